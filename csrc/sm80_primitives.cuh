// The sm_80 instructions the attention kernels are built from, as inline PTX:
//   mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32   tensor-core product
//   ldmatrix.sync.aligned.m8n8.{x4,x2.trans}{.trans}.shared.b16      shared -> mma fragments
//   cp.async.{cg,ca}.shared.global (+ commit_group / wait_group)      asynchronous tile loads
//   red.global.add.f32                                               atomic fp32 accumulation
// plus thread/block indices, the block barrier and quad (4-lane) shuffles.
//
// The kernels call only these wrappers for anything warp- or block-collective, so the same
// kernel source also compiles as host C++ with TVF_EMULATE defined: the wrappers then forward
// to a CPU emulator (csrc/testing/emu_harness.cpp) that runs a thread block as 128 fibers.
// The PTX path is what nvcc compiles for sm_80 and sm_90a; sm_90a runs the same sm_80-style
// code (mma.sync is valid on Hopper; wgmma/TMA are not used).
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#if defined(__CUDACC__)
#define TVF_DEVICE __device__ __forceinline__
#else
#define TVF_DEVICE inline
#endif

namespace tvf {

// A 16-byte chunk (8 fp16/bf16 elements): the unit of every global <-> shared copy.
struct alignas(16) Chunk16 {
  uint32_t x, y, z, w;
};

template <typename T>
struct IsBf16 {
  static constexpr bool value = false;
};
template <>
struct IsBf16<__nv_bfloat16> {
  static constexpr bool value = true;
};

// Two fp32 values -> one 32-bit register of two 16-bit values, the first in the low half
// (the lower column index, as mma fragments expect).
template <typename T>
TVF_DEVICE uint32_t pack2(float lo, float hi);

template <>
TVF_DEVICE uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  uint32_t r;
  memcpy(&r, &h, sizeof(r));
  return r;
}

template <>
TVF_DEVICE uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  uint32_t r;
  memcpy(&r, &h, sizeof(r));
  return r;
}

template <typename T>
TVF_DEVICE float to_float(T x);
template <>
TVF_DEVICE float to_float<__half>(__half x) {
  return __half2float(x);
}
template <>
TVF_DEVICE float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

#if defined(TVF_EMULATE)
// ---- CPU emulation hooks (implemented by csrc/testing/emu_harness.cpp) ----------------------
namespace emu {
int thread_index();
int block_index(int axis);
void block_sync();
float shfl_xor(float v, int lane_mask);
void ldmatrix(uint32_t* r, int matrices, const void* smem_row, bool trans);
void atomic_add(float* gmem, float v);
void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16);
void cp_async(void* smem_dst, const void* gmem_src, int bytes, bool valid);
void cp_async_commit();
void cp_async_wait(int pending);
}  // namespace emu

TVF_DEVICE int thread_index() { return emu::thread_index(); }
TVF_DEVICE int block_index_x() { return emu::block_index(0); }
TVF_DEVICE int block_index_y() { return emu::block_index(1); }
TVF_DEVICE int block_index_z() { return emu::block_index(2); }
TVF_DEVICE void block_sync() { emu::block_sync(); }
TVF_DEVICE float shfl_xor(float v, int m) { return emu::shfl_xor(v, m); }
TVF_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* p) { emu::ldmatrix(r, 4, p, false); }
TVF_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) { emu::ldmatrix(r, 4, p, true); }
TVF_DEVICE void ldmatrix_x2_trans(uint32_t (&r)[2], const void* p) { emu::ldmatrix(r, 2, p, true); }
TVF_DEVICE void atomic_add_f32(float* p, float v) { emu::atomic_add(p, v); }
template <typename T>
TVF_DEVICE void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::mma_16816(d, a, b0, b1, IsBf16<T>::value);
}
TVF_DEVICE void cp_async_16(void* dst, const void* src, bool valid) { emu::cp_async(dst, src, 16, valid); }
TVF_DEVICE void cp_async_4(void* dst, const void* src, bool valid) { emu::cp_async(dst, src, 4, valid); }
TVF_DEVICE void cp_async_commit() { emu::cp_async_commit(); }
template <int N>
TVF_DEVICE void cp_async_wait() {
  emu::cp_async_wait(N);
}

#elif defined(__CUDACC__)
// ---- the GPU: inline PTX ---------------------------------------------------------------------

TVF_DEVICE int thread_index() { return threadIdx.x; }
TVF_DEVICE int block_index_x() { return blockIdx.x; }
TVF_DEVICE int block_index_y() { return blockIdx.y; }
TVF_DEVICE int block_index_z() { return blockIdx.z; }
TVF_DEVICE void block_sync() { __syncthreads(); }
TVF_DEVICE float shfl_xor(float v, int m) { return __shfl_xor_sync(0xffffffffu, v, m); }

TVF_DEVICE uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Lane l supplies the address of row (l % 8) of matrix (l / 8); register i receives matrix i.
TVF_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

TVF_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// Lanes 0-15 supply the row addresses of the two matrices (lanes 16-31 are ignored).
TVF_DEVICE void ldmatrix_x2_trans(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(p)));
}

// Fire-and-forget fp32 add to global memory (RED.E.ADD.F32); the order of the adds is not
// deterministic, so neither are the last bits of the sum.
TVF_DEVICE void atomic_add_f32(float* p, float v) { atomicAdd(p, v); }

// d += A (16x16, row) * B (16x8, col), fp32 accumulate.
template <typename T>
TVF_DEVICE void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
TVF_DEVICE void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
TVF_DEVICE void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16-byte global -> shared copy, bypassing L1; valid = false zero-fills the destination
// (src-size 0: nothing is read from src).
TVF_DEVICE void cp_async_16(void* dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(src_bytes));
}

// 4-byte variant (lse / delta rows, which need not be 16-byte aligned).
TVF_DEVICE void cp_async_4(void* dst, const void* src, bool valid) {
  const int src_bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(src_bytes));
}

TVF_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
TVF_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

#else
#error "sm80_primitives.cuh: compile with nvcc, or define TVF_EMULATE for the CPU emulator"
#endif

// Max / sum over the 4 lanes of a quad (the lanes that share a fragment row).
TVF_DEVICE float quad_max(float v) {
  v = fmaxf(v, shfl_xor(v, 1));
  return fmaxf(v, shfl_xor(v, 2));
}

TVF_DEVICE float quad_sum(float v) {
  v += shfl_xor(v, 1);
  return v + shfl_xor(v, 2);
}

}  // namespace tvf
