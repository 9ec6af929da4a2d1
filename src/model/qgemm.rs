//! Batched quantised matrix multiplication for the CPU that reads each weight block once per
//! call for all rows. It covers Q8_0, Q4_0 and Q4_1 natively; the loader requantises the other
//! types to Q8_0 (see `QuantPolicy`).
//!
//! On SmolLM2's shapes, candle 0.11's quantised matmul cost about as much per row at 16 rows as
//! at one (measured: `docs/benchmarks.md`). Here the weight matrix `(out, in)` is walked once.
//! Activations are quantised per block of 32 to int8, as llama.cpp does: Q8_0 weights meet
//! Q8_0 activations and 4-bit weights meet Q8_1-style activations, whose block sums carry the
//! weights' offset. That offset term is added after the integer loop, for 64 output columns at
//! a time.
//!
//! The weights are repacked at load into panels of eight output columns. Within a panel and a
//! block, the four weights of each column that meet activations `4k..4k+4` sit side by side,
//! so one 32-byte vector contains them for all eight columns. A kernel broadcasts four activation
//! bytes at a time and multiplies them with that vector, which yields the eight columns' dot
//! products in one register, without horizontal sums. Each panel block is loaded once and
//! used for up to four rows.
//!
//! Each output is a sum over blocks of `exact integer dot · (weight scale · activation scale)`,
//! accumulated block by block in f32 with separate multiplies and adds. The integer dot is
//! exact on every path, so the scalar, AVX2 and AVX-512 VNNI kernels give bit-identical
//! results, whatever the batch around a row. The SIMD path is chosen at run time.

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
/// Output columns per panel: one f32 vector of 256 bits.
const PANEL: usize = 8;
/// Output columns per parallel task.
const COLUMNS_PER_TASK: usize = 64;
/// Rows that share one load of a panel block.
const TILE: usize = 4;

/// The weights of a [`QuantMatrix`] in panels of eight columns (the last one zero-padded),
/// one scale per block of 32 in every layout.
#[derive(Debug)]
enum Layout {
    /// `w = scale · q` with `q` in int8: `(panels, blocks, 8 groups, 8 columns, 4)` values,
    /// where group `k` contains elements `4k..4k+4` of the block.
    Q8 { values: Vec<i8> },
    /// `w = scale · q + min` with `q` in `0..16`: `(panels, blocks, 4 groups, 8 columns, 4)`
    /// bytes. GGUF packs element `j` of a block in the low nibble of byte `j` and element
    /// `j + 16` in its high nibble, and group `k` contains bytes `4k..4k+4`. Q4_0 is stored with
    /// `min = −8 · scale`. The minimums are grouped by parallel task: `(⌈out / 64⌉, in / 32,
    /// 64)`, zero-padded, so the offset pass reads 64 columns of one block contiguously.
    Q4 { nibbles: Vec<u8>, mins: Vec<f32> },
}

/// A quantised weight matrix `(out, in)` in a layout the kernels read directly.
#[derive(Debug)]
pub struct QuantMatrix {
    out_features: usize,
    in_features: usize,
    /// `(panels, in / 32, 8)` scales.
    scales: Vec<f32>,
    layout: Layout,
}

/// Activations quantised per block: `(rows, in)` int8 values, `(rows, in / 32)` scales, and
/// `(rows, in / 32)` block sums, as integers and as `scale · Σ q` for the 4-bit offsets.
struct QuantizedRows {
    values: Vec<i8>,
    scales: Vec<f32>,
    int_sums: Vec<i32>,
    sums: Vec<f32>,
}

/// The weights of one panel, borrowed from a [`QuantMatrix`]: `blocks · 256` values or
/// `blocks · 128` packed bytes, and `(blocks, 8)` scales.
#[derive(Clone, Copy)]
enum Panel<'a> {
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

/// Returns the index, in a panel layout, of byte `byte` (0..4) of group `group` of
/// `column`'s block `block`, for blocks of `groups` groups.
fn panel_index(
    column: usize,
    block: usize,
    group: usize,
    byte: usize,
    blocks: usize,
    groups: usize,
) -> usize {
    let (panel, lane) = (column / PANEL, column % PANEL);
    (((panel * blocks + block) * groups + group) * PANEL + lane) * 4 + byte
}

