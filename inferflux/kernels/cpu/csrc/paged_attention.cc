// Paged attention for ragged steps on CPU, as an XLA FFI handler.
//
// The same semantics as `paged_attention_reference` (inferflux/kernels/paged_attention.py): T query
// tokens (prefill chunks and decode tokens together, padding rows at position -1) attend causally
// through their sequence's block table to K/V pages laid out [KVH, NP, PS, D]; page 0 (the null page)
// and out-of-range page ids are masked, an optional sliding window limits what a token sees, and
// GQA groups of query heads share their KV head. Pages are read in place: nothing is gathered.
//
// Work items are (token, KV head, segment of positions). Long contexts with few tokens are split into
// segments whose partial online-softmax states are merged at the end (flash-decoding), so a batch-1
// decode at a long context still uses every thread. Threads come from XLA's intra-op pool via the FFI
// context (common.h, ParallelFor: the caller works too and waits only for items already claimed, so a
// busy or single-thread pool cannot deadlock it). Each item's arithmetic is fixed, so the result does not
// depend on the thread count. Documented in docs/runtime.md.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common.h"
#include "paged_attention.h"
#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(__i386__)
#define IF_X86 1
#else
#define IF_X86 0
#endif

namespace ffi = xla::ffi;

namespace inferflux::attn {
namespace {

// The portable inner loop (any CPU; also the oracle of the vector paths): the same 16-position blocks as
// the AVX2/AVX-512 paths, plain loops, std::exp.
void attend_generic(const Problem& pb, int64_t t, int64_t g, int64_t p0, int64_t p1, Partial part) {
  const int64_t dim = pb.D, group = pb.group();
  std::vector<float> qs(group * dim), kt(dim * kBlock);
  const float* q = pb.q + (t * pb.H + g * group) * dim;
  for (int64_t i = 0; i < group * dim; ++i) qs[i] = q[i] * pb.scale;
  const int32_t* table = pb.tables + std::clamp<int64_t>(pb.seq[t], 0, pb.S - 1) * pb.P;
  const float* krows[kBlock];
  const float* vrows[kBlock];
  for (int64_t b = p0; b < p1; b += kBlock) {
    const uint32_t valid = block_rows(pb, table, g, b, std::min<int64_t>(kBlock, p1 - b), krows, vrows);
    if (valid == 0) continue;
    const int last = 32 - __builtin_clz(valid);
    for (int i = 0; i < kBlock; ++i)
      for (int64_t d = 0; d < dim; ++d) kt[d * kBlock + i] = krows[i][d];
    for (int64_t j = 0; j < group; ++j) {
      float s[kBlock] = {0}, p[kBlock];
      for (int64_t d = 0; d < dim; ++d) {
        const float qd = qs[j * dim + d];
        for (int i = 0; i < kBlock; ++i) s[i] += qd * kt[d * kBlock + i];
      }
      float bm = kMaskValue;
      for (int i = 0; i < kBlock; ++i) bm = ((valid >> i) & 1) && s[i] > bm ? s[i] : bm;
      const float m_new = std::max(part.m[j], bm);
      const float corr = std::exp(part.m[j] - m_new);
      float sum = 0;
      for (int i = 0; i < kBlock; ++i) {
        const float e = std::exp(s[i] - m_new);
        p[i] = ((valid >> i) & 1) ? e : 0.0f;
        sum += p[i];
      }
      part.l[j] = part.l[j] * corr + sum;
      float* acc = part.acc + j * dim;
      if (m_new != part.m[j])
        for (int64_t d = 0; d < dim; ++d) acc[d] *= corr;
      part.m[j] = m_new;
      for (int i = 0; i < last; ++i) {
        const float pi = p[i];
        const float* vr = vrows[i];
        for (int64_t d = 0; d < dim; ++d) acc[d] += pi * vr[d];
      }
    }
  }
}

// Run one item's positions through the fastest path the CPU (and `isa`, a test override) allows.
// (Every CPU with AVX-512 VNNI has AVX-512F, all the AVX-512 path needs; AVX-VNNI CPUs get the AVX2 path.)
void attend(Isa isa, const Problem& pb, int64_t t, int64_t g, int64_t p0, int64_t p1, Partial part) {
  if (isa >= kAvx512Vnni && attend_avx512(pb, t, g, p0, p1, part)) return;
  if (isa >= kAvx2 && attend_avx2(pb, t, g, p0, p1, part)) return;
  attend_scalar(pb, t, g, p0, p1, part);
}

struct Item {
  int64_t t, g, p0, p1;
  int64_t slot;  // -1: the only segment of its (t, g), written straight to the output
};

// Work below this many query-head x position x head_dim products runs on the calling thread alone:
// waking pool threads costs more than it saves (~50 us of work).
constexpr int64_t kParallelWork = 1 << 21;
// Contexts are cut at multiples of this many positions (a multiple of kBlock) into segments merged at the
// end. The cut depends only on the token's own positions, never on the batch or the thread count, so a
// row's result is the same alone, in any batch, on any number of threads.
constexpr int64_t kSegment = 256;

ffi::Error paged_attention_impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                                ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> tables,
                                ffi::Buffer<ffi::S32> token_seq, ffi::Buffer<ffi::S32> token_pos,
                                ffi::ResultBuffer<ffi::F32> out, float scale, int64_t sliding_window,
                                int64_t isa_override) {
  const auto qd = q.dimensions(), kd = k.dimensions(), td = tables.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || td.size() != 2 || v.dimensions().size() != 4)
    return ffi::Error::InvalidArgument("paged_attention: want q [T,H,D], k/v [KVH,NP,PS,D], tables [S,P]");
  Problem pb{};
  pb.q = q.typed_data(), pb.k = k.typed_data(), pb.v = v.typed_data();
  pb.tables = tables.typed_data(), pb.seq = token_seq.typed_data(), pb.pos = token_pos.typed_data();
  pb.T = qd[0], pb.H = qd[1], pb.D = qd[2];
  pb.KVH = kd[0], pb.NP = kd[1], pb.PS = kd[2];
  pb.S = td[0], pb.P = td[1];
  pb.scale = scale;
  pb.window = sliding_window;
  for (int i = 0; i < 4; ++i)
    if (v.dimensions()[i] != kd[i]) return ffi::Error::InvalidArgument("paged_attention: k and v differ");
  if (kd[3] != pb.D || pb.KVH <= 0 || pb.H % pb.KVH != 0 || pb.S <= 0 || pb.PS <= 0 ||
      token_seq.element_count() != static_cast<size_t>(pb.T) ||
      token_pos.element_count() != static_cast<size_t>(pb.T))
    return ffi::Error::InvalidArgument("paged_attention: inconsistent shapes");
  const int64_t dim = pb.D, group = pb.group();
  std::vector<float> zeros(dim, 0.0f);
  pb.zeros = zeros.data();
  float* o = out->typed_data();
  std::memset(o, 0, sizeof(float) * pb.T * pb.H * dim);  // padding rows (and empty rows) stay zero
  const Isa isa = ResolveIsa(isa_override);
  if (isa == 0) return ffi::Error::InvalidArgument("paged_attention: this CPU lacks the requested isa");

