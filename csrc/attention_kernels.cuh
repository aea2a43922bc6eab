// FlashAttention-2 style attention kernels for sm_80 (also compiled for sm_90a), non-causal,
// dense or packed varlen, fp16/bf16 in, fp32 accumulation, head dims 64/80/96/128.
//
// Forward (one thread block = 4 warps per (query tile of 64 rows, head, batch entry)):
//   Q tile -> shared (cp.async) -> mma A-fragments kept in registers (ldmatrix).
//   K/V tiles stream through a STAGES-deep cp.async ring in shared memory; each warp owns 16
//   query rows and computes S = Q K^T (mma.m16n8k16, fp32), the online-softmax update (fp32,
//   exp2, lane-local running sums), then O += P V with P converted in registers straight into
//   A-fragments (the C-fragment of S has the A-fragment's layout) and V read with ldmatrix.trans.
//   The epilogue normalises O by the row sum, stages it through shared memory for 16-byte
//   stores, and writes lse (natural log) for the backward.
//
// Backward (three launches, no atomics, deterministic):
//   1. preprocess: delta = rowsum(dO * O) in fp32, laid out like lse.
//   2. dQ: one block per query tile; loops over K/V tiles, recomputes P = exp2(S - lse),
//      dP = dO V^T, dS = P (dP - delta), dQ += dS K.
//   3. dK/dV: one block per key tile (each warp owns 16 keys); loops over Q/dO tiles, recomputes
//      the transposed P^T = exp2(K Q^T - lse), dV += P^T dO, dP^T = V dO^T, dS^T, dK += dS^T Q
//      (for D > 64 in 16-query steps within each tile: the dK/dV accumulators already take
//      D registers per thread).
//   This recomputes QK^T and dO V^T once more than FlashAttention-2's single-kernel backward
//   (7 instead of 5 tile products), in exchange for no fp32 dQ accumulator and no atomics.
//
// Ragged tails: rows past a segment are zero-filled by cp.async (src-size 0) and never stored;
// key columns past the segment get -inf scores (forward) or P = 0 (backward).
//
// The tile arithmetic lives in attention_tile.h (tested on the CPU); the instructions in
// sm80_primitives.cuh. This file is also compiled as host C++ by the CPU emulator
// (csrc/testing/emu_harness.cpp, TVF_EMULATE), which runs the kernel bodies below unchanged.
#pragma once

#include "attention_params.h"
#include "attention_tile.h"
#include "sm80_primitives.cuh"

