//! A batched Q8_0 matrix multiplication for the CPU that reads each weight block once per call
//! for all rows.
//!
//! On SmolLM2's shapes, candle 0.11's quantised matmul cost about as much per row at 16 rows as
//! at one (measured: `docs/benchmarks.md`). Here the weight matrix `(out, in)` is walked once.
//! Every block of 32 weights is loaded once and multiplied with the matching blocks of up to four
//! activation rows while it sits in registers. Activations are quantised per block of 32 to
//! int8, as llama.cpp and candle do for Q8_0.
//!
//! Each output element is computed by the same instruction sequence, in the same order, whether
//! its row is alone or in a batch, so results are bit-identical across batch compositions.
//! The SIMD path is chosen at run time (AVX2 on x86-64); other CPUs use the scalar path.

use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;
use rayon::prelude::*;

/// Values per quantisation block.
const BLOCK: usize = 32;
/// Bytes of one Q8_0 block in GGUF: an f16 scale and 32 int8 values.
const Q8_0_BYTES: usize = 2 + BLOCK;
/// Output columns per parallel task.
const COLUMNS_PER_TASK: usize = 64;

/// A Q8_0 weight matrix `(out, in)` with scales and values in separate arrays.
#[derive(Debug)]
pub struct Q8Matrix {
    out_features: usize,
    in_features: usize,
    /// `(out, in)` int8 values.
    values: Vec<i8>,
    /// `(out, in / 32)` scales.
    scales: Vec<f32>,
}

/// Activations quantised per block: `(rows, in)` int8 values and `(rows, in / 32)` scales.
struct QuantizedRows {
    values: Vec<i8>,
    scales: Vec<f32>,
}

impl Q8Matrix {
    /// Converts a Q8_0 tensor; `None` for other types or an inner size that is not a multiple
    /// of 32.
    pub fn from_qtensor(tensor: &QTensor) -> Option<Self> {
        if tensor.dtype() != GgmlDType::Q8_0 {
            return None;
        }
        let (out_features, in_features) = tensor.shape().dims2().ok()?;
        if in_features % BLOCK != 0 {
            return None;
        }
        let data = tensor.data().ok()?;
        let blocks = out_features * in_features / BLOCK;
        if data.len() != blocks * Q8_0_BYTES {
            return None;
        }
        let mut values = Vec::with_capacity(out_features * in_features);
        let mut scales = Vec::with_capacity(blocks);
        for block in data.chunks_exact(Q8_0_BYTES) {
            scales.push(f16::from_le_bytes([block[0], block[1]]).to_f32());
            values.extend(block[2..].iter().map(|&b| b as i8));
        }
        Some(Self {
            out_features,
            in_features,
            values,
            scales,
        })
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Input width.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Returns the weights as dense f32, `(out, in)` row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let blocks = self.in_features / BLOCK;
        self.values
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                v as f32
                    * self.scales[(i / self.in_features) * blocks + (i % self.in_features) / BLOCK]
            })
            .collect()
    }

    /// `x·Wᵀ` for `rows` rows of `x` (`(rows, in)` row-major) into `(rows, out)` row-major.
    pub fn matmul(&self, x: &[f32], rows: usize) -> Vec<f32> {
        debug_assert_eq!(x.len(), rows * self.in_features);
        let activations = quantize_rows(x, rows, self.in_features);
        let blocks = self.in_features / BLOCK;
        // Computed column-major so each task owns a contiguous slice, then transposed.
        let mut transposed = vec![0f32; self.out_features * rows];
        let kernel = Kernel::detect();
        transposed
            .par_chunks_mut(COLUMNS_PER_TASK * rows)
            .enumerate()
            .for_each(|(task, out)| {
                let first = task * COLUMNS_PER_TASK;
                for (offset, column_out) in out.chunks_exact_mut(rows).enumerate() {
                    let column = first + offset;
                    let weights = &self.values[column * self.in_features..][..self.in_features];
                    let scales = &self.scales[column * blocks..][..blocks];
                    kernel.column(weights, scales, &activations, blocks, column_out);
                }
            });
        let mut out = vec![0f32; rows * self.out_features];
        for (column, values) in transposed.chunks_exact(rows).enumerate() {
            for (row, &value) in values.iter().enumerate() {
                out[row * self.out_features + column] = value;
            }
        }
        out
    }
}

