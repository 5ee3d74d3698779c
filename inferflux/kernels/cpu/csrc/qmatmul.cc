// XLA FFI handler `inferflux_qmatmul_v2`: y[M, N] = x[M, K] . W[N, K]^T on raw GGUF blocks (see qmm.h).
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

ffi::Error QMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w,
                   ffi::Buffer<ffi::S32> rows, ffi::ResultBuffer<ffi::F32> y, int64_t qtype, int64_t isa) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2) return ffi::Error::InvalidArgument("qmatmul: x and w must be 2-D");
  if (rows.element_count() != 1) return ffi::Error::InvalidArgument("qmatmul: rows must be one int32");
  const int64_t padded = xd[0], K = xd[1], N = wd[0];
  const int64_t real = rows.typed_data()[0];
  const int64_t M = real < 0 ? 0 : (real > padded ? padded : real);
  int64_t bvals = 0, bbytes = 0;
  WeightBlock(qtype, &bvals, &bbytes);
  if (bvals == 0) return ffi::Error::InvalidArgument("qmatmul: no kernel for ggml type " + std::to_string(qtype));
  if (K % bvals != 0 || wd[1] != K / bvals * bbytes)
    return ffi::Error::InvalidArgument("qmatmul: weight row bytes do not match K for this type");
  if (y->element_count() != static_cast<size_t>(padded * N))
    return ffi::Error::InvalidArgument("qmatmul: output must be [M, N]");
  const Isa chosen = ResolveIsa(isa);
  if (chosen == 0) return ffi::Error::InvalidArgument("qmatmul: this CPU lacks the requested instruction set");
  const QmmKernels kernels = KernelsFor(chosen);
  if (M < padded) std::memset(y->typed_data() + M * N, 0, static_cast<size_t>((padded - M) * N) * sizeof(float));
  if (M == 0 || N == 0) return ffi::Error::Success();

  const int64_t qb = ActBlock(qtype);
  std::vector<int8_t> qa(static_cast<size_t>(M * K));
  std::vector<float> da(static_cast<size_t>(M * (K / qb)));
  std::vector<int32_t> asum16(static_cast<size_t>(M * (K / 16))), asum32(static_cast<size_t>(M * (K / 32)));
  const float* xp = x.typed_data();
  const int64_t mchunk = M * K < (1 << 16) ? M : 16;
  ParallelFor(pool, (M + mchunk - 1) / mchunk, [&](int64_t c) {
    const int64_t m0 = c * mchunk, m1 = m0 + mchunk < M ? m0 + mchunk : M;
    kernels.quantize(xp, K, qb, m0, m1, qa.data(), da.data(), asum16.data(), asum32.data());
  });

  QmmArgs args{M, N, K, qtype, w.typed_data(), wd[1], qa.data(), da.data(), asum16.data(),
                asum32.data(), y->typed_data(), nullptr};
  const int64_t panel_min = PanelMinRows();
  const bool panel = kernels.panel != nullptr && panel_min > 0 && M >= panel_min;
  std::vector<int8_t> qa_t;
  if (!panel && kernels.has_wide != nullptr && kernels.has_wide(qtype)) {  // M * K bytes: cheap next to the call
    qa_t.resize(static_cast<size_t>(M * K));
    kernels.transpose(qa.data(), K, 0, M, qa_t.data());
    args.qa_t = qa_t.data();
  }
  if (panel) {
    // Chunks of 32 weight rows (two tiles of 16 lanes, four of 8): each decoded once for all M rows.
    const int64_t pchunk = 32;
    ParallelFor(pool, (N + pchunk - 1) / pchunk, [&](int64_t c) {
      const int64_t n0 = c * pchunk, n1 = n0 + pchunk < N ? n0 + pchunk : N;
      kernels.panel(args, n0, n1);
    });
    return ffi::Error::Success();
  }
  // Enough chunks to balance a busy pool, each at least a few rows so a chunk amortises its claim.
  const int64_t threads = pool.num_threads() > 0 ? pool.num_threads() : 1;
  int64_t nchunk = N / (8 * threads);
  nchunk = nchunk < 4 ? 4 : (nchunk > 64 ? 64 : nchunk);
  ParallelFor(pool, (N + nchunk - 1) / nchunk, [&](int64_t c) {
    const int64_t n0 = c * nchunk, n1 = n0 + nchunk < N ? n0 + nchunk : N;
    kernels.rows(args, n0, n1);
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace inferflux

XLA_FFI_DEFINE_HANDLER_SYMBOL(inferflux_qmatmul_v2, inferflux::QMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()  // rows: how many leading rows of x are real
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("qtype")
                                  .Attr<int64_t>("isa"));
