//! Batched quantised matrix multiplication for the CPU that reads each weight block once per
//! call for all rows. It covers Q8_0, Q4_0 and Q4_1 natively; the loader requantises the other
//! types to Q8_0 (see `QuantPolicy`).
//!
//! On SmolLM2's shapes, candle 0.11's quantised matmul cost about as much per row at 16 rows as
//! at one (measured: `docs/benchmarks.md`). Here the weight matrix `(out, in)` is walked once.
//! Every block of 32 weights is loaded (and, for 4-bit types, unpacked) once and multiplied with
//! the matching blocks of up to four activation rows while it sits in registers. Activations are
//! quantised per block of 32 to int8, as llama.cpp does: Q8_0 weights meet Q8_0 activations and
//! 4-bit weights meet Q8_1-style activations, whose block sums carry the weights' offset. That
//! offset term is added after the integer loop, for 64 output columns at a time.
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
/// Bytes of one Q4_0 block in GGUF: an f16 scale and 32 packed 4-bit values.
const Q4_0_BYTES: usize = 2 + BLOCK / 2;
/// Bytes of one Q4_1 block in GGUF: an f16 scale, an f16 minimum and 32 packed 4-bit values.
const Q4_1_BYTES: usize = 4 + BLOCK / 2;
/// Output columns per parallel task.
const COLUMNS_PER_TASK: usize = 64;

/// The weights of a [`QuantMatrix`], one scale per block of 32 in every layout.
#[derive(Debug)]
enum Layout {
    /// `w = scale · q` with `q` in int8: `(out, in)` values.
    Q8 { values: Vec<i8> },
    /// `w = scale · q + min` with `q` in `0..16`: `(out, in / 2)` bytes, where byte `j` of a
    /// block holds element `j` in its low nibble and element `j + 16` in its high nibble (the
    /// GGUF order). Q4_0 is stored with `min = −8 · scale`. The minimums are grouped by
    /// parallel task: `(⌈out / 64⌉, in / 32, 64)`, zero-padded, so the offset pass reads 64
    /// columns of one block contiguously.
    Q4 { nibbles: Vec<u8>, mins: Vec<f32> },
}

/// A quantised weight matrix `(out, in)` in a layout the kernels read directly.
#[derive(Debug)]
pub struct QuantMatrix {
    out_features: usize,
    in_features: usize,
    /// `(out, in / 32)` scales.
    scales: Vec<f32>,
    layout: Layout,
}

/// Activations quantised per block: `(rows, in)` int8 values, `(rows, in / 32)` scales, and
/// `(rows, in / 32)` block sums `scale · Σ q` for the 4-bit layouts' offsets.
struct QuantizedRows {
    values: Vec<i8>,
    scales: Vec<f32>,
    sums: Vec<f32>,
}

/// The weights of one output column, borrowed from a [`QuantMatrix`].
#[derive(Clone, Copy)]
enum Column<'a> {
    Q8 {
        values: &'a [i8],
        scales: &'a [f32],
    },
    Q4 {
        nibbles: &'a [u8],
        scales: &'a [f32],
    },
}

fn f16_at(bytes: &[u8], offset: usize) -> f32 {
    f16::from_le_bytes([bytes[offset], bytes[offset + 1]]).to_f32()
}

