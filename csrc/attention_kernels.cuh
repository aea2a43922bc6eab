// FlashAttention-2 style attention kernels for sm_80 (also compiled for sm_90a), non-causal,
// dense or packed varlen, fp16/bf16 in, fp32 accumulation, head dims 64/80/96/128. Tile sizes
// and warp layouts: attention_params.h.
//
// Forward (a block = 4 warps per (128 query rows, head, batch entry); a warp owns 32 rows):
//   Q -> shared (cp.async). K and V have one shared buffer each, loaded staggered so one copy is
//   always in flight: V_j during S = Q K_j^T, K_{j+1} during softmax and O += P V_j. S comes from
//   mma.m16n8k16 with Q and K both read with ldmatrix (two m16 tiles per warp share every K
//   fragment); the online softmax runs in fp32 (exp2, lane-local running sums); P is converted in
//   registers straight into A-fragments (the C-fragment of S has the A-fragment's layout) and V
//   read with ldmatrix.trans. The epilogue normalises O by the row sum, stages it through shared
//   memory for 16-byte stores, and writes lse (natural log) for the backward.
//
// Backward, deterministic (the default; no atomics, bit-reproducible), three launches:
//   1. preprocess: delta = rowsum(dO * O) in fp32, laid out like lse.
//   2. dQ: the forward's tiling (128 rows, 32 per warp) over a 2-stage ring of K/V tiles;
//      recomputes P = exp2(S - lse), dP = dO V^T, dS = P (dP - delta), dQ += dS K.
//   3. dK/dV: a block of 8 warps per 128 keys loops over query tiles: S^T = K Q^T and dP^T = V dO^T
//      with 4 x 2 warps (32 keys x half the queries each), P^T and dS^T through shared memory, then
//      dV += P^T dO and dK += dS^T Q with 4 x 2 warps (32 keys x half the head dim each).
//   7 tile products in all, FlashAttention-2's 5 plus S and dP recomputed by the dQ kernel.
// Backward, 5 products (opt-in): the dK/dV kernel also forms each query tile's dS K and adds it to
//   an fp32 dQ buffer with atomics; a last pass scales and rounds it (no dQ kernel).
//
// Pipelines: every refill of a shared buffer is issued right after a barrier that ends every
// warp's reads of that buffer (the emulator's greedy schedule and its mutation test check it).
// Ragged tails: rows past a segment are zero-filled by cp.async (src-size 0) and never stored;
// key columns past the segment get -inf scores (forward) or P = 0 (backward).
//
// The tile arithmetic lives in attention_tile.h (tested on the CPU); the instructions in
// sm80_primitives.cuh. The opt-in Hopper forward (wgmma) is in attention_fwd_sm90.cuh. This file is also compiled as host C++ by the CPU emulator
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

// How a block's threads cover a ROWS x D tile in 16-byte chunks: each row's D/8 chunks go to
// D/8 consecutive threads, so a pass covers ROW_STEP rows (threads past ROW_STEP * D/8 idle).
// A thread's chunks are then one pointer stepping by ROW_STEP rows, not one precomputed 64-bit
// address per chunk (which the compiler would keep live across the main loop).
template <int ROWS, int D, int THREADS>
struct TileMap {
  static constexpr int kChunksPerRow = D / 8;
  static constexpr int ROW_STEP = THREADS / kChunksPerRow;
  static constexpr int PASSES = (ROWS + ROW_STEP - 1) / ROW_STEP;
  static_assert(ROW_STEP > 0, "a row must fit in one pass");
  TVF_DEVICE static bool active(int tid) { return ROW_STEP * kChunksPerRow == THREADS || tid < ROW_STEP * kChunksPerRow; }
  TVF_DEVICE static int row(int tid) { return tid / kChunksPerRow; }
  TVF_DEVICE static int col(int tid) { return (tid % kChunksPerRow) * 8; }
};

// ROWS x D tile, global (row stride in elements, unit stride along D) -> shared (row stride LD),
// in 16-byte cp.async chunks spread over the block; rows >= valid_rows are zero-filled.
template <int ROWS, int D, int LD, int THREADS, typename T>
TVF_DEVICE void load_tile_async(T* smem, const T* gmem, int64_t row_stride, int valid_rows, int tid) {
  using Map = TileMap<ROWS, D, THREADS>;
  if (!Map::active(tid)) return;
  const int row0 = Map::row(tid), col = Map::col(tid);
  const T* src = gmem + row0 * row_stride + col;
  const int64_t step = Map::ROW_STEP * row_stride;
#pragma unroll
  for (int pass = 0; pass < Map::PASSES; ++pass, src += step) {
    const int row = row0 + pass * Map::ROW_STEP;
    if (ROWS % Map::ROW_STEP == 0 || row < ROWS) {
      const bool ok = row < valid_rows;
      cp_async_16(smem + row * LD + col, ok ? src : gmem, ok);
    }
  }
}

