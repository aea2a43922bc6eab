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
  // Varlen: int32 cumulative sequence lengths (batch + 1 entries) or nullptr for dense.
  const int* cu_seqlens_q;
  const int* cu_seqlens_k;

  RowLayout q_layout, k_layout, v_layout, o_layout, do_layout, dq_layout, dk_layout, dv_layout;
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

constexpr int kThreads = 128;       // 4 warps per block for the attention kernels
constexpr int kPad = 8;             // shared-memory row padding in elements (16 bytes): rows
                                    // start 16 bytes apart mod 128, so ldmatrix is conflict-free
constexpr int kSmemAUnroll = 2;     // unroll of the k-loop of products with A read from shared
constexpr int kPreprocessRows = 128;  // query rows (one per thread) per preprocess block
constexpr int kElemBytes = 2;       // fp16 / bf16

template <int D>
struct FwdConfig {
  static constexpr int BM = 64;                 // query rows per block (16 per warp)
  static constexpr int BN = D <= 64 ? 64 : 32;  // keys per streamed tile
  static constexpr int STAGES = 2;              // depth of the K/V cp.async ring
  static constexpr int LD = D + kPad;
  static constexpr int smem_bytes = (BM + 2 * STAGES * BN) * LD * kElemBytes;  // Q, K/V ring
};

template <int D>
struct DqConfig {
  static constexpr int BM = 64;                 // query rows per block (16 per warp)
  static constexpr int BN = D <= 64 ? 64 : 32;  // keys per streamed tile
  static constexpr int STAGES = 2;
  static constexpr int LD = D + kPad;
  static constexpr int smem_bytes = (2 * BM + 2 * STAGES * BN) * LD * kElemBytes;  // Q, dO, K/V ring
};

template <int D>
struct DkdvConfig {
  static constexpr int BN = 64;                 // keys per block (16 per warp)
  static constexpr int BM = D <= 64 ? 64 : 32;  // queries per streamed tile
  static constexpr int SUB = D <= 64 ? BM : 16; // queries per compute step (register pressure)
  static constexpr int STAGES = 2;
  static constexpr int LD = D + kPad;
  // K, V, the Q/dO ring, then the fp32 lse/delta ring.
  static constexpr int smem_float_offset_bytes = (2 * BN + 2 * STAGES * BM) * LD * kElemBytes;
  static constexpr int smem_bytes = smem_float_offset_bytes + 2 * STAGES * BM * 4;
};

// Launchers, one explicit instantiation per compiled head dim (attention_{fwd,bwd}_hdimD.cu).
// They return the cudaError_t of the launch sequence as an int (0 = success).
template <int D>
int launch_attention_fwd(const AttentionParams& p, CUstream_st* stream);
template <int D>
int launch_attention_bwd(const AttentionParams& p, CUstream_st* stream);

}  // namespace tvf
