// The sm_90a instructions of the Hopper forward kernel (attention_fwd_sm90.cuh), as inline PTX:
//   wgmma.mma_async.sync.aligned.m64nNk16.f32.{f16,bf16}.{f16,bf16}  warpgroup tensor-core product
//       A from shared memory (descriptor) or from registers, B from shared memory (descriptor)
//   wgmma.fence / commit_group / wait_group                         ordering of the async products
//   fence.proxy.async.shared::cta                                   thread writes -> async-proxy reads
//
// Shared-memory operands use the no-swizzle ("interleave") canonical layout: 8 x 8 core matrices
// of 8 rows x 16 bytes, each stored as 128 contiguous bytes (rows 16 bytes apart). A descriptor
// gives the operand's start address, SBO = the byte distance between core matrices adjacent along
// M or N, and LBO = the distance between core matrices adjacent along K; the same two strides
// describe a K-major operand (its 16-byte rows run along K) and an MN-major one (trans flag set:
// its 16-byte rows run along M or N). The accumulator of m64nNk16 gives warp w of the warpgroup
// rows [16 w, 16 w + 16), per 8 columns in mma.m16n8's C-fragment layout (registers 4 i .. 4 i + 3
// for columns [8 i, 8 i + 8)); an A operand from registers is, per warp, mma.m16n8k16's A-fragment.
//
// As in sm80_primitives.cuh, the kernels call only these wrappers for warpgroup-collective work,
// and with TVF_EMULATE they forward to the CPU emulator (csrc/testing/emu_harness.cpp). On the GPU
// they exist only where nvcc compiles for sm_90a (__CUDA_ARCH_FEAT_SM90_ALL); compiled for another
// arch they trap, and the launcher never starts the kernel there.
#pragma once

#include "sm80_primitives.cuh"

