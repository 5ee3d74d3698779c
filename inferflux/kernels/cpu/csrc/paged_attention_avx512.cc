// AVX-512 inner loop of the CPU paged attention (see paged_attention.h). Compiled with a
// function-level target attribute only: the library itself has no -march, and the handler calls
// this path only when __builtin_cpu_supports says the CPU has AVX-512F/DQ/BW/VL.
//
// Lanes are positions: a block of 16 K rows (any pages) is transposed to K^T[D][16] once, then each
// query head of the GQA group gets 16 scores with D broadcast FMAs, an online-softmax update
// (vector exp), and 16 V rows folded into its output with FMAs over head_dim.
#include "paged_attention.h"

#if defined(__x86_64__) || defined(__i386__)
// GCC 12 warns about _mm512_undefined_ps() inside its own intrinsics (GCC bug 105593).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <memory>

namespace inferflux::attn {
namespace {

#define IF_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma")))
#define IF_INLINE inline __attribute__((always_inline))

constexpr int kMaxDim = 256;  // K^T block buffer: kMaxDim x 16 floats
constexpr int kSub = 8;       // query heads per register-blocked pass

// exp(x) in f32, Cephes' expf polynomial (max error ~2 ulp); exp of very negative x flushes to 0.
IF_AVX512 IF_INLINE __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-103.972084f));
  const __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, fx);
}

// Horizontal max / sum of 16 lanes, in a fixed order (swap halves, quarters, pairs, neighbours).
template <bool kMax>
IF_AVX512 IF_INLINE __m512 op16(__m512 a, __m512 b) {
  if constexpr (kMax) {
    return _mm512_max_ps(a, b);
  } else {
    return _mm512_add_ps(a, b);
  }
}

template <bool kMax>
IF_AVX512 IF_INLINE float reduce16(__m512 x) {
  x = op16<kMax>(x, _mm512_shuffle_f32x4(x, x, _MM_SHUFFLE(1, 0, 3, 2)));
  x = op16<kMax>(x, _mm512_shuffle_f32x4(x, x, _MM_SHUFFLE(2, 3, 0, 1)));
  x = op16<kMax>(x, _mm512_permute_ps(x, _MM_SHUFFLE(1, 0, 3, 2)));
  x = op16<kMax>(x, _mm512_permute_ps(x, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm512_cvtss_f32(x);
}

// out[k*16 + i] = rows[i][col + k] for k, i < 16: one 16x16 tile of K transposed.
IF_AVX512 IF_INLINE void transpose16(const float* const* rows, int64_t col, float* out) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(rows[i] + col);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  // r[4a + b] now holds, in 128-bit lane L, column 4L + b of rows 4a..4a+3.
  for (int h = 0; h < 16; h += 8) {
    for (int b = 0; b < 4; ++b) {
      t[h + b] = _mm512_shuffle_f32x4(r[h + b], r[h + 4 + b], 0x88);
      t[h + 4 + b] = _mm512_shuffle_f32x4(r[h + b], r[h + 4 + b], 0xdd);
    }
  }
  for (int b = 0; b < 8; ++b) {
    r[b] = _mm512_shuffle_f32x4(t[b], t[8 + b], 0x88);
    r[8 + b] = _mm512_shuffle_f32x4(t[b], t[8 + b], 0xdd);
  }
  // After the two 128-bit shuffle rounds r[c] is column c.
  for (int c = 0; c < 16; ++c) _mm512_store_ps(out + c * 16, r[c]);
}

// Scores of NJ query heads (qs rows, already scaled) against the 16 positions of kt: s[j] lanes = positions.
template <int NJ>
IF_AVX512 IF_INLINE void scores(const float* qs, int64_t dim, const float* kt, __m512* s) {
  __m512 acc[NJ];
  for (int j = 0; j < NJ; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t d = 0; d < dim; ++d) {
    const __m512 kd = _mm512_load_ps(kt + d * 16);
    for (int j = 0; j < NJ; ++j) acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(qs[j * dim + d]), kd, acc[j]);
  }
  for (int j = 0; j < NJ; ++j) s[j] = acc[j];
}

