//! The value head: a two-layer MLP that maps the doctor's last hidden state to `log V`.
//!
//! `log V(s) = W₂ · silu(W₀ · h + b₀) + b₂`, with `h` the hidden state at the last position of
//! `s`. The head exists only during training, where it supplies the `log V` terms of the flow.
//!
//! Checkpoints are safetensors files, by convention named [`ValueHead::FILE_NAME`], with the
//! tensor names PyTorch gives an `nn.Sequential(Linear, SiLU, Linear)` called `value_head`:
//!
//! | name | shape |
//! | --- | --- |
//! | `value_head.0.weight` | `(inner, hidden)` |
//! | `value_head.0.bias` | `(inner,)` |
//! | `value_head.2.weight` | `(1, inner)` |
//! | `value_head.2.bias` | `(1,)` |

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;

use super::TrainError;

const FIRST_WEIGHT: &str = "value_head.0.weight";
const FIRST_BIAS: &str = "value_head.0.bias";
const SECOND_WEIGHT: &str = "value_head.2.weight";
const SECOND_BIAS: &str = "value_head.2.bias";

/// The sizes of a value head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ValueHeadDims {
    /// The width of the hidden states it reads, the model's `hidden_size`.
    pub hidden: usize,
    /// The width of its inner layer.
    pub inner: usize,
}

/// A trainable MLP from hidden states to `log V`. Its weights are [`Var`]s, so an optimizer
/// that updates them in place updates the head, and a clone shares the weights.
#[derive(Clone, Debug)]
pub struct ValueHead {
    dims: ValueHeadDims,
    /// `(inner, hidden)`
    first_weight: Var,
    /// `(inner,)`
    first_bias: Var,
    /// `(1, inner)`
    second_weight: Var,
    /// `(1,)`
    second_bias: Var,
}

impl ValueHead {
    /// The conventional checkpoint file name.
    pub const FILE_NAME: &'static str = "value_head.safetensors";

    /// Creates a head with PyTorch's default `Linear` initialisation: every weight and bias is
    /// drawn uniformly from `±1/√fan_in`. Appends its four variables to `vars`.
    pub fn new(
        dims: ValueHeadDims,
        dtype: DType,
        device: &Device,
        vars: &mut Vec<Var>,
        rng: &mut impl Rng,
    ) -> Result<Self, TrainError> {
        if dims.hidden == 0 || dims.inner == 0 {
            return Err(TrainError::InvalidParam {
                name: if dims.hidden == 0 { "hidden" } else { "inner" },
                value: 0.0,
                expected: "value head widths must be at least 1",
            });
        }
        let mut uniform = |shape: &[usize], fan_in: usize| -> Result<Var, TrainError> {
            let bound = 1.0 / (fan_in as f64).sqrt();
            let count = shape.iter().product();
            let values: Vec<f64> = (0..count).map(|_| rng.gen_range(-bound..bound)).collect();
            let tensor = Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?;
            Ok(Var::from_tensor(&tensor)?)
        };
        let head = Self {
            dims,
            first_weight: uniform(&[dims.inner, dims.hidden], dims.hidden)?,
            first_bias: uniform(&[dims.inner], dims.hidden)?,
            second_weight: uniform(&[1, dims.inner], dims.inner)?,
            second_bias: uniform(&[1], dims.inner)?,
        };
        vars.extend(head.vars());
        Ok(head)
    }

    /// Returns the head's sizes.
    pub fn dims(&self) -> ValueHeadDims {
        self.dims
    }

    /// Returns the head's variables, in checkpoint order.
    pub fn vars(&self) -> [Var; 4] {
        [
            self.first_weight.clone(),
            self.first_bias.clone(),
            self.second_weight.clone(),
            self.second_bias.clone(),
        ]
    }

    /// Computes `log V` for each position.
    ///
    /// Shapes: `hidden_states (positions, hidden)` → `(positions,)`. Inputs in another dtype are
    /// converted to the head's dtype, and the conversion is differentiable.
    pub fn forward(&self, hidden_states: &Tensor) -> Result<Tensor, TrainError> {
        let hidden = match hidden_states.dims() {
            [_, hidden] => *hidden,
            dims => {
                return Err(TrainError::Shape {
                    input: "value head input".into(),
                    expected: format!("(positions, {})", self.dims.hidden),
                    found: dims.to_vec(),
                })
            }
        };
        if hidden != self.dims.hidden {
            return Err(TrainError::Shape {
                input: "value head input".into(),
                expected: format!("(positions, {})", self.dims.hidden),
                found: hidden_states.dims().to_vec(),
            });
        }
        let x = hidden_states.to_dtype(self.first_weight.dtype())?;
        let x = x
            .matmul(&self.first_weight.t()?)? // (positions, inner)
            .broadcast_add(&self.first_bias)?
            .silu()?;
        let log_v = x
            .matmul(&self.second_weight.t()?)? // (positions, 1)
            .broadcast_add(&self.second_bias)?;
        Ok(log_v.squeeze(1)?) // (positions,)
    }