// ROWS fp32 values (lse or delta of a query tile); entries >= valid_rows are zero-filled.
template <int ROWS, int THREADS>
TVF_DEVICE void load_rows_async(float* smem, const float* gmem, int valid_rows, int tid) {
  static_assert(ROWS <= THREADS, "one value per thread");
  if (tid < ROWS) {
    const bool ok = tid < valid_rows;
    cp_async_4(smem + tid, ok ? gmem + tid : gmem, ok);
  }
}

// Shared (row stride LD) -> global, 16-byte stores, rows < valid_rows only.
template <int ROWS, int D, int LD, int THREADS, typename T>
TVF_DEVICE void store_tile(T* gmem, int64_t row_stride, const T* smem, int valid_rows, int tid) {
  using Map = TileMap<ROWS, D, THREADS>;
  if (!Map::active(tid)) return;
  const int row0 = Map::row(tid), col = Map::col(tid);
  T* dst = gmem + row0 * row_stride + col;
  const int64_t step = Map::ROW_STEP * row_stride;
#pragma unroll
  for (int pass = 0; pass < Map::PASSES; ++pass, dst += step) {
    const int row = row0 + pass * Map::ROW_STEP;
    if ((ROWS % Map::ROW_STEP == 0 || row < ROWS) && row < valid_rows) {
      *reinterpret_cast<Chunk16*>(dst) = *reinterpret_cast<const Chunk16*>(smem + row * LD + col);
    }
  }
}

// A warp's fp32 accumulator (MT m16 tiles x 8*NT columns), times `mul` per m-tile and row slot,
// converted to T and written into shared memory rows [0, 16 MT) of `smem` (row stride LD).
template <typename T, int MT, int NT, int LD>
TVF_DEVICE void acc_to_smem(T* smem, const float (&acc)[MT][NT][4], const float (&mul)[MT][2], int lane) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int i = 0; i < NT; ++i) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = mt * 16 + frag_row(lane, 2 * r);
        const int col = frag_col(lane, i, 0);
        *reinterpret_cast<uint32_t*>(smem + row * LD + col) =
            pack2<T>(acc[mt][i][2 * r] * mul[mt][r], acc[mt][i][2 * r + 1] * mul[mt][r]);
      }
    }
  }
}

// ---- warp-level tile products -------------------------------------------------------------------
//
// A warp owns MT m16 tiles (16 MT rows) and 8 NT output columns. Per 16-wide k-chunk it loads
// the MT A-fragments once and each 16-column pair of B once (ldmatrix.x4), and issues 2 MT mma
// per B pair: the more rows per warp, the fewer shared-memory reads per mma.

// A-fragment of rows [16 mt, 16 mt + 16) x columns [16 kk, 16 kk + 16) of a row-major tile.
template <int LDA, typename T>
TVF_DEVICE void load_a_frag(uint32_t (&a)[4], const T* tile, int mt, int kk, int lane) {
  ldmatrix_x4(a, tile + (mt * 16 + (lane & 15)) * LDA + kk * 16 + (lane >> 4) * 8);
}

// acc (16MT x 8NT) += A B^T: A is 16MT x KDIM row-major in shared memory, B is 8NT x KDIM
// row-major in shared memory (both contiguous along KDIM: S = Q K^T, dP = dO V^T, S^T = K Q^T,
// dP^T = V dO^T).
// The k-loop (over the head dim) is not unrolled: unrolled, the compiler hoists the fragment
// loads of later k-chunks and the forward at D = 128 spills (ptxas, sm_80 and sm_90a).
template <typename T, int KDIM, int MT, int NT, int LDA, int LDB>
TVF_DEVICE void gemm_nt_ss(float (&acc)[MT][NT][4], const T* a, const T* b, int lane) {
  static_assert(NT % 2 == 0, "n-tiles are loaded in pairs");
#pragma unroll 1
  for (int kk = 0; kk < KDIM / 16; ++kk) {
    uint32_t af[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) load_a_frag<LDA>(af[mt], a, mt, kk, lane);
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t bf[4];
      ldmatrix_x4(bf, b + (np * 16 + (lane >> 4) * 8 + (lane & 7)) * LDB + kk * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma_16816<T>(acc[mt][2 * np], af[mt], bf[0], bf[1]);
        mma_16816<T>(acc[mt][2 * np + 1], af[mt], bf[2], bf[3]);
      }
    }
  }
}

