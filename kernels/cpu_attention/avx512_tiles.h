// Tile helpers shared by the AVX-512 translation units (included inside their anonymous
// namespace, after APEX_TARGET is defined): 16 tokens per tile, their masks, the
// transpose-and-add tree that turns 16 per-token accumulators into one register of scores, and
// a vector exp.
#pragma once

// ---- q . k for up to 16 tokens at once --------------------------------------------------------
// One query row against a tile of up to 16 keys: 16 independent accumulators (vertical FMAs
// over head_dim), then one transpose-and-add tree turns them into one register holding the 16
// scores in token order. That is ~3 shuffles/adds per token instead of a full horizontal
// reduction (and its latency chain) per token per row.

constexpr int kTileTokens = 16;

// Level 1 and 2 of the tree: quads[i], per 128-bit lane, holds that lane's partial sums of
// tokens 4i..4i+3 (in token order).
APEX_TARGET inline void reduce_to_quads(__m512 (&acc)[kTileTokens], __m512 (&quads)[4]) {
  __m512 pairs[8];  // per 128-bit lane: halves of tokens 2i and 2i+1, interleaved
  for (int i = 0; i < 8; ++i)
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(acc[2 * i], acc[2 * i + 1]),
                             _mm512_unpackhi_ps(acc[2 * i], acc[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d low = _mm512_castps_pd(pairs[2 * i]);
    const __m512d high = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(low, high)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(low, high)));
  }
}

// Level 3: halves[i] = 128-bit lanes (0+1, 2+3) of quads 2i and 2i+1, i.e.
// [lanes 0-7 sums of tokens 8i..8i+3, lanes 8-15 sums of those, same for tokens 8i+4..8i+7].
APEX_TARGET inline void reduce_to_halves(__m512 (&quads)[4], __m512 (&halves)[2]) {
  for (int i = 0; i < 2; ++i)
    halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0x88),
                              _mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0xdd));
}

// kPack rows share each accumulator: row r owns lanes [r * 16 / kPack, (r + 1) * 16 / kPack).
// out[r] lane t = the sum of row r's lanes of acc[t].
template <int kPack>
APEX_TARGET inline void reduce_packed_tile(__m512 (&acc)[kTileTokens], __m512 (&out)[kPack]) {
  __m512 quads[4];
  reduce_to_quads(acc, quads);
  if constexpr (kPack == 4) {
    // 4x4 transpose of 128-bit lanes: row r's lane of every quad, in token order.
    const __m512 low01 = _mm512_shuffle_f32x4(quads[0], quads[1], 0x44);
    const __m512 low23 = _mm512_shuffle_f32x4(quads[2], quads[3], 0x44);
    const __m512 high01 = _mm512_shuffle_f32x4(quads[0], quads[1], 0xee);
    const __m512 high23 = _mm512_shuffle_f32x4(quads[2], quads[3], 0xee);
    out[0] = _mm512_shuffle_f32x4(low01, low23, 0x88);
    out[1] = _mm512_shuffle_f32x4(low01, low23, 0xdd);
    out[2] = _mm512_shuffle_f32x4(high01, high23, 0x88);
    out[3] = _mm512_shuffle_f32x4(high01, high23, 0xdd);
  } else {
    __m512 halves[2];
    reduce_to_halves(quads, halves);
    if constexpr (kPack == 2) {
      out[0] = _mm512_shuffle_f32x4(halves[0], halves[1], 0x88);
      out[1] = _mm512_shuffle_f32x4(halves[0], halves[1], 0xdd);
    } else {
      out[0] = _mm512_add_ps(_mm512_shuffle_f32x4(halves[0], halves[1], 0x88),
                             _mm512_shuffle_f32x4(halves[0], halves[1], 0xdd));
    }
  }
}

// sums[t] = acc[t][0] + ... + acc[t][15], returned as lane t.
APEX_TARGET inline __m512 reduce_tile(__m512 (&acc)[kTileTokens]) {
  __m512 out[1];
  reduce_packed_tile<1>(acc, out);
  return out[0];
}

APEX_TARGET inline __mmask16 lanes(int count) {
  return count >= 16 ? __mmask16(0xffff) : __mmask16((1u << count) - 1u);
}

// exp(x) = 2^n * exp(r), r = x - n ln2 in [-ln2/2, ln2/2]; degree-6 Taylor polynomial
// (relative error ~1e-7). x is clamped at -87 so 2^n stays a normal float.
APEX_TARGET inline __m512 exp_lanes(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 poly = _mm512_set1_ps(1.0f / 720.0f);
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f / 120.0f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f / 24.0f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f / 6.0f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(0.5f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(poly, n);
}