impl QuantMatrix {
    /// Converts a Q8_0, Q4_0 or Q4_1 tensor; `None` for other types or an inner size that is
    /// not a multiple of 32.
    pub fn from_qtensor(tensor: &QTensor) -> Option<Self> {
        let block_bytes = match tensor.dtype() {
            GgmlDType::Q8_0 => Q8_0_BYTES,
            GgmlDType::Q4_0 => Q4_0_BYTES,
            GgmlDType::Q4_1 => Q4_1_BYTES,
            _ => return None,
        };
        let (out_features, in_features) = tensor.shape().dims2().ok()?;
        if in_features % BLOCK != 0 {
            return None;
        }
        let data = tensor.data().ok()?;
        let blocks = out_features * in_features / BLOCK;
        if data.len() != blocks * block_bytes {
            return None;
        }
        let mut scales = Vec::with_capacity(blocks);
        let layout = match tensor.dtype() {
            GgmlDType::Q8_0 => {
                let mut values = Vec::with_capacity(out_features * in_features);
                for block in data.chunks_exact(Q8_0_BYTES) {
                    scales.push(f16_at(block, 0));
                    values.extend(block[2..].iter().map(|&b| b as i8));
                }
                Layout::Q8 { values }
            }
            dtype => {
                let header = block_bytes - BLOCK / 2;
                let row_blocks = in_features / BLOCK;
                let groups = out_features.div_ceil(COLUMNS_PER_TASK);
                let mut nibbles = Vec::with_capacity(out_features * in_features / 2);
                let mut mins = vec![0f32; groups * row_blocks * COLUMNS_PER_TASK];
                for (index, block) in data.chunks_exact(block_bytes).enumerate() {
                    let scale = f16_at(block, 0);
                    scales.push(scale);
                    let (column, block_index) = (index / row_blocks, index % row_blocks);
                    mins[min_index(column, block_index, row_blocks)] = if dtype == GgmlDType::Q4_1 {
                        f16_at(block, 2)
                    } else {
                        -8.0 * scale
                    };
                    nibbles.extend_from_slice(&block[header..]);
                }
                Layout::Q4 { nibbles, mins }
            }
        };
        Some(Self {
            out_features,
            in_features,
            scales,
            layout,
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

    /// Bytes of weight data held, scales included.
    pub fn weight_bytes(&self) -> usize {
        let layout = match &self.layout {
            Layout::Q8 { values } => values.len(),
            Layout::Q4 { nibbles, mins } => nibbles.len() + 4 * mins.len(),
        };
        layout + 4 * self.scales.len()
    }

    fn column(&self, column: usize) -> Column<'_> {
        let blocks = self.in_features / BLOCK;
        let scales = &self.scales[column * blocks..][..blocks];
        match &self.layout {
            Layout::Q8 { values } => Column::Q8 {
                values: &values[column * self.in_features..][..self.in_features],
                scales,
            },
            Layout::Q4 { nibbles, .. } => Column::Q4 {
                nibbles: &nibbles[column * self.in_features / 2..][..self.in_features / 2],
                scales,
            },
        }
    }

    /// Returns the weights as dense f32, `(out, in)` row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.out_features * self.in_features);
        let blocks = self.in_features / BLOCK;
        for column in 0..self.out_features {
            match self.column(column) {
                Column::Q8 { values, scales } => {
                    for (block, values) in values.chunks_exact(BLOCK).enumerate() {
                        out.extend(values.iter().map(|&q| q as f32 * scales[block]));
                    }
                }
                Column::Q4 { nibbles, scales } => {
                    let Layout::Q4 { mins, .. } = &self.layout else {
                        unreachable!("a Q4 column comes from the Q4 layout")
                    };
                    for (block, bytes) in nibbles.chunks_exact(BLOCK / 2).enumerate() {
                        let min = mins[min_index(column, block, blocks)];
                        let value = |q: u8| q as f32 * scales[block] + min;
                        out.extend(bytes.iter().map(|&b| value(b & 0x0F)));
                        out.extend(bytes.iter().map(|&b| value(b >> 4)));
                    }
                }
            }
        }
        out
    }

    /// `x·Wᵀ` for `rows` rows of `x` (`(rows, in)` row-major) into `(rows, out)` row-major.
    pub fn matmul(&self, x: &[f32], rows: usize) -> Vec<f32> {
        Self::matmul_many(&[self], x, rows).remove(0)
    }

    /// Computes `x·Wᵀ` for several matrices with the same input width, such as q, k and v. The
    /// activations are quantised once and all columns go through one parallel loop, so the
    /// pool is entered once. Each output is bit-identical to [`QuantMatrix::matmul`]'s.
    ///
    /// # Panics
    /// If `matrices` is empty or their input widths differ.
    pub fn matmul_many(matrices: &[&QuantMatrix], x: &[f32], rows: usize) -> Vec<Vec<f32>> {
        let in_features = matrices[0].in_features;
        assert!(
            matrices.iter().all(|m| m.in_features == in_features),
            "matmul_many needs matrices with one input width"
        );
        debug_assert_eq!(x.len(), rows * in_features);
        let activations = quantize_rows(x, rows, in_features);
        let kernel = Kernel::detect();
        // Computed column-major so each task owns a contiguous slice, then transposed.
        let mut transposed: Vec<Vec<f32>> = matrices
            .iter()
            .map(|m| vec![0f32; m.out_features * rows])
            .collect();
        let tasks: Vec<(&QuantMatrix, usize, &mut [f32])> = matrices
            .iter()
            .zip(&mut transposed)
            .flat_map(|(&matrix, out)| {
                out.chunks_mut(COLUMNS_PER_TASK * rows)
                    .enumerate()
                    .map(move |(task, chunk)| (matrix, task, chunk))
            })
            .collect();
        tasks.into_par_iter().for_each(|(matrix, task, out)| {
            matrix.run_task(task, &activations, kernel, rows, out);
        });
        matrices
            .iter()
            .zip(&transposed)
            .map(|(matrix, transposed)| {
                let mut out = vec![0f32; rows * matrix.out_features];
                for (column, values) in transposed.chunks_exact(rows).enumerate() {
                    for (row, &value) in values.iter().enumerate() {
                        out[row * matrix.out_features + column] = value;
                    }
                }
                out
            })
            .collect()
    }

    /// Computes the columns of one parallel task (64 columns from `task * 64`) for every row,
    /// column-major into `out`.
    fn run_task(
        &self,
        task: usize,
        activations: &QuantizedRows,
        kernel: Kernel,
        rows: usize,
        out: &mut [f32],
    ) {
        let blocks = self.in_features / BLOCK;
        let first = task * COLUMNS_PER_TASK;
        for (offset, column_out) in out.chunks_exact_mut(rows).enumerate() {
            let column = self.column(first + offset);
            kernel.column(column, activations, blocks, column_out);
        }
        if let Layout::Q4 { mins, .. } = &self.layout {
            let mins = &mins[task * blocks * COLUMNS_PER_TASK..][..blocks * COLUMNS_PER_TASK];
            kernel.add_offsets(mins, &activations.sums, blocks, rows, out);
        }
    }
}

/// Returns the index of `column`'s minimum for `block` in the grouped layout of [`Layout::Q4`].
fn min_index(column: usize, block: usize, blocks: usize) -> usize {
    let (group, lane) = (column / COLUMNS_PER_TASK, column % COLUMNS_PER_TASK);
    (group * blocks + block) * COLUMNS_PER_TASK + lane
}

/// Adds the 4-bit offset term `Σ_blocks min · sum_x` to one task's column-major outputs
/// (`(columns, rows)`, at most 64 columns). `mins` is the task's `(blocks, 64)` slice.
///
/// Each column is summed in the order of [`crate::model::attention::dot`]: eight partial sums
/// over blocks `b mod 8`, added in order, then the remaining blocks one by one, each with a
/// separate multiply and add. So the result does not depend on the batch, the vector width or
/// the kernel. The order matters on real models: the offset nearly cancels the main term, and
/// plain sequential summation moved one of SmolLM2's first-step log-probabilities by 0.3.
#[inline(always)]
fn add_offsets_generic(mins: &[f32], sums: &[f32], blocks: usize, rows: usize, out: &mut [f32]) {
    const LANES: usize = 8;
    let columns = out.len() / rows;
    let full = blocks / LANES * LANES;
    for row in 0..rows {
        let row_sums = &sums[row * blocks..][..blocks];
        let mut partials = [[0f32; COLUMNS_PER_TASK]; LANES];
        for (block, &sum) in row_sums[..full].iter().enumerate() {
            let block_mins = &mins[block * COLUMNS_PER_TASK..][..COLUMNS_PER_TASK];
            for (partial, &min) in partials[block % LANES].iter_mut().zip(block_mins) {
                *partial += min * sum;
            }
        }
        let mut offsets = [0f32; COLUMNS_PER_TASK];
        for partial in &partials {
            for (offset, &value) in offsets.iter_mut().zip(partial) {
                *offset += value;
            }
        }
        for (block, &sum) in row_sums.iter().enumerate().skip(full) {
            let block_mins = &mins[block * COLUMNS_PER_TASK..][..COLUMNS_PER_TASK];
            for (offset, &min) in offsets.iter_mut().zip(block_mins) {
                *offset += min * sum;
            }
        }
        for (column, offset) in offsets.iter().take(columns).enumerate() {
            out[column * rows + row] += offset;
        }
    }
}

/// Quantises each block of 32 activations to int8 with scale `max|x| / 127`.
fn quantize_rows(x: &[f32], rows: usize, in_features: usize) -> QuantizedRows {
    let blocks = in_features / BLOCK;
    let mut values = vec![0i8; rows * in_features];
    let mut scales = vec![0f32; rows * blocks];
    let mut sums = vec![0f32; rows * blocks];
    for (index, (chunk, out)) in x
        .chunks_exact(BLOCK)
        .zip(values.chunks_exact_mut(BLOCK))
        .enumerate()
    {
        let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        let mut total = 0i32;
        for (o, &v) in out.iter_mut().zip(chunk) {
            *o = (v * inverse).round() as i8;
            total += *o as i32;
        }
        scales[index] = scale;
        sums[index] = scale * total as f32;
    }
    QuantizedRows {
        values,
        scales,
        sums,
    }
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

    /// Computes one output column for every row of `activations`.
    fn column(
        self,
        column: Column<'_>,
        activations: &QuantizedRows,
        blocks: usize,
        out: &mut [f32],
    ) {
        match self {
            Self::Scalar => column_scalar(column, activations, blocks, out),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `detect` returned Avx2 only after checking that the CPU has AVX2 and FMA.
            Self::Avx2 => unsafe { avx2::column(column, activations, blocks, out) },
        }
    }

    /// Adds the 4-bit offset term to one task's outputs, with AVX2 code where the CPU has it.
    /// The result is the same on every path.
    fn add_offsets(self, mins: &[f32], sums: &[f32], blocks: usize, rows: usize, out: &mut [f32]) {
        match self {
            Self::Scalar => add_offsets_generic(mins, sums, blocks, rows, out),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `detect` returned Avx2 only after checking that the CPU has AVX2 and FMA.
            Self::Avx2 => unsafe { avx2::add_offsets(mins, sums, blocks, rows, out) },
        }
    }
}

/// Computes `out[row] = Σ_blocks dw · dx · (qw · qx)`. [`Kernel::add_offsets`] adds the 4-bit
/// offset.
fn column_scalar(column: Column<'_>, activations: &QuantizedRows, blocks: usize, out: &mut [f32]) {
    let in_features = blocks * BLOCK;
    for (row, value) in out.iter_mut().enumerate() {
        let x = &activations.values[row * in_features..][..in_features];
        let x_scales = &activations.scales[row * blocks..][..blocks];
        let mut sum = 0f32;
        for block in 0..blocks {
            let a = &x[block * BLOCK..][..BLOCK];
            match column {
                Column::Q8 { values, scales } => {
                    let w = &values[block * BLOCK..][..BLOCK];
                    let dot: i32 = w.iter().zip(a).map(|(&w, &a)| w as i32 * a as i32).sum();
                    sum += scales[block] * x_scales[block] * dot as f32;
                }
                Column::Q4 { nibbles, scales } => {
                    let bytes = &nibbles[block * BLOCK / 2..][..BLOCK / 2];
                    let (low, high) = a.split_at(BLOCK / 2);
                    let dot: i32 = bytes
                        .iter()
                        .zip(low.iter().zip(high))
                        .map(|(&b, (&l, &h))| {
                            (b & 0x0F) as i32 * l as i32 + (b >> 4) as i32 * h as i32
                        })
                        .sum();
                    sum += scales[block] * x_scales[block] * dot as f32;
                }
            }
        }
        *value = sum;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{add_offsets_generic, Column, QuantizedRows, BLOCK};

    /// Rows processed together; their accumulators and one weight block fit in registers.
    const TILE: usize = 4;

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn column(
        column: Column<'_>,
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
                    4 => tile::<4>(column, activations, blocks, start, out),
                    3 => tile::<3>(column, activations, blocks, start, out),
                    2 => tile::<2>(column, activations, blocks, start, out),
                    _ => tile::<1>(column, activations, blocks, start, out),
                }
            }
            start += count;
        }
    }

    /// Computes `R` rows starting at `start` with the kernel for the column's layout.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const R: usize>(
        column: Column<'_>,
        activations: &QuantizedRows,
        blocks: usize,
        start: usize,
        out: &mut [f32],
    ) {
        // SAFETY: the caller enables AVX2 and FMA and passes rows in bounds.
        unsafe {
            match column {
                Column::Q8 { values, scales } => {
                    q8_tile::<R>(values, scales, activations, blocks, start, out)
                }
                Column::Q4 { nibbles, scales } => {
                    q4_tile::<R>(nibbles, scales, activations, blocks, start, out)
                }
            }
        }
    }

    /// `R` Q8_0 rows starting at `start`. Every row goes through the same instructions in the
    /// same order whatever `R` is, which keeps rows bit-identical across batch sizes.
    #[allow(clippy::needless_range_loop)] // the indices address three arrays in lockstep
    #[target_feature(enable = "avx2,fma")]
    unsafe fn q8_tile<const R: usize>(
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

    /// `R` rows of a 4-bit column starting at `start`, with the same batch-size independence
    /// as [`q8_tile`]. The nibbles are unsigned, so they meet the signed activations in
    /// `maddubs` directly. The offset term is left to [`add_offsets`].
    #[allow(clippy::needless_range_loop)] // the indices address four arrays in lockstep
    #[target_feature(enable = "avx2,fma")]
    unsafe fn q4_tile<const R: usize>(
        nibbles: &[u8],
        scales: &[f32],
        activations: &QuantizedRows,
        blocks: usize,
        start: usize,
        out: &mut [f32],
    ) {
        let in_features = blocks * BLOCK;
        let ones = _mm256_set1_epi16(1);
        let low_mask = _mm256_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); R];
        for block in 0..blocks {
            // SAFETY: `block * 16 + 16 <= in_features / 2` for the weights, and
            // `block * BLOCK + 32 <= in_features` for every row.
            unsafe {
                let packed =
                    _mm_loadu_si128(nibbles.as_ptr().add(block * BLOCK / 2) as *const __m128i);
                // Elements 0..16 are the low nibbles, 16..32 the high ones.
                let both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
                let w = _mm256_and_si256(both, low_mask);
                for r in 0..R {
                    let row = start + r;
                    let x_ptr = activations
                        .values
                        .as_ptr()
                        .add(row * in_features + block * BLOCK);
                    let x = _mm256_loadu_si256(x_ptr as *const __m256i);
                    let pairs = _mm256_maddubs_epi16(w, x);
                    let sums = _mm256_madd_epi16(pairs, ones);
                    let index = row * blocks + block;
                    let scale = scales[block] * activations.scales[index];
                    acc[r] =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(scale), acc[r]);
                }
            }
        }
        for (r, lanes) in acc.iter().enumerate() {
            out[start + r] = horizontal_sum(*lanes);
        }
    }

    /// Runs [`add_offsets_generic`] compiled for AVX2, which vectorises its loop over 64 columns.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn add_offsets(
        mins: &[f32],
        sums: &[f32],
        blocks: usize,
        rows: usize,
        out: &mut [f32],
    ) {
        add_offsets_generic(mins, sums, blocks, rows, out);
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

    /// The layouts with a kernel of their own.
    const TYPES: [GgmlDType; 3] = [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4_1];

    fn random(rows: usize, cols: usize, seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let data: Vec<f32> = (0..rows * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
        Tensor::from_vec(data, (rows, cols), &Device::Cpu).unwrap()
    }

    /// Returns [`random`] weights with a different offset per output row, so that a 4-bit
    /// minimum applied to the wrong column shows.
    fn shifted_random(rows: usize, cols: usize, seed: u64) -> Tensor {
        let shifts: Vec<f32> = (0..rows).map(|row| (row % 7) as f32 - 3.0).collect();
        let shifts = Tensor::from_vec(shifts, (rows, 1), &Device::Cpu).unwrap();
        random(rows, cols, seed).broadcast_add(&shifts).unwrap()
    }

    fn host(x: &Tensor) -> Vec<f32> {
        x.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn dequantizes_like_candle() {
        for dtype in TYPES {
            let q = QTensor::quantize(&random(130, 96, 2), dtype).unwrap();
            let matrix = QuantMatrix::from_qtensor(&q).unwrap();
            let candle = host(&q.dequantize(&Device::Cpu).unwrap());
            assert_eq!(matrix.dequantize(), candle, "{dtype:?}");
        }
    }

    /// Against the dequantised weights in f32. The only error is the int8 rounding of the
    /// activations, at most half a step (max|x|/254) per value, so each output is within
    /// Σ|w|·max|x|/254; the bound below doubles that. For 4-bit weights the offset term uses the
    /// rounded block sums, whose error is inside the same bound because it is the same rounding
    /// seen through `w = scale·q + min`.
    #[test]
    fn matches_dequantized_reference() {
        for dtype in TYPES {
            for (out_features, in_features) in [(64, 32), (96, 576), (200, 1536), (7, 64)] {
                let weight = shifted_random(out_features, in_features, 1);
                let q = QTensor::quantize(&weight, dtype).unwrap();
                let matrix = QuantMatrix::from_qtensor(&q).unwrap();
                let dense: Vec<Vec<f32>> = q.dequantize(&Device::Cpu).unwrap().to_vec2().unwrap();
                for rows in [1, 2, 3, 4, 5, 9, 16] {
                    let x_host = host(&random(rows, in_features, 7 + rows as u64));
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
                                "{dtype:?} {out_features}x{in_features}, rows {rows}: [{row},{col}] {got} vs {exact}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Against the dequantised weights times the int8-rounded activations the kernels see, so
    /// the only difference left is f32 summation order: within 1e-5 of `Σ|w·x|`.
    #[test]
    fn matches_rounded_activations() {
        for dtype in TYPES {
            let (out_features, in_features, rows) = (200, 576, 5);
            let weight = shifted_random(out_features, in_features, 8);
            let q = QTensor::quantize(&weight, dtype).unwrap();
            let matrix = QuantMatrix::from_qtensor(&q).unwrap();
            let dense: Vec<Vec<f32>> = q.dequantize(&Device::Cpu).unwrap().to_vec2().unwrap();
            let x = host(&random(rows, in_features, 9));
            let rounded = quantize_rows(&x, rows, in_features);
            let out = matrix.matmul(&x, rows);
            for row in 0..rows {
                let xq: Vec<f32> = (0..in_features)
                    .map(|i| {
                        let index = row * in_features + i;
                        rounded.values[index] as f32 * rounded.scales[index / BLOCK]
                    })
                    .collect();
                for col in 0..out_features {
                    let products = dense[col].iter().zip(&xq).map(|(w, x)| w * x);
                    let exact: f32 = products.clone().sum();
                    let magnitude: f32 = products.map(f32::abs).sum();
                    let got = out[row * out_features + col];
                    assert!(
                        (got - exact).abs() <= 1e-5 * magnitude,
                        "{dtype:?} [{row},{col}]: {got} vs {exact}"
                    );
                }
            }
        }
    }

    #[test]
    fn matmul_many_equals_separate_calls() {
        let shapes = [(130, 96), (64, 96), (7, 96)];
        let matrices: Vec<QuantMatrix> = shapes
            .iter()
            .zip(TYPES)
            .map(|(&(out, input), dtype)| {
                let q = QTensor::quantize(&random(out, input, out as u64), dtype).unwrap();
                QuantMatrix::from_qtensor(&q).unwrap()
            })
            .collect();
        let x = host(&random(6, 96, 10));
        let refs: Vec<&QuantMatrix> = matrices.iter().collect();
        let together = QuantMatrix::matmul_many(&refs, &x, 6);
        assert_eq!(together.len(), 3);
        for (matrix, output) in matrices.iter().zip(&together) {
            assert_eq!(output[..], matrix.matmul(&x, 6)[..]);
        }
    }

    #[test]
    fn rows_are_bit_identical_across_batch_sizes() {
        for dtype in TYPES {
            let q = QTensor::quantize(&random(130, 576, 3), dtype).unwrap();
            let matrix = QuantMatrix::from_qtensor(&q).unwrap();
            let x_host = host(&random(16, 576, 4));
            let full = matrix.matmul(&x_host, 16);
            for rows in [1, 3, 7] {
                let part = matrix.matmul(&x_host[..rows * 576], rows);
                assert_eq!(part[..], full[..rows * 130], "{dtype:?} rows {rows}");
            }
            // A row alone at another position of the batch.
            let alone = matrix.matmul(&x_host[5 * 576..6 * 576], 1);
            assert_eq!(alone[..], full[5 * 130..6 * 130], "{dtype:?}");
        }
    }

    #[test]
    fn scalar_and_simd_agree_closely() {
        for dtype in TYPES {
            let q = QTensor::quantize(&random(40, 256, 5), dtype).unwrap();
            let matrix = QuantMatrix::from_qtensor(&q).unwrap();
            let x_host = host(&random(3, 256, 6));
            let activations = quantize_rows(&x_host, 3, 256);
            for col in 0..40 {
                let column = matrix.column(col);
                let mut scalar = vec![0f32; 3];
                column_scalar(column, &activations, 8, &mut scalar);
                let mut detected = vec![0f32; 3];
                Kernel::detect().column(column, &activations, 8, &mut detected);
                for (s, d) in scalar.iter().zip(&detected) {
                    assert!(
                        (s - d).abs() <= 1e-4 * s.abs().max(1.0),
                        "{dtype:?}: {s} vs {d}"
                    );
                }
            }
        }
    }

    #[test]
    fn four_bit_weights_take_less_memory() {
        let weight = random(64, 256, 9);
        let bytes = |dtype| {
            let q = QTensor::quantize(&weight, dtype).unwrap();
            QuantMatrix::from_qtensor(&q).unwrap().weight_bytes()
        };
        assert_eq!(bytes(GgmlDType::Q8_0), 64 * 256 + 64 * 8 * 4);
        assert_eq!(bytes(GgmlDType::Q4_1), 64 * 128 + 64 * 8 * 8);
    }

    #[test]
    fn other_types_are_not_converted() {
        let q = QTensor::quantize(&random(32, 64, 8), GgmlDType::Q5_1).unwrap();
        assert!(QuantMatrix::from_qtensor(&q).is_none());
        let q = QTensor::quantize(&random(2, 256, 8), GgmlDType::Q4K).unwrap();
        assert!(QuantMatrix::from_qtensor(&q).is_none());
    }
}
