//! Batched quantised matrix multiplication for the CPU that reads each weight block once per
//! call for all rows. It covers Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants Q3_K to Q6_K
//! natively, each repacked without changing a weight. The loader requantises Q2_K to Q8_0 (see
//! `QuantPolicy`).
//!
//! On SmolLM2's shapes, candle 0.11's quantised matmul cost about as much per row at 16 rows as
//! at one (measured: `docs/benchmarks.md`). Here the weight matrix `(out, in)` is walked once.
//! Activations are quantised per block of 32 to int8, as llama.cpp does. The weights' offsets
//! (the minimums of Q4_1, Q5_1, Q4_K and Q5_K, and Q4_0's implied −8 · scale) meet the
//! activations' block sums after the integer loop, 64 output columns at a time.
//!
//! Every supported type decodes exactly to blocks of 32 integers `q` with an f32 scale, an
//! optional f32 minimum, and for Q3_K and Q6_K an integer sub-scale per 16 values:
//! `w = scale · sub · q + min`. The products `d · sc` of the K-quants are exact in f32, so no
//! weight changes. At load the blocks are repacked into panels of eight output columns. Within
//! a panel and a block, the four weights of each column that meet activations `4k..4k+4` sit
//! side by side, so one 32-byte vector contains them for all eight columns (4-bit types keep
//! two weights per byte). A kernel broadcasts four activation bytes at a time and multiplies
//! them with that vector, which yields the eight columns' dot products in one register, without
//! horizontal sums. Each panel block is loaded once and used for up to four rows.
//!
//! Each output is a sum over blocks of `exact integer dot · (weight scale · activation scale)`,
//! accumulated block by block in f32 with separate multiplies and adds. The integer dot
//! (sub-scales included) is exact on every path, so the scalar, AVX2 and AVX-512 VNNI kernels
//! give bit-identical results, whatever the batch around a row. The SIMD path is chosen at run
//! time.

use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;
use rayon::prelude::*;

/// Values per quantisation block.
const BLOCK: usize = 32;
/// Values per K-quant super-block.
const SUPER_BLOCK: usize = 256;
/// Every GGUF type with a batched kernel here, Q8_0 first.
pub const NATIVE_TYPES: [GgmlDType; 9] = [
    GgmlDType::Q8_0,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];
/// Output columns per panel: one f32 vector of 256 bits.
const PANEL: usize = 8;
/// Output columns per parallel task.
const COLUMNS_PER_TASK: usize = 64;
/// Rows that share one load of a panel block.
const TILE: usize = 4;

/// The storage of a [`QuantMatrix`]'s integers, which selects the inner loop a kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    /// int8 `q`, no minimum: Q8_0 and Q5_0.
    Signed = SIGNED,
    /// int8 `q` (|q| ≤ 32) with an int8 sub-scale per 16 values: Q3_K and Q6_K.
    SubScaled = SUB_SCALED,
    /// `q` in `0..32` as bytes, with a minimum: Q5_1 and Q5_K.
    Unsigned = UNSIGNED,
    /// `q` in `0..16`, two per byte, with a minimum: Q4_0, Q4_1 and Q4_K.
    Nibbles = NIBBLES,
}

// The kinds as numbers, so that the SIMD kernels can take them as const generic parameters.
const SIGNED: u8 = 0;
const SUB_SCALED: u8 = 1;
const UNSIGNED: u8 = 2;
const NIBBLES: u8 = 3;

impl Kind {
    /// Returns whether the type has a minimum per block, added by the offset pass.
    fn has_mins(self) -> bool {
        matches!(self, Self::Unsigned | Self::Nibbles)
    }

    /// Bytes of one panel block: 256 values, or 128 bytes of packed nibbles.
    fn panel_block_bytes(self) -> usize {
        match self {
            Self::Nibbles => PANEL * BLOCK / 2,
            _ => PANEL * BLOCK,
        }
    }
}

/// A quantised weight matrix `(out, in)` in the panel layout the kernels read directly.
#[derive(Debug)]
pub struct QuantMatrix {
    out_features: usize,
    in_features: usize,
    kind: Kind,
    /// `(panels, in / 32, groups, 8 columns, 4)` bytes, the last panel zero-padded. Group `k`
    /// of a block contains elements `4k..4k+4` (8 groups), or for [`Kind::Nibbles`] bytes
    /// `4k..4k+4` of the GGUF-style packing (4 groups), where byte `j` contains element `j` in its
    /// low nibble and element `j + 16` in its high nibble. [`Kind::Signed`] and
    /// [`Kind::SubScaled`] bytes are int8.
    data: Vec<u8>,
    /// `(panels, in / 32, 8)` scales.
    scales: Vec<f32>,
    /// `(panels, in / 32, 2, 8)` sub-scales for [`Kind::SubScaled`], otherwise empty.
    subs: Vec<i8>,
    /// Minimums for the kinds that have them, grouped by parallel task: `(⌈out / 64⌉, in / 32,
    /// 64)`, zero-padded, so that the offset pass reads 64 columns of one block contiguously.
    /// Otherwise empty.
    mins: Vec<f32>,
}

/// Activations quantised per block: `(rows, in)` int8 values, `(rows, in / 32)` scales, and
/// `(rows, in / 32)` block sums, as integers and as `scale · Σ q` for the offsets.
struct QuantizedRows {
    values: Vec<i8>,
    scales: Vec<f32>,
    int_sums: Vec<i32>,
    /// `(rows, in / 32, 2)` integer sums of each block's two halves of 16.
    half_sums: Vec<i32>,
    sums: Vec<f32>,
}

/// The weights of one panel, borrowed from a [`QuantMatrix`]: `blocks` panel blocks of data,
/// `(blocks, 8)` scales and, for [`Kind::SubScaled`], `(blocks, 2, 8)` sub-scales.
#[derive(Clone, Copy)]
struct Panel<'a> {
    data: &'a [u8],
    scales: &'a [f32],
    subs: &'a [i8],
}