// acc[j][:] += sum_i probs[j][i] * vrows[i][:] for NJ heads over lanes i < n.
template <int NJ>
IF_AVX512 IF_INLINE void fold_values(const float* probs, const float* const* vrows, int n, int64_t dim,
                                     float* acc) {
  for (int64_t c = 0; c < dim; c += 16) {
    __m512 a[NJ];
    for (int j = 0; j < NJ; ++j) a[j] = _mm512_loadu_ps(acc + j * dim + c);
    for (int i = 0; i < n; ++i) {
      const __m512 vv = _mm512_loadu_ps(vrows[i] + c);
      for (int j = 0; j < NJ; ++j) a[j] = _mm512_fmadd_ps(_mm512_set1_ps(probs[j * 16 + i]), vv, a[j]);
    }
    for (int j = 0; j < NJ; ++j) _mm512_storeu_ps(acc + j * dim + c, a[j]);
  }
}

// One sub-group of NJ query heads over one block: scores, online-softmax update, values.
template <int NJ>
IF_AVX512 void block_heads(const float* qs, const float* kt, const float* const* vrows, __mmask16 valid, int n,
                           int64_t dim, float* m, float* l, float* acc) {
  __m512 s[NJ];
  scores<NJ>(qs, dim, kt, s);
  alignas(64) float probs[NJ * 16];
  alignas(64) float m_old[16] = {0}, m_new[16] = {0}, corr[16];
  const __m512 masked = _mm512_set1_ps(kMaskValue);
  for (int j = 0; j < NJ; ++j) {
    s[j] = _mm512_mask_blend_ps(valid, masked, s[j]);
    m_old[j] = m[j];
    m_new[j] = std::max(m[j], reduce16<true>(s[j]));
  }
  _mm512_store_ps(corr, exp512(_mm512_sub_ps(_mm512_load_ps(m_old), _mm512_load_ps(m_new))));
  for (int j = 0; j < NJ; ++j) {
    const __m512 p = _mm512_maskz_mov_ps(valid, exp512(_mm512_sub_ps(s[j], _mm512_set1_ps(m_new[j]))));
    _mm512_store_ps(probs + j * 16, p);
    l[j] = l[j] * corr[j] + reduce16<false>(p);
    m[j] = m_new[j];
    if (m_new[j] != m_old[j]) {
      const __m512 cj = _mm512_set1_ps(corr[j]);
      for (int64_t c = 0; c < dim; c += 16) {
        _mm512_storeu_ps(acc + j * dim + c, _mm512_mul_ps(cj, _mm512_loadu_ps(acc + j * dim + c)));
      }
    }
  }
  fold_values<NJ>(probs, vrows, n, dim, acc);
}

using BlockFn = void (*)(const float*, const float*, const float* const*, __mmask16, int, int64_t, float*, float*,
                         float*);
constexpr BlockFn kBlockFns[kSub + 1] = {nullptr,         block_heads<1>, block_heads<2>,
                                         block_heads<3>,  block_heads<4>, block_heads<5>,
                                         block_heads<6>,  block_heads<7>, block_heads<8>};

}  // namespace

IF_AVX512 bool attend_avx512(const Problem& pb, int64_t t, int64_t g, int64_t p0, int64_t p1, Partial part) {
  const int64_t dim = pb.D, group = pb.group();
  if (dim % 16 != 0 || dim > kMaxDim) return false;
  // The group's query heads, scaled once.
  float qs_stack[8 * kMaxDim];
  float* qs = qs_stack;
  std::unique_ptr<float[]> qs_heap;
  if (group > 8) {
    qs_heap.reset(new float[group * dim]);
    qs = qs_heap.get();
  }
  const float* q = pb.q + (t * pb.H + g * group) * dim;
  for (int64_t i = 0; i < group * dim; ++i) qs[i] = q[i] * pb.scale;

  const int32_t* table = pb.tables + std::clamp<int64_t>(pb.seq[t], 0, pb.S - 1) * pb.P;
  alignas(64) float kt[kMaxDim * 16];
  const float* krows[kBlock];
  const float* vrows[kBlock];
  for (int64_t b = p0; b < p1; b += kBlock) {
    const int64_t n = std::min<int64_t>(kBlock, p1 - b);
    const uint32_t valid = block_rows(pb, table, g, b, n, krows, vrows);
    if (valid == 0) continue;
    for (int64_t c = 0; c < dim; c += 16) transpose16(krows, c, kt + c * 16);
    const int last = 32 - __builtin_clz(valid);  // lanes past the last valid one hold nothing
    for (int64_t j0 = 0; j0 < group; j0 += kSub) {
      const int nj = static_cast<int>(std::min<int64_t>(kSub, group - j0));
      kBlockFns[nj](qs + j0 * dim, kt, vrows, static_cast<__mmask16>(valid), last, dim, part.m + j0,
                    part.l + j0, part.acc + j0 * dim);
    }
  }
  return true;
}

}  // namespace inferflux::attn

#endif  // x86