    /// Writes the head to a safetensors file under the names in the module documentation.
    pub fn save(&self, path: &Path) -> Result<(), TrainError> {
        let names = [FIRST_WEIGHT, FIRST_BIAS, SECOND_WEIGHT, SECOND_BIAS];
        let tensors: HashMap<&str, Tensor> = names
            .into_iter()
            .zip(self.vars())
            .map(|(name, var)| (name, var.as_tensor().clone()))
            .collect();
        candle_core::safetensors::save(&tensors, path).map_err(|err| TrainError::Checkpoint {
            path: path.to_owned(),
            message: err.to_string(),
        })
    }

    /// Reads a head from a safetensors file, converting its tensors to `dtype`. The sizes come
    /// from the file. Appends the head's four variables to `vars`.
    pub fn load(
        path: &Path,
        dtype: DType,
        device: &Device,
        vars: &mut Vec<Var>,
    ) -> Result<Self, TrainError> {
        let mut tensors =
            candle_core::safetensors::load(path, device).map_err(|err| TrainError::Checkpoint {
                path: path.to_owned(),
                message: err.to_string(),
            })?;
        let mut take = |name: &str| -> Result<Tensor, TrainError> {
            tensors
                .remove(name)
                .ok_or_else(|| TrainError::MissingTensor {
                    name: name.to_owned(),
                    path: path.to_owned(),
                })
        };
        let first_weight = take(FIRST_WEIGHT)?;
        let first_bias = take(FIRST_BIAS)?;
        let second_weight = take(SECOND_WEIGHT)?;
        let second_bias = take(SECOND_BIAS)?;

        let dims = match first_weight.dims() {
            [inner, hidden] => ValueHeadDims {
                hidden: *hidden,
                inner: *inner,
            },
            found => {
                return Err(TrainError::Shape {
                    input: format!("`{FIRST_WEIGHT}` in `{}`", path.display()),
                    expected: "(inner, hidden)".into(),
                    found: found.to_vec(),
                })
            }
        };
        let expected: [(&str, &Tensor, Vec<usize>); 3] = [
            (FIRST_BIAS, &first_bias, vec![dims.inner]),
            (SECOND_WEIGHT, &second_weight, vec![1, dims.inner]),
            (SECOND_BIAS, &second_bias, vec![1]),
        ];
        for (name, tensor, shape) in expected {
            if tensor.dims() != shape.as_slice() {
                return Err(TrainError::Shape {
                    input: format!("`{name}` in `{}`", path.display()),
                    expected: format!("{shape:?}"),
                    found: tensor.dims().to_vec(),
                });
            }
        }

        let var = |tensor: Tensor| -> Result<Var, TrainError> {
            Ok(Var::from_tensor(&tensor.to_dtype(dtype)?)?)
        };
        let head = Self {
            dims,
            first_weight: var(first_weight)?,
            first_bias: var(first_bias)?,
            second_weight: var(second_weight)?,
            second_bias: var(second_bias)?,
        };
        vars.extend(head.vars());
        Ok(head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    const DIMS: ValueHeadDims = ValueHeadDims {
        hidden: 5,
        inner: 4,
    };

    fn head(dtype: DType, vars: &mut Vec<Var>) -> ValueHead {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        ValueHead::new(DIMS, dtype, &Device::Cpu, vars, &mut rng).unwrap()
    }

    fn random_matrix(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> Tensor {
        let values: Vec<f64> = (0..rows * cols).map(|_| rng.gen_range(-2.0..2.0)).collect();
        Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap()
    }

    #[test]
    fn forward_maps_positions_to_scalars() {
        let mut vars = Vec::new();
        let head = head(DType::F32, &mut vars);
        assert_eq!(vars.len(), 4);
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let hidden = random_matrix(&mut rng, 3, DIMS.hidden);
        let log_v = head.forward(&hidden).unwrap();
        assert_eq!(log_v.dims(), &[3]);
        assert_eq!(log_v.dtype(), DType::F32);
    }

    #[test]
    fn forward_rejects_wrong_width() {
        let head = head(DType::F32, &mut Vec::new());
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let err = head.forward(&random_matrix(&mut rng, 3, 6)).unwrap_err();
        assert!(err.to_string().contains("expected (positions, 5)"), "{err}");
        let vector = Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(
            head.forward(&vector),
            Err(TrainError::Shape { .. })
        ));
    }

    #[test]
    fn save_and_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(ValueHead::FILE_NAME);
        let head = head(DType::F32, &mut Vec::new());
        head.save(&path).unwrap();

        let names = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let mut names: Vec<&str> = names.keys().map(String::as_str).collect();
        names.sort();
        assert_eq!(
            names,
            vec![FIRST_BIAS, FIRST_WEIGHT, SECOND_BIAS, SECOND_WEIGHT]
        );

        let mut vars = Vec::new();
        let loaded = ValueHead::load(&path, DType::F32, &Device::Cpu, &mut vars).unwrap();
        assert_eq!(loaded.dims(), DIMS);
        assert_eq!(vars.len(), 4);
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let hidden = random_matrix(&mut rng, 2, DIMS.hidden);
        assert_eq!(
            head.forward(&hidden).unwrap().to_vec1::<f32>().unwrap(),
            loaded.forward(&hidden).unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn load_reports_missing_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(ValueHead::FILE_NAME);
        let mut tensors = HashMap::new();
        tensors.insert(
            FIRST_WEIGHT,
            Tensor::zeros((4, 5), DType::F32, &Device::Cpu).unwrap(),
        );
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let err = ValueHead::load(&path, DType::F32, &Device::Cpu, &mut Vec::new()).unwrap_err();
        assert!(matches!(err, TrainError::MissingTensor { ref name, .. } if name == FIRST_BIAS));
    }

    #[test]
    fn load_reports_inconsistent_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(ValueHead::FILE_NAME);
        let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
        let tensors = HashMap::from([
            (FIRST_WEIGHT, zeros(&[4, 5])),
            (FIRST_BIAS, zeros(&[4])),
            (SECOND_WEIGHT, zeros(&[1, 3])),
            (SECOND_BIAS, zeros(&[1])),
        ]);
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let err = ValueHead::load(&path, DType::F32, &Device::Cpu, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("value_head.2.weight"), "{err}");
    }

    #[test]
    fn new_rejects_zero_width() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let dims = ValueHeadDims {
            hidden: 0,
            inner: 4,
        };
        let err = ValueHead::new(dims, DType::F32, &Device::Cpu, &mut Vec::new(), &mut rng);
        assert!(matches!(
            err,
            Err(TrainError::InvalidParam { name: "hidden", .. })
        ));
    }