namespace tvf {

// ---- segment bookkeeping ----------------------------------------------------------------------

struct Segment {
  int q_start, seqlen_q, k_start, seqlen_k;
};

TVF_DEVICE Segment segment_of(const AttentionParams& p, int b) {
  Segment s;
  if (p.cu_seqlens_q != nullptr) {
    s.q_start = p.cu_seqlens_q[b];
    s.seqlen_q = p.cu_seqlens_q[b + 1] - s.q_start;
    s.k_start = p.cu_seqlens_k[b];
    s.seqlen_k = p.cu_seqlens_k[b + 1] - s.k_start;
  } else {
    s.q_start = 0;
    s.seqlen_q = p.max_seqlen_q;
    s.k_start = 0;
    s.seqlen_k = p.max_seqlen_k;
  }
  return s;
}

// Element offset of row `row` (counted from the tensor's segment start) of (batch b, head h).
TVF_DEVICE int64_t row_offset(const RowLayout& l, int b, int h, int row) {
  return static_cast<int64_t>(b) * l.batch_stride + static_cast<int64_t>(row) * l.row_stride +
         static_cast<int64_t>(h) * l.head_stride;
}

TVF_DEVICE int64_t lse_offset(const AttentionParams& p, int b, int h, int row) {
  return static_cast<int64_t>(b) * p.lse_batch_stride + static_cast<int64_t>(h) * p.lse_head_stride +
         row;
}

TVF_DEVICE int min_i(int a, int b) { return a < b ? a : b; }

// ---- tile movement ----------------------------------------------------------------------------

// ROWS x D tile, global (row stride in elements, unit stride along D) -> shared (row stride LD),
// in 16-byte cp.async chunks spread over the block; rows >= valid_rows are zero-filled.
template <int ROWS, int D, int LD, typename T>
TVF_DEVICE void load_tile_async(T* smem, const T* gmem, int64_t row_stride, int valid_rows, int tid) {
  constexpr int kChunksPerRow = D / 8;
  constexpr int kChunks = ROWS * kChunksPerRow;
#pragma unroll
  for (int c0 = 0; c0 < kChunks; c0 += kThreads) {
    const int c = c0 + tid;
    if (kChunks % kThreads == 0 || c < kChunks) {
      const int row = c / kChunksPerRow;
      const int col = (c % kChunksPerRow) * 8;
      const bool ok = row < valid_rows;
      const T* src = ok ? gmem + row * row_stride + col : gmem;
      cp_async_16(smem + row * LD + col, src, ok);
    }
  }
}

// ROWS fp32 values (lse or delta of a query tile); entries >= valid_rows are zero-filled.
template <int ROWS>
TVF_DEVICE void load_rows_async(float* smem, const float* gmem, int valid_rows, int tid) {
  static_assert(ROWS <= kThreads, "one value per thread");
  if (tid < ROWS) {
    const bool ok = tid < valid_rows;
    cp_async_4(smem + tid, ok ? gmem + tid : gmem, ok);
  }
}

// Shared (row stride LD) -> global, 16-byte stores, rows < valid_rows only.
template <int ROWS, int D, int LD, typename T>
TVF_DEVICE void store_tile(T* gmem, int64_t row_stride, const T* smem, int valid_rows, int tid) {
  constexpr int kChunksPerRow = D / 8;
  constexpr int kChunks = ROWS * kChunksPerRow;
#pragma unroll
  for (int c0 = 0; c0 < kChunks; c0 += kThreads) {
    const int c = c0 + tid;
    if (kChunks % kThreads == 0 || c < kChunks) {
      const int row = c / kChunksPerRow;
      const int col = (c % kChunksPerRow) * 8;
      if (row < valid_rows) {
        *reinterpret_cast<Chunk16*>(gmem + row * row_stride + col) =
            *reinterpret_cast<const Chunk16*>(smem + row * LD + col);
      }
    }
  }
}

// A warp's 16-row fp32 accumulator strip (8*ND columns), times `mul` per row slot, converted
// to T and written into shared memory rows [0, 16) of `smem` (row stride LD).
template <typename T, int ND, int LD>
TVF_DEVICE void acc_to_smem(T* smem, const float (&acc)[ND][4], const float (&mul)[2], int lane) {
#pragma unroll
  for (int i = 0; i < ND; ++i) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = frag_row(lane, 2 * r);
      const int col = frag_col(lane, i, 0);
      *reinterpret_cast<uint32_t*>(smem + row * LD + col) =
          pack2<T>(acc[i][2 * r] * mul[r], acc[i][2 * r + 1] * mul[r]);
    }
  }
}

// ---- warp-level tile products -----------------------------------------------------------------

// A-fragments of a warp's 16 x KDIM strip of a row-major shared tile.
template <int KDIM, int LD, typename T>
TVF_DEVICE void load_a_frags(uint32_t (&a)[KDIM / 16][4], const T* strip, int lane) {
#pragma unroll
  for (int kk = 0; kk < KDIM / 16; ++kk) {
    ldmatrix_x4(a[kk], strip + (lane & 15) * LD + kk * 16 + (lane >> 4) * 8);
  }
}

// acc (16 x 8NT) += A (16 x KDIM) * B^T, where B is an 8NT x KDIM row-major shared tile (both
// operands contiguous along KDIM: S = Q K^T, dP = dO V^T and their transposes).
template <typename T, int KDIM, int NT, int LD>
TVF_DEVICE void gemm_nt_rega(float (&acc)[NT][4], const uint32_t (&a)[KDIM / 16][4], const T* b,
                             int lane) {
  static_assert(NT % 2 == 0, "n-tiles are loaded in pairs");
#pragma unroll
  for (int kk = 0; kk < KDIM / 16; ++kk) {
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t bf[4];
      ldmatrix_x4(bf, b + (np * 16 + (lane >> 4) * 8 + (lane & 7)) * LD + kk * 16 + ((lane >> 3) & 1) * 8);
      mma_16816<T>(acc[2 * np], a[kk], bf[0], bf[1]);
      mma_16816<T>(acc[2 * np + 1], a[kk], bf[2], bf[3]);
    }
  }
}

