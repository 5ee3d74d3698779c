// Paged attention for ragged steps on CPU: the pieces shared by the FFI handler
// (paged_attention.cc) and its ISA-specific inner loops (paged_attention_avx512.cc).
// Semantics: inferflux/kernels/paged_attention.py (`paged_attention_reference`); design: docs/runtime.md.
#pragma once

#include <cstdint>

namespace inferflux::attn {

// Finite "minus infinity", as in the Python reference: exp(m_old - m_new) stays defined when a
// whole block is masked.
constexpr float kMaskValue = -0.7f * 3.4028234663852886e38f;

// Positions are processed in blocks of this many (one AVX-512 register of scores).
constexpr int kBlock = 16;

// The KV-cache views of one step, read in place: nothing is gathered or copied.
struct Problem {
  const float* q;         // [T, H, D]
  const float* k;         // [KVH, NP, PS, D]
  const float* v;         // [KVH, NP, PS, D]
  const int32_t* tables;  // [S, P] page ids, 0 = null page (masked)
  const int32_t* seq;     // [T] sequence slot of each token
  const int32_t* pos;     // [T] absolute position, -1 = padding
  const float* zeros;     // [D] zeros: the row masked lanes read
  int64_t T, H, KVH, NP, PS, D, S, P;
  float scale;
  int64_t window;  // sliding window, 0 = none
  int64_t group() const { return H / KVH; }
};

// The running online-softmax state of one (token, KV head) over part of its context:
// per query head of the group, max m, sum l and unnormalised output acc[D].
struct Partial {
  float* m;    // [G]
  float* l;    // [G]
  float* acc;  // [G, D]
};

// Fold positions [p0, p1) of token t's sequence into `part`, for KV head g's query heads.
// `p0`/`p1` are already clipped to what the token may see (causal, window, table width);
// null pages inside the range are masked here. Each returns false when it cannot take the shape
// (the caller then uses the next path).
bool attend_avx512(const Problem& pb, int64_t t, int64_t g, int64_t p0, int64_t p1, Partial part);
bool attend_avx2(const Problem& pb, int64_t t, int64_t g, int64_t p0, int64_t p1, Partial part);
void attend_scalar(const Problem& pb, int64_t t, int64_t g, int64_t p0, int64_t p1, Partial part);

// Row pointers of one block of positions [b, b + n) for KV head g: K and V rows, and a bit mask
// of the lanes that hold real context (page id in [1, NP)). Lanes past n or on a null page point
// at `pb.zeros`. Returns the mask (0: the whole block is null, skip it).
inline uint32_t block_rows(const Problem& pb, const int32_t* table, int64_t g, int64_t b, int64_t n,
                           const float** krows, const float** vrows) {
  uint32_t mask = 0;
  const int64_t head_base = g * pb.NP;
  for (int i = 0; i < kBlock; ++i) {
    krows[i] = vrows[i] = pb.zeros;
    if (i >= n) continue;
    const int64_t p = b + i;
    const int32_t page = table[p / pb.PS];
    if (page <= 0 || page >= pb.NP) continue;
    const int64_t off = ((head_base + page) * pb.PS + p % pb.PS) * pb.D;
    krows[i] = pb.k + off;
    vrows[i] = pb.v + off;
    mask |= 1u << i;
  }
  return mask;
}

}  // namespace inferflux::attn