/// Quantises each block of 32 activations to int8 with scale `max|x| / 127`.
fn quantize_rows(x: &[f32], rows: usize, in_features: usize) -> QuantizedRows {
    let blocks = in_features / BLOCK;
    let mut values = vec![0i8; rows * in_features];
    let mut scales = vec![0f32; rows * blocks];
    for (index, (chunk, out)) in x
        .chunks_exact(BLOCK)
        .zip(values.chunks_exact_mut(BLOCK))
        .enumerate()
    {
        let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        for (o, &v) in out.iter_mut().zip(chunk) {
            *o = (v * inverse).round() as i8;
        }
        scales[index] = scale;
    }
    QuantizedRows { values, scales }
}

#[derive(Clone, Copy)]
enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Kernel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Self::Avx2;
            }
        }
        Self::Scalar
    }

    /// Computes one output column for every row: `out[row] = Σ_blocks dw · dx · (w_block · x_block)`.
    fn column(
        self,
        weights: &[i8],
        scales: &[f32],
        activations: &QuantizedRows,
        blocks: usize,
        out: &mut [f32],
    ) {
        match self {
            Self::Scalar => column_scalar(weights, scales, activations, blocks, out),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `detect` returned Avx2 only after checking that the CPU has AVX2 and FMA.
            Self::Avx2 => unsafe { avx2::column(weights, scales, activations, blocks, out) },
        }
    }
}