// Same, with A read from a 16-row shared strip one k-chunk at a time (fewer live registers).
template <typename T, int KDIM, int NT, int LD>
TVF_DEVICE void gemm_nt_smema(float (&acc)[NT][4], const T* a_strip, const T* b, int lane) {
  static_assert(NT % 2 == 0, "n-tiles are loaded in pairs");
#pragma unroll kSmemAUnroll
  for (int kk = 0; kk < KDIM / 16; ++kk) {
    uint32_t a[4];
    ldmatrix_x4(a, a_strip + (lane & 15) * LD + kk * 16 + (lane >> 4) * 8);
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t bf[4];
      ldmatrix_x4(bf, b + (np * 16 + (lane >> 4) * 8 + (lane & 7)) * LD + kk * 16 + ((lane >> 3) & 1) * 8);
      mma_16816<T>(acc[2 * np], a, bf[0], bf[1]);
      mma_16816<T>(acc[2 * np + 1], a, bf[2], bf[3]);
    }
  }
}

// fp32 accumulator fragments of a 16 x 8KT strip (P or dS) -> the A-fragments of the next
// product, rounded to T. The m16n8 C-fragment layout of two adjacent n-tiles is exactly the
// m16n8k16 A-fragment layout of one 16-wide k-chunk, so this is a register-local conversion.
template <typename T, int KT>
TVF_DEVICE void pack_a_frags(uint32_t (&a)[KT / 2][4], const float (&p)[KT][4]) {
  static_assert(KT % 2 == 0, "16-wide k-chunks");
#pragma unroll
  for (int kk = 0; kk < KT / 2; ++kk) {
    a[kk][0] = pack2<T>(p[2 * kk][0], p[2 * kk][1]);
    a[kk][1] = pack2<T>(p[2 * kk][2], p[2 * kk][3]);
    a[kk][2] = pack2<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]);
    a[kk][3] = pack2<T>(p[2 * kk + 1][2], p[2 * kk + 1][3]);
  }
}

// acc (16 x 8NT) += A (16 x KDIM, register fragments) * B, where B is a KDIM x 8NT row-major
// shared tile read with ldmatrix.trans (O += P V, dV += P^T dO, dK += dS^T Q, dQ += dS K).
template <typename T, int KDIM, int NT, int LD>
TVF_DEVICE void gemm_nn_rega(float (&acc)[NT][4], const uint32_t (&a)[KDIM / 16][4], const T* b, int lane) {
  static_assert(NT % 2 == 0, "n-tile pairs");
#pragma unroll
  for (int kk = 0; kk < KDIM / 16; ++kk) {
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t bf[4];
      ldmatrix_x4_trans(bf, b + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LD + np * 16 + (lane >> 4) * 8);
      mma_16816<T>(acc[2 * np], a[kk], bf[0], bf[1]);
      mma_16816<T>(acc[2 * np + 1], a[kk], bf[2], bf[3]);
    }
  }
}

template <int ND>
TVF_DEVICE void zero_acc(float (&acc)[ND][4]) {
#pragma unroll
  for (int i = 0; i < ND; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[i][e] = 0.f;
  }
}

// ---- forward ----------------------------------------------------------------------------------