impl Panel<'_> {
    /// Returns the integer `q` of element `element` of block `block` in column `lane`, read as
    /// `kind` stores it.
    fn q(self, kind: Kind, block: usize, element: usize, lane: usize) -> i32 {
        match kind {
            Kind::Nibbles => {
                let byte = element % 16;
                let packed = self.data[((block * 4 + byte / 4) * PANEL + lane) * 4 + byte % 4];
                (if element < 16 {
                    packed & 0x0F
                } else {
                    packed >> 4
                }) as i32
            }
            Kind::Unsigned => {
                self.data[((block * 8 + element / 4) * PANEL + lane) * 4 + element % 4] as i32
            }
            Kind::Signed | Kind::SubScaled => {
                self.data[((block * 8 + element / 4) * PANEL + lane) * 4 + element % 4] as i8 as i32
            }
        }
    }

    /// Returns the sub-scale of half `half` (0 or 1) of block `block` in column `lane`: 1 for
    /// the kinds without sub-scales.
    fn sub(self, kind: Kind, block: usize, half: usize, lane: usize) -> i32 {
        if kind == Kind::SubScaled {
            self.subs[(block * 2 + half) * PANEL + lane] as i32
        } else {
            1
        }
    }
}

/// One block of 32 weights decoded exactly: `w[i] = scale · sub[i / 16] · q[i] + min`.
struct Decoded {
    scale: f32,
    min: f32,
    subs: [i8; 2],
    q: [i8; BLOCK],
}

impl Decoded {
    fn new(scale: f32, min: f32) -> Self {
        Self {
            scale,
            min,
            subs: [1, 1],
            q: [0; BLOCK],
        }
    }
}

fn f16_at(bytes: &[u8], offset: usize) -> f32 {
    f16::from_le_bytes([bytes[offset], bytes[offset + 1]]).to_f32()
}

/// Returns the kind a GGUF type is stored as, its block size in values and in bytes, or `None`
/// for a type without a kernel here.
fn type_info(dtype: GgmlDType) -> Option<(Kind, usize, usize)> {
    Some(match dtype {
        GgmlDType::Q8_0 => (Kind::Signed, BLOCK, 34),
        GgmlDType::Q5_0 => (Kind::Signed, BLOCK, 22),
        GgmlDType::Q5_1 => (Kind::Unsigned, BLOCK, 24),
        GgmlDType::Q4_0 => (Kind::Nibbles, BLOCK, 18),
        GgmlDType::Q4_1 => (Kind::Nibbles, BLOCK, 20),
        GgmlDType::Q3K => (Kind::SubScaled, SUPER_BLOCK, 110),
        GgmlDType::Q4K => (Kind::Nibbles, SUPER_BLOCK, 144),
        GgmlDType::Q5K => (Kind::Unsigned, SUPER_BLOCK, 176),
        GgmlDType::Q6K => (Kind::SubScaled, SUPER_BLOCK, 210),
        _ => return None,
    })
}

/// Returns the 6-bit scale and minimum `j` (0..8) of a Q4_K or Q5_K super-block.
fn k4_scale_min(j: usize, packed: &[u8]) -> (u8, u8) {
    if j < 4 {
        (packed[j] & 63, packed[j + 4] & 63)
    } else {
        (
            (packed[j + 4] & 0x0F) | ((packed[j - 4] >> 6) << 4),
            (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4),
        )
    }
}

/// Returns the sixteen 6-bit scales of a Q3_K super-block, each minus 32.
fn q3k_scales(packed: &[u8]) -> [i8; 16] {
    std::array::from_fn(|j| {
        let low = if j < 8 {
            packed[j] & 0x0F
        } else {
            packed[j - 8] >> 4
        };
        let high = (packed[8 + j % 4] >> (2 * (j / 4))) & 3;
        (low | (high << 4)) as i8 - 32
    })
}

