//! Attention on the CPU over host-memory KV caches, for serving.
//!
//! candle needs about fifteen small tensor operations per row and layer to run attention
//! against a row's own cache, and their fixed cost dominated decode steps with many rows. Here
//! one pass appends every row's new keys and values to its cache and computes every
//! (token, head) output in parallel, reading the cache in place. Each output is computed by
//! the same code in the same order whatever else is in the batch.

use rayon::prelude::*;

/// Where one row's new tokens sit in the batch.
pub(crate) struct AttentionSpan {
    /// First token of the row in the batch.
    pub offset: usize,
    /// New tokens of the row.
    pub len: usize,
    /// Positions already cached.
    pub past: usize,
}

/// Shapes of one attention call.
#[derive(Clone, Copy)]
pub(crate) struct AttentionShape {
    pub tokens: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Appends a row's new keys or values, given heads-first as `(kv_heads, tokens, head_dim)` for
/// the whole batch, to its position-major cache `(positions, kv_heads, head_dim)`.
pub(crate) fn append(
    cache: &mut Vec<f32>,
    new: &[f32],
    span: &AttentionSpan,
    shape: AttentionShape,
) {
    let hd = shape.head_dim;
    cache.reserve(span.len * shape.kv_heads * hd);
    for token in span.offset..span.offset + span.len {
        for head in 0..shape.kv_heads {
            let start = (head * shape.tokens + token) * hd;
            cache.extend_from_slice(&new[start..start + hd]);
        }
    }
}

/// Causal attention for every token of the batch: `q` is `(heads, tokens, head_dim)`, each
/// row's cache already holds its new positions. Returns `(tokens, heads · head_dim)`.
pub(crate) fn attend(
    q: &[f32],
    caches: &[(&[f32], &[f32])],
    spans: &[AttentionSpan],
    shape: AttentionShape,
) -> Vec<f32> {
    let hd = shape.head_dim;
    let group = shape.heads / shape.kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut token_row = vec![0usize; shape.tokens];
    for (row, span) in spans.iter().enumerate() {
        token_row[span.offset..span.offset + span.len].fill(row);
    }
    let mut out = vec![0f32; shape.tokens * shape.heads * hd];
    let wide = Wide::detect();
    // One item per (token, key/value head): the query heads that share a key/value head read
    // its cache in one pass, so the cache is read once per token instead of once per head.
    out.par_chunks_mut(group * hd)
        .enumerate()
        .for_each_init(Vec::new, |scores, (item, out)| {
            let token = item / shape.kv_heads;
            let kv_head = item % shape.kv_heads;
            let row = token_row[token];
            let span = &spans[row];
            let item = Item {
                q,
                token,
                kv_head,
                position: span.past + (token - span.offset),
                caches: caches[row],
                scale,
            };
            wide.attend_group(&item, shape, scores, out);
        });
    out
}

/// One (token, key/value head) item of [`attend`].
struct Item<'a> {
    /// All queries, `(heads, tokens, head_dim)`.
    q: &'a [f32],
    token: usize,
    kv_head: usize,
    /// The token's position; it attends to positions `0..=position`.
    position: usize,
    caches: (&'a [f32], &'a [f32]),
    scale: f32,
}

/// Whether the CPU runs 256-bit vector code. The compiler vectorises [`attend_group`] either
/// way. With AVX2 its vectors are twice as wide, but every lane does the same operations in
/// the same order, so the results are identical.
#[derive(Clone, Copy)]
enum Wide {
    Baseline,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Wide {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") {
                return Self::Avx2;
            }
        }
        Self::Baseline
    }

    fn attend_group(
        self,
        item: &Item<'_>,
        shape: AttentionShape,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        match self {
            Self::Baseline => attend_group(item, shape, scores, out),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `detect` returned Avx2 only after checking that the CPU has AVX2.
            Self::Avx2 => unsafe { attend_group_avx2(item, shape, scores, out) },
        }
    }
}

/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn attend_group_avx2(
    item: &Item<'_>,
    shape: AttentionShape,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    attend_group(item, shape, scores, out);
}

/// Computes softmax attention for the query heads that share the item's key/value head, over
/// its row's cache, added into `out` (`(group, head_dim)`). Each head's arithmetic runs in
/// position order, as it would for that head alone.
#[inline(always)]
fn attend_group(item: &Item<'_>, shape: AttentionShape, scores: &mut Vec<f32>, out: &mut [f32]) {
    let hd = shape.head_dim;
    let group = shape.heads / shape.kv_heads;
    let stride = shape.kv_heads * hd;
    let positions = item.position + 1;
    let (keys, values) = item.caches;
    let query = |g: usize| {
        let head = item.kv_head * group + g;
        &item.q[(head * shape.tokens + item.token) * hd..][..hd]
    };

    // Scores of head `g` at `scores[g * positions..]`.
    scores.clear();
    scores.resize(group * positions, 0.0);
    for p in 0..positions {
        let key = &keys[p * stride + item.kv_head * hd..][..hd];
        for g in 0..group {
            scores[g * positions + p] = dot(query(g), key) * item.scale;
        }
    }

    let mut inverses = Vec::with_capacity(group);
    for head_scores in scores.chunks_exact_mut(positions) {
        let max = head_scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        let mut sum = 0f32;
        for score in head_scores.iter_mut() {
            *score = (*score - max).exp();
            sum += *score;
        }
        inverses.push(1.0 / sum);
    }

    for p in 0..positions {
        let value = &values[p * stride + item.kv_head * hd..][..hd];
        for (g, head_out) in out.chunks_exact_mut(hd).enumerate() {
            let weight = scores[g * positions + p] * inverses[g];
            for (o, &v) in head_out.iter_mut().zip(value) {
                *o += weight * v;
            }
        }
    }
}

/// Computes a dot product with eight partial sums, which the compiler keeps in one SIMD
/// register. The summation order depends only on the length, so results do not depend on the batch.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut partial = [0f32; 8];
    let chunks = a.len() / 8;
    for i in 0..chunks {
        for lane in 0..8 {
            partial[lane] += a[i * 8 + lane] * b[i * 8 + lane];
        }
    }
    let mut sum = partial.iter().sum::<f32>();
    for i in chunks * 8..a.len() {
        sum += a[i] * b[i];
    }
    sum
}
