// AVX2 + FMA inner loop of the CPU paged attention (see paged_attention.h), for x86 CPUs without AVX-512.
// The same blocks as the AVX-512 path (paged_attention_avx512.cc): 16 positions per block, K transposed to
// K^T[D][16] (two 8x8 tiles per 8 columns), positions in the lanes of two 8-float registers, query heads
// register-blocked 4 at a time. Compiled with a function-level target attribute only (no -march); the
// handler calls it only when __builtin_cpu_supports reports AVX2 and FMA.
#include "paged_attention.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <algorithm>
#include <memory>

namespace inferflux::attn {
namespace {

#define IF_AVX2 __attribute__((target("avx2,fma")))
#define IF_INLINE inline __attribute__((always_inline))

constexpr int kMaxDim = 256;
constexpr int kSub = 4;  // query heads per pass: 8 score registers + 2 loads fit the 16 ymm registers

// exp(x) in f32, Cephes' expf polynomial (~2 ulp); 2^n built in the exponent bits.
IF_AVX2 IF_INLINE __m256 exp256(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-87.3365478515625f));
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}

template <bool kMax>
IF_AVX2 IF_INLINE __m256 op8(__m256 a, __m256 b) {
  if constexpr (kMax) {
    return _mm256_max_ps(a, b);
  } else {
    return _mm256_add_ps(a, b);
  }
}

// Horizontal max / sum of 16 lanes (two registers), in a fixed order.
template <bool kMax>
IF_AVX2 IF_INLINE float reduce16(__m256 lo, __m256 hi) {
  __m256 x = op8<kMax>(lo, hi);
  x = op8<kMax>(x, _mm256_permute2f128_ps(x, x, 1));
  x = op8<kMax>(x, _mm256_permute_ps(x, _MM_SHUFFLE(1, 0, 3, 2)));
  x = op8<kMax>(x, _mm256_permute_ps(x, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm256_cvtss_f32(x);
}

// out[k*16 + i] = rows[i][col + k] for k, i < 8: one 8x8 tile (rows 0..7 of `rows`) into lanes 0..7.
IF_AVX2 IF_INLINE void transpose8(const float* const* rows, int64_t col, float* out) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(rows[i] + col);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  // r[4a + b] holds, in 128-bit half h, column 4h + b of rows 4a..4a+3.
  for (int b = 0; b < 4; ++b) {
    _mm256_storeu_ps(out + b * 16, _mm256_permute2f128_ps(r[b], r[4 + b], 0x20));
    _mm256_storeu_ps(out + (4 + b) * 16, _mm256_permute2f128_ps(r[b], r[4 + b], 0x31));
  }
}

template <int NJ>
IF_AVX2 void block_heads(const float* qs, const float* kt, const float* const* vrows, uint32_t valid, int n,
                         int64_t dim, float* m, float* l, float* acc) {
  __m256 lo[NJ], hi[NJ];
  for (int j = 0; j < NJ; ++j) lo[j] = hi[j] = _mm256_setzero_ps();
  for (int64_t d = 0; d < dim; ++d) {
    const __m256 k0 = _mm256_loadu_ps(kt + d * 16), k1 = _mm256_loadu_ps(kt + d * 16 + 8);
    for (int j = 0; j < NJ; ++j) {
      const __m256 qd = _mm256_broadcast_ss(qs + j * dim + d);
      lo[j] = _mm256_fmadd_ps(qd, k0, lo[j]);
      hi[j] = _mm256_fmadd_ps(qd, k1, hi[j]);
    }
  }
  // Lane masks of the valid positions (all ones / zeros per lane).
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256 ok0 = _mm256_castsi256_ps(_mm256_cmpeq_epi32(
      _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(valid & 0xff)), bit), bit));
  const __m256 ok1 = _mm256_castsi256_ps(_mm256_cmpeq_epi32(
      _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(valid >> 8)), bit), bit));
  const __m256 masked = _mm256_set1_ps(kMaskValue);
  alignas(32) float probs[NJ * 16];
  for (int j = 0; j < NJ; ++j) {
    lo[j] = _mm256_blendv_ps(masked, lo[j], ok0);
    hi[j] = _mm256_blendv_ps(masked, hi[j], ok1);
    const float m_new = std::max(m[j], reduce16<true>(lo[j], hi[j]));
    const float corr = _mm256_cvtss_f32(exp256(_mm256_set1_ps(m[j] - m_new)));
    const __m256 mn = _mm256_set1_ps(m_new);
    const __m256 p0 = _mm256_and_ps(ok0, exp256(_mm256_sub_ps(lo[j], mn)));
    const __m256 p1 = _mm256_and_ps(ok1, exp256(_mm256_sub_ps(hi[j], mn)));
    _mm256_store_ps(probs + j * 16, p0);
    _mm256_store_ps(probs + j * 16 + 8, p1);
    l[j] = l[j] * corr + reduce16<false>(p0, p1);
    if (m_new != m[j]) {
      const __m256 cj = _mm256_set1_ps(corr);
      for (int64_t c = 0; c < dim; c += 8) {
        _mm256_storeu_ps(acc + j * dim + c, _mm256_mul_ps(cj, _mm256_loadu_ps(acc + j * dim + c)));
      }
    }
    m[j] = m_new;
  }
  for (int64_t c = 0; c < dim; c += 8) {
    __m256 a[NJ];
    for (int j = 0; j < NJ; ++j) a[j] = _mm256_loadu_ps(acc + j * dim + c);
    for (int i = 0; i < n; ++i) {
      const __m256 vv = _mm256_loadu_ps(vrows[i] + c);
      for (int j = 0; j < NJ; ++j) a[j] = _mm256_fmadd_ps(_mm256_broadcast_ss(probs + j * 16 + i), vv, a[j]);
    }
    for (int j = 0; j < NJ; ++j) _mm256_storeu_ps(acc + j * dim + c, a[j]);
  }
}

