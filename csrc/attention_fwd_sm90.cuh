// Hopper (sm_90a) forward: the algorithm of attention_fwd_body (attention_kernels.cuh) with the
// products on wgmma. Opt-in only (the op's wgmma=True, TUBEVIT_FAST_CUDA_WGMMA=1) until a GPU run
// has checked and timed it.
//
// A block = 2 warpgroups per 128 query rows; warpgroup g owns rows [64 g, 64 g + 64) and warp w of
// it the 16 rows [16 w, 16 w + 16) of those, in mma.m16n8's C-fragment layout, so the tile
// arithmetic of attention_tile.h runs unchanged on its accumulators:
//   S = Q K^T      D/16 wgmma m64n64k16, Q and K both from shared memory (K-major descriptors)
//   softmax        online, fp32, as in the sm_80 kernel; P packed into A-fragments in registers
//   O += P V       per 16 keys, wgmma m64n{64,32,16}k16 with A = P from registers and V from
//                  shared memory as an N-major (transposed) operand: no transposing copy of V
// K and V are single-buffered and loaded staggered, exactly as in the sm_80 forward, with cp.async
// into the no-swizzle core-matrix layout (sm90_primitives.cuh); a fence.proxy.async after each
// wait makes the threads' copies visible to wgmma, and every product is waited for (wait_group 0)
// before the barrier that lets its buffers be refilled. No TMA, no warp specialisation, no
// swizzled layouts: the first version aims at being right and checkable, not yet at speed.
#pragma once

#include "attention_kernels.cuh"
#include "sm90_primitives.cuh"

namespace tvf {

// ROWS x D tile, global -> shared in the core-matrix layout: 16-byte chunk c of row r at element
// (r / 8) * 8 D + c * 64 + (r % 8) * 8 (core matrices of 8 rows x 16 bytes, 128 bytes apart along
// a row, 16 D bytes apart down 8 rows). Consecutive threads take the 8 rows of a core matrix
// (conflict-free shared writes) and, 8 threads further, the next chunk (64 contiguous bytes per
// row and warp in global memory). Rows >= valid_rows are zero-filled.
template <int ROWS, int D, int THREADS, typename T>
TVF_DEVICE void load_tile_core_async(T* smem, const T* gmem, int64_t row_stride, int valid_rows, int tid) {
  constexpr int kChunksPerRow = D / 8, kChunks = ROWS * kChunksPerRow;
#pragma unroll
  for (int q0 = 0; q0 < kChunks; q0 += THREADS) {
    const int q = q0 + tid;
    if (kChunks % THREADS == 0 || q < kChunks) {
      const int r8 = q % 8, rest = q / 8;
      const int c = rest % kChunksPerRow, row = (rest / kChunksPerRow) * 8 + r8;
      const bool ok = row < valid_rows;
      cp_async_16(smem + (row / 8) * 8 * D + c * 64 + r8 * 8, ok ? gmem + row * row_stride + c * 8 : gmem, ok);
    }
  }
}

template <int NT>
TVF_DEVICE void keep_all_after_wait(float (&acc)[NT][4]) {
#pragma unroll
  for (int i = 0; i < NT; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) keep_after_wait(acc[i][e]);
  }
}

// acc (this warpgroup's 64 rows x D) += P (64 x 16 keys, A-fragments) * V (16 keys x D, N-major
// in shared memory, v_keys = its first key's row group), in n64 / n32 / n16 pieces.
template <typename T, int D>
TVF_DEVICE void wgmma_pv(float (&acc)[D / 8][4], const uint32_t (&p)[4], const T* v_keys) {
  constexpr uint32_t kCoreBytes = 128, kRowGroupBytes = 16 * D;
  // V element (key, d) sits at (key / 8) * kRowGroupBytes + (d / 8) * kCoreBytes + ...: for the
  // N-major operand, N = d steps core matrices by SBO = kCoreBytes and K = key by LBO.
  constexpr int kN64 = D / 64 * 64;  // then at most one n32 and one n16 piece
#pragma unroll
  for (int n0 = 0; n0 < kN64; n0 += 64) {
    wgmma_rs_trans_b<T, 64>(&acc[n0 / 8][0], p, smem_descriptor(v_keys + n0 * 8, kRowGroupBytes, kCoreBytes));
  }
  if constexpr ((D - kN64) & 32) {
    wgmma_rs_trans_b<T, 32>(&acc[kN64 / 8][0], p, smem_descriptor(v_keys + kN64 * 8, kRowGroupBytes, kCoreBytes));
  }
  if constexpr ((D - kN64) & 16) {
    constexpr int n0 = D - 16;
    wgmma_rs_trans_b<T, 16>(&acc[n0 / 8][0], p, smem_descriptor(v_keys + n0 * 8, kRowGroupBytes, kCoreBytes));
  }
}