// B-fragments of k-rows [16 kk, 16 kk + 16) x columns [16 np, 16 np + 16) of a row-major
// KDIM x N tile (ldmatrix.trans): registers 0, 1 for n-tile 2 np, 2, 3 for 2 np + 1.
template <int LDB, typename T>
TVF_DEVICE void load_b_frags_trans(uint32_t (&bf)[4], const T* b, int kk, int np, int lane) {
  ldmatrix_x4_trans(bf, b + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LDB + np * 16 + (lane >> 4) * 8);
}

// acc (16MT x 8NT) += A B: A in registers (MT x KDIM/16 A-fragments), B a KDIM x 8NT row-major
// shared tile (O += P V, dQ += dS K).
template <typename T, int KDIM, int MT, int NT, int LDB>
TVF_DEVICE void gemm_nn_rs(float (&acc)[MT][NT][4], const uint32_t (&a)[MT][KDIM / 16][4], const T* b, int lane) {
  static_assert(NT % 2 == 0, "n-tile pairs");
#pragma unroll
  for (int kk = 0; kk < KDIM / 16; ++kk) {
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t bf[4];
      load_b_frags_trans<LDB>(bf, b, kk, np, lane);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma_16816<T>(acc[mt][2 * np], a[mt][kk], bf[0], bf[1]);
        mma_16816<T>(acc[mt][2 * np + 1], a[mt][kk], bf[2], bf[3]);
      }
    }
  }
}

// A-fragment of rows [16 mt, 16 mt + 16) x columns [16 kk, 16 kk + 16) of A, where the tile
// holds A transposed (element (m, k) at tile_t[k * LDA + m]): ldmatrix.trans of its k-rows.
template <int LDA, typename T>
TVF_DEVICE void load_a_frag_trans(uint32_t (&a)[4], const T* tile_t, int mt, int kk, int lane) {
  ldmatrix_x4_trans(a, tile_t + (kk * 16 + (lane & 7) + (lane >> 4) * 8) * LDA + mt * 16 + ((lane >> 3) & 1) * 8);
}

// acc (16MT x 8NT) += A B with both in shared memory: B KDIM x 8NT row-major; A 16MT x KDIM
// row-major (dV += P^T dO, dK += dS^T Q), or stored transposed when A_TRANS (dQ += dS K from the
// dS^T tile). An odd NT ends with a single n-tile (ldmatrix.x2.trans): D/2 = 40 at D = 80.
template <typename T, int KDIM, int MT, int NT, int LDA, int LDB, bool A_TRANS = false>
TVF_DEVICE void gemm_nn_ss(float (&acc)[MT][NT][4], const T* a, const T* b, int lane) {
#pragma unroll
  for (int kk = 0; kk < KDIM / 16; ++kk) {
    uint32_t af[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      if (A_TRANS) {
        load_a_frag_trans<LDA>(af[mt], a, mt, kk, lane);
      } else {
        load_a_frag<LDA>(af[mt], a, mt, kk, lane);
      }
    }
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t bf[4];
      load_b_frags_trans<LDB>(bf, b, kk, np, lane);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma_16816<T>(acc[mt][2 * np], af[mt], bf[0], bf[1]);
        mma_16816<T>(acc[mt][2 * np + 1], af[mt], bf[2], bf[3]);
      }
    }
    if (NT % 2 == 1) {
      uint32_t bf[2];
      ldmatrix_x2_trans(bf, b + (kk * 16 + (lane & 15)) * LDB + (NT - 1) * 8);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) mma_16816<T>(acc[mt][NT - 1], af[mt], bf[0], bf[1]);
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

template <int MT, int NT>
TVF_DEVICE void zero_acc(float (&acc)[MT][NT][4]) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int i = 0; i < NT; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][i][e] = 0.f;
    }
  }
}

// ---- forward ----------------------------------------------------------------------------------

// What a forward block (BM query rows of one head and sequence) reads and writes.
template <typename T>
struct FwdBlock {
  Segment seg;
  int rows_valid;  // query rows of the block inside the segment (<= BM)
  const T* q;      // the block's first query row
  const T* k;      // the segment's first key
  const T* v;
  T* o;
  float* lse;
};

