//! TFPO losses on candle tensors: subtrajectory balance (SubTB) and value discrimination.
//!
//! For a response `y_1..y_L` with states `s_0..s_L` (`s_0` is the prompt), the flow is
//! `log F(s_t) = log Q(s_t) + log V(s_t)`, where `log Q` accumulates the stage-1 token rewards
//! and `log V` comes from the value head. SubTB requires every subtrajectory `s_m → s_n` to balance:
//!
//! ```text
//! L_SubTB = Σ_{0≤m<n≤L} ( log F(s_n) − log F(s_m) − Σ_{k=m}^{n−1} log π(y_{k+1} | s_k) )²
//! ```
//!
//! With `d_t = log F(s_t) − Σ_{k<t} log π(y_{k+1} | s_k)` every residual is `d_n − d_m`, and
//! for `N = L + 1` states the double sum equals `N · Σ_t (d_t − mean d)²`.
//! [`subtb_closed_form`] uses that identity. [`subtb_brute_force`] evaluates the double sum and
//! exists to check it. Both divide by the number of pairs `N(N−1)/2`, so long responses do not
//! outweigh short ones.
//!
//! Every function here is differentiable with candle's autograd and works in any float dtype:
//! training uses f32, and the gradient checks use f64.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::TrainError;

/// Weights of the TFPO loss terms.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossParams {
    /// `γ`, the margin by which `log V` of the chosen branch should exceed the rejected one.
    pub gamma: f64,
    /// `λ`, the weight of the value-discrimination term against SubTB.
    pub lambda: f64,
}

impl Default for LossParams {
    fn default() -> Self {
        Self {
            gamma: 0.1,
            lambda: 0.1,
        }
    }
}

/// The per-state inputs of SubTB for one response of `L` tokens.
#[derive(Clone, Copy, Debug)]
pub struct Trajectory<'a> {
    /// `log Q(s_t)` for `t = 0..=L`, shape `(L+1,)`, with `log Q(s_0) = 0`. Usually a constant
    /// built with [`cumulative_log_q`](super::rewards::cumulative_log_q).
    pub log_q: &'a Tensor,
    /// `log V(s_t)` from the value head, shape `(L+1,)`.
    pub log_v: &'a Tensor,
    /// The doctor's `log π(y_{t+1} | s_t)` for each response token, shape `(L,)`.
    pub log_pi: &'a Tensor,
}

/// Computes the normalised SubTB loss in `O(L)` residuals from the closed form
/// `2 · Σ_t (d_t − mean d)² / (N − 1)`, which is `N · Σ_t (d_t − mean d)²` over `N(N−1)/2` pairs.
///
/// Shapes: `log_q (L+1,)`, `log_v (L+1,)`, `log_pi (L,)` → scalar. Fails when `L = 0`, because
/// a single state has no subtrajectory.
pub fn subtb_closed_form(
    log_q: &Tensor,
    log_v: &Tensor,
    log_pi: &Tensor,
) -> Result<Tensor, TrainError> {
    let states = check_trajectory(log_q, log_v, log_pi)?;
    let offsets = balance_offsets(log_q, log_v, log_pi)?; // (N,)
    let centered = offsets.broadcast_sub(&offsets.mean_all()?)?; // (N,)
    let sum_of_squares = centered.sqr()?.sum_all()?;
    Ok(sum_of_squares.affine(2.0 / (states - 1) as f64, 0.0)?)
}

/// Computes the normalised SubTB loss from its definition, with one residual per pair
/// `m < n`. This is `O(L²)` tensor operations and serves as the reference in tests.
///
/// Shapes: `log_q (L+1,)`, `log_v (L+1,)`, `log_pi (L,)` → scalar. Fails when `L = 0`.
pub fn subtb_brute_force(
    log_q: &Tensor,
    log_v: &Tensor,
    log_pi: &Tensor,
) -> Result<Tensor, TrainError> {
    let states = check_trajectory(log_q, log_v, log_pi)?;
    let log_flow = (log_q + log_v)?; // (N,)
    let mut residuals = Vec::with_capacity(states * (states - 1) / 2);
    for m in 0..states {
        for n in m + 1..states {
            let path_log_prob = log_pi.narrow(0, m, n - m)?.sum_all()?;
            let residual = ((log_flow.get(n)? - log_flow.get(m)?)? - path_log_prob)?;
            residuals.push(residual);
        }
    }
    let pairs = residuals.len();
    let residuals = Tensor::stack(&residuals, 0)?; // (pairs,)
    Ok(residuals
        .sqr()?
        .sum_all()?
        .affine(1.0 / pairs as f64, 0.0)?)
}