template <typename T, int D>
TVF_DEVICE void attention_fwd_body(const AttentionParams& p, char* smem_raw) {
  using Cfg = FwdConfig<D>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, STAGES = Cfg::STAGES, LD = Cfg::LD;
  constexpr int NT_S = BN / 8, NT_O = D / 8;
  static_assert(D % 16 == 0, "head dim must be a multiple of 16");
  static_assert(sizeof(T) == kElemBytes, "fp16 / bf16 only");

  const int tid = thread_index(), lane = tid & 31, warp = tid >> 5;
  const int m_block = block_index_x(), h = block_index_y(), b = block_index_z();
  const Segment seg = segment_of(p, b);
  const int row0 = m_block * BM;
  if (row0 >= seg.seqlen_q) return;  // whole block: varlen segment shorter than max_seqlen_q
  const int rows_valid = min_i(BM, seg.seqlen_q - row0);

  const T* q = static_cast<const T*>(p.q) + row_offset(p.q_layout, b, h, seg.q_start + row0);
  const T* k = static_cast<const T*>(p.k) + row_offset(p.k_layout, b, h, seg.k_start);
  const T* v = static_cast<const T*>(p.v) + row_offset(p.v_layout, b, h, seg.k_start);
  T* o = static_cast<T*>(p.o) + row_offset(p.o_layout, b, h, seg.q_start + row0);
  float* lse = p.lse + lse_offset(p, b, h, seg.q_start + row0);

  T* s_q = reinterpret_cast<T*>(smem_raw);
  T* s_k = s_q + BM * LD;
  T* s_v = s_k + STAGES * BN * LD;

  const int n_tiles = (seg.seqlen_k + BN - 1) / BN;
  auto load_kv = [&](int j) {
    const int stage = j % STAGES;
    const int valid = seg.seqlen_k - j * BN;
    load_tile_async<BN, D, LD>(s_k + stage * BN * LD, k + static_cast<int64_t>(j) * BN * p.k_layout.row_stride,
                               p.k_layout.row_stride, valid, tid);
    load_tile_async<BN, D, LD>(s_v + stage * BN * LD, v + static_cast<int64_t>(j) * BN * p.v_layout.row_stride,
                               p.v_layout.row_stride, valid, tid);
  };

  // Prologue: Q in its own group, then the first STAGES-1 K/V tiles.
  load_tile_async<BM, D, LD>(s_q, q, p.q_layout.row_stride, rows_valid, tid);
  cp_async_commit();
#pragma unroll
  for (int j = 0; j < STAGES - 1; ++j) {
    if (j < n_tiles) load_kv(j);
    cp_async_commit();
  }
  cp_async_wait<STAGES - 1>();
  block_sync();
  uint32_t q_frag[D / 16][4];
  load_a_frags<D, LD>(q_frag, s_q + warp * 16 * LD, lane);

  float acc_o[NT_O][4];
  zero_acc(acc_o);
  float m[2] = {neg_inf(), neg_inf()};
  float l[2] = {0.f, 0.f};

  for (int j = 0; j < n_tiles; ++j) {
    // Refill the stage that tile j-1 used (everyone finished it at the barrier ending j-1).
    if (j + STAGES - 1 < n_tiles) load_kv(j + STAGES - 1);
    cp_async_commit();
    cp_async_wait<STAGES - 1>();  // tile j has landed (for this thread's copies) ...
    block_sync();                 // ... and for everyone's
    const T* s_kj = s_k + (j % STAGES) * BN * LD;
    const T* s_vj = s_v + (j % STAGES) * BN * LD;

    float s[NT_S][4];
    zero_acc(s);
    gemm_nt_rega<T, D, NT_S, LD>(s, q_frag, s_kj, lane);

    scale_and_mask_cols(s, p.scale_log2, lane, seg.seqlen_k - j * BN);
    float tile_max[2];
    row_max_partial(s, tile_max);
    tile_max[0] = quad_max(tile_max[0]);
    tile_max[1] = quad_max(tile_max[1]);
    float alpha[2], m_use[2];
    online_softmax_step(m, tile_max, alpha, m_use);
    exp2_rows_and_sum(s, m_use, alpha, l);
    rescale_rows(acc_o, alpha);

    uint32_t p_frag[BN / 16][4];
    pack_a_frags<T, NT_S>(p_frag, s);
    gemm_nn_rega<T, BN, NT_O, LD>(acc_o, p_frag, s_vj, lane);
    block_sync();  // loop end: the next iteration refills this stage
  }

  // Epilogue. The wait + barrier also cover n_tiles == 0 (empty key segment), where the loop
  // never waited.
  cp_async_wait<0>();
  block_sync();
  float l_total[2] = {quad_sum(l[0]), quad_sum(l[1])};
  float inv_l[2], row_lse[2];
  finalize_rows(m, l_total, inv_l, row_lse);
  acc_to_smem<T, NT_O, LD>(s_q + warp * 16 * LD, acc_o, inv_l, lane);
  if ((lane & 3) == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp * 16 + frag_row(lane, 2 * r);
      if (row < rows_valid) lse[row] = row_lse[r];
    }
  }
  block_sync();
  store_tile<BM, D, LD>(o, p.o_layout.row_stride, s_q, rows_valid, tid);
}