// false for a block wholly past its (varlen) segment's end: it has nothing to do.
template <typename T, int BM>
TVF_DEVICE bool fwd_block(const AttentionParams& p, FwdBlock<T>& blk) {
  const int h = block_index_y(), b = block_index_z();
  blk.seg = segment_of(p, b);
  const int row0 = block_index_x() * BM;
  if (row0 >= blk.seg.seqlen_q) return false;
  blk.rows_valid = min_i(BM, blk.seg.seqlen_q - row0);
  blk.q = static_cast<const T*>(p.q) + row_offset(p.q_layout, b, h, blk.seg.q_start + row0);
  blk.k = static_cast<const T*>(p.k) + row_offset(p.k_layout, b, h, blk.seg.k_start);
  blk.v = static_cast<const T*>(p.v) + row_offset(p.v_layout, b, h, blk.seg.k_start);
  blk.o = static_cast<T*>(p.o) + row_offset(p.o_layout, b, h, blk.seg.q_start + row0);
  blk.lse = p.lse + lse_offset(p, b, h, blk.seg.q_start + row0);
  return true;
}

// One key tile of the online softmax for one m16 tile: raw scores s (16 x 8 NT_S) -> P, packed
// into the A-fragments of O += P V; the running max m and sum l updated, acc_o rescaled.
template <typename T, int NT_S, int NT_O>
TVF_DEVICE void online_softmax_tile(float (&s)[NT_S][4], float (&m)[2], float (&l)[2], float (&acc_o)[NT_O][4],
                                    uint32_t (&p_frag)[NT_S / 2][4], float scale_log2, int lane, int valid_cols) {
  scale_and_mask_cols(s, scale_log2, lane, valid_cols);
  float tile_max[2];
  row_max_partial(s, tile_max);
  tile_max[0] = quad_max(tile_max[0]);
  tile_max[1] = quad_max(tile_max[1]);
  float alpha[2], m_use[2];
  online_softmax_step(m, tile_max, alpha, m_use);
  exp2_rows_and_sum(s, m_use, alpha, l);
  rescale_rows(acc_o, alpha);
  pack_a_frags<T, NT_S>(p_frag, s);
}

// End of the forward for one m16 tile whose first row is block row `row0`: inv_l = 1 / row sum
// (quad-reduced), and lse stored for the rows inside the segment.
TVF_DEVICE void finish_rows(const float (&m)[2], const float (&l)[2], float (&inv_l)[2], float* lse, int row0,
                            int rows_valid, int lane) {
  const float l_total[2] = {quad_sum(l[0]), quad_sum(l[1])};
  float row_lse[2];
  finalize_rows(m, l_total, inv_l, row_lse);
  if ((lane & 3) == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row0 + frag_row(lane, 2 * r);
      if (row < rows_valid) lse[row] = row_lse[r];
    }
  }
}