/// Decodes one GGUF block of `dtype` (one block of 32 or one super-block of 256 values) and
/// passes its blocks of 32 to `emit` in order. The formulas follow ggml's dequantisation. The
/// result is exact, so dequantising a [`Decoded`] gives candle's values bit for bit.
fn decode_block(dtype: GgmlDType, bytes: &[u8], mut emit: impl FnMut(Decoded)) {
    match dtype {
        GgmlDType::Q8_0 => {
            let mut block = Decoded::new(f16_at(bytes, 0), 0.0);
            for (q, &byte) in block.q.iter_mut().zip(&bytes[2..]) {
                *q = byte as i8;
            }
            emit(block);
        }
        GgmlDType::Q4_0 | GgmlDType::Q4_1 => {
            let scale = f16_at(bytes, 0);
            let (min, packed) = if dtype == GgmlDType::Q4_1 {
                (f16_at(bytes, 2), &bytes[4..])
            } else {
                (-8.0 * scale, &bytes[2..])
            };
            let mut block = Decoded::new(scale, min);
            for (j, &byte) in packed.iter().enumerate() {
                block.q[j] = (byte & 0x0F) as i8;
                block.q[j + 16] = (byte >> 4) as i8;
            }
            emit(block);
        }
        GgmlDType::Q5_0 | GgmlDType::Q5_1 => {
            let scale = f16_at(bytes, 0);
            let (min, rest) = if dtype == GgmlDType::Q5_1 {
                (f16_at(bytes, 2), &bytes[4..])
            } else {
                (0.0, &bytes[2..])
            };
            let high = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
            let shift = if dtype == GgmlDType::Q5_0 { 16 } else { 0 };
            let mut block = Decoded::new(scale, min);
            for (j, &byte) in rest[4..].iter().enumerate() {
                let low = (byte & 0x0F) | ((((high >> j) & 1) as u8) << 4);
                let up = (byte >> 4) | ((((high >> (j + 16)) & 1) as u8) << 4);
                block.q[j] = low as i8 - shift;
                block.q[j + 16] = up as i8 - shift;
            }
            emit(block);
        }
        GgmlDType::Q4K | GgmlDType::Q5K => {
            let (d, dmin) = (f16_at(bytes, 0), f16_at(bytes, 2));
            let packed = &bytes[4..16];
            let (high, low) = if dtype == GgmlDType::Q5K {
                (Some(&bytes[16..48]), &bytes[48..176])
            } else {
                (None, &bytes[16..144])
            };
            for j in 0..8 {
                let (scale, min) = k4_scale_min(j, packed);
                let mut block = Decoded::new(d * scale as f32, -(dmin * min as f32));
                // Sub-blocks 2i and 2i + 1 share 32 bytes: low nibbles, then high ones.
                let bytes = &low[(j / 2) * 32..][..32];
                for (l, q) in block.q.iter_mut().enumerate() {
                    let nibble = if j % 2 == 0 {
                        bytes[l] & 0x0F
                    } else {
                        bytes[l] >> 4
                    };
                    let fifth = high.map_or(0, |high| ((high[l] >> j) & 1) << 4);
                    *q = (nibble | fifth) as i8;
                }
                emit(block);
            }
        }
        GgmlDType::Q6K => {
            let (low, high) = (&bytes[..128], &bytes[128..192]);
            let subs = &bytes[192..208];
            let d = f16_at(bytes, 208);
            for j in 0..8 {
                let mut block = Decoded::new(d, 0.0);
                block.subs = [subs[2 * j] as i8, subs[2 * j + 1] as i8];
                // Each half of 128 values: element `32k + l` (k in 0..4, l in 0..32) takes a
                // nibble of byte `l` (k even) or `l + 32` (k odd), low for k < 2, and bits
                // `2k..2k+2` of high byte `l`.
                let (half, k) = (j / 4, j % 4);
                let low = &low[half * 64..][..64];
                let high = &high[half * 32..][..32];
                for (l, q) in block.q.iter_mut().enumerate() {
                    let byte = low[l + 32 * (k % 2)];
                    let nibble = if k < 2 { byte & 0x0F } else { byte >> 4 };
                    let top = (high[l] >> (2 * k)) & 3;
                    *q = (nibble | (top << 4)) as i8 - 32;
                }
                emit(block);
            }
        }
        GgmlDType::Q3K => {
            let (mask, low) = (&bytes[..32], &bytes[32..96]);
            let subs = q3k_scales(&bytes[96..108]);
            let d = f16_at(bytes, 108);
            for j in 0..8 {
                let mut block = Decoded::new(d, 0.0);
                block.subs = [subs[2 * j], subs[2 * j + 1]];
                // Each half of 128 values: element `32k + i` takes bits `2k..2k+2` of byte
                // `i` of the half's 32 bytes, minus 4 unless bit `4 · half + k` of mask
                // byte `i` is set.
                let (half, k) = (j / 4, j % 4);
                let low = &low[half * 32..][..32];
                for (i, q) in block.q.iter_mut().enumerate() {
                    let value = ((low[i] >> (2 * k)) & 3) as i8;
                    let set = mask[i] & (1 << (4 * half + k)) != 0;
                    *q = value - if set { 0 } else { 4 };
                }
                emit(block);
            }
        }
        _ => unreachable!("decode_block is called only for types with a kind"),
    }
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

/// Returns the index of `column`'s `(blocks, 8)` entry for `block` in a panel layout.
fn scale_index(column: usize, block: usize, blocks: usize) -> usize {
    ((column / PANEL) * blocks + block) * PANEL + column % PANEL
}

/// Returns the index of `column`'s minimum for `block` in the grouped layout of
/// [`QuantMatrix::mins`].
fn min_index(column: usize, block: usize, blocks: usize) -> usize {
    let (group, lane) = (column / COLUMNS_PER_TASK, column % COLUMNS_PER_TASK);
    (group * blocks + block) * COLUMNS_PER_TASK + lane
}

impl QuantMatrix {
    /// Converts a tensor of a supported type; `None` for other types, or for an inner size
    /// that is not a multiple of the type's block.
    pub fn from_qtensor(tensor: &QTensor) -> Option<Self> {
        let dtype = tensor.dtype();
        let (kind, type_block, type_bytes) = type_info(dtype)?;
        let (out_features, in_features) = tensor.shape().dims2().ok()?;
        if in_features == 0 || in_features % type_block != 0 {
            return None;
        }
        let data = tensor.data().ok()?;
        if data.len() != out_features * in_features / type_block * type_bytes {
            return None;
        }
        let blocks = in_features / BLOCK;
        let panels = out_features.div_ceil(PANEL);
        let groups = kind.panel_block_bytes() / (PANEL * 4);
        let mut packed = vec![0u8; panels * blocks * kind.panel_block_bytes()];
        let mut scales = vec![0f32; panels * blocks * PANEL];
        let mut subs = Vec::new();
        if kind == Kind::SubScaled {
            subs = vec![0i8; panels * blocks * 2 * PANEL];
        }
        let mut mins = Vec::new();
        if kind.has_mins() {
            mins = vec![0f32; out_features.div_ceil(COLUMNS_PER_TASK) * blocks * COLUMNS_PER_TASK];
        }
        let row_bytes = in_features / type_block * type_bytes;
        for (column, row) in data.chunks_exact(row_bytes).enumerate() {
            let mut block = 0;
            for bytes in row.chunks_exact(type_bytes) {
                decode_block(dtype, bytes, |decoded| {
                    scales[scale_index(column, block, blocks)] = decoded.scale;
                    if kind.has_mins() {
                        mins[min_index(column, block, blocks)] = decoded.min;
                    }
                    if kind == Kind::SubScaled {
                        for (half, &sub) in decoded.subs.iter().enumerate() {
                            let at = ((column / PANEL * blocks + block) * 2 + half) * PANEL;
                            subs[at + column % PANEL] = sub;
                        }
                    }
                    for element in 0..groups * 4 {
                        let byte = if kind == Kind::Nibbles {
                            let (low, high) = (decoded.q[element], decoded.q[element + 16]);
                            low as u8 | (high as u8) << 4
                        } else {
                            decoded.q[element] as u8
                        };
                        let at =
                            panel_index(column, block, element / 4, element % 4, blocks, groups);
                        packed[at] = byte;
                    }
                    block += 1;
                });
            }
        }
        Some(Self {
            out_features,
            in_features,
            kind,
            data: packed,
            scales,
            subs,
            mins,
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
        self.data.len() + self.subs.len() + 4 * (self.scales.len() + self.mins.len())
    }

    fn panel(&self, panel: usize) -> Panel<'_> {
        let blocks = self.in_features / BLOCK;
        let subs = if self.subs.is_empty() {
            &[][..]
        } else {
            &self.subs[panel * blocks * 2 * PANEL..][..blocks * 2 * PANEL]
        };
        let block_bytes = self.kind.panel_block_bytes();
        Panel {
            data: &self.data[panel * blocks * block_bytes..][..blocks * block_bytes],
            scales: &self.scales[panel * blocks * PANEL..][..blocks * PANEL],
            subs,
        }
    }

    /// Returns the integer `q` and the sub-scale of `column`'s element `element` of `block`.
    fn weight_parts(&self, column: usize, block: usize, element: usize) -> (i32, i32) {
        let panel = self.panel(column / PANEL);
        let lane = column % PANEL;
        (
            panel.q(self.kind, block, element, lane),
            panel.sub(self.kind, block, element / 16, lane),
        )
    }

    /// Returns the weights as dense f32, `(out, in)` row-major, computed as candle's
    /// dequantisation does.
    pub fn dequantize(&self) -> Vec<f32> {
        let blocks = self.in_features / BLOCK;
        let mut out = Vec::with_capacity(self.out_features * self.in_features);
        for column in 0..self.out_features {
            for block in 0..blocks {
                let scale = self.scales[scale_index(column, block, blocks)];
                out.extend((0..BLOCK).map(|element| {
                    let (q, sub) = self.weight_parts(column, block, element);
                    match self.kind {
                        Kind::Signed => q as f32 * scale,
                        Kind::SubScaled => scale * sub as f32 * q as f32,
                        Kind::Unsigned | Kind::Nibbles => {
                            q as f32 * scale + self.mins[min_index(column, block, blocks)]
                        }
                    }
                }));
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
                kernel.tile(self.kind, panel, activations, blocks, start, count, out);
                start += count;
            }
        }
        if self.kind.has_mins() {
            let mins = &self.mins[task * blocks * COLUMNS_PER_TASK..][..blocks * COLUMNS_PER_TASK];
            kernel.add_offsets(mins, &activations.sums, blocks, rows, out);
        }
    }
}

/// Adds the offset term `Σ_blocks min · sum_x` to one task's outputs (`(rows, 64)`
/// row-major). `mins` is the task's `(blocks, 64)` slice.
///
/// Each column is summed in the order of [`crate::model::attention::dot`]: eight partial sums
/// over blocks `b mod 8`, added in order, then the remaining blocks one by one, each with a
/// separate multiply and add. So the result does not depend on the batch, the vector width or
/// the kernel. The order matters on real models: the offset nearly cancels the main term, and
/// plain sequential summation moved one of SmolLM2's first-step log-probabilities by 0.3.
///
/// `W` columns are summed side by side: 8 for one AVX2 register of partial sums, 16 for an
/// AVX-512 one. Each column's arithmetic is the same for every `W`.
#[inline(always)]
fn add_offsets_generic<const W: usize>(
    mins: &[f32],
    sums: &[f32],
    blocks: usize,
    rows: usize,
    out: &mut [f32],
) {
    const LANES: usize = 8;
    let full = blocks / LANES * LANES;
    for row in 0..rows {
        let row_sums = &sums[row * blocks..][..blocks];
        let row_out = &mut out[row * COLUMNS_PER_TASK..][..COLUMNS_PER_TASK];
        // `W` columns at a time, so that the eight partial sums stay in registers.
        for (chunk, chunk_out) in row_out.chunks_exact_mut(W).enumerate() {
            let min_at = |block: usize| &mins[block * COLUMNS_PER_TASK + chunk * W..][..W];
            let mut partials = [[0f32; W]; LANES];
            for first in (0..full).step_by(LANES) {
                for (lane, partial) in partials.iter_mut().enumerate() {
                    let block = first + lane;
                    for (value, &min) in partial.iter_mut().zip(min_at(block)) {
                        *value += min * row_sums[block];
                    }
                }
            }
            let mut offsets = [0f32; W];
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
/// An AVX-512F build of this loop measured slower than the AVX2 one, so the VNNI kernel uses
/// the AVX2 code too.
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
    let mut half_sums = vec![0i32; rows * blocks * 2];
    let mut sums = vec![0f32; rows * blocks];
    for (index, (chunk, out)) in x
        .chunks_exact(BLOCK)
        .zip(values.chunks_exact_mut(BLOCK))
        .enumerate()
    {
        // A compare and select rather than `f32::max`, whose NaN handling keeps the loop
        // scalar. Both ignore NaN, so the result is the same.
        let amax = chunk
            .iter()
            .fold(0f32, |m, v| if v.abs() > m { v.abs() } else { m });
        let scale = amax / 127.0;
        let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        let mut halves = [0i32; 2];
        // Each half is rounded into i32 lanes first, with plain float and integer operations
        // so that the loop vectorises (a saturating `as` conversion keeps it scalar). Adding
        // 1.5 · 2^23 to a whole number below 2^22 in magnitude leaves it in the low mantissa
        // bits. The values lie within ±127.5, so the narrowing to i8 is exact.
        const SHIFT: f32 = 12_582_912.0;
        const SHIFT_BITS: i32 = 0x4B40_0000;
        for ((half_out, half_in), sum) in out
            .chunks_exact_mut(16)
            .zip(chunk.chunks_exact(16))
            .zip(&mut halves)
        {
            let mut rounded = [0i32; 16];
            for (r, &v) in rounded.iter_mut().zip(half_in) {
                *r = ((v * inverse).round() + SHIFT).to_bits() as i32 - SHIFT_BITS;
            }
            for (o, &r) in half_out.iter_mut().zip(&rounded) {
                *o = r as i8;
            }
            *sum = rounded.iter().sum();
        }
        let total = halves[0] + halves[1];
        scales[index] = scale;
        int_sums[index] = total;
        half_sums[2 * index..2 * index + 2].copy_from_slice(&halves);
        sums[index] = scale * total as f32;
    }
    QuantizedRows {
        values,
        scales,
        int_sums,
        half_sums,
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
    #[allow(clippy::too_many_arguments)] // the tile's coordinates, as the kernels take them
    fn tile(
        self,
        kind: Kind,
        panel: Panel<'_>,
        activations: &QuantizedRows,
        blocks: usize,
        start: usize,
        count: usize,
        out: &mut [f32],
    ) {
        match self {
            Self::Scalar => tile_scalar(kind, panel, activations, blocks, start, count, out),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `detect` and `available` return Avx2 only after checking the CPU for it.
            Self::Avx2 => unsafe {
                simd::tile_avx2(kind, panel, activations, blocks, start, count, out)
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `detect` and `available` return Vnni only after checking the CPU for
            // AVX-512 VNNI and VL.
            Self::Vnni => unsafe {
                simd::tile_vnni(kind, panel, activations, blocks, start, count, out)
            },
        }
    }

    /// Adds the offset term to one task's outputs, with AVX2 code where the CPU has it.
    /// The result is the same on every path.
    fn add_offsets(self, mins: &[f32], sums: &[f32], blocks: usize, rows: usize, out: &mut [f32]) {
        match self {
            Self::Scalar => add_offsets_generic::<PANEL>(mins, sums, blocks, rows, out),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `detect` and `available` return Avx2 only after checking the CPU for it.
            Self::Avx2 => unsafe { simd::add_offsets(mins, sums, blocks, rows, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `detect` and `available` return Vnni only after checking the CPU for
            // AVX-512 VNNI and VL, which come with AVX-512F.
            Self::Vnni => unsafe { simd::add_offsets_avx512(mins, sums, blocks, rows, out) },
        }
    }
}

/// Computes one panel for `count` rows from `start`: for each block, the exact integer dot
/// products of the eight columns (each half of 16 times its sub-scale for
/// [`Kind::SubScaled`]), times `weight scale · activation scale`, added to the sums. The SIMD
/// kernels perform the same f32 operations in the same order.
fn tile_scalar(
    kind: Kind,
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
                let mut halves = [0i32; 2];
                for (element, &a) in x.iter().enumerate() {
                    halves[element / 16] += panel.q(kind, block, element, lane) * a as i32;
                }
                let dot = halves[0] * panel.sub(kind, block, 0, lane)
                    + halves[1] * panel.sub(kind, block, 1, lane);
                *sum += dot as f32 * (panel.scales[block * PANEL + lane] * x_scale);
            }
        }
        out[(row - start) * COLUMNS_PER_TASK..][..PANEL].copy_from_slice(&acc);
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::{
        add_offsets_generic, quantize_rows_generic, Kind, Panel, QuantizedRows, BLOCK,
        COLUMNS_PER_TASK, NIBBLES, PANEL, SIGNED, SUB_SCALED, UNSIGNED,
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

    /// Loads the panel's weights of one block into eight vectors, group `k` in vector `k`: the
    /// stored bytes, or for [`Kind::Nibbles`] the unpacked unsigned nibbles.
    ///
    /// # Safety
    /// AVX2 must be available, and `block` must be below the panel's block count.
    #[inline(always)]
    unsafe fn load_block<const K: u8>(panel: Panel<'_>, block: usize) -> [__m256i; 8] {
        // SAFETY: a panel contains `blocks · 256` bytes, or `blocks · 128` for nibbles.
        unsafe {
            if K == NIBBLES {
                let base = panel.data.as_ptr().add(block * 128) as *const __m256i;
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
            } else {
                let base = panel.data.as_ptr().add(block * 256) as *const __m256i;
                std::array::from_fn(|group| _mm256_loadu_si256(base.add(group)))
            }
        }
    }

    /// Loads the eight columns' sub-scales of both halves of a block, widened to 32 bits.
    ///
    /// # Safety
    /// AVX2 must be available, and the panel must have sub-scales for `block`.
    #[inline(always)]
    unsafe fn load_subs(panel: Panel<'_>, block: usize) -> [__m256i; 2] {
        // SAFETY: the panel contains `(blocks, 2, 8)` sub-scales.
        unsafe {
            let base = panel.subs.as_ptr().add(block * 2 * PANEL);
            std::array::from_fn(|half| {
                let bytes = _mm_loadl_epi64(base.add(half * PANEL) as *const __m128i);
                _mm256_cvtepi8_epi32(bytes)
            })
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

    /// Returns the 16-bit pair sums `magnitude · x` of groups `first..first + 4`, with `x`'s
    /// signs flipped where the weight is negative if `signed`.
    ///
    /// # Safety
    /// AVX2 must be available, and `x` must point to a block of 32 readable bytes.
    #[inline(always)]
    unsafe fn half_pairs(
        x: *const i8,
        weights: &[__m256i; 8],
        magnitudes: &[__m256i; 8],
        first: usize,
        signed: bool,
    ) -> __m256i {
        // SAFETY: the caller guarantees AVX2 and the block, and `first + 4 <= 8`.
        unsafe {
            let mut pairs = _mm256_setzero_si256();
            for group in first..first + 4 {
                let mut x_group = broadcast_group(x, group);
                if signed {
                    x_group = _mm256_sign_epi8(x_group, weights[group]);
                }
                let product = _mm256_maddubs_epi16(magnitudes[group], x_group);
                pairs = _mm256_add_epi16(pairs, product);
            }
            pairs
        }
    }

    /// Combines the two halves' dots with their sub-scales: `lo · sub_lo + hi · sub_hi`.
    #[inline(always)]
    unsafe fn scale_halves(lo: __m256i, hi: __m256i, subs: [__m256i; 2]) -> __m256i {
        // SAFETY: the callers enable AVX2.
        unsafe {
            _mm256_add_epi32(
                _mm256_mullo_epi32(lo, subs[0]),
                _mm256_mullo_epi32(hi, subs[1]),
            )
        }
    }

    /// Calls `$kernel::<rows, kind>` for a tile of `$count` rows (1 to 4) and `$kind`.
    macro_rules! dispatch {
        ($kernel:ident, $kind:expr, $count:expr, $($arg:expr),*) => {
            match ($kind, $count) {
                (Kind::Signed, 4) => $kernel::<4, SIGNED>($($arg),*),
                (Kind::Signed, 3) => $kernel::<3, SIGNED>($($arg),*),
                (Kind::Signed, 2) => $kernel::<2, SIGNED>($($arg),*),
                (Kind::Signed, _) => $kernel::<1, SIGNED>($($arg),*),
                (Kind::SubScaled, 4) => $kernel::<4, SUB_SCALED>($($arg),*),
                (Kind::SubScaled, 3) => $kernel::<3, SUB_SCALED>($($arg),*),
                (Kind::SubScaled, 2) => $kernel::<2, SUB_SCALED>($($arg),*),
                (Kind::SubScaled, _) => $kernel::<1, SUB_SCALED>($($arg),*),
                (Kind::Unsigned, 4) => $kernel::<4, UNSIGNED>($($arg),*),
                (Kind::Unsigned, 3) => $kernel::<3, UNSIGNED>($($arg),*),
                (Kind::Unsigned, 2) => $kernel::<2, UNSIGNED>($($arg),*),
                (Kind::Unsigned, _) => $kernel::<1, UNSIGNED>($($arg),*),
                (Kind::Nibbles, 4) => $kernel::<4, NIBBLES>($($arg),*),
                (Kind::Nibbles, 3) => $kernel::<3, NIBBLES>($($arg),*),
                (Kind::Nibbles, 2) => $kernel::<2, NIBBLES>($($arg),*),
                (Kind::Nibbles, _) => $kernel::<1, NIBBLES>($($arg),*),
            }
        };
    }

    /// Computes the panel's tile with AVX-512 VNNI on 256-bit vectors: `vpdpbusd` multiplies
    /// unsigned by signed bytes and adds groups of four into 32-bit lanes.
    /// - Unsigned weights (nibbles, 5-bit values) go in as they are.
    /// - Signed weights are made unsigned by adding 128, which adds `128 · Σx` to the dot, so
    ///   that is subtracted again. Sub-scaled weights do the same for each half of 16.
    ///
    /// # Safety
    /// The CPU must support AVX2, AVX-512 VNNI and AVX-512 VL.
    #[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
    pub(super) unsafe fn tile_vnni(
        kind: Kind,
        panel: Panel<'_>,
        activations: &QuantizedRows,
        blocks: usize,
        start: usize,
        count: usize,
        out: &mut [f32],
    ) {
        // SAFETY: the features are enabled above, and `count <= 4` rows from `start` exist.
        unsafe { dispatch!(vnni, kind, count, panel, activations, blocks, start, out) }
    }

    // NOTE: `vnni` and `avx2` repeat the same block and row loops. A shared generic loop with
    // the block dot behind a trait measured 5–10% slower at 16 rows, so each keeps its own.
    #[allow(clippy::needless_range_loop)] // `r` addresses the accumulators and the rows
    #[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
    unsafe fn vnni<const R: usize, const K: u8>(
        panel: Panel<'_>,
        activations: &QuantizedRows,
        blocks: usize,
        start: usize,
        out: &mut [f32],
    ) {
        let in_features = blocks * BLOCK;
        let mut acc = [_mm256_setzero_ps(); R];
        for block in 0..blocks {
            // SAFETY: `block < blocks`, and every row contains `in_features` values.
            unsafe {
                let mut weights = load_block::<K>(panel, block);
                let mut subs = [_mm256_setzero_si256(); 2];
                if K == SIGNED || K == SUB_SCALED {
                    let flip = _mm256_set1_epi8(-128);
                    for w in &mut weights {
                        *w = _mm256_xor_si256(*w, flip);
                    }
                }
                if K == SUB_SCALED {
                    subs = load_subs(panel, block);
                }
                let block_scales = _mm256_loadu_ps(panel.scales.as_ptr().add(block * PANEL));
                for r in 0..R {
                    let row = start + r;
                    let x = activations
                        .values
                        .as_ptr()
                        .add(row * in_features + block * BLOCK);
                    let dot = if K == SUB_SCALED {
                        let mut lo = _mm256_setzero_si256();
                        let mut hi = _mm256_setzero_si256();
                        for group in 0..4 {
                            lo = _mm256_dpbusd_epi32(lo, weights[group], broadcast_group(x, group));
                            hi = _mm256_dpbusd_epi32(
                                hi,
                                weights[group + 4],
                                broadcast_group(x, group + 4),
                            );
                        }
                        let halves = &activations.half_sums[(row * blocks + block) * 2..];
                        lo = _mm256_sub_epi32(lo, _mm256_set1_epi32(128 * halves[0]));
                        hi = _mm256_sub_epi32(hi, _mm256_set1_epi32(128 * halves[1]));
                        scale_halves(lo, hi, subs)
                    } else {
                        let mut even = _mm256_setzero_si256();
                        let mut odd = _mm256_setzero_si256();
                        for group in (0..8).step_by(2) {
                            even = _mm256_dpbusd_epi32(
                                even,
                                weights[group],
                                broadcast_group(x, group),
                            );
                            odd = _mm256_dpbusd_epi32(
                                odd,
                                weights[group + 1],
                                broadcast_group(x, group + 1),
                            );
                        }
                        let mut dot = _mm256_add_epi32(even, odd);
                        if K == SIGNED {
                            let bias = 128 * activations.int_sums[row * blocks + block];
                            dot = _mm256_sub_epi32(dot, _mm256_set1_epi32(bias));
                        }
                        dot
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

    /// Computes the panel's tile with AVX2: `vpmaddubsw` multiplies unsigned by signed bytes
    /// into 16-bit pairs, which must not overflow.
    /// - Nibbles: eight groups of pairs fit in 16 bits (at most 8 · 2 · 15 · 127).
    /// - 5-bit values: four groups fit (4 · 2 · 31 · 127), so each half is widened alone.
    /// - Q8_0-style weights use `|w| · (x · sign(w))`, widened to 32 bits after each group.
    /// - Sub-scaled weights (|w| ≤ 32) use the same products, four groups per half
    ///   (4 · 2 · 32 · 127).
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn tile_avx2(
        kind: Kind,
        panel: Panel<'_>,
        activations: &QuantizedRows,
        blocks: usize,
        start: usize,
        count: usize,
        out: &mut [f32],
    ) {
        // SAFETY: AVX2 is enabled above, and `count <= 4` rows from `start` exist.
        unsafe { dispatch!(avx2, kind, count, panel, activations, blocks, start, out) }
    }

    #[allow(clippy::needless_range_loop)] // `r` addresses the accumulators and the rows
    #[target_feature(enable = "avx2")]
    unsafe fn avx2<const R: usize, const K: u8>(
        panel: Panel<'_>,
        activations: &QuantizedRows,
        blocks: usize,
        start: usize,
        out: &mut [f32],
    ) {
        let in_features = blocks * BLOCK;
        let ones = _mm256_set1_epi16(1);
        let signed = K == SIGNED || K == SUB_SCALED;
        let mut acc = [_mm256_setzero_ps(); R];
        for block in 0..blocks {
            // SAFETY: `block < blocks`, and every row contains `in_features` values.
            unsafe {
                let weights = load_block::<K>(panel, block);
                let magnitudes = if signed {
                    weights.map(|w| _mm256_sign_epi8(w, w))
                } else {
                    weights
                };
                let subs = if K == SUB_SCALED {
                    load_subs(panel, block)
                } else {
                    [_mm256_setzero_si256(); 2]
                };
                let block_scales = _mm256_loadu_ps(panel.scales.as_ptr().add(block * PANEL));
                for r in 0..R {
                    let row = start + r;
                    let x = activations
                        .values
                        .as_ptr()
                        .add(row * in_features + block * BLOCK);
                    let dot = if K == SIGNED {
                        let mut dot = _mm256_setzero_si256();
                        for (group, (&w, &magnitude)) in weights.iter().zip(&magnitudes).enumerate()
                        {
                            let x_signed = _mm256_sign_epi8(broadcast_group(x, group), w);
                            let pairs = _mm256_maddubs_epi16(magnitude, x_signed);
                            dot = _mm256_add_epi32(dot, _mm256_madd_epi16(pairs, ones));
                        }
                        dot
                    } else if K == NIBBLES {
                        let pairs = _mm256_add_epi16(
                            half_pairs(x, &weights, &magnitudes, 0, signed),
                            half_pairs(x, &weights, &magnitudes, 4, signed),
                        );
                        _mm256_madd_epi16(pairs, ones)
                    } else {
                        let lo = _mm256_madd_epi16(
                            half_pairs(x, &weights, &magnitudes, 0, signed),
                            ones,
                        );
                        let hi = _mm256_madd_epi16(
                            half_pairs(x, &weights, &magnitudes, 4, signed),
                            ones,
                        );
                        if K == SUB_SCALED {
                            scale_halves(lo, hi, subs)
                        } else {
                            _mm256_add_epi32(lo, hi)
                        }
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
        add_offsets_generic::<PANEL>(mins, sums, blocks, rows, out);
    }

    /// Computes [`add_offsets_generic`] with AVX-512F, sixteen columns per register: the same
    /// multiplies and adds in the same order, so the result is bit-identical. Written with
    /// intrinsics because the compiled generic loop kept its partial sums in memory.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    ///
    /// # Panics
    /// If `mins`, `sums` or `out` is shorter than `blocks`, `rows` and the task width imply.
    #[target_feature(enable = "avx2,avx512f")]
    pub(super) unsafe fn add_offsets_avx512(
        mins: &[f32],
        sums: &[f32],
        blocks: usize,
        rows: usize,
        out: &mut [f32],
    ) {
        const LANES: usize = 8;
        const WIDTH: usize = 16;
        assert!(mins.len() >= blocks * COLUMNS_PER_TASK, "mins too short");
        assert!(sums.len() >= rows * blocks, "sums too short");
        assert!(out.len() >= rows * COLUMNS_PER_TASK, "out too short");
        let full = blocks / LANES * LANES;
        for row in 0..rows {
            for chunk in 0..COLUMNS_PER_TASK / WIDTH {
                // SAFETY: the asserts above keep every block, row and column in bounds.
                unsafe {
                    let row_sums = sums.as_ptr().add(row * blocks);
                    let min_at = |block: usize| {
                        _mm512_loadu_ps(mins.as_ptr().add(block * COLUMNS_PER_TASK + chunk * WIDTH))
                    };
                    let term = |block: usize| {
                        _mm512_mul_ps(min_at(block), _mm512_set1_ps(*row_sums.add(block)))
                    };
                    let mut partials = [_mm512_setzero_ps(); LANES];
                    for first in (0..full).step_by(LANES) {
                        for (lane, partial) in partials.iter_mut().enumerate() {
                            *partial = _mm512_add_ps(*partial, term(first + lane));
                        }
                    }
                    let mut offsets = _mm512_setzero_ps();
                    for partial in partials {
                        offsets = _mm512_add_ps(offsets, partial);
                    }
                    for block in full..blocks {
                        offsets = _mm512_add_ps(offsets, term(block));
                    }
                    let at = out.as_mut_ptr().add(row * COLUMNS_PER_TASK + chunk * WIDTH);
                    _mm512_storeu_ps(at, _mm512_add_ps(_mm512_loadu_ps(at), offsets));
                }
            }
        }
    }

    const _: () = assert!(PANEL == 8);
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    use super::NATIVE_TYPES as TYPES;

    /// Returns `at_least` rounded up to a whole number of `dtype`'s blocks.
    fn width(dtype: GgmlDType, at_least: usize) -> usize {
        at_least.next_multiple_of(dtype.block_size())
    }

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
            let q = QTensor::quantize(&shifted_random(130, width(dtype, 96), 2), dtype).unwrap();
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
            let shapes = [(64, 32), (96, 576), (200, 1536), (7, 64), (40, 512)];
            for (out_features, in_features) in shapes {
                if in_features % dtype.block_size() != 0 {
                    continue;
                }
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
            let (out_features, in_features, rows) = (200, 768, 5);
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
            let inner = width(dtype, 576);
            let q = QTensor::quantize(&random(130, inner, 3), dtype).unwrap();
            let matrix = QuantMatrix::from_qtensor(&q).unwrap();
            let x_host = host(&random(16, inner, 4));
            let full = matrix.matmul(&x_host, 16);
            for rows in [1, 3, 7] {
                let part = matrix.matmul(&x_host[..rows * inner], rows);
                assert_eq!(part[..], full[..rows * 130], "{dtype:?} rows {rows}");
            }
            // A row alone at another position of the batch.
            let alone = matrix.matmul(&x_host[5 * inner..6 * inner], 1);
            assert_eq!(alone[..], full[5 * 130..6 * 130], "{dtype:?}");
        }
    }

    /// Every kernel the CPU can run gives the scalar kernel's results bit for bit, at every
    /// tile size and with a zero-padded panel.
    #[test]
    fn kernels_agree_exactly() {
        let kernels = Kernel::available();
        // 288 inputs leave one block after the offset sums' groups of eight.
        for (dtype, inputs) in TYPES.iter().flat_map(|&t| [(t, 256), (t, width(t, 288))]) {
            let q = QTensor::quantize(&shifted_random(43, inputs, 5), dtype).unwrap();
            let matrix = QuantMatrix::from_qtensor(&q).unwrap();
            for rows in 1..=6 {
                let x = host(&random(rows, inputs, 6));
                let scalar = QuantMatrix::matmul_many_with(Kernel::Scalar, &[&matrix], &x, rows);
                for &kernel in &kernels {
                    let got = QuantMatrix::matmul_many_with(kernel, &[&matrix], &x, rows);
                    assert_eq!(
                        got, scalar,
                        "{dtype:?} {kernel:?} {inputs} inputs, rows {rows}"
                    );
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
            assert_eq!(got.half_sums, scalar.half_sums, "{kernel:?}");
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
        for dtype in [GgmlDType::Q2K, GgmlDType::F16, GgmlDType::F32] {
            let q = QTensor::quantize(&random(2, 256, 8), dtype).unwrap();
            assert!(QuantMatrix::from_qtensor(&q).is_none(), "{dtype:?}");
        }
    }

    /// Weights at the ends of their range meet activations of 127, the case where the AVX2
    /// kernels' 16-bit pair sums come closest to overflowing. Each output is then an exact
    /// integer multiple of the scales, which every kernel must reproduce.
    #[test]
    fn extreme_weights_do_not_overflow() {
        let (out_features, in_features) = (16, 512);
        // Q6_K and Q3_K give every weight of -1 the most negative q. Q5_1, Q5_K and the 4-bit
        // types give the ones of a 0/1 pattern the largest unsigned q.
        let negative = Tensor::full(-1f32, (out_features, in_features), &Device::Cpu).unwrap();
        let pattern: Vec<f32> = (0..out_features * in_features)
            .map(|i| if i % 32 == 0 { 0.0 } else { 1.0 })
            .collect();
        let pattern = Tensor::from_vec(pattern, (out_features, in_features), &Device::Cpu).unwrap();
        let x = vec![1f32; 3 * in_features];
        for dtype in TYPES {
            let weight = match dtype {
                GgmlDType::Q6K | GgmlDType::Q3K | GgmlDType::Q8_0 | GgmlDType::Q5_0 => &negative,
                _ => &pattern,
            };
            let matrix =
                QuantMatrix::from_qtensor(&QTensor::quantize(weight, dtype).unwrap()).unwrap();
            let dense = matrix.dequantize();
            let scalar = QuantMatrix::matmul_many_with(Kernel::Scalar, &[&matrix], &x, 3);
            for kernel in Kernel::available() {
                let got = QuantMatrix::matmul_many_with(kernel, &[&matrix], &x, 3);
                assert_eq!(got, scalar, "{dtype:?} {kernel:?}");
            }
            for (col, weights) in dense.chunks_exact(in_features).enumerate() {
                let exact: f32 = weights.iter().sum();
                let got = scalar[0][col];
                assert!(
                    (got - exact).abs() <= 1e-5 * exact.abs().max(1.0),
                    "{dtype:?} column {col}: {got} vs {exact}"
                );
            }
        }
    }
}
