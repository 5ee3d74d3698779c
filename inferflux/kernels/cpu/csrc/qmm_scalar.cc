// Portable scalar build of the quantized-matmul kernels (any CPU; also the reference for the SIMD builds).
#define QMM_ENTRY QmmScalar
#include "qmm_body.inc"