namespace tvf {

#if defined(TVF_EMULATE)
namespace emu {
uint32_t smem_offset(const void* p);
void wgmma(float* d, int n, const uint32_t* a_regs, uint64_t desc_a, uint64_t desc_b, bool trans_b, bool bf16);
void wgmma_commit();
void wgmma_wait(int pending);
}  // namespace emu
#endif

// Shared-memory byte address of p as a descriptor needs it (within the block's window).
TVF_DEVICE uint32_t smem_address(const void* p) {
#if defined(TVF_EMULATE)
  return emu::smem_offset(p);
#else
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#endif
}

// A no-swizzle matrix descriptor (PTX ISA, "Matrix Descriptor Format"): addresses and strides in
// 16-byte units, base offset 0, swizzle mode 0.
TVF_DEVICE uint64_t smem_descriptor(const void* start, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  return static_cast<uint64_t>((smem_address(start) & 0x3FFFF) >> 4) |
         (static_cast<uint64_t>((lbo_bytes & 0x3FFFF) >> 4) << 16) |
         (static_cast<uint64_t>((sbo_bytes & 0x3FFFF) >> 4) << 32);
}

#if defined(TVF_EMULATE)

TVF_DEVICE void keep_after_wait(float&) {}
TVF_DEVICE void wgmma_fence() {}
TVF_DEVICE void fence_proxy_async() {}
TVF_DEVICE void wgmma_commit() { emu::wgmma_commit(); }
template <int N>
TVF_DEVICE void wgmma_wait() {
  emu::wgmma_wait(N);
}
// d (this thread's N/2 accumulators) += A (64 x 16, K-major, shared) * B (16 x N, K-major, shared).
template <typename T, int N>
TVF_DEVICE void wgmma_ss(float* d, uint64_t desc_a, uint64_t desc_b) {
  emu::wgmma(d, N, nullptr, desc_a, desc_b, false, IsBf16<T>::value);
}
// d += A (64 x 16, this thread's A-fragment) * B (16 x N, N-major (transposed) in shared memory).
template <typename T, int N>
TVF_DEVICE void wgmma_rs_trans_b(float* d, const uint32_t (&a)[4], uint64_t desc_b) {
  emu::wgmma(d, N, a, 0, desc_b, true, IsBf16<T>::value);
}

#elif defined(__CUDACC__)

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define TVF_SM90_ASM(...) asm volatile(__VA_ARGS__)
#else
#define TVF_SM90_ASM(...) __trap()
#endif

// An empty asm that "rewrites" an accumulator register: placed after wgmma.wait_group (both are
// volatile asm, so they stay in order), it keeps the compiler from reading the register before
// the asynchronous product has written it.
TVF_DEVICE void keep_after_wait(float& x) { asm volatile("" : "+f"(x)::"memory"); }
TVF_DEVICE void wgmma_fence() { TVF_SM90_ASM("wgmma.fence.sync.aligned;\n" ::: "memory"); }
TVF_DEVICE void fence_proxy_async() { TVF_SM90_ASM("fence.proxy.async.shared::cta;\n" ::: "memory"); }
TVF_DEVICE void wgmma_commit() { TVF_SM90_ASM("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
TVF_DEVICE void wgmma_wait() {
  TVF_SM90_ASM("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Operand lists: the accumulators first ("+f", 4 per 8 columns), then A, B, the scale-d flag.
#define TVF_D8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), \
                  "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define TVF_D16 TVF_D8(0), TVF_D8(8)
#define TVF_D32 TVF_D8(0), TVF_D8(8), TVF_D8(16), TVF_D8(24)
#define TVF_LIST8 "%0, %1, %2, %3, %4, %5, %6, %7"
#define TVF_LIST16 TVF_LIST8 ", %8, %9, %10, %11, %12, %13, %14, %15"
#define TVF_LIST32 TVF_LIST16 ", %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"

// A and B from shared memory, both K-major (imm-trans-a = imm-trans-b = 0); d += A B (scale-d 1).
#define TVF_WGMMA_SS(N, TY, LIST, IA, IB, IS, ...)                                                \
  TVF_SM90_ASM("{\n.reg .pred p;\nsetp.ne.b32 p, %" #IS ", 0;\n"                                    \
               "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " "                       \
               "{" LIST "}, %" #IA ", %" #IB ", p, 1, 1, 0, 0;\n}\n"                                 \
               : __VA_ARGS__                                                                        \
               : "l"(desc_a), "l"(desc_b), "r"(1))

// A from registers, B from shared memory N-major (imm-trans-b = 1).
#define TVF_WGMMA_RS_TRANS_B(N, TY, LIST, A0, A1, A2, A3, IB, IS, ...)                            \
  TVF_SM90_ASM("{\n.reg .pred p;\nsetp.ne.b32 p, %" #IS ", 0;\n"                                    \
               "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " "                       \
               "{" LIST "}, {%" #A0 ", %" #A1 ", %" #A2 ", %" #A3 "}, %" #IB ", p, 1, 1, 1;\n}\n"       \
               : __VA_ARGS__                                                                        \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1))

template <typename T, int N>
TVF_DEVICE void wgmma_ss(float* d, uint64_t desc_a, uint64_t desc_b);
template <>
TVF_DEVICE void wgmma_ss<__half, 64>(float* d, uint64_t desc_a, uint64_t desc_b) {
  TVF_WGMMA_SS(64, "f16", TVF_LIST32, 32, 33, 34, TVF_D32);
}
template <>
TVF_DEVICE void wgmma_ss<__nv_bfloat16, 64>(float* d, uint64_t desc_a, uint64_t desc_b) {
  TVF_WGMMA_SS(64, "bf16", TVF_LIST32, 32, 33, 34, TVF_D32);
}

template <typename T, int N>
TVF_DEVICE void wgmma_rs_trans_b(float* d, const uint32_t (&a)[4], uint64_t desc_b);
#define TVF_DEFINE_RS_TRANS_B(N, TYPE, TY, LIST, A0, A1, A2, A3, IB, IS, REGS)                    \
  template <>                                                                                      \
  TVF_DEVICE void wgmma_rs_trans_b<TYPE, N>(float* d, const uint32_t (&a)[4], uint64_t desc_b) {   \
    TVF_WGMMA_RS_TRANS_B(N, TY, LIST, A0, A1, A2, A3, IB, IS, REGS);                               \
  }
TVF_DEFINE_RS_TRANS_B(64, __half, "f16", TVF_LIST32, 32, 33, 34, 35, 36, 37, TVF_D32)
TVF_DEFINE_RS_TRANS_B(64, __nv_bfloat16, "bf16", TVF_LIST32, 32, 33, 34, 35, 36, 37, TVF_D32)
TVF_DEFINE_RS_TRANS_B(32, __half, "f16", TVF_LIST16, 16, 17, 18, 19, 20, 21, TVF_D16)
TVF_DEFINE_RS_TRANS_B(32, __nv_bfloat16, "bf16", TVF_LIST16, 16, 17, 18, 19, 20, 21, TVF_D16)
TVF_DEFINE_RS_TRANS_B(16, __half, "f16", TVF_LIST8, 8, 9, 10, 11, 12, 13, TVF_D8(0))
TVF_DEFINE_RS_TRANS_B(16, __nv_bfloat16, "bf16", TVF_LIST8, 8, 9, 10, 11, 12, 13, TVF_D8(0))

#else
#error "sm90_primitives.cuh: compile with nvcc, or define TVF_EMULATE for the CPU emulator"
#endif

}  // namespace tvf
