//! Reading weights from GGUF and safetensors files, and the linear layer they become.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use super::qgemm::{QuantMatrix, NATIVE_TYPES};
use super::ModelError;

/// The in-memory format of the weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    /// Keep GGUF quantised blocks and run quantised matmuls (serving).
    Quantized(QuantPolicy),
    /// Dequantise everything to dense f32 (training, which needs gradients through the base).
    Dense,
}

/// The treatment of quantised types that have no batched kernel of ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantPolicy {
    /// Keep every tensor in its stored type. Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and Q3_K to Q6_K use
    /// the batched CPU kernels of [`super::qgemm`]. Q2_K uses candle's, which re-read the
    /// weights for every row.
    AsStored,
    /// Also requantise Q2_K to Q8_0 at load, so that every quantised matrix runs on the batched
    /// kernels. This trades weight memory (8.5 bits per weight) for batched speed, and adds a
    /// small rounding step.
    FastTypes,
    /// Requantise every block type other than Q8_0 to Q8_0, Q4_0 and Q4_1 included. This
    /// compares the 4-bit kernels with the 8-bit one on the same model.
    AllQ8_0,
}

/// Options for loading a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// The in-memory format of the weights.
    pub format: WeightFormat,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            format: WeightFormat::Quantized(QuantPolicy::FastTypes),
        }
    }
}

/// The weight of a [`Linear`].
#[derive(Clone, Debug)]
enum LinearWeight {
    /// candle's kernels: dense tensors and quantised types without a kernel of ours.
    Candle(QMatMul),
    /// A type with a batched CPU kernel in [`super::qgemm`].
    Batched(Arc<QuantMatrix>),
}

/// A linear layer `y = x·Wᵀ + b` over a quantised or dense weight of shape `(out, in)`.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    in_features: usize,
    out_features: usize,
}

impl Linear {
    /// Wraps a dense `(out, in)` f32 weight.
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Result<Self, ModelError> {
        let (out_features, in_features) = weight.dims2()?;
        Ok(Self {
            weight: LinearWeight::Candle(QMatMul::Tensor(weight)),
            bias,
            in_features,
            out_features,
        })
    }

    /// Wraps a quantised `(out, in)` weight. Q8_0, Q4_0 and Q4_1 weights on the CPU use the
    /// batched kernel of [`super::qgemm`]. Other types use candle's.
    pub fn quantized(weight: Arc<QTensor>, bias: Option<Tensor>) -> Result<Self, ModelError> {
        let (out_features, in_features) = weight.shape().dims2()?;
        let on_cpu = matches!(weight.device(), Device::Cpu);
        let kernel = if on_cpu {
            QuantMatrix::from_qtensor(&weight).map(|m| LinearWeight::Batched(Arc::new(m)))
        } else {
            None
        };
        let weight = match kernel {
            Some(kernel) => kernel,
            None => LinearWeight::Candle(QMatMul::from_arc(weight)?),
        };
        Ok(Self {
            weight,
            bias,
            in_features,
            out_features,
        })
    }

    /// `(tokens, in) -> (tokens, out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        let y = match &self.weight {
            LinearWeight::Candle(weight) => weight.forward(x)?,
            LinearWeight::Batched(matrix) => {
                let (rows, _) = x.dims2()?;
                let host: Vec<f32> = x.flatten_all()?.to_vec1()?;
                let out = matrix.matmul(&host, rows);
                Tensor::from_vec(out, (rows, self.out_features), x.device())?
            }
        };
        Ok(match &self.bias {
            Some(bias) => y.broadcast_add(bias)?,
            None => y,
        })
    }

    /// Applies several layers to the same input, such as q, k and v. When all of them use the
    /// batched kernel and have no bias, one [`QuantMatrix::matmul_many`] call serves them all.
    /// Otherwise each layer runs on its own. The results equal [`Linear::forward`]'s either way.
    pub fn forward_many(linears: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>, ModelError> {
        let matrices: Option<Vec<&QuantMatrix>> = linears
            .iter()
            .map(|linear| match (&linear.weight, &linear.bias) {
                (LinearWeight::Batched(matrix), None) => Some(matrix.as_ref()),
                _ => None,
            })
            .collect();
        let shared_input = |m: &Vec<&QuantMatrix>| {
            m.len() > 1 && m.iter().all(|q| q.in_features() == m[0].in_features())
        };
        let Some(matrices) = matrices.filter(shared_input) else {
            return linears.iter().map(|linear| linear.forward(x)).collect();
        };
        let (rows, _) = x.dims2()?;
        let host: Vec<f32> = x.flatten_all()?.to_vec1()?;
        QuantMatrix::matmul_many(&matrices, &host, rows)
            .into_iter()
            .zip(linears)
            .map(|(out, linear)| {
                Ok(Tensor::from_vec(
                    out,
                    (rows, linear.out_features),
                    x.device(),
                )?)
            })
            .collect()
    }

    /// Input width.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Returns the weight as a dense f32 `(out, in)` tensor.
    pub fn dense_weight(&self) -> Result<Tensor, ModelError> {
        Ok(match &self.weight {
            LinearWeight::Candle(QMatMul::QTensor(q)) => q.dequantize(&q.device())?,
            LinearWeight::Candle(QMatMul::Tensor(w)) => w.clone(),
            LinearWeight::Candle(QMatMul::TensorF16(w)) => w.to_dtype(DType::F32)?,
            LinearWeight::Batched(matrix) => Tensor::from_vec(
                matrix.dequantize(),
                (self.out_features, self.in_features),
                &Device::Cpu,
            )?,
        })
    }
}