/// Computes the value-discrimination hinge `max(0, γ − (log_v_w − log_v_l))` element by element.
///
/// `log_v_w` is `log V` after the chosen response's first diverging token, `log_v_l` after the
/// rejected one's. Shapes: two equal shapes in, the same shape out.
pub fn value_hinge(log_v_w: &Tensor, log_v_l: &Tensor, gamma: f64) -> Result<Tensor, TrainError> {
    if log_v_w.dims() != log_v_l.dims() {
        return Err(TrainError::Shape {
            input: "log_v_l".into(),
            expected: format!("{:?}, the shape of log_v_w", log_v_w.dims()),
            found: log_v_l.dims().to_vec(),
        });
    }
    Ok((log_v_l - log_v_w)?.affine(1.0, gamma)?.relu()?)
}

/// Combines the terms as `subtb + λ · value`, or returns `subtb` alone when the pair has no
/// value term (see [`divergence_point`]).
///
/// Shapes: `subtb` and `value` are equal shapes, usually scalars.
pub fn tfpo_loss(
    subtb: &Tensor,
    value: Option<&Tensor>,
    params: &LossParams,
) -> Result<Tensor, TrainError> {
    match value {
        Some(value) => Ok((subtb + value.affine(params.lambda, 0.0)?)?),
        None => Ok(subtb.clone()),
    }
}

/// Computes the TFPO loss of one preference pair: the SubTB of both responses plus `λ` times
/// the value hinge at their divergence point.
///
/// `divergence` is [`divergence_point`] of the two responses' token ids. When it is `Some(k)`,
/// the hinge compares `log V` of the states after token `k` of each response, which are
/// `chosen.log_v[k + 1]` and `rejected.log_v[k + 1]`. When it is `None`, the pair has no
/// diverging next token and only the SubTB terms count. Returns a scalar.
pub fn pair_tfpo_loss(
    chosen: Trajectory<'_>,
    rejected: Trajectory<'_>,
    divergence: Option<usize>,
    params: &LossParams,
) -> Result<Tensor, TrainError> {
    let subtb_chosen = subtb_closed_form(chosen.log_q, chosen.log_v, chosen.log_pi)?;
    let subtb_rejected = subtb_closed_form(rejected.log_q, rejected.log_v, rejected.log_pi)?;
    let subtb = (subtb_chosen + subtb_rejected)?;
    let value = match divergence {
        Some(index) => {
            for (side, trajectory) in [("chosen", &chosen), ("rejected", &rejected)] {
                let states = trajectory.log_v.dim(0)?;
                if index + 1 >= states {
                    return Err(TrainError::Shape {
                        input: format!("{side} log_v"),
                        expected: format!(
                            "at least {} states for divergence point {index}",
                            index + 2
                        ),
                        found: trajectory.log_v.dims().to_vec(),
                    });
                }
            }
            let log_v_w = chosen.log_v.get(index + 1)?;
            let log_v_l = rejected.log_v.get(index + 1)?;
            Some(value_hinge(&log_v_w, &log_v_l, params.gamma)?)
        }
        None => None,
    };
    tfpo_loss(&subtb, value.as_ref(), params)
}

/// Returns the index of the first token where the two responses differ, which is also the
/// length of their common prefix.
///
/// Returns `None` when the responses are identical or one is a prefix of the other. No state
/// then has a diverging next token in both responses, so the caller skips the value hinge for
/// that pair and keeps its SubTB terms.
pub fn divergence_point(chosen_ids: &[u32], rejected_ids: &[u32]) -> Option<usize> {
    let common = chosen_ids
        .iter()
        .zip(rejected_ids)
        .take_while(|(chosen, rejected)| chosen == rejected)
        .count();
    (common < chosen_ids.len() && common < rejected_ids.len()).then_some(common)
}