// ---- backward: delta = rowsum(dO * O) ---------------------------------------------------------

template <typename T, int D>
TVF_DEVICE void attention_bwd_preprocess_body(const AttentionParams& p) {
  const int tid = thread_index();
  const int h = block_index_y(), b = block_index_z();
  const Segment seg = segment_of(p, b);
  const int row = block_index_x() * kPreprocessRows + tid;
  if (row >= seg.seqlen_q) return;
  const T* o = static_cast<const T*>(p.o) + row_offset(p.o_layout, b, h, seg.q_start + row);
  const T* d_o = static_cast<const T*>(p.dout) + row_offset(p.do_layout, b, h, seg.q_start + row);
  float acc = 0.f;
#pragma unroll
  for (int c = 0; c < D; c += 8) {
    const Chunk16 oc = *reinterpret_cast<const Chunk16*>(o + c);
    const Chunk16 dc = *reinterpret_cast<const Chunk16*>(d_o + c);
    const T* oe = reinterpret_cast<const T*>(&oc);
    const T* de = reinterpret_cast<const T*>(&dc);
#pragma unroll
    for (int e = 0; e < 8; ++e) acc += to_float<T>(oe[e]) * to_float<T>(de[e]);
  }
  p.delta[lse_offset(p, b, h, seg.q_start + row)] = acc;
}

// ---- backward: dQ -----------------------------------------------------------------------------

template <typename T, int D>
TVF_DEVICE void attention_bwd_dq_body(const AttentionParams& p, char* smem_raw) {
  using Cfg = DqConfig<D>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, STAGES = Cfg::STAGES, LD = Cfg::LD;
  constexpr int NT_S = BN / 8, NT_D = D / 8;

  const int tid = thread_index(), lane = tid & 31, warp = tid >> 5;
  const int m_block = block_index_x(), h = block_index_y(), b = block_index_z();
  const Segment seg = segment_of(p, b);
  const int row0 = m_block * BM;
  if (row0 >= seg.seqlen_q) return;
  const int rows_valid = min_i(BM, seg.seqlen_q - row0);

  const T* q = static_cast<const T*>(p.q) + row_offset(p.q_layout, b, h, seg.q_start + row0);
  const T* d_o = static_cast<const T*>(p.dout) + row_offset(p.do_layout, b, h, seg.q_start + row0);
  const T* k = static_cast<const T*>(p.k) + row_offset(p.k_layout, b, h, seg.k_start);
  const T* v = static_cast<const T*>(p.v) + row_offset(p.v_layout, b, h, seg.k_start);
  T* dq = static_cast<T*>(p.dq) + row_offset(p.dq_layout, b, h, seg.q_start + row0);
  const int64_t lrow = lse_offset(p, b, h, seg.q_start + row0);

  T* s_q = reinterpret_cast<T*>(smem_raw);
  T* s_do = s_q + BM * LD;
  T* s_k = s_do + BM * LD;
  T* s_v = s_k + STAGES * BN * LD;

  // This lane's two query rows: lse and delta straight from global memory.
  float row_lse[2], row_delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = warp * 16 + frag_row(lane, 2 * r);
    row_lse[r] = row < rows_valid ? p.lse[lrow + row] : 0.f;
    row_delta[r] = row < rows_valid ? p.delta[lrow + row] : 0.f;
  }

  const int n_tiles = (seg.seqlen_k + BN - 1) / BN;
  auto load_kv = [&](int j) {
    const int stage = j % STAGES;
    const int valid = seg.seqlen_k - j * BN;
    load_tile_async<BN, D, LD>(s_k + stage * BN * LD, k + static_cast<int64_t>(j) * BN * p.k_layout.row_stride,
                               p.k_layout.row_stride, valid, tid);
    load_tile_async<BN, D, LD>(s_v + stage * BN * LD, v + static_cast<int64_t>(j) * BN * p.v_layout.row_stride,
                               p.v_layout.row_stride, valid, tid);
  };

  load_tile_async<BM, D, LD>(s_q, q, p.q_layout.row_stride, rows_valid, tid);
  load_tile_async<BM, D, LD>(s_do, d_o, p.do_layout.row_stride, rows_valid, tid);
  cp_async_commit();
