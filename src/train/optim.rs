//! AdamW with a state that can be saved and restored, the learning-rate schedule, and global
//! gradient-norm clipping.
//!
//! The update is candle-nn's `AdamW` (decoupled weight decay, bias-corrected moments). It is
//! written out here because candle-nn keeps the moments private, and a resumed run must
//! continue from the same moments to match an uninterrupted one.

use std::collections::HashMap;
use std::f64::consts::PI;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use super::TrainError;

/// AdamW hyper-parameters other than the learning rate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWParams {
    /// Decay of the first moment.
    pub beta1: f64,
    /// Decay of the second moment.
    pub beta2: f64,
    /// Added to the square root of the second moment.
    pub eps: f64,
    /// Decoupled weight decay per unit of learning rate.
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// AdamW over a fixed list of variables.
pub struct AdamW {
    vars: Vec<Var>,
    first_moments: Vec<Tensor>,
    second_moments: Vec<Tensor>,
    steps: usize,
    params: AdamWParams,
}

impl AdamW {
    /// Creates the optimizer with zero moments.
    pub fn new(vars: Vec<Var>, params: AdamWParams) -> Result<Self, TrainError> {
        let zeros = |var: &Var| var.as_tensor().zeros_like();
        let first_moments = vars.iter().map(zeros).collect::<Result<Vec<_>, _>>()?;
        let second_moments = vars.iter().map(zeros).collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            vars,
            first_moments,
            second_moments,
            steps: 0,
            params,
        })
    }

    /// Returns the number of updates made, restored ones included.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// Applies one update with learning rate `lr`. Variables without a gradient keep their
    /// value and moments.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<(), TrainError> {
        self.steps += 1;
        let AdamWParams {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.params;
        let correction1 = 1.0 / (1.0 - beta1.powi(self.steps as i32));
        let correction2 = 1.0 / (1.0 - beta2.powi(self.steps as i32));
        for (index, var) in self.vars.iter().enumerate() {
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
            let m = ((&self.first_moments[index] * beta1)? + (grad * (1.0 - beta1))?)?;
            let v = ((&self.second_moments[index] * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?;
            let m_hat = (&m * correction1)?;
            let v_hat = (&v * correction2)?;
            let decayed = (var.as_tensor() * (1.0 - lr * weight_decay))?;
            let update = (m_hat / (v_hat.sqrt()? + eps)?)?;
            var.set(&(decayed - (update * lr)?)?)?;
            self.first_moments[index] = m;
            self.second_moments[index] = v;
        }
        Ok(())
    }

    /// Returns the moments as named tensors (`m.{i}`, `v.{i}` in variable order).
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut tensors = HashMap::new();
        for (index, (m, v)) in self
            .first_moments
            .iter()
            .zip(&self.second_moments)
            .enumerate()
        {
            tensors.insert(format!("m.{index}"), m.clone());
            tensors.insert(format!("v.{index}"), v.clone());
        }
        tensors
    }

    /// Restores the moments saved by [`AdamW::state_tensors`] and the update count.
    pub fn restore(
        &mut self,
        mut tensors: HashMap<String, Tensor>,
        steps: usize,
    ) -> Result<(), TrainError> {
        for index in 0..self.vars.len() {
            for (prefix, slot) in [
                ("m", &mut self.first_moments[index]),
                ("v", &mut self.second_moments[index]),
            ] {
                let name = format!("{prefix}.{index}");
                let tensor = tensors.remove(&name).ok_or(TrainError::InvalidRecord {
                    message: format!("optimizer state has no tensor `{name}`"),
                })?;
                if tensor.dims() != slot.dims() {
                    return Err(TrainError::Shape {
                        input: format!("optimizer state `{name}`"),
                        expected: format!("{:?}", slot.dims()),
                        found: tensor.dims().to_vec(),
                    });
                }
                *slot = tensor;
            }
        }
        self.steps = steps;
        Ok(())
    }
}

/// Linear warm-up from 0 to `peak` over `warmup` steps, then cosine decay to 0 at `total`.
/// `step` counts from 0.
pub fn learning_rate(step: usize, total: usize, warmup: usize, peak: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / decay_steps as f64).min(1.0);
    peak * 0.5 * (1.0 + (PI * progress).cos())
}

/// Scales the gradients of `vars` in place so that their global L2 norm is at most `max_norm`,
/// and returns the norm before scaling.
pub fn clip_grad_norm(
    grads: &mut GradStore,
    vars: &[Var],
    max_norm: f64,
) -> Result<f64, TrainError> {
    let mut squared = 0.0f64;
    for var in vars {
        if let Some(grad) = grads.get(var.as_tensor()) {
            squared += f64::from(grad.sqr()?.sum_all()?.to_scalar::<f32>()?);
        }
    }
    let norm = squared.sqrt();
    if norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for var in vars {
            if let Some(grad) = grads.remove(var.as_tensor()) {
                grads.insert(var.as_tensor(), (grad * scale)?);
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_warms_up_then_decays() {
        assert!((learning_rate(0, 100, 10, 1.0) - 0.1).abs() < 1e-12);
        assert!((learning_rate(9, 100, 10, 1.0) - 1.0).abs() < 1e-12);
        assert!((learning_rate(10, 100, 10, 1.0) - 1.0).abs() < 1e-12);
        assert!((learning_rate(55, 100, 10, 1.0) - 0.5).abs() < 1e-12);
        assert!(learning_rate(100, 100, 10, 1.0).abs() < 1e-12);
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let a = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        let b = Var::new(&[3.0f32], &Device::Cpu).unwrap();
        let loss = ((a.as_tensor().sum_all().unwrap() * 3.0).unwrap()
            + (b.as_tensor().sum_all().unwrap() * 4.0).unwrap())
        .unwrap();
        let mut grads = loss.backward().unwrap();
        let vars = [a.clone(), b.clone()];
        let norm = clip_grad_norm(&mut grads, &vars, 1.0).unwrap();
        assert!((norm - (9.0f64 + 9.0 + 16.0).sqrt()).abs() < 1e-5);
        let mut after = 0.0f32;
        for var in &vars {
            after += grads
                .get(var.as_tensor())
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
        }
        assert!((after.sqrt() - 1.0).abs() < 1e-4);
    }

    #[test]
    fn adamw_matches_candle_nn() {
        use candle_nn::Optimizer;
        let init = [0.5f32, -1.0, 2.0];
        let ours = Var::new(&init, &Device::Cpu).unwrap();
        let theirs = Var::new(&init, &Device::Cpu).unwrap();
        let mut our_opt = AdamW::new(vec![ours.clone()], AdamWParams::default()).unwrap();
        let mut their_opt = candle_nn::AdamW::new(
            vec![theirs.clone()],
            candle_nn::ParamsAdamW {
                lr: 0.01,
                weight_decay: 0.0,
                ..Default::default()
            },
        )
        .unwrap();
        for _ in 0..5 {
            let loss = ours.as_tensor().sqr().unwrap().sum_all().unwrap();
            our_opt.step(&loss.backward().unwrap(), 0.01).unwrap();
            let loss = theirs.as_tensor().sqr().unwrap().sum_all().unwrap();
            their_opt.backward_step(&loss).unwrap();
        }
        let ours = ours.as_tensor().to_vec1::<f32>().unwrap();
        let theirs = theirs.as_tensor().to_vec1::<f32>().unwrap();
        for (o, t) in ours.iter().zip(&theirs) {
            assert!((o - t).abs() < 1e-6, "ours {ours:?}, candle-nn {theirs:?}");
        }
    }
}