    /// `Σ_p c_p · log V_p` for fixed coefficients `c`, a scalar that depends on every weight.
    fn weighted_output(head: &ValueHead, hidden: &Tensor, coefficients: &Tensor) -> Tensor {
        (head.forward(hidden).unwrap() * coefficients)
            .unwrap()
            .sum_all()
            .unwrap()
    }

    #[test]
    fn gradients_match_finite_differences() {
        let mut vars = Vec::new();
        let head = head(DType::F64, &mut vars);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let hidden = Var::from_tensor(&random_matrix(&mut rng, 3, DIMS.hidden)).unwrap();
        let coefficients = Tensor::new(&[1.0f64, -0.5, 2.0], &Device::Cpu).unwrap();
        vars.push(hidden.clone());

        let grads = weighted_output(&head, hidden.as_tensor(), &coefficients)
            .backward()
            .unwrap();
        let step = 1e-6;
        for (which, var) in vars.iter().enumerate() {
            let shape = var.dims().to_vec();
            let original = var.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let analytic = grads
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for index in 0..original.len() {
                let evaluate_at = |offset: f64| {
                    let mut values = original.clone();
                    values[index] += offset;
                    var.set(&Tensor::from_vec(values, shape.as_slice(), &Device::Cpu).unwrap())
                        .unwrap();
                    let output = weighted_output(&head, hidden.as_tensor(), &coefficients);
                    output.to_scalar::<f64>().unwrap()
                };
                let numeric = (evaluate_at(step) - evaluate_at(-step)) / (2.0 * step);
                evaluate_at(0.0);
                let scale = analytic[index].abs().max(numeric.abs());
                if scale < 1e-9 {
                    continue;
                }
                let error = (analytic[index] - numeric).abs() / scale;
                assert!(
                    error <= 1e-3,
                    "variable {which}, element {index}: analytic {}, numeric {numeric}",
                    analytic[index]
                );
            }
        }
    }
}