  // What each token may see: [lo, hi), clipped to the block table's width.
  std::vector<int64_t> lo(pb.T), hi(pb.T);
  int64_t work = 0;
  for (int64_t t = 0; t < pb.T; ++t) {
    const int64_t p = pb.pos[t];
    hi[t] = std::min<int64_t>(p + 1, pb.P * pb.PS);
    lo[t] = pb.window > 0 ? std::max<int64_t>(0, p - pb.window + 1) : 0;
    if (p < 0 || hi[t] <= lo[t]) {
      hi[t] = lo[t] = 0;
      continue;
    }
    work += (hi[t] - lo[t]) * pb.H * dim;
  }
  const bool parallel = pool.num_threads() > 1 && work >= kParallelWork;
  std::vector<Item> items;
  int64_t slots = 0;
  for (int64_t t = 0; t < pb.T; ++t) {
    if (hi[t] <= lo[t]) continue;
    const int64_t first = lo[t] / kSegment, n_seg = (hi[t] - 1) / kSegment - first + 1;
    for (int64_t g = 0; g < pb.KVH; ++g) {
      for (int64_t s = first; s < first + n_seg; ++s) {
        const int64_t p0 = std::max(lo[t], s * kSegment), p1 = std::min(hi[t], (s + 1) * kSegment);
        items.push_back({t, g, p0, p1, n_seg == 1 ? -1 : slots++});
      }
    }
  }
  const int64_t stride = group * (dim + 2);  // one partial: m[G], l[G], acc[G, D]
  std::vector<float> partials(slots * stride);

