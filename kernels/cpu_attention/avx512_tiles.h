// Tile helpers shared by the AVX-512 translation units (included inside their anonymous
// namespace, after APEX_TARGET is defined): 16 tokens per tile, their masks, and the
// transpose-and-add tree that turns 16 per-token accumulators into one register of scores.
#pragma once

// ---- q . k for up to 16 tokens at once --------------------------------------------------------
// One query row against a tile of up to 16 keys: 16 independent accumulators (vertical FMAs
// over head_dim), then one transpose-and-add tree turns them into one register holding the 16
// scores in token order. That is ~3 shuffles/adds per token instead of a full horizontal
// reduction (and its latency chain) per token per row.

constexpr int kTileTokens = 16;

// sums[t] = acc[t][0] + ... + acc[t][15], returned as lane t.
APEX_TARGET inline __m512 reduce_tile(__m512 (&acc)[kTileTokens]) {
  __m512 pairs[8];  // per 128-bit lane: halves of tokens 2i and 2i+1, interleaved
  for (int i = 0; i < 8; ++i)
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(acc[2 * i], acc[2 * i + 1]),
                             _mm512_unpackhi_ps(acc[2 * i], acc[2 * i + 1]));
  __m512 quads[4];  // per 128-bit lane: that lane's partial sums of tokens 4i..4i+3
  for (int i = 0; i < 4; ++i) {
    const __m512d low = _mm512_castps_pd(pairs[2 * i]);
    const __m512d high = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(low, high)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(low, high)));
  }
  __m512 halves[2];  // 128-bit lane pairs summed: lanes of quads 2i and 2i+1
  for (int i = 0; i < 2; ++i)
    halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0x88),
                              _mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(halves[0], halves[1], 0x88),
                       _mm512_shuffle_f32x4(halves[0], halves[1], 0xdd));
}

APEX_TARGET inline __mmask16 lanes(int count) {
  return count >= 16 ? __mmask16(0xffff) : __mmask16((1u << count) - 1u);
}

