// Tile-level arithmetic of the FlashAttention-2 kernels: the online-softmax update, the
// rescaling of the output accumulator, tail masking, the log-sum-exp finalisation and the
// backward recomputation of P and dS.
//
// Everything here is __host__ __device__ and free of CUDA types, so the same code runs on
// the CPU in tests/test_attention_cuda.py (csrc/testing/tile_harness.cpp compiles this
// header with g++ and checks it against a float64 reference).
//
// Fragment layout. A warp computes a 16-row strip of a score tile with mma.m16n8k16; the
// fp32 accumulator of one 16x8 "n-tile" is four floats per lane (PTX ISA, "Matrix Fragments
// for mma.m16n8k16"): with g = lane / 4 and t = lane % 4, element e of n-tile i sits at
//     row = g + 8 * (e / 2),  col = 8 * i + 2 * t + (e % 2).
// So each lane holds two rows (g and g + 8; "row slot" r = 0, 1) and the four lanes of a quad
// (same g) together hold a whole row. Row reductions are therefore: a lane-local partial over
// the lane's elements (functions here), then a reduction over the quad (two xor-shuffles on
// the GPU; done by the caller).
//
// Units: scores are kept in log2 units after scaling, x = s * softmax_scale * log2(e), so every
// exponential is one exp2 (ex2.approx on the GPU). The running max m is in those units; the
// saved lse is in natural-log units: lse = (m + log2(l)) * ln(2).
#pragma once

#if defined(__CUDACC__)
#define TVF_HD __host__ __device__ __forceinline__
#else
#define TVF_HD inline
#endif

#include <math.h>

namespace tvf {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

TVF_HD float neg_inf() { return -INFINITY; }

TVF_HD float exp2_fast(float x) {
#if defined(__CUDA_ARCH__)
  return exp2f(x);  // ex2.approx.ftz.f32 under --use_fast_math; exp2(-inf) = 0
#else
  return exp2f(x);
#endif
}

TVF_HD float log2_fast(float x) { return log2f(x); }

TVF_HD float max_f(float a, float b) { return a > b ? a : b; }

// ---- fragment geometry ------------------------------------------------------------------------

// Row (0..15) of element e (0..3) of a lane's m16n8 accumulator fragment.
TVF_HD int frag_row(int lane, int e) { return (lane >> 2) + ((e >> 1) << 3); }
// Column of element e of n-tile i (8 columns per n-tile).
TVF_HD int frag_col(int lane, int i, int e) { return i * 8 + ((lane & 3) << 1) + (e & 1); }

// ---- forward: online softmax ------------------------------------------------------------------

// x = s * scale_log2 for every element; columns at or beyond `valid_cols` (the tail of the last
// key tile, counted from the tile's first column) become -inf so they get zero probability.
template <int NT>
TVF_HD void scale_and_mask_cols(float (&s)[NT][4], float scale_log2, int lane, int valid_cols) {
  const bool full = valid_cols >= NT * 8;  // every tile but a ragged last one: no compares
#pragma unroll
  for (int i = 0; i < NT; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[i][e] = full || frag_col(lane, i, e) < valid_cols ? s[i][e] * scale_log2 : neg_inf();
    }
  }
}

// Lane-local max of each of the lane's two rows (slot r = e / 2).
template <int NT>
TVF_HD void row_max_partial(const float (&x)[NT][4], float (&mx)[2]) {
  mx[0] = neg_inf();
  mx[1] = neg_inf();
#pragma unroll
  for (int i = 0; i < NT; ++i) {
    mx[0] = max_f(mx[0], max_f(x[i][0], x[i][1]));
    mx[1] = max_f(mx[1], max_f(x[i][2], x[i][3]));
  }
}

// One step of the online softmax, per row slot. In: m = running max before this tile (-inf
// before the first), tile_max = the tile's row max (already reduced over the quad). Out: m =
// new running max; alpha = exp2(m_old - m_new), the factor that rescales the running sum and
// the output accumulator; m_use = the value subtracted before exponentiating (m_new, or 0 for a
// row whose every score so far is -inf: this avoids (-inf) - (-inf) = NaN).
TVF_HD void online_softmax_step(float (&m)[2], const float (&tile_max)[2], float (&alpha)[2],
                                float (&m_use)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float m_new = max_f(m[r], tile_max[r]);
    m_use[r] = m_new == neg_inf() ? 0.f : m_new;
    alpha[r] = exp2_fast(m[r] - m_use[r]);  // m[r] = -inf gives 0: nothing to rescale yet
    m[r] = m_new;
  }
}