impl QuantMatrix {
    /// Converts a Q8_0, Q4_0 or Q4_1 tensor; `None` for other types or an inner size that is
    /// not a multiple of 32.
    pub fn from_qtensor(tensor: &QTensor) -> Option<Self> {
        let dtype = tensor.dtype();
        let block_bytes = match dtype {
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
        let blocks = in_features / BLOCK;
        if data.len() != out_features * blocks * block_bytes {
            return None;
        }
        let padded = out_features.next_multiple_of(PANEL);
        let mut scales = vec![0f32; padded * blocks];
        let scale_index = |column: usize, block: usize| {
            ((column / PANEL) * blocks + block) * PANEL + column % PANEL
        };
        let layout = if dtype == GgmlDType::Q8_0 {
            let mut values = vec![0i8; padded * in_features];
            for (index, bytes) in data.chunks_exact(Q8_0_BYTES).enumerate() {
                let (column, block) = (index / blocks, index % blocks);
                scales[scale_index(column, block)] = f16_at(bytes, 0);
                for (element, &q) in bytes[2..].iter().enumerate() {
                    let at = panel_index(column, block, element / 4, element % 4, blocks, 8);
                    values[at] = q as i8;
                }
            }
            Layout::Q8 { values }
        } else {
            let header = block_bytes - BLOCK / 2;
            let tasks = out_features.div_ceil(COLUMNS_PER_TASK);
            let mut nibbles = vec![0u8; padded * in_features / 2];
            let mut mins = vec![0f32; tasks * blocks * COLUMNS_PER_TASK];
            for (index, bytes) in data.chunks_exact(block_bytes).enumerate() {
                let (column, block) = (index / blocks, index % blocks);
                let scale = f16_at(bytes, 0);
                scales[scale_index(column, block)] = scale;
                mins[min_index(column, block, blocks)] = if dtype == GgmlDType::Q4_1 {
                    f16_at(bytes, 2)
                } else {
                    -8.0 * scale
                };
                for (byte, &packed) in bytes[header..].iter().enumerate() {
                    nibbles[panel_index(column, block, byte / 4, byte % 4, blocks, 4)] = packed;
                }
            }
            Layout::Q4 { nibbles, mins }
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

    /// Returns the bytes of weight data, scales and padding included.
    pub fn weight_bytes(&self) -> usize {
        let layout = match &self.layout {
            Layout::Q8 { values } => values.len(),
            Layout::Q4 { nibbles, mins } => nibbles.len() + 4 * mins.len(),
        };
        layout + 4 * self.scales.len()
    }

    fn panel(&self, panel: usize) -> Panel<'_> {
        let blocks = self.in_features / BLOCK;
        let scales = &self.scales[panel * blocks * PANEL..][..blocks * PANEL];
        match &self.layout {
            Layout::Q8 { values } => Panel::Q8 {
                values: &values[panel * blocks * 256..][..blocks * 256],
                scales,
            },
            Layout::Q4 { nibbles, .. } => Panel::Q4 {
                nibbles: &nibbles[panel * blocks * 128..][..blocks * 128],
                scales,
            },
        }
    }

    /// Returns the weights as dense f32, `(out, in)` row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let blocks = self.in_features / BLOCK;
        let mut out = Vec::with_capacity(self.out_features * self.in_features);
        for column in 0..self.out_features {
            for block in 0..blocks {
                let scale =
                    self.scales[((column / PANEL) * blocks + block) * PANEL + column % PANEL];
                match &self.layout {
                    Layout::Q8 { values } => out.extend((0..BLOCK).map(|element| {
                        let at = panel_index(column, block, element / 4, element % 4, blocks, 8);
                        values[at] as f32 * scale
                    })),
                    Layout::Q4 { nibbles, mins } => {
                        let min = mins[min_index(column, block, blocks)];
                        out.extend((0..BLOCK).map(|element| {
                            let byte = element % 16;
                            let packed =
                                nibbles[panel_index(column, block, byte / 4, byte % 4, blocks, 4)];
                            let q = if element < 16 {
                                packed & 0x0F
                            } else {
                                packed >> 4
                            };
                            q as f32 * scale + min
                        }));
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
        Self::matmul_many_with(Kernel::detect(), matrices, x, rows)
    }

    fn matmul_many_with(
        kernel: Kernel,
        matrices: &[&QuantMatrix],
        x: &[f32],
        rows: usize,
    ) -> Vec<Vec<f32>> {
        let in_features = matrices[0].in_features;
        assert!(
            matrices.iter().all(|m| m.in_features == in_features),
            "matmul_many needs matrices with one input width"
        );
        debug_assert_eq!(x.len(), rows * in_features);
        let activations = quantize_rows(kernel, x, rows, in_features);
        // Each task writes its 64 columns, row-major, into a slice of its own.
        let task_len = COLUMNS_PER_TASK * rows;
        let mut scratch: Vec<Vec<f32>> = matrices
            .iter()
            .map(|m| vec![0f32; m.out_features.div_ceil(COLUMNS_PER_TASK) * task_len])
            .collect();
        let tasks: Vec<(&QuantMatrix, usize, &mut [f32])> = matrices
            .iter()
            .zip(&mut scratch)
            .flat_map(|(&matrix, out)| {
                out.chunks_mut(task_len)
                    .enumerate()
                    .map(move |(task, chunk)| (matrix, task, chunk))
            })
            .collect();
        tasks.into_par_iter().for_each(|(matrix, task, out)| {
            matrix.run_task(task, &activations, kernel, rows, out);
        });
        matrices
            .iter()
            .zip(&scratch)
            .map(|(matrix, scratch)| {
                let width = matrix.out_features;
                let mut out = vec![0f32; rows * width];
                for (task, chunk) in scratch.chunks_exact(task_len).enumerate() {
                    let first = task * COLUMNS_PER_TASK;
                    let columns = (width - first).min(COLUMNS_PER_TASK);
                    for (row, values) in chunk.chunks_exact(COLUMNS_PER_TASK).enumerate() {
                        out[row * width + first..][..columns].copy_from_slice(&values[..columns]);
                    }
                }
                out
            })
            .collect()
    }

    /// Computes the columns of one parallel task (64 columns from `task * 64`, zero-padded
    /// panels included) for every row into `out`, `(rows, 64)` row-major.
    fn run_task(
        &self,
        task: usize,
        activations: &QuantizedRows,
        kernel: Kernel,
        rows: usize,
        out: &mut [f32],
    ) {
        let blocks = self.in_features / BLOCK;
        let first_panel = task * COLUMNS_PER_TASK / PANEL;
        let panels =
            (self.out_features.div_ceil(PANEL) - first_panel).min(COLUMNS_PER_TASK / PANEL);
        for local in 0..panels {
            let panel = self.panel(first_panel + local);
            let mut start = 0;
            while start < rows {
                let count = (rows - start).min(TILE);
                let out = &mut out[start * COLUMNS_PER_TASK + local * PANEL..];
                kernel.tile(panel, activations, blocks, start, count, out);
                start += count;
            }
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

/// Adds the 4-bit offset term `Σ_blocks min · sum_x` to one task's outputs (`(rows, 64)`
/// row-major). `mins` is the task's `(blocks, 64)` slice.
///
/// Each column is summed in the order of [`crate::model::attention::dot`]: eight partial sums
/// over blocks `b mod 8`, added in order, then the remaining blocks one by one, each with a
/// separate multiply and add. So the result does not depend on the batch, the vector width or
/// the kernel. The order matters on real models: the offset nearly cancels the main term, and
/// plain sequential summation moved one of SmolLM2's first-step log-probabilities by 0.3.
#[inline(always)]
fn add_offsets_generic(mins: &[f32], sums: &[f32], blocks: usize, rows: usize, out: &mut [f32]) {
    const LANES: usize = 8;
    let full = blocks / LANES * LANES;
    for row in 0..rows {
        let row_sums = &sums[row * blocks..][..blocks];
        let row_out = &mut out[row * COLUMNS_PER_TASK..][..COLUMNS_PER_TASK];
        // Eight columns at a time, so that the eight partial sums stay in registers.
        for (chunk, chunk_out) in row_out.chunks_exact_mut(PANEL).enumerate() {
            let min_at = |block: usize| &mins[block * COLUMNS_PER_TASK + chunk * PANEL..][..PANEL];
            let mut partials = [[0f32; PANEL]; LANES];
            for first in (0..full).step_by(LANES) {
                for (lane, partial) in partials.iter_mut().enumerate() {
                    let block = first + lane;
                    for (value, &min) in partial.iter_mut().zip(min_at(block)) {
                        *value += min * row_sums[block];
                    }
                }
            }
            let mut offsets = [0f32; PANEL];
            for partial in &partials {
                for (offset, &value) in offsets.iter_mut().zip(partial) {
                    *offset += value;
                }
            }
            for (block, &sum) in row_sums.iter().enumerate().skip(full) {
                for (offset, &min) in offsets.iter_mut().zip(min_at(block)) {
                    *offset += min * sum;
                }
            }
            for (value, offset) in chunk_out.iter_mut().zip(&offsets) {
                *value += offset;
            }
        }
    }
}

/// Quantises each block of 32 activations to int8 with scale `max|x| / 127`, with AVX2 code
/// where `kernel` uses it. Rounding is exact on both paths, so the results are the same.
fn quantize_rows(kernel: Kernel, x: &[f32], rows: usize, in_features: usize) -> QuantizedRows {
    match kernel {
        Kernel::Scalar => quantize_rows_generic(x, rows, in_features),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: both SIMD kernels are chosen only on CPUs with AVX2.
        Kernel::Avx2 | Kernel::Vnni => unsafe { simd::quantize_rows(x, rows, in_features) },
    }
}

#[inline(always)]
fn quantize_rows_generic(x: &[f32], rows: usize, in_features: usize) -> QuantizedRows {
    let blocks = in_features / BLOCK;
    let mut values = vec![0i8; rows * in_features];
    let mut scales = vec![0f32; rows * blocks];
    let mut int_sums = vec![0i32; rows * blocks];
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
        int_sums[index] = total;
        sums[index] = scale * total as f32;
    }
    QuantizedRows {
        values,
        scales,
        int_sums,
        sums,
    }
}

/// Reports whether the CPU runs the VNNI kernel: AVX-512 VNNI on 256-bit vectors (VL).
#[cfg(target_arch = "x86_64")]
fn has_vnni() -> bool {
    is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Vnni,
}

impl Kernel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if has_vnni() {
                return Self::Vnni;
            }
            if is_x86_feature_detected!("avx2") {
                return Self::Avx2;
            }
        }
        Self::Scalar
    }

    /// Returns every kernel this CPU can run, the scalar one first.
    #[cfg(test)]
    fn available() -> Vec<Self> {
        let mut kernels = vec![Self::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") {
                kernels.push(Self::Avx2);
            }
            if has_vnni() {
                kernels.push(Self::Vnni);
            }
        }
        kernels
    }

    /// Computes one panel for `count` (at most 4) rows from `start`. Row `r`'s eight outputs
    /// go to `out[r * 64..][..8]`.
    fn tile(
        self,
        panel: Panel<'_>,
        activations: &QuantizedRows,
        blocks: usize,
        start: usize,
        count: usize,
        out: &mut [f32],
    ) {
        match self {
            Self::Scalar => tile_scalar(panel, activations, blocks, start, count, out),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `detect` and `available` return Avx2 only after checking the CPU for it.
            Self::Avx2 => unsafe { simd::tile_avx2(panel, activations, blocks, start, count, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `detect` and `available` return Vnni only after checking the CPU for
            // AVX-512 VNNI and VL.
            Self::Vnni => unsafe { simd::tile_vnni(panel, activations, blocks, start, count, out) },
        }
    }

    /// Adds the 4-bit offset term to one task's outputs, with AVX2 code where the CPU has it.
    /// The result is the same on every path.
    fn add_offsets(self, mins: &[f32], sums: &[f32], blocks: usize, rows: usize, out: &mut [f32]) {
        match self {
            Self::Scalar => add_offsets_generic(mins, sums, blocks, rows, out),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: both SIMD kernels are chosen only on CPUs with AVX2.
            Self::Avx2 | Self::Vnni => unsafe { simd::add_offsets(mins, sums, blocks, rows, out) },
        }
    }
}

/// Computes one panel for `count` rows from `start`: for each block, the exact integer dot
/// products of the eight columns, times `weight scale · activation scale`, added to the sums.
/// The SIMD kernels perform the same f32 operations in the same order.
fn tile_scalar(
    panel: Panel<'_>,
    activations: &QuantizedRows,
    blocks: usize,
    start: usize,
    count: usize,
    out: &mut [f32],
) {
    let in_features = blocks * BLOCK;
    for row in start..start + count {
        let mut acc = [0f32; PANEL];
        for block in 0..blocks {
            let x = &activations.values[row * in_features + block * BLOCK..][..BLOCK];
            let x_scale = activations.scales[row * blocks + block];
            for (lane, sum) in acc.iter_mut().enumerate() {
                let mut dot = 0i32;
                for (element, &a) in x.iter().enumerate() {
                    let w = match panel {
                        Panel::Q8 { values, .. } => {
                            values[((block * 8 + element / 4) * PANEL + lane) * 4 + element % 4]
                                as i32
                        }
                        Panel::Q4 { nibbles, .. } => {
                            let byte = element % 16;
                            let packed =
                                nibbles[((block * 4 + byte / 4) * PANEL + lane) * 4 + byte % 4];
                            (if element < 16 {
                                packed & 0x0F
                            } else {
                                packed >> 4
                            }) as i32
                        }
                    };
                    dot += w * a as i32;
                }
                let scales = match panel {
                    Panel::Q8 { scales, .. } | Panel::Q4 { scales, .. } => scales,
                };
                *sum += dot as f32 * (scales[block * PANEL + lane] * x_scale);
            }
        }
        out[(row - start) * COLUMNS_PER_TASK..][..PANEL].copy_from_slice(&acc);
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::{
        add_offsets_generic, quantize_rows_generic, Panel, QuantizedRows, BLOCK, COLUMNS_PER_TASK,
        PANEL,
    };

    /// Loads the four bytes of activations `4 · group..` of a block and repeats them in every
    /// 32-bit lane.
    ///
    /// # Safety
    /// `block` must point to at least 32 readable bytes.
    #[inline(always)]
    unsafe fn broadcast_group(block: *const i8, group: usize) -> __m256i {
        // SAFETY: the caller guarantees 32 readable bytes, and `group < 8`.
        unsafe { _mm256_set1_epi32((block.add(group * 4) as *const i32).read_unaligned()) }
    }

    /// Eight vectors with the panel's weights of one block, group `k` in vector `k`: unsigned
    /// nibbles for 4-bit panels, int8 values for Q8_0.
    ///
    /// # Safety
    /// AVX2 must be available, and `block` must be below the panel's block count.
    #[inline(always)]
    unsafe fn load_block(panel: Panel<'_>, block: usize) -> [__m256i; 8] {
        // SAFETY: a panel contains `blocks · 256` values or `blocks · 128` bytes.
        unsafe {
            match panel {
                Panel::Q8 { values, .. } => {
                    let base = values.as_ptr().add(block * 256) as *const __m256i;
                    std::array::from_fn(|group| _mm256_loadu_si256(base.add(group)))
                }
                Panel::Q4 { nibbles, .. } => {
                    let base = nibbles.as_ptr().add(block * 128) as *const __m256i;
                    let mask = _mm256_set1_epi8(0x0F);
                    let packed: [__m256i; 4] =
                        std::array::from_fn(|group| _mm256_loadu_si256(base.add(group)));
                    std::array::from_fn(|group| {
                        if group < 4 {
                            _mm256_and_si256(packed[group], mask)
                        } else {
                            _mm256_and_si256(_mm256_srli_epi16(packed[group - 4], 4), mask)
                        }
                    })
                }
            }
        }
    }

    /// Adds `dot · (weight scales · x_scale)` to `acc`, as separate multiplies and an add.
    #[inline(always)]
    unsafe fn accumulate(acc: __m256, dot: __m256i, scales: __m256, x_scale: f32) -> __m256 {
        // SAFETY: the callers enable AVX2.
        unsafe {
            let scale = _mm256_mul_ps(scales, _mm256_set1_ps(x_scale));
            _mm256_add_ps(acc, _mm256_mul_ps(_mm256_cvtepi32_ps(dot), scale))
        }
    }

    /// Computes the panel's tile with AVX-512 VNNI on 256-bit vectors: `vpdpbusd` multiplies
    /// unsigned by signed bytes and adds groups of four into 32-bit lanes. Q8_0 weights are
    /// made unsigned by adding 128, which adds `128 · Σx` to the dot, so that is subtracted
    /// again.
    ///
    /// # Safety
    /// The CPU must support AVX2, AVX-512 VNNI and AVX-512 VL.
    #[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
    pub(super) unsafe fn tile_vnni(
        panel: Panel<'_>,
        activations: &QuantizedRows,
        blocks: usize,
        start: usize,
        count: usize,
        out: &mut [f32],
    ) {
        // SAFETY: the features are enabled above, and `count <= 4` rows from `start` exist.
        unsafe {
            match count {
                4 => vnni::<4>(panel, activations, blocks, start, out),
                3 => vnni::<3>(panel, activations, blocks, start, out),
                2 => vnni::<2>(panel, activations, blocks, start, out),
                _ => vnni::<1>(panel, activations, blocks, start, out),
            }
        }
    }

    // NOTE: `vnni` and `avx2` repeat the same block and row loops. A shared generic loop with
    // the block dot behind a trait measured 5–10% slower at 16 rows, so each keeps its own.
    #[allow(clippy::needless_range_loop)] // `r` addresses the accumulators and the rows
    #[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
    unsafe fn vnni<const R: usize>(
        panel: Panel<'_>,
        activations: &QuantizedRows,
        blocks: usize,
        start: usize,
        out: &mut [f32],
    ) {
        let in_features = blocks * BLOCK;
        let (signed, scales) = match panel {
            Panel::Q8 { scales, .. } => (true, scales),
            Panel::Q4 { scales, .. } => (false, scales),
        };
        let mut acc = [_mm256_setzero_ps(); R];
        for block in 0..blocks {
            // SAFETY: `block < blocks`, and every row contains `in_features` values.
            unsafe {
                let mut weights = load_block(panel, block);
                if signed {
                    let flip = _mm256_set1_epi8(-128);
                    for w in &mut weights {
                        *w = _mm256_xor_si256(*w, flip);
                    }
                }
                let block_scales = _mm256_loadu_ps(scales.as_ptr().add(block * PANEL));
                for r in 0..R {
                    let row = start + r;
                    let x = activations
                        .values
                        .as_ptr()
                        .add(row * in_features + block * BLOCK);
                    let mut even = _mm256_setzero_si256();
                    let mut odd = _mm256_setzero_si256();
                    for group in (0..8).step_by(2) {
                        even = _mm256_dpbusd_epi32(even, weights[group], broadcast_group(x, group));
                        odd = _mm256_dpbusd_epi32(
                            odd,
                            weights[group + 1],
                            broadcast_group(x, group + 1),
                        );
                    }
                    let mut dot = _mm256_add_epi32(even, odd);
                    if signed {
                        let bias = 128 * activations.int_sums[row * blocks + block];
                        dot = _mm256_sub_epi32(dot, _mm256_set1_epi32(bias));
                    }
                    let x_scale = activations.scales[row * blocks + block];
                    acc[r] = accumulate(acc[r], dot, block_scales, x_scale);
                }
            }
        }
        for (r, lanes) in acc.iter().enumerate() {
            // SAFETY: row `r` of the tile has eight outputs at `r * 64` in `out`.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(r * COLUMNS_PER_TASK), *lanes) };
        }
    }

    /// Computes the panel's tile with AVX2: `vpmaddubsw` multiplies unsigned by signed bytes
    /// into 16-bit pairs. 4-bit weights are unsigned already, and eight groups of their pairs
    /// fit in 16 bits (at most 8 · 2 · 15 · 127). Q8_0 weights use `|w| · (x · sign(w))`,
    /// widened to 32 bits after each group.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn tile_avx2(
        panel: Panel<'_>,
        activations: &QuantizedRows,
        blocks: usize,
        start: usize,
        count: usize,
        out: &mut [f32],
    ) {
        // SAFETY: AVX2 is enabled above, and `count <= 4` rows from `start` exist.
        unsafe {
            match count {
                4 => avx2::<4>(panel, activations, blocks, start, out),
                3 => avx2::<3>(panel, activations, blocks, start, out),
                2 => avx2::<2>(panel, activations, blocks, start, out),
                _ => avx2::<1>(panel, activations, blocks, start, out),
            }
        }
    }

    #[allow(clippy::needless_range_loop)] // `r` addresses the accumulators and the rows
    #[target_feature(enable = "avx2")]
    unsafe fn avx2<const R: usize>(
        panel: Panel<'_>,
        activations: &QuantizedRows,
        blocks: usize,
        start: usize,
        out: &mut [f32],
    ) {
        let in_features = blocks * BLOCK;
        let ones = _mm256_set1_epi16(1);
        let (signed, scales) = match panel {
            Panel::Q8 { scales, .. } => (true, scales),
            Panel::Q4 { scales, .. } => (false, scales),
        };
        let mut acc = [_mm256_setzero_ps(); R];
        for block in 0..blocks {
            // SAFETY: `block < blocks`, and every row contains `in_features` values.
            unsafe {
                let weights = load_block(panel, block);
                let magnitudes = if signed {
                    weights.map(|w| _mm256_sign_epi8(w, w))
                } else {
                    weights
                };
                let block_scales = _mm256_loadu_ps(scales.as_ptr().add(block * PANEL));
                for r in 0..R {
                    let row = start + r;
                    let x = activations
                        .values
                        .as_ptr()
                        .add(row * in_features + block * BLOCK);
                    let dot = if signed {
                        let mut dot = _mm256_setzero_si256();
                        for (group, (&w, &magnitude)) in weights.iter().zip(&magnitudes).enumerate()
                        {
                            let x_signed = _mm256_sign_epi8(broadcast_group(x, group), w);
                            let pairs = _mm256_maddubs_epi16(magnitude, x_signed);
                            dot = _mm256_add_epi32(dot, _mm256_madd_epi16(pairs, ones));
                        }
                        dot
                    } else {
                        let mut pairs = _mm256_setzero_si256();
                        for (group, &w) in weights.iter().enumerate() {
                            let product = _mm256_maddubs_epi16(w, broadcast_group(x, group));
                            pairs = _mm256_add_epi16(pairs, product);
                        }
                        _mm256_madd_epi16(pairs, ones)
                    };
                    let x_scale = activations.scales[row * blocks + block];
                    acc[r] = accumulate(acc[r], dot, block_scales, x_scale);
                }
            }
        }
        for (r, lanes) in acc.iter().enumerate() {
            // SAFETY: row `r` of the tile has eight outputs at `r * 64` in `out`.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(r * COLUMNS_PER_TASK), *lanes) };
        }
    }

    /// Runs [`quantize_rows_generic`] compiled for AVX2, where `round` becomes a vector
    /// instruction sequence with the same results.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize_rows(
        x: &[f32],
        rows: usize,
        in_features: usize,
    ) -> QuantizedRows {
        quantize_rows_generic(x, rows, in_features)
    }

    /// Runs [`add_offsets_generic`] compiled for AVX2, which vectorises its loop over 64 columns.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn add_offsets(
        mins: &[f32],
        sums: &[f32],
        blocks: usize,
        rows: usize,
        out: &mut [f32],
    ) {
        add_offsets_generic(mins, sums, blocks, rows, out);
    }

    const _: () = assert!(PANEL == 8);
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
            let rounded = quantize_rows(Kernel::Scalar, &x, rows, in_features);
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

    /// Every kernel the CPU can run gives the scalar kernel's results bit for bit, at every
    /// tile size and with a zero-padded panel.
    #[test]
    fn kernels_agree_exactly() {
        let kernels = Kernel::available();
        for dtype in TYPES {
            let q = QTensor::quantize(&shifted_random(43, 256, 5), dtype).unwrap();
            let matrix = QuantMatrix::from_qtensor(&q).unwrap();
            for rows in 1..=6 {
                let x = host(&random(rows, 256, 6));
                let scalar = QuantMatrix::matmul_many_with(Kernel::Scalar, &[&matrix], &x, rows);
                for &kernel in &kernels {
                    let got = QuantMatrix::matmul_many_with(kernel, &[&matrix], &x, rows);
                    assert_eq!(got, scalar, "{dtype:?} {kernel:?} rows {rows}");
                }
            }
        }
    }

    /// Halves round away from zero on every path, as `f32::round` does.
    #[test]
    fn activation_rounding_agrees() {
        // max|x| = 127 gives scale 1, so each value is rounded as it is.
        let mut x: Vec<f32> = (0..31).map(|i| i as f32 * 0.5 - 7.5).collect();
        x.push(127.0);
        let scalar = quantize_rows(Kernel::Scalar, &x, 1, 32);
        assert_eq!(scalar.values[0], -8);
        assert_eq!(scalar.values[1], -7);
        assert_eq!(scalar.values[16], 1);
        for kernel in Kernel::available() {
            let got = quantize_rows(kernel, &x, 1, 32);
            assert_eq!(got.values, scalar.values, "{kernel:?}");
            assert_eq!(got.int_sums, scalar.int_sums, "{kernel:?}");
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