#pragma unroll
  for (int j = 0; j < STAGES - 1; ++j) {
    if (j < n_tiles) load_kv(j);
    cp_async_commit();
  }

  const T* q_strip = s_q + warp * 16 * LD;
  const T* do_strip = s_do + warp * 16 * LD;
  float acc_dq[NT_D][4];
  zero_acc(acc_dq);

  for (int j = 0; j < n_tiles; ++j) {
    if (j + STAGES - 1 < n_tiles) load_kv(j + STAGES - 1);
    cp_async_commit();
    cp_async_wait<STAGES - 1>();  // Q/dO (older group) and tile j have landed
    block_sync();
    const T* s_kj = s_k + (j % STAGES) * BN * LD;
    const T* s_vj = s_v + (j % STAGES) * BN * LD;

    float s[NT_S][4];
    zero_acc(s);
    gemm_nt_smema<T, D, NT_S, LD>(s, q_strip, s_kj, lane);
    recompute_p_rows(s, row_lse, p.scale_log2, lane, seg.seqlen_k - j * BN);

    float dp[NT_S][4];
    zero_acc(dp);
    gemm_nt_smema<T, D, NT_S, LD>(dp, do_strip, s_vj, lane);
    ds_rows(s, dp, row_delta);

    uint32_t ds_frag[BN / 16][4];
    pack_a_frags<T, NT_S>(ds_frag, dp);
    gemm_nn_rega<T, BN, NT_D, LD>(acc_dq, ds_frag, s_kj, lane);
    block_sync();  // loop end: the next iteration refills this stage
  }

  cp_async_wait<0>();
  block_sync();
  const float mul[2] = {p.softmax_scale, p.softmax_scale};
  acc_to_smem<T, NT_D, LD>(s_q + warp * 16 * LD, acc_dq, mul, lane);
  block_sync();
  store_tile<BM, D, LD>(dq, p.dq_layout.row_stride, s_q, rows_valid, tid);
}

// ---- backward: dK, dV -------------------------------------------------------------------------

