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
    out.par_chunks_mut(group * hd).enumerate().for_each_init(
        Scratch::default,
        |scratch, (item, out)| {
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
            wide.attend_group(&item, shape, scratch, out);
        },
    );
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

/// Buffers that one thread reuses across items, so that an item allocates nothing.
#[derive(Default)]
struct Scratch {
    /// Scores of head `g` at `scores[g * positions..]`.
    scores: Vec<f32>,
    /// `1 / Σ exp` of each head.
    inverses: Vec<f32>,
}

/// The vector code attention runs: the x86-64 baseline or AVX2. The compiler vectorises
/// [`attend_group`] either way. With AVX2 its vectors are twice as wide and the scores come from
/// [`dots8`], but every value goes through the same operations in the same order, so the
/// results are identical.
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
        scratch: &mut Scratch,
        out: &mut [f32],
    ) {
        match self {
            Self::Baseline => attend_group::<false>(item, shape, scratch, out),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `detect` returned Avx2 only after checking that the CPU has AVX2.
            Self::Avx2 => unsafe { attend_group_avx2(item, shape, scratch, out) },
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
    scratch: &mut Scratch,
    out: &mut [f32],
) {
    attend_group::<true>(item, shape, scratch, out);
}

/// Computes softmax attention for the query heads that share the item's key/value head, over
/// its row's cache, added into `out` (`(group, head_dim)`). Each head's arithmetic runs in
/// position order, as it would for that head alone. `AVX2` computes the scores eight positions
/// at a time with [`dots8`], and the caller must then run with AVX2 enabled.
#[inline(always)]
fn attend_group<const AVX2: bool>(
    item: &Item<'_>,
    shape: AttentionShape,
    scratch: &mut Scratch,
    out: &mut [f32],
) {
    let hd = shape.head_dim;
    let group = shape.heads / shape.kv_heads;
    let stride = shape.kv_heads * hd;
    let positions = item.position + 1;
    let (keys, values) = item.caches;
    let query = |g: usize| {
        let head = item.kv_head * group + g;
        &item.q[(head * shape.tokens + item.token) * hd..][..hd]
    };

    let Scratch { scores, inverses } = scratch;
    scores.clear();
    scores.resize(group * positions, 0.0);
    let key_at = |p: usize| &keys[p * stride + item.kv_head * hd..][..hd];
    let mut first = 0;
    #[cfg(target_arch = "x86_64")]
    if AVX2 && hd.is_multiple_of(8) {
        while first + 8 <= positions {
            let eight: [&[f32]; 8] = std::array::from_fn(|j| key_at(first + j));
            for g in 0..group {
                // SAFETY: `AVX2` is set only by a caller compiled with AVX2, and `hd` is a
                // multiple of 8.
                let dots = unsafe { dots8(query(g), eight) };
                for (j, dot) in dots.into_iter().enumerate() {
                    scores[g * positions + first + j] = dot * item.scale;
                }
            }
            first += 8;
        }
    }
    for p in first..positions {
        let key = key_at(p);
        for g in 0..group {
            scores[g * positions + p] = dot(query(g), key) * item.scale;
        }
    }

    inverses.clear();
    for head_scores in scores.chunks_exact_mut(positions) {
        let max = head_scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        let mut sum = 0f32;
        for score in head_scores.iter_mut() {
            *score = (*score - max).exp();
            sum += *score;
        }
        inverses.push(1.0 / sum);
    }

    // Each head's outputs are summed 64 at a time in a local array, which the compiler keeps
    // in registers, over all positions in order. Every output still adds its terms in
    // position order, so the result is the same as a loop over positions outside.
    const CHUNK: usize = 64;
    let value_at = |p: usize, start: usize| &values[p * stride + item.kv_head * hd + start..];
    for (g, head_out) in out.chunks_exact_mut(hd).enumerate() {
        let head_scores = &scores[g * positions..][..positions];
        let inverse = inverses[g];
        let mut start = 0;
        while start + CHUNK <= hd {
            let chunk_out = &mut head_out[start..start + CHUNK];
            let mut sums = [0f32; CHUNK];
            sums.copy_from_slice(chunk_out);
            for (p, &score) in head_scores.iter().enumerate() {
                let weight = score * inverse;
                for (sum, &v) in sums.iter_mut().zip(&value_at(p, start)[..CHUNK]) {
                    *sum += weight * v;
                }
            }
            chunk_out.copy_from_slice(&sums);
            start += CHUNK;
        }
        if start < hd {
            for (p, &score) in head_scores.iter().enumerate() {
                let weight = score * inverse;
                for (o, &v) in head_out[start..].iter_mut().zip(value_at(p, start)) {
                    *o += weight * v;
                }
            }
        }
    }
}

/// Computes [`dot`] of `query` with eight keys, with the same result for each. The eight
/// partial sums of each key are kept in one vector, and the eight vectors are transposed, so
/// that adding their lanes in order takes seven vector adds for all eight keys.
///
/// # Safety
/// The CPU must support AVX2, and every slice must have the same length, a multiple of 8.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dots8(query: &[f32], keys: [&[f32]; 8]) -> [f32; 8] {
    use std::arch::x86_64::*;
    let chunks = query.len() / 8;
    let mut dots = [0f32; 8];
    // SAFETY: the caller enables AVX2, and each slice has `8 * chunks` values.
    unsafe {
        let mut partials = [_mm256_setzero_ps(); 8];
        for chunk in 0..chunks {
            let q = _mm256_loadu_ps(query.as_ptr().add(chunk * 8));
            for (partial, key) in partials.iter_mut().zip(keys) {
                let k = _mm256_loadu_ps(key.as_ptr().add(chunk * 8));
                *partial = _mm256_add_ps(*partial, _mm256_mul_ps(q, k));
            }
        }
        let [a0, a1, a2, a3, a4, a5, a6, a7] = partials;
        let (t0, t1) = (_mm256_unpacklo_ps(a0, a1), _mm256_unpackhi_ps(a0, a1));
        let (t2, t3) = (_mm256_unpacklo_ps(a2, a3), _mm256_unpackhi_ps(a2, a3));
        let (t4, t5) = (_mm256_unpacklo_ps(a4, a5), _mm256_unpackhi_ps(a4, a5));
        let (t6, t7) = (_mm256_unpacklo_ps(a6, a7), _mm256_unpackhi_ps(a6, a7));
        let (s0, s1) = (
            _mm256_shuffle_ps::<0x44>(t0, t2),
            _mm256_shuffle_ps::<0xEE>(t0, t2),
        );
        let (s2, s3) = (
            _mm256_shuffle_ps::<0x44>(t1, t3),
            _mm256_shuffle_ps::<0xEE>(t1, t3),
        );
        let (s4, s5) = (
            _mm256_shuffle_ps::<0x44>(t4, t6),
            _mm256_shuffle_ps::<0xEE>(t4, t6),
        );
        let (s6, s7) = (
            _mm256_shuffle_ps::<0x44>(t5, t7),
            _mm256_shuffle_ps::<0xEE>(t5, t7),
        );
        // Lane `l` of every key, in key order.
        let lanes = [
            _mm256_permute2f128_ps::<0x20>(s0, s4),
            _mm256_permute2f128_ps::<0x20>(s1, s5),
            _mm256_permute2f128_ps::<0x20>(s2, s6),
            _mm256_permute2f128_ps::<0x20>(s3, s7),
            _mm256_permute2f128_ps::<0x31>(s0, s4),
            _mm256_permute2f128_ps::<0x31>(s1, s5),
            _mm256_permute2f128_ps::<0x31>(s2, s6),
            _mm256_permute2f128_ps::<0x31>(s3, s7),
        ];
        let mut sums = lanes[0];
        for &lane in &lanes[1..] {
            sums = _mm256_add_ps(sums, lane);
        }
        _mm256_storeu_ps(dots.as_mut_ptr(), sums);
    }
    dots
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The eight-key path gives [`dot`]'s results bit for bit.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn dots8_equals_dot() {
        if !is_x86_feature_detected!("avx2") {
            return;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for len in [8, 64, 128] {
            let mut random =
                |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-4.0f32..4.0)).collect() };
            let query = random(len);
            let keys: Vec<Vec<f32>> = (0..8).map(|_| random(len)).collect();
            let eight: [&[f32]; 8] = std::array::from_fn(|j| keys[j].as_slice());
            // SAFETY: AVX2 was detected above, and every slice has `len` values.
            let fast = unsafe { dots8(&query, eight) };
            for (key, got) in keys.iter().zip(fast) {
                assert_eq!(got.to_bits(), dot(&query, key).to_bits(), "length {len}");
            }
        }
    }

    /// [`attend`] gives, bit for bit, the straightforward computation: scores with [`dot`],
    /// softmax, then each output summed over positions in order. Head sizes 64 and 80 cover
    /// the 64-wide register path and its remainder.
    #[test]
    fn attend_matches_position_loop() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for hd in [64, 80] {
            let (heads, kv_heads) = (6, 2);
            let group = heads / kv_heads;
            // Row 0: two new tokens after 5 cached. Row 1: one new token after 11.
            let spans = [
                AttentionSpan {
                    offset: 0,
                    len: 2,
                    past: 5,
                },
                AttentionSpan {
                    offset: 2,
                    len: 1,
                    past: 11,
                },
            ];
            let shape = AttentionShape {
                tokens: 3,
                heads,
                kv_heads,
                head_dim: hd,
            };
            let mut random =
                |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-2.0f32..2.0)).collect() };
            let q = random(heads * 3 * hd);
            let cache_len = |span: &AttentionSpan| (span.past + span.len) * kv_heads * hd;
            let keys: Vec<Vec<f32>> = spans.iter().map(|s| random(cache_len(s))).collect();
            let values: Vec<Vec<f32>> = spans.iter().map(|s| random(cache_len(s))).collect();
            let caches: Vec<(&[f32], &[f32])> = keys
                .iter()
                .zip(&values)
                .map(|(k, v)| (k.as_slice(), v.as_slice()))
                .collect();
            let got = attend(&q, &caches, &spans, shape);

            let scale = 1.0 / (hd as f32).sqrt();
            for (row, span) in spans.iter().enumerate() {
                for token in span.offset..span.offset + span.len {
                    let positions = span.past + (token - span.offset) + 1;
                    for head in 0..heads {
                        let kv = head / group;
                        let at = |cache: &[f32], p: usize| {
                            cache[(p * kv_heads + kv) * hd..][..hd].to_vec()
                        };
                        let query = &q[(head * 3 + token) * hd..][..hd];
                        let mut weights: Vec<f32> = (0..positions)
                            .map(|p| dot(query, &at(&keys[row], p)) * scale)
                            .collect();
                        let max = weights.iter().fold(f32::NEG_INFINITY, |m, &w| m.max(w));
                        let mut sum = 0f32;
                        for w in &mut weights {
                            *w = (*w - max).exp();
                            sum += *w;
                        }
                        let inverse = 1.0 / sum;
                        let mut expected = vec![0f32; hd];
                        for (p, &w) in weights.iter().enumerate() {
                            for (e, v) in expected.iter_mut().zip(at(&values[row], p)) {
                                *e += w * inverse * v;
                            }
                        }
                        let out = &got[(token * heads + head) * hd..][..hd];
                        assert_eq!(
                            out,
                            expected.as_slice(),
                            "hd {hd} token {token} head {head}"
                        );
                    }
                }
            }
        }
    }
}