/// The token embedding table, quantised or dense, `(vocab, hidden)`.
#[derive(Clone, Debug)]
pub enum Embedding {
    /// Quantised rows, dequantised on lookup.
    Quantized(Arc<QTensor>),
    /// Dense f32 rows.
    Dense(Tensor),
}

impl Embedding {
    /// `(tokens,) u32 -> (tokens, hidden)`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor, ModelError> {
        Ok(match self {
            Self::Quantized(q) => q.embedding(ids)?,
            Self::Dense(w) => w.index_select(ids, 0)?,
        })
    }
}

/// A checkpoint opened for reading, with tensor lookup by name.
pub enum WeightSource {
    /// A GGUF file; tensors are read on demand.
    Gguf {
        /// Parsed header and metadata.
        content: gguf_file::Content,
        /// The open file.
        reader: Mutex<BufReader<File>>,
        /// Path, for messages.
        path: PathBuf,
    },
    /// One or more safetensors files, memory-mapped.
    Safetensors {
        /// The mapped files.
        tensors: candle_core::safetensors::MmapedSafetensors,
        /// The model folder, for messages.
        path: PathBuf,
    },
}

/// Reads the header and metadata of a GGUF file.
pub fn read_gguf(path: &Path) -> Result<(gguf_file::Content, BufReader<File>), ModelError> {
    let file = File::open(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut reader = BufReader::new(file);
    let content = gguf_file::Content::read(&mut reader).map_err(|err| ModelError::InvalidFile {
        file: path.to_path_buf(),
        message: super::candle_message(&err),
    })?;
    Ok((content, reader))
}

impl WeightSource {
    /// Opens a GGUF file.
    pub fn open_gguf(path: &Path) -> Result<Self, ModelError> {
        let (content, reader) = read_gguf(path)?;
        Ok(Self::Gguf {
            content,
            reader: Mutex::new(reader),
            path: path.to_path_buf(),
        })
    }

    /// Memory-maps every `*.safetensors` file of a Hugging Face model folder.
    pub fn open_safetensors_dir(dir: &Path) -> Result<Self, ModelError> {
        let entries = std::fs::read_dir(dir).map_err(|source| ModelError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|ext| ext == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(ModelError::InvalidFile {
                file: dir.to_path_buf(),
                message: "the folder contains no .safetensors file".into(),
            });
        }
        // SAFETY: the files are mapped read-only and this process never writes to them. Like
        // every mmap-based loader, it assumes no other process truncates them while mapped.
        let tensors = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
            .map_err(|err| ModelError::InvalidFile {
                file: dir.to_path_buf(),
                message: super::candle_message(&err),
            })?;
        Ok(Self::Safetensors {
            tensors,
            path: dir.to_path_buf(),
        })
    }

    /// Returns the file or folder the weights come from.
    pub fn path(&self) -> &Path {
        match self {
            Self::Gguf { path, .. } | Self::Safetensors { path, .. } => path,
        }
    }

    /// Reports whether a tensor of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        match self {
            Self::Gguf { content, .. } => content.tensor_infos.contains_key(name),
            Self::Safetensors { tensors, .. } => tensors.get(name).is_ok(),
        }
    }

    fn missing(&self, name: &str) -> ModelError {
        ModelError::MissingTensor {
            name: name.to_string(),
            file: self.path().to_path_buf(),
        }
    }

    fn check_shape(
        &self,
        name: &str,
        found: &[usize],
        expected: &[usize],
    ) -> Result<(), ModelError> {
        if found != expected {
            return Err(ModelError::ShapeMismatch {
                name: name.to_string(),
                file: self.path().to_path_buf(),
                expected: expected.to_vec(),
                found: found.to_vec(),
            });
        }
        Ok(())
    }

    fn read_qtensor(&self, name: &str, device: &Device) -> Result<QTensor, ModelError> {
        let Self::Gguf {
            content,
            reader,
            path,
        } = self
        else {
            return Err(self.missing(name));
        };
        let info = content
            .tensor_infos
            .get(name)
            .ok_or_else(|| self.missing(name))?;
        // A poisoned lock only means another load panicked mid-read; the reader seeks before
        // every read, so its position does not matter.
        let mut reader = reader
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        info.read(&mut *reader, content.tensor_data_offset, device)
            .map_err(|err| ModelError::TensorRead {
                name: name.to_string(),
                file: path.clone(),
                message: super::candle_message(&err),
            })
    }

    /// Reads a tensor as dense f32 and checks its shape.
    pub fn dense(
        &self,
        name: &str,
        shape: &[usize],
        device: &Device,
    ) -> Result<Tensor, ModelError> {
        let tensor = match self {
            Self::Gguf { .. } => {
                let q = self.read_qtensor(name, device)?;
                self.check_shape(name, q.shape().dims(), shape)?;
                q.dequantize(device)?
            }
            Self::Safetensors { tensors, path } => {
                let t = tensors.load(name, device).map_err(|err| {
                    if tensors.get(name).is_err() {
                        self.missing(name)
                    } else {
                        ModelError::TensorRead {
                            name: name.to_string(),
                            file: path.clone(),
                            message: super::candle_message(&err),
                        }
                    }
                })?;
                self.check_shape(name, t.dims(), shape)?;
                t.to_dtype(DType::F32)?
            }
        };
        Ok(tensor)
    }

    /// Reads a `(out, in)` weight, and its bias when `bias_name` is given, as a linear layer in
    /// the requested format.
    pub fn linear(
        &self,
        name: &str,
        bias_name: Option<&str>,
        (out_features, in_features): (usize, usize),
        format: WeightFormat,
        device: &Device,
    ) -> Result<Linear, ModelError> {
        let bias = match bias_name {
            Some(bias) => Some(self.dense(bias, &[out_features], device)?),
            None => None,
        };
        let expected = [out_features, in_features];
        match (self, format) {
            (Self::Gguf { .. }, WeightFormat::Quantized(policy)) => {
                let q = self.read_qtensor(name, device)?;
                self.check_shape(name, q.shape().dims(), &expected)?;
                let q = apply_policy(q, policy, device)?;
                Linear::quantized(Arc::new(q), bias)
            }
            _ => Linear::dense(self.dense(name, &expected, device)?, bias),
        }
    }

    /// Reads the `(vocab, hidden)` embedding table.
    pub fn embedding(
        &self,
        name: &str,
        (vocab, hidden): (usize, usize),
        format: WeightFormat,
        device: &Device,
    ) -> Result<(Embedding, Option<Arc<QTensor>>), ModelError> {
        match (self, format) {
            (Self::Gguf { .. }, WeightFormat::Quantized(_)) => {
                let q = self.read_qtensor(name, device)?;
                self.check_shape(name, q.shape().dims(), &[vocab, hidden])?;
                if matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
                    return Ok((Embedding::Dense(q.dequantize(device)?), None));
                }
                let q = Arc::new(q);
                Ok((Embedding::Quantized(q.clone()), Some(q)))
            }
            _ => Ok((
                Embedding::Dense(self.dense(name, &[vocab, hidden], device)?),
                None,
            )),
        }
    }
}