/// Computes `d_t = log F(s_t) − Σ_{k<t} log π(y_{k+1} | s_k)` for `t = 0..=L`.
///
/// Shapes: `log_q (L+1,)`, `log_v (L+1,)`, `log_pi (L,)` → `(L+1,)`.
fn balance_offsets(log_q: &Tensor, log_v: &Tensor, log_pi: &Tensor) -> Result<Tensor, TrainError> {
    let log_flow = (log_q + log_v)?; // (L+1,)

    // NOTE: candle's cumsum multiplies by an (L, L) triangular matrix, so this prefix sum
    // costs O(L²) flops in one kernel, which is small next to the forward pass at response
    // lengths in the thousands.
    let prefix = log_pi.cumsum(0)?; // (L,)
    let start = Tensor::zeros(1, log_pi.dtype(), log_pi.device())?; // (1,)
    let prefix = Tensor::cat(&[&start, &prefix], 0)?; // (L+1,)
    Ok((log_flow - prefix)?)
}

/// Checks the SubTB input shapes and returns the number of states `N = L + 1`.
fn check_trajectory(log_q: &Tensor, log_v: &Tensor, log_pi: &Tensor) -> Result<usize, TrainError> {
    let tokens = vector_len("log_pi", log_pi, "(L,)")?;
    if tokens == 0 {
        return Err(TrainError::EmptyResponse {
            computation: "subtrajectory balance",
        });
    }
    let states = tokens + 1;
    let expected = format!("({states},), one more than log_pi");
    for (input, tensor) in [("log_q", log_q), ("log_v", log_v)] {
        if vector_len(input, tensor, &expected)? != states {
            return Err(TrainError::Shape {
                input: input.into(),
                expected,
                found: tensor.dims().to_vec(),
            });
        }
    }
    Ok(states)
}