template <typename T, int D>
TVF_DEVICE void attention_bwd_dkdv_body(const AttentionParams& p, char* smem_raw) {
  using Cfg = DkdvConfig<D>;
  constexpr int BN = Cfg::BN, BM = Cfg::BM, SUB = Cfg::SUB, STAGES = Cfg::STAGES, LD = Cfg::LD;
  constexpr int NT_S = SUB / 8, NT_D = D / 8;

  const int tid = thread_index(), lane = tid & 31, warp = tid >> 5;
  const int n_block = block_index_x(), h = block_index_y(), b = block_index_z();
  const Segment seg = segment_of(p, b);
  const int key0 = n_block * BN;
  if (key0 >= seg.seqlen_k) return;
  const int keys_valid = min_i(BN, seg.seqlen_k - key0);

  const T* k = static_cast<const T*>(p.k) + row_offset(p.k_layout, b, h, seg.k_start + key0);
  const T* v = static_cast<const T*>(p.v) + row_offset(p.v_layout, b, h, seg.k_start + key0);
  const T* q = static_cast<const T*>(p.q) + row_offset(p.q_layout, b, h, seg.q_start);
  const T* d_o = static_cast<const T*>(p.dout) + row_offset(p.do_layout, b, h, seg.q_start);
  const float* lse = p.lse + lse_offset(p, b, h, seg.q_start);
  const float* delta = p.delta + lse_offset(p, b, h, seg.q_start);
  T* dk = static_cast<T*>(p.dk) + row_offset(p.dk_layout, b, h, seg.k_start + key0);
  T* dv = static_cast<T*>(p.dv) + row_offset(p.dv_layout, b, h, seg.k_start + key0);

  T* s_k = reinterpret_cast<T*>(smem_raw);
  T* s_v = s_k + BN * LD;
  T* s_q = s_v + BN * LD;
  T* s_do = s_q + STAGES * BM * LD;
  float* s_lse = reinterpret_cast<float*>(smem_raw + Cfg::smem_float_offset_bytes);
  float* s_delta = s_lse + STAGES * BM;

  const int m_tiles = (seg.seqlen_q + BM - 1) / BM;
  auto load_q = [&](int i) {
    const int stage = i % STAGES;
    const int valid = seg.seqlen_q - i * BM;
    const int64_t r0 = static_cast<int64_t>(i) * BM;
    load_tile_async<BM, D, LD>(s_q + stage * BM * LD, q + r0 * p.q_layout.row_stride, p.q_layout.row_stride,
                               valid, tid);
    load_tile_async<BM, D, LD>(s_do + stage * BM * LD, d_o + r0 * p.do_layout.row_stride,
                               p.do_layout.row_stride, valid, tid);
    load_rows_async<BM>(s_lse + stage * BM, lse + r0, valid, tid);
    load_rows_async<BM>(s_delta + stage * BM, delta + r0, valid, tid);
  };

  load_tile_async<BN, D, LD>(s_k, k, p.k_layout.row_stride, keys_valid, tid);
  load_tile_async<BN, D, LD>(s_v, v, p.v_layout.row_stride, keys_valid, tid);
  cp_async_commit();
#pragma unroll
  for (int i = 0; i < STAGES - 1; ++i) {
    if (i < m_tiles) load_q(i);
    cp_async_commit();
  }

  const T* k_strip = s_k + warp * 16 * LD;
  const T* v_strip = s_v + warp * 16 * LD;
  float acc_dk[NT_D][4], acc_dv[NT_D][4];
  zero_acc(acc_dk);
  zero_acc(acc_dv);

  for (int i = 0; i < m_tiles; ++i) {
    if (i + STAGES - 1 < m_tiles) load_q(i + STAGES - 1);
    cp_async_commit();
    cp_async_wait<STAGES - 1>();
    block_sync();
    const int stage = i % STAGES;
    const T* s_qi = s_q + stage * BM * LD;
    const T* s_doi = s_do + stage * BM * LD;

    // The query tile is processed in sub-tiles of SUB queries (fewer live registers).
#pragma unroll 1
    for (int sub = 0; sub < BM / SUB; ++sub) {
      const T* s_qs = s_qi + sub * SUB * LD;
      const T* s_dos = s_doi + sub * SUB * LD;
      const int col0 = stage * BM + sub * SUB;
      // dP^T = V dO^T; S^T = K Q^T (keys x queries) -> P^T; dS^T = P^T (dP^T - delta)
      float dp[NT_S][4];
      zero_acc(dp);
      gemm_nt_smema<T, D, NT_S, LD>(dp, v_strip, s_dos, lane);
      float s[NT_S][4];
      zero_acc(s);
      gemm_nt_smema<T, D, NT_S, LD>(s, k_strip, s_qs, lane);
      recompute_p_cols(s, s_lse + col0, p.scale_log2, lane, seg.seqlen_q - i * BM - sub * SUB);
      ds_cols(s, dp, s_delta + col0, lane);
      uint32_t p_frag[SUB / 16][4], ds_frag[SUB / 16][4];
      pack_a_frags<T, NT_S>(p_frag, s);
      pack_a_frags<T, NT_S>(ds_frag, dp);
      // dV += P^T dO, dK += dS^T Q
      gemm_nn_rega<T, SUB, NT_D, LD>(acc_dv, p_frag, s_dos, lane);
      gemm_nn_rega<T, SUB, NT_D, LD>(acc_dk, ds_frag, s_qs, lane);
    }
    block_sync();  // loop end: the next iteration refills this stage
  }

  cp_async_wait<0>();
  block_sync();
  const float mul_k[2] = {p.softmax_scale, p.softmax_scale};
  const float mul_v[2] = {1.f, 1.f};
  acc_to_smem<T, NT_D, LD>(s_k + warp * 16 * LD, acc_dk, mul_k, lane);
  acc_to_smem<T, NT_D, LD>(s_v + warp * 16 * LD, acc_dv, mul_v, lane);
  block_sync();
  store_tile<BN, D, LD>(dk, p.dk_layout.row_stride, s_k, keys_valid, tid);
  store_tile<BN, D, LD>(dv, p.dv_layout.row_stride, s_v, keys_valid, tid);
}