using BlockFn = void (*)(const float*, const float*, const float* const*, uint32_t, int, int64_t, float*, float*,
                         float*);
constexpr BlockFn kBlockFns[kSub + 1] = {nullptr, block_heads<1>, block_heads<2>, block_heads<3>, block_heads<4>};

}  // namespace

IF_AVX2 bool attend_avx2(const Problem& pb, int64_t t, int64_t g, int64_t p0, int64_t p1, Partial part) {
  const int64_t dim = pb.D, group = pb.group();
  if (dim % 8 != 0 || dim > kMaxDim) return false;
  std::unique_ptr<float[]> qs(new float[group * dim]);
  const float* q = pb.q + (t * pb.H + g * group) * dim;
  for (int64_t i = 0; i < group * dim; ++i) qs[i] = q[i] * pb.scale;
  const int32_t* table = pb.tables + std::clamp<int64_t>(pb.seq[t], 0, pb.S - 1) * pb.P;
  alignas(32) float kt[kMaxDim * 16];
  const float* krows[kBlock];
  const float* vrows[kBlock];
  for (int64_t b = p0; b < p1; b += kBlock) {
    const uint32_t valid = block_rows(pb, table, g, b, std::min<int64_t>(kBlock, p1 - b), krows, vrows);
    if (valid == 0) continue;
    for (int64_t c = 0; c < dim; c += 8) {
      transpose8(krows, c, kt + c * 16);
      transpose8(krows + 8, c, kt + c * 16 + 8);
    }
    const int last = 32 - __builtin_clz(valid);
    for (int64_t j0 = 0; j0 < group; j0 += kSub) {
      const int nj = static_cast<int>(std::min<int64_t>(kSub, group - j0));
      kBlockFns[nj](qs.get() + j0 * dim, kt, vrows, valid, last, dim, part.m + j0, part.l + j0,
                    part.acc + j0 * dim);
    }
  }
  return true;
}

}  // namespace inferflux::attn

#endif  // x86