fn vector_len(input: &str, tensor: &Tensor, expected: &str) -> Result<usize, TrainError> {
    match tensor.dims() {
        [len] => Ok(*len),
        dims => Err(TrainError::Shape {
            input: input.into(),
            expected: expected.into(),
            found: dims.to_vec(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random_vector(rng: &mut ChaCha8Rng, len: usize, scale: f64) -> Vec<f64> {
        (0..len).map(|_| rng.gen_range(-scale..scale)).collect()
    }

    fn tensor(values: &[f64]) -> Tensor {
        Tensor::new(values, &Device::Cpu).unwrap()
    }

    fn scalar(t: &Tensor) -> f64 {
        t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
    }

    fn assert_relative(found: f64, expected: f64, tolerance: f64, label: &str) {
        let scale = found.abs().max(expected.abs()).max(1e-12);
        let error = (found - expected).abs() / scale;
        assert!(
            error <= tolerance,
            "{label}: found {found}, expected {expected}, relative error {error}"
        );
    }

    #[test]
    fn closed_form_matches_brute_force() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for tokens in [1, 2, 5, 37] {
            for dtype in [DType::F32, DType::F64] {
                let log_q = tensor(&random_vector(&mut rng, tokens + 1, 3.0))
                    .to_dtype(dtype)
                    .unwrap();
                let log_v = tensor(&random_vector(&mut rng, tokens + 1, 2.0))
                    .to_dtype(dtype)
                    .unwrap();
                let log_pi: Vec<f64> = random_vector(&mut rng, tokens, 4.0)
                    .iter()
                    .map(|x| -x.abs())
                    .collect();
                let log_pi = tensor(&log_pi).to_dtype(dtype).unwrap();
                let closed = scalar(&subtb_closed_form(&log_q, &log_v, &log_pi).unwrap());
                let brute = scalar(&subtb_brute_force(&log_q, &log_v, &log_pi).unwrap());
                assert_relative(closed, brute, 1e-5, &format!("L = {tokens}, {dtype:?}"));
            }
        }
    }

    #[test]
    fn subtb_hand_computed() {
        // L = 1: d_0 = 0 + 0.5, d_1 = 1 + 0.25 − (−0.5) = 1.75, one pair, loss = 1.25² = 1.5625.
        let loss = subtb_closed_form(
            &tensor(&[0.0, 1.0]),
            &tensor(&[0.5, 0.25]),
            &tensor(&[-0.5]),
        )
        .unwrap();
        assert_relative(scalar(&loss), 1.5625, 1e-12, "L = 1");
    }

    #[test]
    fn subtb_zero_when_balanced() {
        // log V chosen so that log F(s_t) = Σ_{k<t} log π, which balances every subtrajectory.
        let log_q = tensor(&[0.0, 0.3, 0.3, -0.2]);
        let log_pi = tensor(&[-1.0, -0.5, -2.0]);
        let log_v = tensor(&[0.0, -1.3, -1.8, -3.3]);
        let loss = subtb_closed_form(&log_q, &log_v, &log_pi).unwrap();
        assert!(scalar(&loss).abs() < 1e-12);
    }

    #[test]
    fn subtb_rejects_bad_shapes() {
        let err = subtb_closed_form(&tensor(&[0.0]), &tensor(&[0.0]), &tensor(&[])).unwrap_err();
        assert!(matches!(err, TrainError::EmptyResponse { .. }));
        let err =
            subtb_closed_form(&tensor(&[0.0, 0.0]), &tensor(&[0.0]), &tensor(&[-1.0])).unwrap_err();
        assert!(matches!(err, TrainError::Shape { ref input, .. } if input == "log_v"));
        let matrix = Tensor::zeros((2, 1), DType::F64, &Device::Cpu).unwrap();
        let err =
            subtb_closed_form(&tensor(&[0.0, 0.0]), &tensor(&[0.0, 0.0]), &matrix).unwrap_err();
        assert!(matches!(err, TrainError::Shape { ref input, .. } if input == "log_pi"));
    }

    #[test]
    fn hinge_is_zero_past_margin() {
        let active = value_hinge(&tensor(&[0.0, 1.0]), &tensor(&[0.5, 0.95]), 0.1).unwrap();
        let values = active.to_vec1::<f64>().unwrap();
        assert_relative(values[0], 0.6, 1e-12, "w below l");
        assert_relative(values[1], 0.05, 1e-12, "w above l by less than γ");
        let inactive = value_hinge(&tensor(&[1.0]), &tensor(&[0.0]), 0.1).unwrap();
        assert_eq!(inactive.to_vec1::<f64>().unwrap(), vec![0.0]);
    }

    #[test]
    fn tfpo_loss_weights_value_term() {
        let subtb = tensor(&[2.0]);
        let value = tensor(&[0.5]);
        let params = LossParams::default();
        let with_value = tfpo_loss(&subtb, Some(&value), &params).unwrap();
        assert_relative(
            with_value.to_vec1::<f64>().unwrap()[0],
            2.05,
            1e-12,
            "λ = 0.1",
        );
        let without = tfpo_loss(&subtb, None, &params).unwrap();
        assert_eq!(without.to_vec1::<f64>().unwrap(), vec![2.0]);
    }

    #[test]
    fn divergence_point_cases() {
        assert_eq!(divergence_point(&[1, 2, 3], &[1, 2, 4]), Some(2));
        assert_eq!(divergence_point(&[5], &[6, 7]), Some(0));
        assert_eq!(divergence_point(&[1, 2], &[1, 2, 3]), None);
        assert_eq!(divergence_point(&[1, 2], &[1, 2]), None);
        assert_eq!(divergence_point(&[], &[1]), None);
    }

    /// Estimates the derivative of `loss` with respect to `values[which][index]` by a central
    /// difference.
    fn finite_difference(
        loss: &dyn Fn(&[Vec<f64>]) -> f64,
        values: &[Vec<f64>],
        which: usize,
        index: usize,
    ) -> f64 {
        let step = 1e-6;
        let mut plus = values.to_vec();
        plus[which][index] += step;
        let mut minus = values.to_vec();
        minus[which][index] -= step;
        (loss(&plus) - loss(&minus)) / (2.0 * step)
    }

    #[test]
    fn pair_loss_gradients_match_finite_differences() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (chosen_len, rejected_len) = (6, 4);
        let chosen_q = tensor(&random_vector(&mut rng, chosen_len + 1, 1.0));
        let rejected_q = tensor(&random_vector(&mut rng, rejected_len + 1, 1.0));
        // Order: chosen log V, chosen log π, rejected log V, rejected log π.
        let mut values = vec![
            random_vector(&mut rng, chosen_len + 1, 1.0),
            random_vector(&mut rng, chosen_len, 2.0),
            random_vector(&mut rng, rejected_len + 1, 1.0),
            random_vector(&mut rng, rejected_len, 2.0),
        ];
        // Keep the hinge active, away from its kink: log V_w − log V_l = −0.5 at the
        // divergence point, state 3.
        values[0][3] = 0.0;
        values[2][3] = 0.5;
        let divergence = Some(2);
        let params = LossParams::default();

        let evaluate = |values: &[Vec<f64>]| -> Tensor {
            let tensors: Vec<Tensor> = values.iter().map(|v| tensor(v)).collect();
            compute_pair(&tensors, &chosen_q, &rejected_q, divergence, &params)
        };
        let vars: Vec<Var> = values
            .iter()
            .map(|v| Var::from_tensor(&tensor(v)).unwrap())
            .collect();
        let var_tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let loss = compute_pair(&var_tensors, &chosen_q, &rejected_q, divergence, &params);
        let grads = loss.backward().unwrap();

        let loss_value = |values: &[Vec<f64>]| scalar(&evaluate(values));
        for (which, var) in vars.iter().enumerate() {
            let grad = grads
                .get(var.as_tensor())
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for (index, &analytic) in grad.iter().enumerate() {
                let numeric = finite_difference(&loss_value, &values, which, index);
                if analytic.abs().max(numeric.abs()) < 1e-9 {
                    continue;
                }
                assert_relative(
                    analytic,
                    numeric,
                    1e-3,
                    &format!("input {which}, element {index}"),
                );
            }
        }
        // The hinge is active, so it pushes the two diverging states' log V apart.
        let chosen_v_grad = grads
            .get(vars[0].as_tensor())
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let without_hinge = subtb_closed_form(&chosen_q, vars[0].as_tensor(), vars[1].as_tensor())
            .unwrap()
            .backward()
            .unwrap();
        let subtb_only = without_hinge
            .get(vars[0].as_tensor())
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert_relative(
            chosen_v_grad[3] - subtb_only[3],
            -params.lambda,
            1e-9,
            "hinge gradient on chosen log V",
        );
    }

    fn compute_pair(
        tensors: &[Tensor],
        chosen_q: &Tensor,
        rejected_q: &Tensor,
        divergence: Option<usize>,
        params: &LossParams,
    ) -> Tensor {
        let chosen = Trajectory {
            log_q: chosen_q,
            log_v: &tensors[0],
            log_pi: &tensors[1],
        };
        let rejected = Trajectory {
            log_q: rejected_q,
            log_v: &tensors[2],
            log_pi: &tensors[3],
        };
        pair_tfpo_loss(chosen, rejected, divergence, params).unwrap()
    }

    #[test]
    fn pair_loss_rejects_divergence_past_end() {
        let q = tensor(&[0.0, 0.0]);
        let v = tensor(&[0.0, 0.0]);
        let pi = tensor(&[-1.0]);
        let trajectory = Trajectory {
            log_q: &q,
            log_v: &v,
            log_pi: &pi,
        };
        let err =
            pair_tfpo_loss(trajectory, trajectory, Some(1), &LossParams::default()).unwrap_err();
        assert!(matches!(err, TrainError::Shape { .. }));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn closed_form_equals_double_sum(
            values in (1usize..24).prop_flat_map(|tokens| (
                prop::collection::vec(-5.0f64..5.0, tokens + 1),
                prop::collection::vec(-5.0f64..5.0, tokens + 1),
                prop::collection::vec(-10.0f64..0.0, tokens),
            ))
        ) {
            let (log_q, log_v, log_pi) = values;
            let (log_q, log_v, log_pi) = (tensor(&log_q), tensor(&log_v), tensor(&log_pi));
            let closed = scalar(&subtb_closed_form(&log_q, &log_v, &log_pi).unwrap());
            let brute = scalar(&subtb_brute_force(&log_q, &log_v, &log_pi).unwrap());
            let scale = closed.abs().max(brute.abs()).max(1e-9);
            prop_assert!(
                (closed - brute).abs() / scale <= 1e-9,
                "closed form {} but double sum {}",
                closed,
                brute
            );
        }
    }
}
