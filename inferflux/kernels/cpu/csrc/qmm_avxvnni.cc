// The quantized-matmul kernels built for avx2,fma,f16c,avxvnni (selected at run time; see qmatmul.cc).
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "qmm.h"  // before the pragma: its inline helpers must stay generic code
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")
#define QMM_ENTRY QmmAvxVnni
#define QMM_AVXVNNI
#include "qmm_body.inc"
#pragma GCC pop_options
#else
#include "qmm.h"
namespace inferflux {
QmmKernels QmmAvxVnni() { return QmmKernels{nullptr, nullptr, nullptr, nullptr, nullptr}; }
}  // namespace inferflux
#endif