fn apply_policy(q: QTensor, policy: QuantPolicy, device: &Device) -> Result<QTensor, ModelError> {
    let requantise = match policy {
        QuantPolicy::AsStored => false,
        QuantPolicy::FastTypes => needs_requantising(q.dtype()),
        QuantPolicy::AllQ8_0 => !matches!(
            q.dtype(),
            GgmlDType::Q8_0 | GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
        ),
    };
    if requantise {
        let dense = q.dequantize(device)?;
        return Ok(QTensor::quantize(&dense, GgmlDType::Q8_0)?);
    }
    Ok(q)
}

/// Returns whether [`QuantPolicy::FastTypes`] requantises `dtype` to Q8_0: every block type
/// without a batched kernel (of the types GGUF files use, only Q2_K).
fn needs_requantising(dtype: GgmlDType) -> bool {
    let dense = matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
    !dense && !NATIVE_TYPES.contains(&dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_policy_requantises_only_q2_k() {
        assert!(needs_requantising(GgmlDType::Q2K));
        for dtype in NATIVE_TYPES {
            assert!(!needs_requantising(dtype), "{dtype:?}");
        }
        for dtype in [GgmlDType::F32, GgmlDType::F16, GgmlDType::BF16] {
            assert!(!needs_requantising(dtype), "{dtype:?}");
        }
    }
}