template <typename T, int D>
TVF_DEVICE void attention_fwd_body(const AttentionParams& p, char* smem_raw) {
  using Cfg = FwdConfig<D>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, LD = Cfg::LD, THREADS = Cfg::THREADS;
  constexpr int MT = Cfg::WARP_ROWS / 16, NT_S = BN / 8, NT_O = D / 8;
  static_assert(D % 16 == 0, "head dim must be a multiple of 16");
  static_assert(sizeof(T) == kElemBytes, "fp16 / bf16 only");

  const int tid = thread_index(), lane = tid & 31, warp = tid >> 5;
  FwdBlock<T> blk;
  if (!fwd_block<T, BM>(p, blk)) return;
  const Segment& seg = blk.seg;
  const int rows_valid = blk.rows_valid;

  T* s_q = reinterpret_cast<T*>(smem_raw);
  T* s_k = s_q + BM * LD;
  T* s_v = s_k + BN * LD;
  const T* q_strip = s_q + warp * Cfg::WARP_ROWS * LD;

  const int n_tiles = (seg.seqlen_k + BN - 1) / BN;
  auto load_k = [&](int j) {
    load_tile_async<BN, D, LD, THREADS>(s_k, blk.k + static_cast<int64_t>(j) * BN * p.k_layout.row_stride,
                                        p.k_layout.row_stride, seg.seqlen_k - j * BN, tid);
  };
  auto load_v = [&](int j) {
    load_tile_async<BN, D, LD, THREADS>(s_v, blk.v + static_cast<int64_t>(j) * BN * p.v_layout.row_stride,
                                        p.v_layout.row_stride, seg.seqlen_k - j * BN, tid);
  };

  load_tile_async<BM, D, LD, THREADS>(s_q, blk.q, p.q_layout.row_stride, rows_valid, tid);
  if (n_tiles > 0) load_k(0);
  cp_async_commit();  // Q and K_0: one group

  float acc_o[MT][NT_O][4];
  zero_acc(acc_o);
  float m[MT][2], l[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    m[mt][0] = m[mt][1] = neg_inf();
    l[mt][0] = l[mt][1] = 0.f;
  }

  for (int j = 0; j < n_tiles; ++j) {
    cp_async_wait<0>();
    block_sync();
    load_v(j);  // refill: after the barrier that ends every warp's reads of it
    cp_async_commit();

    float s[MT][NT_S][4];
    zero_acc(s);
    gemm_nt_ss<T, D, MT, NT_S, LD, LD>(s, q_strip, s_k, lane);

    cp_async_wait<0>();
    block_sync();
    if (j + 1 < n_tiles) load_k(j + 1);  // refill: after the barrier that ends every warp's reads of it
    cp_async_commit();

    uint32_t p_frag[MT][BN / 16][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      online_softmax_tile<T>(s[mt], m[mt], l[mt], acc_o[mt], p_frag[mt], p.scale_log2, lane, seg.seqlen_k - j * BN);
    }
    gemm_nn_rs<T, BN, MT, NT_O, LD>(acc_o, p_frag, s_v, lane);
  }

  // Epilogue: the warp's rows of O go through its own rows of s_q (which only it reads) for
  // 16-byte stores. The wait + barrier matter where the loop never ran (empty key segment): Q
  // copies of other threads may still be landing.
  cp_async_wait<0>();
  block_sync();
  float inv_l[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    finish_rows(m[mt], l[mt], inv_l[mt], blk.lse, warp * Cfg::WARP_ROWS + mt * 16, rows_valid, lane);
  }
  acc_to_smem<T, MT, NT_O, LD>(s_q + warp * Cfg::WARP_ROWS * LD, acc_o, inv_l, lane);
  block_sync();
  store_tile<BM, D, LD, THREADS>(blk.o, p.o_layout.row_stride, s_q, rows_valid, tid);
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
  constexpr int BM = Cfg::BM, BN = Cfg::BN, STAGES = Cfg::STAGES, LD = Cfg::LD, THREADS = Cfg::THREADS;
  constexpr int MT = Cfg::WARP_ROWS / 16, NT_S = BN / 8, NT_D = D / 8;

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
  const T* q_strip = s_q + warp * Cfg::WARP_ROWS * LD;
  const T* do_strip = s_do + warp * Cfg::WARP_ROWS * LD;

  // This lane's query rows: lse and delta straight from global memory.
  float row_lse[MT][2], row_delta[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp * Cfg::WARP_ROWS + mt * 16 + frag_row(lane, 2 * r);
      row_lse[mt][r] = row < rows_valid ? p.lse[lrow + row] : 0.f;
      row_delta[mt][r] = row < rows_valid ? p.delta[lrow + row] : 0.f;
    }
  }

  const int n_tiles = (seg.seqlen_k + BN - 1) / BN;
  auto load_kv = [&](int j) {
    const int stage = j % STAGES;
    const int valid = seg.seqlen_k - j * BN;
    load_tile_async<BN, D, LD, THREADS>(s_k + stage * BN * LD, k + static_cast<int64_t>(j) * BN * p.k_layout.row_stride,
                                        p.k_layout.row_stride, valid, tid);
    load_tile_async<BN, D, LD, THREADS>(s_v + stage * BN * LD, v + static_cast<int64_t>(j) * BN * p.v_layout.row_stride,
                                        p.v_layout.row_stride, valid, tid);
  };

  load_tile_async<BM, D, LD, THREADS>(s_q, q, p.q_layout.row_stride, rows_valid, tid);
  load_tile_async<BM, D, LD, THREADS>(s_do, d_o, p.do_layout.row_stride, rows_valid, tid);
  if (n_tiles > 0) load_kv(0);
  cp_async_commit();  // Q, dO and the first K/V tile: one group

  float acc_dq[MT][NT_D][4];
  zero_acc(acc_dq);

  for (int j = 0; j < n_tiles; ++j) {
    cp_async_wait<0>();
    block_sync();
    if (j + 1 < n_tiles) load_kv(j + 1);  // refill: after the barrier that ends every warp's reads of it
    cp_async_commit();
    const T* s_kj = s_k + (j % STAGES) * BN * LD;
    const T* s_vj = s_v + (j % STAGES) * BN * LD;

    float s[MT][NT_S][4];
    zero_acc(s);
    gemm_nt_ss<T, D, MT, NT_S, LD, LD>(s, q_strip, s_kj, lane);
    float dp[MT][NT_S][4];
    zero_acc(dp);
    gemm_nt_ss<T, D, MT, NT_S, LD, LD>(dp, do_strip, s_vj, lane);

    uint32_t ds_frag[MT][BN / 16][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      recompute_p_rows(s[mt], row_lse[mt], p.scale_log2, lane, seg.seqlen_k - j * BN);
      ds_rows(s[mt], dp[mt], row_delta[mt]);
      pack_a_frags<T, NT_S>(ds_frag[mt], dp[mt]);
    }
    gemm_nn_rs<T, BN, MT, NT_D, LD>(acc_dq, ds_frag, s_kj, lane);
  }

  // Epilogue: each warp stages its own rows of dQ in its own rows of s_q (wait + barrier: as
  // in the forward).
  cp_async_wait<0>();
  block_sync();
  float mul[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) mul[mt][0] = mul[mt][1] = p.softmax_scale;
  acc_to_smem<T, MT, NT_D, LD>(s_q + warp * Cfg::WARP_ROWS * LD, acc_dq, mul, lane);
  block_sync();
  store_tile<BM, D, LD, THREADS>(dq, p.dq_layout.row_stride, s_q, rows_valid, tid);
}

