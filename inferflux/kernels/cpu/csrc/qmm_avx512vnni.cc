// The quantized-matmul kernels built for avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni (selected at run time; see qmatmul.cc).
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "qmm.h"  // before the pragma: its inline helpers must stay generic code
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#define QMM_ENTRY QmmAvx512Vnni
#define QMM_VNNI512
#include "qmm_body.inc"
#pragma GCC pop_options
#else
#include "qmm.h"
namespace inferflux {
QmmKernels QmmAvx512Vnni() { return QmmKernels{nullptr, nullptr, nullptr, nullptr, nullptr}; }
}  // namespace inferflux
#endif