fn column_scalar(
    weights: &[i8],
    scales: &[f32],
    activations: &QuantizedRows,
    blocks: usize,
    out: &mut [f32],
) {
    let in_features = blocks * BLOCK;
    for (row, value) in out.iter_mut().enumerate() {
        let x = &activations.values[row * in_features..][..in_features];
        let x_scales = &activations.scales[row * blocks..][..blocks];
        let mut sum = 0f32;
        for block in 0..blocks {
            let w = &weights[block * BLOCK..][..BLOCK];
            let a = &x[block * BLOCK..][..BLOCK];
            let dot: i32 = w.iter().zip(a).map(|(&w, &a)| w as i32 * a as i32).sum();
            sum += scales[block] * x_scales[block] * dot as f32;
        }
        *value = sum;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{QuantizedRows, BLOCK};

    /// Rows processed together; their accumulators and one weight block fit in registers.
    const TILE: usize = 4;

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn column(
        weights: &[i8],
        scales: &[f32],
        activations: &QuantizedRows,
        blocks: usize,
        out: &mut [f32],
    ) {
        let rows = out.len();
        let mut start = 0;
        while start < rows {
            let count = (rows - start).min(TILE);
            // SAFETY: AVX2 and FMA are enabled for this function; slices are in bounds.
            unsafe {
                match count {
                    4 => tile::<4>(weights, scales, activations, blocks, start, out),
                    3 => tile::<3>(weights, scales, activations, blocks, start, out),
                    2 => tile::<2>(weights, scales, activations, blocks, start, out),
                    _ => tile::<1>(weights, scales, activations, blocks, start, out),
                }
            }
            start += count;
        }
    }

    /// `R` rows starting at `start`. Every row goes through the same instructions in the same
    /// order whatever `R` is, which keeps rows bit-identical across batch sizes.
    #[allow(clippy::needless_range_loop)] // the indices address three arrays in lockstep
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const R: usize>(
        weights: &[i8],
        scales: &[f32],
        activations: &QuantizedRows,
        blocks: usize,
        start: usize,
        out: &mut [f32],
    ) {
        let in_features = blocks * BLOCK;
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); R];
        for block in 0..blocks {
            // SAFETY: `block * BLOCK + 32 <= in_features` for the weights and for every row.
            unsafe {
                let w = _mm256_loadu_si256(weights.as_ptr().add(block * BLOCK) as *const __m256i);
                let w_abs = _mm256_sign_epi8(w, w);
                for r in 0..R {
                    let row = start + r;
                    let x_ptr = activations
                        .values
                        .as_ptr()
                        .add(row * in_features + block * BLOCK);
                    let x = _mm256_loadu_si256(x_ptr as *const __m256i);
                    // |w| · (x · sign(w)) = w · x, as unsigned × signed pairs summed to i16.
                    let x_signed = _mm256_sign_epi8(x, w);
                    let pairs = _mm256_maddubs_epi16(w_abs, x_signed);
                    let sums = _mm256_madd_epi16(pairs, ones);
                    let scale = scales[block] * activations.scales[row * blocks + block];
                    acc[r] =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(scale), acc[r]);
                }
            }
        }
        for (r, lanes) in acc.iter().enumerate() {
            out[start + r] = horizontal_sum(*lanes);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    fn horizontal_sum(v: __m256) -> f32 {
        let low = _mm256_castps256_ps128(v);
        let high = _mm256_extractf128_ps(v, 1);
        let sum4 = _mm_add_ps(low, high);
        let sum2 = _mm_add_ps(sum4, _mm_movehl_ps(sum4, sum4));
        let sum1 = _mm_add_ss(sum2, _mm_shuffle_ps(sum2, sum2, 1));
        _mm_cvtss_f32(sum1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn random(rows: usize, cols: usize, seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let data: Vec<f32> = (0..rows * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
        Tensor::from_vec(data, (rows, cols), &Device::Cpu).unwrap()
    }

    /// Against the dequantised weights in f32: the only error is the int8 rounding of the
    /// activations, at most half a step (max|x|/254) per value, so the bound below is
    /// Σ|w|·max|x|/254 per output with a 2x margin.
    #[test]
    fn matches_dequantized_reference() {
        for (out_features, in_features) in [(64, 32), (96, 576), (200, 1536), (7, 64)] {
            let weight = random(out_features, in_features, 1);
            let q = QTensor::quantize(&weight, GgmlDType::Q8_0).unwrap();
            let matrix = Q8Matrix::from_qtensor(&q).unwrap();
            let dense: Vec<Vec<f32>> = q.dequantize(&Device::Cpu).unwrap().to_vec2().unwrap();
            for rows in [1, 2, 3, 4, 5, 9, 16] {
                let x = random(rows, in_features, 7 + rows as u64);
                let x_host: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                let out = matrix.matmul(&x_host, rows);
                for row in 0..rows {
                    let xr = &x_host[row * in_features..][..in_features];
                    for col in 0..out_features {
                        let exact: f32 = dense[col].iter().zip(xr).map(|(w, x)| w * x).sum();
                        let bound: f32 =
                            dense[col].iter().map(|w| w.abs()).sum::<f32>() * 2.0 / 254.0;
                        let got = out[row * out_features + col];
                        assert!(
                            (got - exact).abs() <= bound,
                            "{out_features}x{in_features}, rows {rows}: [{row},{col}] {got} vs {exact}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn rows_are_bit_identical_across_batch_sizes() {
        let weight = random(130, 576, 3);
        let q = QTensor::quantize(&weight, GgmlDType::Q8_0).unwrap();
        let matrix = Q8Matrix::from_qtensor(&q).unwrap();
        let x = random(16, 576, 4);
        let x_host: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let full = matrix.matmul(&x_host, 16);
        for rows in [1, 3, 7] {
            let part = matrix.matmul(&x_host[..rows * 576], rows);
            assert_eq!(part[..], full[..rows * 130], "rows {rows}");
        }
        // A row alone at another position of the batch.
        let alone = matrix.matmul(&x_host[5 * 576..6 * 576], 1);
        assert_eq!(alone[..], full[5 * 130..6 * 130]);
    }

    #[test]
    fn scalar_and_simd_agree_closely() {
        let weight = random(40, 256, 5);
        let q = QTensor::quantize(&weight, GgmlDType::Q8_0).unwrap();
        let matrix = Q8Matrix::from_qtensor(&q).unwrap();
        let x = random(3, 256, 6);
        let x_host: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let activations = quantize_rows(&x_host, 3, 256);
        for col in 0..40 {
            let weights = &matrix.values[col * 256..][..256];
            let scales = &matrix.scales[col * 8..][..8];
            let mut scalar = vec![0f32; 3];
            column_scalar(weights, scales, &activations, 8, &mut scalar);
            let mut detected = vec![0f32; 3];
            Kernel::detect().column(weights, scales, &activations, 8, &mut detected);
            for (s, d) in scalar.iter().zip(&detected) {
                assert!((s - d).abs() <= 1e-4 * s.abs().max(1.0), "{s} vs {d}");
            }
        }
    }

    #[test]
    fn other_types_are_not_converted() {
        let weight = random(32, 64, 8);
        let q = QTensor::quantize(&weight, GgmlDType::Q4_0).unwrap();
        assert!(Q8Matrix::from_qtensor(&q).is_none());
    }
}