// ---- backward: dK, dV -------------------------------------------------------------------------

// The 5-product backward's dQ: this key block's contribution dS K to the query tile starting
// at row q0, (BM x 128 keys) x (128 keys x D), with dS read transposed from the dS^T tile and K
// from shared memory, added to the fp32 buffer p.dq_accum (scaled and rounded by the convert
// kernel once every key block has added its part).
template <typename T, int D>
TVF_DEVICE void add_dq_contribution(const AttentionParams& p, const Segment& seg, int b, int h, int q0,
                                    const T* s_dst, const T* s_k, int warp, int lane) {
  using Cfg = DkdvConfig<D>;
  constexpr int NT = D / Cfg::WARPS_DQ_COLS / 8;
  const int qm = warp / Cfg::WARPS_DQ_COLS, qd = warp % Cfg::WARPS_DQ_COLS;
  float acc[1][NT][4];
  zero_acc(acc);
  gemm_nn_ss<T, Cfg::BN, 1, NT, Cfg::LDP, Cfg::LD, true>(acc, s_dst + qm * 16, s_k + qd * NT * 8, lane);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = q0 + qm * 16 + frag_row(lane, 2 * r);
    if (row < seg.seqlen_q) {
      float* dst = p.dq_accum + row_offset(p.dq_accum_layout, b, h, seg.q_start + row) + qd * NT * 8;
#pragma unroll
      for (int i = 0; i < NT; ++i) {
        atomic_add_f32(dst + frag_col(lane, i, 0), acc[0][i][2 * r]);
        atomic_add_f32(dst + frag_col(lane, i, 1), acc[0][i][2 * r + 1]);
      }
    }
  }
}