  auto run_item = [&](int64_t i) {
    const Item& it = items[i];
    std::vector<float> local;
    float* base;
    if (it.slot >= 0) {
      base = partials.data() + it.slot * stride;
    } else {
      local.resize(stride);
      base = local.data();
    }
    Partial part{base, base + group, base + 2 * group};
    std::fill(part.m, part.m + group, kMaskValue);
    std::fill(part.l, part.l + group + group * dim, 0.0f);  // l and acc
    attend(isa, pb, it.t, it.g, it.p0, it.p1, part);
    if (it.slot >= 0) return;
    for (int64_t j = 0; j < group; ++j) {
      float* dst = o + (it.t * pb.H + it.g * group + j) * dim;
      const float inv = part.l[j] == 0.0f ? 0.0f : 1.0f / part.l[j];
      for (int64_t d = 0; d < dim; ++d) dst[d] = part.acc[j * dim + d] * inv;
    }
  };
  const int64_t n_items = static_cast<int64_t>(items.size());
  if (parallel) {
    ParallelFor(pool, n_items, run_item);
  } else {
    for (int64_t i = 0; i < n_items; ++i) run_item(i);
  }

  // Merge the segments of split (token, KV head) pairs, in segment order: items of one pair are adjacent.
  for (int64_t i = 0; i < n_items;) {
    if (items[i].slot < 0) {
      ++i;
      continue;
    }
    int64_t end = i;
    while (end < n_items && items[end].t == items[i].t && items[end].g == items[i].g) ++end;
    for (int64_t j = 0; j < group; ++j) {
      float m = kMaskValue, l = 0.0f;
      for (int64_t s = i; s < end; ++s) m = std::max(m, partials[items[s].slot * stride + j]);
      float* dst = o + (items[i].t * pb.H + items[i].g * group + j) * dim;
      for (int64_t s = i; s < end; ++s) {
        const float* part = partials.data() + items[s].slot * stride;
        const float w = std::exp(part[j] - m);
        l += w * part[group + j];
        const float* acc = part + 2 * group + j * dim;
        for (int64_t d = 0; d < dim; ++d) dst[d] += w * acc[d];
      }
      const float inv = l == 0.0f ? 0.0f : 1.0f / l;
      for (int64_t d = 0; d < dim; ++d) dst[d] *= inv;
    }
    i = end;
  }
  return ffi::Error::Success();
}

}  // namespace

void attend_scalar(const Problem& pb, int64_t t, int64_t g, int64_t p0, int64_t p1, Partial part) {
  attend_generic(pb, t, g, p0, p1, part);
}

#if !IF_X86
bool attend_avx2(const Problem&, int64_t, int64_t, int64_t, int64_t, Partial) { return false; }
bool attend_avx512(const Problem&, int64_t, int64_t, int64_t, int64_t, Partial) { return false; }
#endif

}  // namespace inferflux::attn

// Registered by inferflux/kernels/cpu/attention.py under its own name.
XLA_FFI_DEFINE_HANDLER_SYMBOL(inferflux_paged_attention_v1, inferflux::attn::paged_attention_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q [T, H, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k pages [KVH, NP, PS, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v pages
                                  .Arg<ffi::Buffer<ffi::S32>>()  // block tables [S, P]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // token_seq [T]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // token_pos [T]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [T, H, D]
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("sliding_window")
                                  .Attr<int64_t>("isa"));