// ---- grids ------------------------------------------------------------------------------------

struct Grid3 {
  int x, y, z;
};

TVF_HD Grid3 grid_over_q(const AttentionParams& p, int rows_per_block) {
  return Grid3{(p.max_seqlen_q + rows_per_block - 1) / rows_per_block, p.heads, p.batch};
}

TVF_HD Grid3 grid_over_k(const AttentionParams& p, int rows_per_block) {
  return Grid3{(p.max_seqlen_k + rows_per_block - 1) / rows_per_block, p.heads, p.batch};
}

}  // namespace tvf

// ---- kernels and launchers (nvcc only) ----------------------------------------------------------
#if defined(__CUDACC__) && !defined(TVF_EMULATE)
#include <cuda_runtime.h>

namespace tvf {

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(const AttentionParams p) {
  extern __shared__ __align__(16) char smem[];
  attention_fwd_body<T, D>(p, smem);
}

template <typename T, int D>
__global__ void __launch_bounds__(kPreprocessRows) attention_bwd_preprocess_kernel(const AttentionParams p) {
  attention_bwd_preprocess_body<T, D>(p);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_bwd_dq_kernel(const AttentionParams p) {
  extern __shared__ __align__(16) char smem[];
  attention_bwd_dq_body<T, D>(p, smem);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_bwd_dkdv_kernel(const AttentionParams p) {
  extern __shared__ __align__(16) char smem[];
  attention_bwd_dkdv_body<T, D>(p, smem);
}

template <typename Kernel>
inline cudaError_t launch_checked(Kernel kernel, Grid3 g, int threads, size_t smem, cudaStream_t stream,
                                  const AttentionParams& p) {
  if (g.x == 0 || g.y == 0 || g.z == 0) return cudaSuccess;
  if (smem > 48 * 1024) {
    // Above 48 KiB a kernel must opt in to dynamic shared memory (sm_80: up to 163 KiB).
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<dim3(g.x, g.y, g.z), threads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t run_attention_fwd(const AttentionParams& p, cudaStream_t stream) {
  using Cfg = FwdConfig<D>;
  return launch_checked(attention_fwd_kernel<T, D>, grid_over_q(p, Cfg::BM), kThreads,
                        Cfg::smem_bytes, stream, p);
}

template <typename T, int D>
cudaError_t run_attention_bwd(const AttentionParams& p, cudaStream_t stream) {
  cudaError_t err = launch_checked(attention_bwd_preprocess_kernel<T, D>, grid_over_q(p, kPreprocessRows),
                                   kPreprocessRows, 0, stream, p);
  if (err != cudaSuccess) return err;
  err = launch_checked(attention_bwd_dq_kernel<T, D>, grid_over_q(p, DqConfig<D>::BM), kThreads,
                       DqConfig<D>::smem_bytes, stream, p);
  if (err != cudaSuccess) return err;
  return launch_checked(attention_bwd_dkdv_kernel<T, D>, grid_over_k(p, DkdvConfig<D>::BN), kThreads,
                        DkdvConfig<D>::smem_bytes, stream, p);
}

}  // namespace tvf

namespace tvf {

template <int D>
int launch_attention_fwd(const AttentionParams& p, CUstream_st* stream) {
  return p.is_bf16 ? static_cast<int>(run_attention_fwd<__nv_bfloat16, D>(p, stream))
                   : static_cast<int>(run_attention_fwd<__half, D>(p, stream));
}

template <int D>
int launch_attention_bwd(const AttentionParams& p, CUstream_st* stream) {
  return p.is_bf16 ? static_cast<int>(run_attention_bwd<__nv_bfloat16, D>(p, stream))
                   : static_cast<int>(run_attention_bwd<__half, D>(p, stream));
}

}  // namespace tvf

// One head dim and direction per translation unit (parallel, selectable builds); each
// instantiates fp16 and bf16.
#define TVF_INSTANTIATE_FWD(D) \
  template int tvf::launch_attention_fwd<D>(const tvf::AttentionParams&, CUstream_st*);
#define TVF_INSTANTIATE_BWD(D) \
  template int tvf::launch_attention_bwd<D>(const tvf::AttentionParams&, CUstream_st*);
#endif
