// Quantized matmul on raw GGUF blocks: the problem description shared by the FFI handler (qmatmul.cc) and
// the per-ISA kernels (qmm_*.cc, each compiling qmm_body.inc under its own `target` pragma).
//
// y[M, N] = x[M, K] . W[N, K]^T with W as the file stores it: row n is `row_bytes` of GGUF blocks.
// x is first quantized to int8 in blocks of 32 (as ggml's Q8_0; finer than its Q8_K blocks of 256 for K-quants,
// so an outlier costs precision in 32 values, not 256): d = absmax / 127, q = rint(x * (127 / absmax)). Every weight block is then
// decoded to unsigned bytes u = q_true + offset, and per (sub-)block the integer dot u . q_x is exact in
// int32 whatever the instruction set; the float epilogue runs in one fixed order, so every ISA path, every
// M and every thread count give the same bits (docs/runtime.md, "CPU kernels").
#pragma once

#include <cstdint>

namespace inferflux {

// ggml type ids (GGMLQuantizationType) with a kernel.
enum QType : int64_t { kQ4_0 = 2, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14, kIQ4_XS = 23 };

struct QmmArgs {
  int64_t M, N, K;
  int64_t qtype;
  const uint8_t* w;      // [N, row_bytes]
  int64_t row_bytes;
  const int8_t* qa;      // [M, K] quantized activations
  const float* da;       // [M, K / act_block] activation block scales
  const int32_t* asum16; // [M, K / 16] sums of 16 consecutive quantized activations
  const int32_t* asum32; // [M, K / 32] sums of 32
  float* y;              // [M, N]
  const int8_t* qa_t;    // qa in the few-row path's two layouts (TransposedBytes), or nullptr
  const float* pairs;    // that path's per-pair scales and sums (qmm_pairs512.inc, PairLayout), or nullptr
};

// Activation block size: 32 for every weight type.
inline int64_t ActBlock(int64_t) { return 32; }
// (values per weight block, bytes per weight block); (0, 0) for a type without a kernel.
inline void WeightBlock(int64_t qtype, int64_t* values, int64_t* bytes) {
  switch (qtype) {
    case kQ4_0: *values = 32; *bytes = 18; return;
    case kQ8_0: *values = 32; *bytes = 34; return;
    case kQ4_K: *values = 256; *bytes = 144; return;
    case kQ5_K: *values = 256; *bytes = 176; return;
    case kQ6_K: *values = 256; *bytes = 210; return;
    case kIQ4_XS: *values = 256; *bytes = 136; return;
    default: *values = 0; *bytes = 0;
  }
}

// One instruction set's kernels. `quantize` fills qa/da/asum16 for rows [m0, m1); `rows` computes y[:, n]
// for weight rows [n0, n1) and every activation row (an output element is never split between calls).
struct QmmKernels {
  void (*quantize)(const float* x, int64_t K, int64_t act_block, int64_t m0, int64_t m1, int8_t* qa,
                   float* da, int32_t* asum16, int32_t* asum32);
  void (*rows)(const QmmArgs& args, int64_t n0, int64_t n1);
  // The large-M path (qmm_panel.inc): the same results as `rows`, bit for bit; nullptr in the scalar build.
  // Weight rows [n0, n1) are decoded once into a panel reused by every activation row.
  void (*panel)(const QmmArgs& args, int64_t n0, int64_t n1);
  // The AVX-512 few-row path (qmm_rows512.inc; nullptr elsewhere): whether it has a type, and the activation
  // layouts it reads (rows [0, M) of qa -> qa_t, TransposedBytes). `rows` takes it when args.qa_t is set.
  bool (*has_wide)(int64_t qtype);
  void (*transpose)(const int8_t* qa, int64_t K, int64_t M, int8_t* qa_t);
  // The same path's per-pair layout of da, asum16 and asum32 (PairFloats(M, K) floats at `pairs`).
  void (*pair_layout)(const float* da, const int32_t* asum16, const int32_t* asum32, int64_t M, int64_t K,
                      float* pairs);
};

// Activation rows are laid out by groups of 8 (the few-row path's row group, kRowGroup in qmm_body.inc) so
// that the rows of one group and one 256-value group of K sit at constant offsets from one pointer.
inline int64_t RowGroups(int64_t M) { return (M + 7) / 8; }
// Bytes of qa_t: the transposed layout [M, K], then the pair layout [RowGroups(M), K / 256, 8, 256].
inline int64_t TransposedBytes(int64_t M, int64_t K) { return M * K + RowGroups(M) * 8 * K; }
// Floats of the pair layout of scales and sums: [RowGroups(M), K / 256, 4 pairs, 48].
inline int64_t PairFloats(int64_t M, int64_t K) { return RowGroups(M) * (K / 256) * 4 * 48; }

QmmKernels QmmScalar();
QmmKernels QmmAvx2();
QmmKernels QmmAvxVnni();
QmmKernels QmmAvx512Vnni();

}  // namespace inferflux