template <typename T, int D>
TVF_DEVICE void attention_fwd_sm90_body(const AttentionParams& p, char* smem_raw) {
  using Cfg = FwdSm90Config<D>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, THREADS = Cfg::THREADS;
  constexpr int NT_S = BN / 8, NT_O = D / 8;
  constexpr uint32_t kCoreBytes = 128, kRowGroupBytes = 16 * D;
  static_assert(BN == 64, "S = Q K^T is one m64n64k16 product per 16 head-dim columns");
  static_assert(D % 16 == 0, "head dim must be a multiple of 16");

  const int tid = thread_index(), lane = tid & 31, warp = tid >> 5;
  const int wg = warp / 4, warp_row0 = wg * 64 + (warp % 4) * 16;
  FwdBlock<T> blk;
  if (!fwd_block<T, BM>(p, blk)) return;
  const Segment& seg = blk.seg;
  const int rows_valid = blk.rows_valid;

  T* s_q = reinterpret_cast<T*>(smem_raw);
  T* s_k = s_q + BM * D;
  T* s_v = s_k + BN * D;
  const T* s_q_wg = s_q + wg * 64 * D;  // this warpgroup's 8 row groups

  const int n_tiles = (seg.seqlen_k + BN - 1) / BN;
  auto load_k = [&](int j) {
    load_tile_core_async<BN, D, THREADS>(s_k, blk.k + static_cast<int64_t>(j) * BN * p.k_layout.row_stride,
                                         p.k_layout.row_stride, seg.seqlen_k - j * BN, tid);
  };
  auto load_v = [&](int j) {
    load_tile_core_async<BN, D, THREADS>(s_v, blk.v + static_cast<int64_t>(j) * BN * p.v_layout.row_stride,
                                         p.v_layout.row_stride, seg.seqlen_k - j * BN, tid);
  };

  load_tile_core_async<BM, D, THREADS>(s_q, blk.q, p.q_layout.row_stride, rows_valid, tid);
  if (n_tiles > 0) load_k(0);
  cp_async_commit();  // Q and K_0: one group

  float acc_o[1][NT_O][4];
  zero_acc(acc_o);
  float m[2] = {neg_inf(), neg_inf()}, l[2] = {0.f, 0.f};

  for (int j = 0; j < n_tiles; ++j) {
    cp_async_wait<0>();
    fence_proxy_async();
    block_sync();
    load_v(j);  // refill: after the barrier that ends every warp's reads of it
    cp_async_commit();

    float s[1][NT_S][4];
    zero_acc(s);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {  // 16 head-dim columns = 2 core matrices along K
      wgmma_ss<T, 64>(&s[0][0][0], smem_descriptor(s_q_wg + kk * 128, kCoreBytes, kRowGroupBytes),
                      smem_descriptor(s_k + kk * 128, kCoreBytes, kRowGroupBytes));
    }
    wgmma_commit();
    wgmma_wait<0>();
    keep_all_after_wait(s[0]);

    cp_async_wait<0>();
    fence_proxy_async();
    block_sync();
    if (j + 1 < n_tiles) load_k(j + 1);  // refill: after the barrier that ends every warp's reads of it
    cp_async_commit();

    uint32_t p_frag[BN / 16][4];
    online_softmax_tile<T>(s[0], m, l, acc_o[0], p_frag, p.scale_log2, lane, seg.seqlen_k - j * BN);

    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) wgmma_pv<T, D>(acc_o[0], p_frag[kk], s_v + kk * 16 * D);
    wgmma_commit();
    wgmma_wait<0>();
    keep_all_after_wait(acc_o[0]);
  }

  // Epilogue as in the sm_80 forward: O staged row-major (row stride D) in the warp's own rows of
  // the Q region, which only its warpgroup's products read, all waited for.
  cp_async_wait<0>();
  block_sync();
  float inv_l[1][2];
  finish_rows(m, l, inv_l[0], blk.lse, warp_row0, rows_valid, lane);
  acc_to_smem<T, 1, NT_O, D>(s_q + warp_row0 * D, acc_o, inv_l, lane);
  block_sync();
  store_tile<BM, D, D, THREADS>(blk.o, p.o_layout.row_stride, s_q, rows_valid, tid);
}

}  // namespace tvf

#if defined(__CUDACC__) && !defined(TVF_EMULATE)
namespace tvf {

template <typename T, int D>
__global__ void __launch_bounds__(FwdSm90Config<D>::THREADS) attention_fwd_sm90_kernel(const AttentionParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(16) char smem[];
  attention_fwd_sm90_body<T, D>(p, smem);
#else
  __trap();  // built into every cubin, launched only on sm_90 (bindings.cpp checks the device)
#endif
}

template <typename T, int D>
cudaError_t run_attention_fwd_sm90(const AttentionParams& p, cudaStream_t stream) {
  using Cfg = FwdSm90Config<D>;
  return launch_checked(attention_fwd_sm90_kernel<T, D>, grid_over_q(p, Cfg::BM), Cfg::THREADS, Cfg::smem_bytes,
                        stream, p);
}

template <int D>
int launch_attention_fwd_sm90(const AttentionParams& p, CUstream_st* stream) {
  return p.is_bf16 ? static_cast<int>(run_attention_fwd_sm90<__nv_bfloat16, D>(p, stream))
                   : static_cast<int>(run_attention_fwd_sm90<__half, D>(p, stream));
}

}  // namespace tvf

#define TVF_INSTANTIATE_FWD_SM90(D) \
  template int tvf::launch_attention_fwd_sm90<D>(const tvf::AttentionParams&, CUstream_st*);
#endif
