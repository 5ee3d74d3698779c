// XLA FFI handler `inferflux_qmatmul_v2`: y[M, N] = x[M, K] . W[N, K]^T on raw GGUF blocks (see qmm.h).
//
// One call may hold several weights of the same K (q|k|v, gate|up): x is quantized once for all of them and
// their rows share one parallel loop (one output each; `qtypes` gives each weight's type).
//
// `rows` (int32 scalar) says how many leading rows of x are real: only those are quantized and multiplied,
// the rest of y is zeros. A step's tokens are padded to their bucket (a power of two), and a program is
// compiled per bucket, not per count: this way a 5-token speculative verify step pays for 5 rows, not 8.
// (v1 had no `rows`; the name changed so no stored executable calls this handler with v1's operands.)
//
// Work split: activation rows are quantized in parallel chunks of rows, then weight rows are dealt out in
// chunks over XLA's intra-op pool (common.h, ParallelFor). One thread computes a whole output element, so
// the result does not depend on the number of threads, on M or on a row's position in the batch.
//
// From kPanelMinRows (24) activation rows on, weight rows go to the panel path (qmm_panel.inc: each weight block
// decoded once per call, not once per 8 rows); it gives the same bits as the row path, so the switch at a
// given M changes no result. INFERFLUX_QMM_PANEL_ROWS (read once) moves the switch, for tests.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common.h"
#include "qmm.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace inferflux {
namespace {

constexpr int64_t kPanelMinRows = 24;

int64_t PanelMinRows() {
  static const int64_t rows = [] {
    const char* v = std::getenv("INFERFLUX_QMM_PANEL_ROWS");
    return v && *v ? std::atoll(v) : kPanelMinRows;
  }();
  return rows;
}

QmmKernels KernelsFor(Isa isa) {
  switch (isa) {
    case kAvx512Vnni: return QmmAvx512Vnni();
    case kAvxVnni: return QmmAvxVnni();
    case kAvx2: return QmmAvx2();
    default: return QmmScalar();
  }
}

// One weight of a call: its argument/result and the chunks of its rows the pool works through.
struct Product {
  QmmArgs args;
  int64_t chunk = 0;      // weight rows per chunk
  int64_t first = 0;      // index of its first chunk in the call's list of chunks
  bool panel = false;
};

ffi::Error QMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> rows,
                   ffi::RemainingArgs weights, ffi::RemainingRets outs, ffi::Span<const int64_t> qtypes,
                   int64_t isa) {
  auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("qmatmul: x must be 2-D");
  if (rows.element_count() != 1) return ffi::Error::InvalidArgument("qmatmul: rows must be one int32");
  const size_t count = qtypes.size();
  if (count == 0 || weights.size() != count || outs.size() != count)
    return ffi::Error::InvalidArgument("qmatmul: one qtype, weight and output per product");
  const int64_t padded = xd[0], K = xd[1];
  const int64_t real = rows.typed_data()[0];
  const int64_t M = real < 0 ? 0 : (real > padded ? padded : real);
  const Isa chosen = ResolveIsa(isa);
  if (chosen == 0) return ffi::Error::InvalidArgument("qmatmul: this CPU lacks the requested instruction set");
  const QmmKernels kernels = KernelsFor(chosen);
  const int64_t panel_min = PanelMinRows();
  const int64_t threads = pool.num_threads() > 0 ? pool.num_threads() : 1;

  std::vector<Product> products(count);
  bool any_wide = false;
  int64_t chunks = 0;
  for (size_t i = 0; i < count; ++i) {
    auto w = weights.get<ffi::Buffer<ffi::U8>>(i);
    auto y = outs.get<ffi::Buffer<ffi::F32>>(i);
    if (!w.has_value() || !y.has_value()) return ffi::Error::InvalidArgument("qmatmul: a weight or output is not uint8/f32");
    auto wd = w->dimensions();
    if (wd.size() != 2) return ffi::Error::InvalidArgument("qmatmul: w must be 2-D");
    const int64_t qtype = qtypes[i], N = wd[0];
    int64_t bvals = 0, bbytes = 0;
    WeightBlock(qtype, &bvals, &bbytes);
    if (bvals == 0) return ffi::Error::InvalidArgument("qmatmul: no kernel for ggml type " + std::to_string(qtype));
    if (K % bvals != 0 || wd[1] != K / bvals * bbytes)
      return ffi::Error::InvalidArgument("qmatmul: weight row bytes do not match K for this type");
    if ((*y)->element_count() != static_cast<size_t>(padded * N))
      return ffi::Error::InvalidArgument("qmatmul: output must be [M, N]");
    float* yp = (*y)->typed_data();
    if (M < padded) std::memset(yp + M * N, 0, static_cast<size_t>((padded - M) * N) * sizeof(float));
    Product& p = products[i];
    p.args = QmmArgs{M, N, K, qtype, w->typed_data(), wd[1], nullptr, nullptr, nullptr, nullptr, yp, nullptr, nullptr};
    p.panel = kernels.panel != nullptr && panel_min > 0 && M >= panel_min;
    if (p.panel) {
      p.chunk = 32;  // two tiles of 16 lanes, four of 8: each decoded once for all M rows
    } else {
      // Enough chunks to balance a busy pool, each at least a few rows so a chunk amortises its claim.
      p.chunk = N / (8 * threads);
      p.chunk = p.chunk < 4 ? 4 : (p.chunk > 64 ? 64 : p.chunk);
      any_wide = any_wide || (kernels.has_wide != nullptr && kernels.has_wide(qtype));
    }
    p.first = chunks;
    chunks += N == 0 ? 0 : (N + p.chunk - 1) / p.chunk;
  }
  if (M == 0 || chunks == 0) return ffi::Error::Success();

  // The activations are quantized once for every product of the call (q|k|v, gate|up share their input).
  const int64_t qb = ActBlock(0);
  std::vector<int8_t> qa(static_cast<size_t>(M * K));
  std::vector<float> da(static_cast<size_t>(M * (K / qb)));
  std::vector<int32_t> asum16(static_cast<size_t>(M * (K / 16))), asum32(static_cast<size_t>(M * (K / 32)));
  const float* xp = x.typed_data();
  const int64_t mchunk = M * K < (1 << 16) ? M : 16;
  ParallelFor(pool, (M + mchunk - 1) / mchunk, [&](int64_t c) {
    const int64_t m0 = c * mchunk, m1 = m0 + mchunk < M ? m0 + mchunk : M;
    kernels.quantize(xp, K, qb, m0, m1, qa.data(), da.data(), asum16.data(), asum32.data());
  });
  std::vector<int8_t> qa_t;
  std::vector<float> pairs;
  if (any_wide) {  // about 2 M K bytes and M K / 5 floats: cheap next to the call
    qa_t.resize(static_cast<size_t>(TransposedBytes(M, K)));
    kernels.transpose(qa.data(), K, M, qa_t.data());
    pairs.resize(static_cast<size_t>(PairFloats(M, K)));
    kernels.pair_layout(da.data(), asum16.data(), asum32.data(), M, K, pairs.data());
  }
  for (Product& p : products) {
    p.args.qa = qa.data();
    p.args.da = da.data();
    p.args.asum16 = asum16.data();
    p.args.asum32 = asum32.data();
    if (!p.panel && any_wide && kernels.has_wide(p.args.qtype)) p.args.qa_t = qa_t.data(), p.args.pairs = pairs.data();
  }
  // One list of chunks over every product's weight rows; a thread that finishes one product moves on.
  ParallelFor(pool, chunks, [&](int64_t c) {
    size_t i = 0;
    while (i + 1 < count && products[i + 1].first <= c) ++i;
    const Product& p = products[i];
    const int64_t n0 = (c - p.first) * p.chunk, n1 = n0 + p.chunk < p.args.N ? n0 + p.chunk : p.args.N;
    if (p.panel) {
      kernels.panel(p.args, n0, n1);
    } else {
      kernels.rows(p.args, n0, n1);
    }
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace inferflux

XLA_FFI_DEFINE_HANDLER_SYMBOL(inferflux_qmatmul_v2, inferflux::QMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [M, K]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // rows: how many leading rows of x are real
                                  .RemainingArgs()               // the weights, uint8 [N_i, row_bytes_i]
                                  .RemainingRets()               // one output per weight, f32 [M, N_i]
                                  .Attr<ffi::Span<const int64_t>>("qtypes")
                                  .Attr<int64_t>("isa"));