// p = exp2(x - m_use[row]) in place, and l = l * alpha + (lane-local row sum of p). The running
// sum l stays a lane-local partial for the whole loop; it is reduced over the quad once, at the
// end (a sum of rescaled partials is the rescaled sum).
template <int NT>
TVF_HD void exp2_rows_and_sum(float (&x)[NT][4], const float (&m_use)[2], const float (&alpha)[2],
                              float (&l)[2]) {
  float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
  for (int i = 0; i < NT; ++i) {
    x[i][0] = exp2_fast(x[i][0] - m_use[0]);
    x[i][1] = exp2_fast(x[i][1] - m_use[0]);
    x[i][2] = exp2_fast(x[i][2] - m_use[1]);
    x[i][3] = exp2_fast(x[i][3] - m_use[1]);
    sum0 += x[i][0] + x[i][1];
    sum1 += x[i][2] + x[i][3];
  }
  l[0] = l[0] * alpha[0] + sum0;
  l[1] = l[1] * alpha[1] + sum1;
}

// Rescale an output accumulator (16 rows x 8*ND columns per warp) by alpha per row slot.
template <int ND>
TVF_HD void rescale_rows(float (&acc)[ND][4], const float (&alpha)[2]) {
#pragma unroll
  for (int i = 0; i < ND; ++i) {
    acc[i][0] *= alpha[0];
    acc[i][1] *= alpha[0];
    acc[i][2] *= alpha[1];
    acc[i][3] *= alpha[1];
  }
}

// Final normalisation: l_total = the quad-reduced row sum. inv_l multiplies the accumulator;
// lse is the natural-log log-sum-exp of the scaled scores. A row that saw no key (empty key
// segment) gets output 0 and lse = -inf (FlashAttention's convention).
TVF_HD void finalize_rows(const float (&m)[2], const float (&l_total)[2], float (&inv_l)[2],
                          float (&lse)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const bool empty = !(l_total[r] > 0.f);
    inv_l[r] = empty ? 0.f : 1.f / l_total[r];
    lse[r] = empty ? neg_inf() : (m[r] + log2_fast(l_total[r])) * kLn2;
  }
}

// ---- backward: recompute P and form dS --------------------------------------------------------

// P = exp2(s * scale_log2 - lse[row] * log2(e)), rows in the fragment's row slots (the dQ
// kernel: queries are rows). Columns at or beyond valid_cols (keys past the segment) get 0.
template <int NT>
TVF_HD void recompute_p_rows(float (&s)[NT][4], const float (&lse)[2], float scale_log2, int lane,
                             int valid_cols) {
  const float b0 = lse[0] * kLog2e, b1 = lse[1] * kLog2e;
#pragma unroll
  for (int i = 0; i < NT; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float p = exp2_fast(s[i][e] * scale_log2 - (e < 2 ? b0 : b1));
      s[i][e] = frag_col(lane, i, e) < valid_cols ? p : 0.f;
    }
  }
}

// The transposed tile of the dK/dV kernel: rows are keys, columns are queries, so lse is
// indexed by column (lse_cols[c] for column c of the tile). Queries at or beyond valid_cols
// (past the query segment) get P = 0.
template <int NT>
TVF_HD void recompute_p_cols(float (&s)[NT][4], const float* lse_cols, float scale_log2, int lane,
                             int valid_cols) {
#pragma unroll
  for (int i = 0; i < NT; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int c = frag_col(lane, i, e);
      const float p = exp2_fast(s[i][e] * scale_log2 - lse_cols[c] * kLog2e);
      s[i][e] = c < valid_cols ? p : 0.f;
    }
  }
}

// dS = P * (dP - delta[row]) in place in dp (delta = rowsum(dO * O) of the query row).
template <int NT>
TVF_HD void ds_rows(const float (&p)[NT][4], float (&dp)[NT][4], const float (&delta)[2]) {
#pragma unroll
  for (int i = 0; i < NT; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dp[i][e] = p[i][e] * (dp[i][e] - delta[e >> 1]);
  }
}

// Transposed: dS^T = P^T * (dP^T - delta[col]).
template <int NT>
TVF_HD void ds_cols(const float (&p)[NT][4], float (&dp)[NT][4], const float* delta_cols, int lane) {
#pragma unroll
  for (int i = 0; i < NT; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dp[i][e] = p[i][e] * (dp[i][e] - delta_cols[frag_col(lane, i, e)]);
  }
}

// Multiply an accumulator by a constant (softmax_scale for dQ and dK).
template <int ND>
TVF_HD void scale_acc(float (&acc)[ND][4], float c) {
#pragma unroll
  for (int i = 0; i < ND; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[i][e] *= c;
  }
}

}  // namespace tvf
