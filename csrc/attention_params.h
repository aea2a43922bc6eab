// Parameters and launcher declarations shared by bindings.cpp (host, g++) and the .cu files
// (nvcc). Plain C++: no torch, no CUDA types beyond an opaque stream handle.
#pragma once

#include <stdint.h>

struct CUstream_st;

namespace tvf {

// Row addressing of one [batch, row, head, dim] tensor (unit stride along dim). Packed varlen
// tensors (total, H, D) use batch_stride = 0 and rows counted from the segment start.
struct RowLayout {
  int64_t batch_stride;
  int64_t row_stride;
  int64_t head_stride;
};

struct AttentionParams {
  // Forward inputs/outputs (the backward reads q, k, v, o, lse too).
  const void* q;
  const void* k;
  const void* v;
  void* o;
  float* lse;  // (B, H, Nq) dense or (H, total_q) varlen; query axis contiguous
  // Backward.
  const void* dout;
  void* dq;
  void* dk;
  void* dv;
  float* delta;  // rowsum(dO * O), laid out like lse
  // The 5-product backward only (nullptr selects the deterministic one): fp32 dQ accumulated
  // with atomic adds by the dK/dV kernel, zeroed by the caller, laid out like q.
  float* dq_accum;
  // Varlen: int32 cumulative sequence lengths (batch + 1 entries) or nullptr for dense.
  const int* cu_seqlens_q;
  const int* cu_seqlens_k;

  RowLayout q_layout, k_layout, v_layout, o_layout, do_layout, dq_layout, dk_layout, dv_layout, dq_accum_layout;
  int64_t lse_batch_stride;  // 0 for varlen
  int64_t lse_head_stride;

  int batch;
  int heads;
  int head_dim;
  int max_seqlen_q;  // dense: Nq; varlen: upper bound on every segment (sets the grid)
  int max_seqlen_k;
  float softmax_scale;
  float scale_log2;  // softmax_scale * log2(e)
  bool is_bf16;
};

// ---- tile configurations (shared by the kernels and by kernel_configs() in bindings.cpp) -----

constexpr int kPad = 8;             // shared-memory row padding in elements (16 bytes): rows
                                    // start 16 bytes apart mod 128, so ldmatrix is conflict-free
constexpr int kPreprocessRows = 128;  // query rows (one per thread) per preprocess block
constexpr int kElemBytes = 2;       // fp16 / bf16

// FlashAttention-2's forward tiling: 128 query rows per block, 4 warps of 32 rows each (two
// m16 tiles per warp, so every K/V fragment read from shared memory feeds two mma), Q in shared
// memory, K and V in one buffer each, loaded staggered: V_j while S = Q K_j^T is computed,
// K_{j+1} while softmax and O += P V_j are.
template <int D>
struct FwdConfig {
  static constexpr int THREADS = 128;
  static constexpr int BM = 128;                // query rows per block
  static constexpr int WARP_ROWS = BM / (THREADS / 32);
  static constexpr int BN = D <= 96 ? 64 : 32;  // keys per tile
  static constexpr int STAGES = 1;              // one K and one V buffer (staggered loads)
  static constexpr int LD = D + kPad;
  static constexpr int smem_bytes = (BM + 2 * BN) * LD * kElemBytes;  // Q, K, V
};

// Hopper forward (sm_90a, opt-in): 2 warpgroups, each 64 query rows with wgmma m64nNk16 (S =
// Q K^T with both operands in shared memory, O += P V with P from registers), K and V staggered as
// in FwdConfig. Tiles in the no-swizzle core-matrix layout (sm90_primitives.cuh), no padding.
template <int D>
struct FwdSm90Config {
  static constexpr int THREADS = 256;
  static constexpr int BM = 128;                // query rows per block (64 per warpgroup)
  static constexpr int BN = 64;                 // keys per tile
  static constexpr int STAGES = 1;
  static constexpr int smem_bytes = (BM + 2 * BN) * D * kElemBytes;  // Q, K, V
};

// dQ: the forward's tiling (128 rows, 32 per warp); K/V pairs through a 2-stage cp.async ring.
template <int D>
struct DqConfig {
  static constexpr int THREADS = 128;
  static constexpr int BM = 128;
  static constexpr int WARP_ROWS = BM / (THREADS / 32);
  static constexpr int BN = D <= 64 ? 64 : 32;  // keys per tile (S and dP live together)
  static constexpr int STAGES = 2;
  static constexpr int LD = D + kPad;
  static constexpr int smem_bytes = (2 * BM + 2 * STAGES * BN) * LD * kElemBytes;  // Q, dO, K/V ring
};

// dK/dV: 128 keys per block, 8 warps in 2-D layouts. Products with keys x queries outputs
// (S^T = K Q^T, dP^T = V dO^T) use 4 x 2 warps: 32 keys x BM/2 queries each. P^T and dS^T go
// through shared memory, and dV += P^T dO, dK += dS^T Q use 4 x 2 warps of 32 keys x D/2. In the
// 5-product backward the block also forms the tile's dQ contribution dS K (queries x D) with
// BM/16 x (8 / (BM/16)) warps of 16 queries and adds it to an fp32 buffer with atomics.
template <int D>
struct DkdvConfig {
  static constexpr int THREADS = 256;
  static constexpr int BN = 128;                // keys per block
  static constexpr int BM = D <= 96 ? 64 : 32;  // queries per streamed tile (shared memory bound)
  static constexpr int STAGES = 2;              // Q/dO/lse/delta ring
  static constexpr int WARPS_Q = 2;             // S^T / dP^T layout: 4 x 2
  static constexpr int WARPS_KEYS_S = THREADS / 32 / WARPS_Q;
  static constexpr int WARPS_D = 2;             // dK / dV layout: 4 x 2
  static constexpr int WARPS_KEYS_D = THREADS / 32 / WARPS_D;
  static constexpr int WARPS_DQ_ROWS = BM / 16;  // dQ contribution layout (5-product backward)
  static constexpr int WARPS_DQ_COLS = THREADS / 32 / WARPS_DQ_ROWS;
  static constexpr int LD = D + kPad;
  static constexpr int LDP = BM + kPad;         // P^T and dS^T tiles (keys x queries)
  static constexpr int smem_float_offset_bytes =
      (2 * BN * LD + 2 * STAGES * BM * LD + 2 * BN * LDP) * kElemBytes;  // K, V, Q/dO ring, P^T, dS^T
  static constexpr int smem_bytes = smem_float_offset_bytes + 2 * STAGES * BM * 4;  // lse/delta ring
};

// Launchers, one explicit instantiation per compiled head dim (attention_{fwd,bwd}_hdimD.cu).
// They return the cudaError_t of the launch sequence as an int (0 = success).
template <int D>
int launch_attention_fwd(const AttentionParams& p, CUstream_st* stream);
template <int D>
int launch_attention_bwd(const AttentionParams& p, CUstream_st* stream);
// The Hopper forward (sm_90a machine code only; the caller checks the device).
template <int D>
int launch_attention_fwd_sm90(const AttentionParams& p, CUstream_st* stream);

}  // namespace tvf
