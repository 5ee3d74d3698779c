// ISA detection for the CPU kernels (runtime dispatch; nothing here is compiled for a specific -march).
#include "common.h"

namespace inferflux {

Isa BestIsa() {
#if defined(__x86_64__) || defined(__i386__)
  static const Isa best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw"))
      return kAvx512Vnni;
    if (__builtin_cpu_supports("avxvnni") && __builtin_cpu_supports("avx2")) return kAvxVnni;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
    return kScalar;
  }();
  return best;
#else
  return kScalar;
#endif
}

Isa ResolveIsa(int64_t requested) {
  Isa best = BestIsa();
  if (requested == kAuto) return best;
  if (requested < kScalar || requested > best) return static_cast<Isa>(0);
  // AVX-VNNI is not implied by AVX-512 VNNI (different encodings): check it on its own.
#if defined(__x86_64__) || defined(__i386__)
  if (requested == kAvxVnni && !__builtin_cpu_supports("avxvnni")) return static_cast<Isa>(0);
#endif
  return static_cast<Isa>(requested);
}

}  // namespace inferflux

// For Python (ctypes): which ISA `kAuto` resolves to on this CPU.
extern "C" __attribute__((visibility("default"))) int64_t inferflux_cpu_best_isa() {
  return inferflux::BestIsa();
}

// `inferflux_cpu_threads_v1`: writes the size of the intra-op pool the kernels get (tests use it to check
// that a thread-count setting really took effect).
namespace {
xla::ffi::Error PoolThreads(xla::ffi::ThreadPool pool, xla::ffi::ResultBuffer<xla::ffi::S32> out) {
  out->typed_data()[0] = static_cast<int32_t>(pool.num_threads());
  return xla::ffi::Error::Success();
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(inferflux_cpu_threads_v1, PoolThreads,
                              xla::ffi::Ffi::Bind().Ctx<xla::ffi::ThreadPool>().Ret<xla::ffi::Buffer<xla::ffi::S32>>());