// ATOMIC_DQ: the 5-product backward, which also adds each query tile's dQ contribution dS K to
// p.dq_accum (fp32, atomics) instead of leaving dQ to the dQ kernel.
template <typename T, int D, bool ATOMIC_DQ>
TVF_DEVICE void attention_bwd_dkdv_body(const AttentionParams& p, char* smem_raw) {
  using Cfg = DkdvConfig<D>;
  constexpr int BN = Cfg::BN, BM = Cfg::BM, STAGES = Cfg::STAGES, LD = Cfg::LD, LDP = Cfg::LDP;
  constexpr int THREADS = Cfg::THREADS;
  // S^T / dP^T layout: warp (key group ks, query half qh) computes 16 MT_S keys x 8 NT_S queries.
  constexpr int MT_S = BN / Cfg::WARPS_KEYS_S / 16, NT_S = BM / Cfg::WARPS_Q / 8;
  // dK / dV layout: warp (key group kd, column group dg) accumulates 16 MT_D keys x 8 NT_D columns.
  constexpr int MT_D = BN / Cfg::WARPS_KEYS_D / 16, NT_D = D / Cfg::WARPS_D / 8;

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
  T* s_pt = s_do + STAGES * BM * LD;  // P^T (keys x queries)
  T* s_dst = s_pt + BN * LDP;         // dS^T
  float* s_lse = reinterpret_cast<float*>(smem_raw + Cfg::smem_float_offset_bytes);
  float* s_delta = s_lse + STAGES * BM;

  const int ks = warp / Cfg::WARPS_Q, qh = warp % Cfg::WARPS_Q;
  const int kd = warp / Cfg::WARPS_D, dg = warp % Cfg::WARPS_D;
  const int s_row0 = ks * MT_S * 16, s_col0 = qh * NT_S * 8;  // this warp's part of S^T
  const int d_row0 = kd * MT_D * 16, d_col0 = dg * NT_D * 8;  // this warp's part of dK, dV

  const int m_tiles = (seg.seqlen_q + BM - 1) / BM;
  auto load_q = [&](int i) {
    const int stage = i % STAGES;
    const int valid = seg.seqlen_q - i * BM;
    const int64_t r0 = static_cast<int64_t>(i) * BM;
    load_tile_async<BM, D, LD, THREADS>(s_q + stage * BM * LD, q + r0 * p.q_layout.row_stride,
                                        p.q_layout.row_stride, valid, tid);
    load_tile_async<BM, D, LD, THREADS>(s_do + stage * BM * LD, d_o + r0 * p.do_layout.row_stride,
                                        p.do_layout.row_stride, valid, tid);
    load_rows_async<BM, THREADS>(s_lse + stage * BM, lse + r0, valid, tid);
    load_rows_async<BM, THREADS>(s_delta + stage * BM, delta + r0, valid, tid);
  };

  load_tile_async<BN, D, LD, THREADS>(s_k, k, p.k_layout.row_stride, keys_valid, tid);
  load_tile_async<BN, D, LD, THREADS>(s_v, v, p.v_layout.row_stride, keys_valid, tid);
  if (m_tiles > 0) load_q(0);
  cp_async_commit();  // K, V and the first query tile: one group

  float acc_dk[MT_D][NT_D][4], acc_dv[MT_D][NT_D][4];
  zero_acc(acc_dk);
  zero_acc(acc_dv);
  float ones[MT_S][2];
#pragma unroll
  for (int mt = 0; mt < MT_S; ++mt) ones[mt][0] = ones[mt][1] = 1.f;

  for (int i = 0; i < m_tiles; ++i) {
    cp_async_wait<0>();
    block_sync();
    if (i + 1 < m_tiles) load_q(i + 1);  // refill: after the barrier that ends every warp's reads of it
    cp_async_commit();
    const int stage = i % STAGES;
    const T* s_qi = s_q + stage * BM * LD;
    const T* s_doi = s_do + stage * BM * LD;

    // S^T = K Q^T -> P^T; dP^T = V dO^T -> dS^T = P^T (dP^T - delta); both to shared memory.
    {
      float s[MT_S][NT_S][4], dp[MT_S][NT_S][4];
      zero_acc(s);
      gemm_nt_ss<T, D, MT_S, NT_S, LD, LD>(s, s_k + s_row0 * LD, s_qi + s_col0 * LD, lane);
      zero_acc(dp);
      gemm_nt_ss<T, D, MT_S, NT_S, LD, LD>(dp, s_v + s_row0 * LD, s_doi + s_col0 * LD, lane);
      const int valid_cols = seg.seqlen_q - i * BM - s_col0;
#pragma unroll
      for (int mt = 0; mt < MT_S; ++mt) {
        recompute_p_cols(s[mt], s_lse + stage * BM + s_col0, p.scale_log2, lane, valid_cols);
        ds_cols(s[mt], dp[mt], s_delta + stage * BM + s_col0, lane);
      }
      acc_to_smem<T, MT_S, NT_S, LDP>(s_pt + s_row0 * LDP + s_col0, s, ones, lane);
      acc_to_smem<T, MT_S, NT_S, LDP>(s_dst + s_row0 * LDP + s_col0, dp, ones, lane);
    }
    block_sync();
    // dV += P^T dO, dK += dS^T Q over the tile's BM queries.
    gemm_nn_ss<T, BM, MT_D, NT_D, LDP, LD>(acc_dv, s_pt + d_row0 * LDP, s_doi + d_col0, lane);
    gemm_nn_ss<T, BM, MT_D, NT_D, LDP, LD>(acc_dk, s_dst + d_row0 * LDP, s_qi + d_col0, lane);
    if (ATOMIC_DQ) add_dq_contribution<T, D>(p, seg, b, h, i * BM, s_dst, s_k, warp, lane);
  }

  // Epilogue: dK and dV staged through s_k and s_v. The wait + barrier matter where the loop
  // never ran (empty query segment): K and V copies of other threads may still be landing.
  cp_async_wait<0>();
  block_sync();
  float mul_k[MT_D][2], mul_v[MT_D][2];
#pragma unroll
  for (int mt = 0; mt < MT_D; ++mt) {
    mul_k[mt][0] = mul_k[mt][1] = p.softmax_scale;
    mul_v[mt][0] = mul_v[mt][1] = 1.f;
  }
  acc_to_smem<T, MT_D, NT_D, LD>(s_k + d_row0 * LD + d_col0, acc_dk, mul_k, lane);
  acc_to_smem<T, MT_D, NT_D, LD>(s_v + d_row0 * LD + d_col0, acc_dv, mul_v, lane);
  block_sync();
  store_tile<BN, D, LD, THREADS>(dk, p.dk_layout.row_stride, s_k, keys_valid, tid);
  store_tile<BN, D, LD, THREADS>(dv, p.dv_layout.row_stride, s_v, keys_valid, tid);
}

// ---- backward (5-product): dQ = softmax_scale * dq_accum, rounded to T --------------------------

template <typename T, int D>
TVF_DEVICE void attention_bwd_dq_convert_body(const AttentionParams& p) {
  const int tid = thread_index();
  const int h = block_index_y(), b = block_index_z();
  const Segment seg = segment_of(p, b);
  const int row = block_index_x() * kPreprocessRows + tid;
  if (row >= seg.seqlen_q) return;
  const float* src = p.dq_accum + row_offset(p.dq_accum_layout, b, h, seg.q_start + row);
  T* dst = static_cast<T*>(p.dq) + row_offset(p.dq_layout, b, h, seg.q_start + row);
#pragma unroll
  for (int c = 0; c < D; c += 8) {
    const Chunk16 lo = *reinterpret_cast<const Chunk16*>(src + c);
    const Chunk16 hi = *reinterpret_cast<const Chunk16*>(src + c + 4);
    float f[8];
    memcpy(f, &lo, 16);
    memcpy(f + 4, &hi, 16);
    Chunk16 out;
    out.x = pack2<T>(f[0] * p.softmax_scale, f[1] * p.softmax_scale);
    out.y = pack2<T>(f[2] * p.softmax_scale, f[3] * p.softmax_scale);
    out.z = pack2<T>(f[4] * p.softmax_scale, f[5] * p.softmax_scale);
    out.w = pack2<T>(f[6] * p.softmax_scale, f[7] * p.softmax_scale);
    *reinterpret_cast<Chunk16*>(dst + c) = out;
  }
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
__global__ void __launch_bounds__(FwdConfig<D>::THREADS) attention_fwd_kernel(const AttentionParams p) {
  extern __shared__ __align__(16) char smem[];
  attention_fwd_body<T, D>(p, smem);
}

template <typename T, int D>
__global__ void __launch_bounds__(kPreprocessRows) attention_bwd_preprocess_kernel(const AttentionParams p) {
  attention_bwd_preprocess_body<T, D>(p);
}

template <typename T, int D>
__global__ void __launch_bounds__(DqConfig<D>::THREADS) attention_bwd_dq_kernel(const AttentionParams p) {
  extern __shared__ __align__(16) char smem[];
  attention_bwd_dq_body<T, D>(p, smem);
}

template <typename T, int D>
__global__ void __launch_bounds__(DkdvConfig<D>::THREADS) attention_bwd_dkdv_kernel(const AttentionParams p) {
  extern __shared__ __align__(16) char smem[];
  attention_bwd_dkdv_body<T, D, false>(p, smem);
}

template <typename T, int D>
__global__ void __launch_bounds__(DkdvConfig<D>::THREADS) attention_bwd_dkdv_dqatomic_kernel(const AttentionParams p) {
  extern __shared__ __align__(16) char smem[];
  attention_bwd_dkdv_body<T, D, true>(p, smem);
}

template <typename T, int D>
__global__ void __launch_bounds__(kPreprocessRows) attention_bwd_dq_convert_kernel(const AttentionParams p) {
  attention_bwd_dq_convert_body<T, D>(p);
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
  return launch_checked(attention_fwd_kernel<T, D>, grid_over_q(p, Cfg::BM), Cfg::THREADS,
                        Cfg::smem_bytes, stream, p);
}

template <typename T, int D>
cudaError_t run_attention_bwd(const AttentionParams& p, cudaStream_t stream) {
  cudaError_t err = launch_checked(attention_bwd_preprocess_kernel<T, D>, grid_over_q(p, kPreprocessRows),
                                   kPreprocessRows, 0, stream, p);
  if (err != cudaSuccess) return err;
  if (p.dq_accum != nullptr) {  // 5 products: dQ through fp32 atomics (p.dq_accum zeroed by the caller)
    err = launch_checked(attention_bwd_dkdv_dqatomic_kernel<T, D>, grid_over_k(p, DkdvConfig<D>::BN),
                         DkdvConfig<D>::THREADS, DkdvConfig<D>::smem_bytes, stream, p);
    if (err != cudaSuccess) return err;
    return launch_checked(attention_bwd_dq_convert_kernel<T, D>, grid_over_q(p, kPreprocessRows), kPreprocessRows,
                          0, stream, p);
  }
  err = launch_checked(attention_bwd_dq_kernel<T, D>, grid_over_q(p, DqConfig<D>::BM), DqConfig<D>::THREADS,
                       DqConfig<D>::smem_bytes, stream, p);
  if (err != cudaSuccess) return err;
  return launch_checked(attention_bwd_dkdv_kernel<T, D>, grid_over_k(p, DkdvConfig<D>::BN), DkdvConfig<D>::THREADS,
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
