// Host harness for csrc/attention_tile.h: the tile arithmetic of the attention kernels, run on
// the CPU exactly as one warp runs it on the GPU (32 lanes' fragments, quad reductions done
// here in place of the shuffles). Built as a shared library by tests/test_attention_cuda.py
// (g++ only, no CUDA needed) and called through ctypes; results are checked there against a
// float64 reference.
#include <math.h>
#include <string.h>

#include "../attention_tile.h"

namespace {

constexpr int kLanes = 32;
constexpr int kRows = 16;  // a warp's strip
constexpr int BN = 64;     // keys per tile in these tests
constexpr int NT = BN / 8;
constexpr int DV = 64;     // value width
constexpr int ND = DV / 8;

float quad_max4(float a, float b, float c, float d) { return tvf::max_f(tvf::max_f(a, b), tvf::max_f(c, d)); }

}  // namespace

extern "C" {

// Fragment geometry: rows[lane * 4 + e], cols[lane * 4 + e] of n-tile `ntile`.
void tvf_tile_fragment_map(int ntile, int* rows, int* cols) {
  for (int lane = 0; lane < kLanes; ++lane) {
    for (int e = 0; e < 4; ++e) {
      rows[lane * 4 + e] = tvf::frag_row(lane, e);
      cols[lane * 4 + e] = tvf::frag_col(lane, ntile, e);
    }
  }
}

// Forward over a 16-row strip: s (16 x n_keys scores, row-major, unscaled), v (n_keys x 64).
// Streams BN-key tiles through the online softmax exactly as attention_fwd_body does, with
// P V accumulated in float from the same fragments. Columns past n_keys in the last tile are
// filled with NaN before masking (the kernel's tail holds whatever the zero-filled K gives;
// NaN makes a missing mask visible). Writes out (16 x 64) and lse (16), natural log.
void tvf_tile_forward(const float* s, const float* v, int n_keys, float softmax_scale, float* out, float* lse) {
  static float acc[kLanes][ND][4];
  static float m[kLanes][2], l[kLanes][2];
  memset(acc, 0, sizeof(acc));
  for (int lane = 0; lane < kLanes; ++lane) {
    m[lane][0] = m[lane][1] = tvf::neg_inf();
    l[lane][0] = l[lane][1] = 0.f;
  }
  const float scale_log2 = softmax_scale * tvf::kLog2e;
  const int n_tiles = (n_keys + BN - 1) / BN;
  for (int j = 0; j < n_tiles; ++j) {
    static float frag[kLanes][NT][4];
    for (int lane = 0; lane < kLanes; ++lane) {
      for (int i = 0; i < NT; ++i) {
        for (int e = 0; e < 4; ++e) {
          const int row = tvf::frag_row(lane, e), col = j * BN + tvf::frag_col(lane, i, e);
          frag[lane][i][e] = col < n_keys ? s[row * n_keys + col] : NAN;
        }
      }
      tvf::scale_and_mask_cols(frag[lane], scale_log2, lane, n_keys - j * BN);
    }
    // Row max: lane-local partial, then over the quad (lanes 4g .. 4g+3).
    float part[kLanes][2];
    for (int lane = 0; lane < kLanes; ++lane) tvf::row_max_partial(frag[lane], part[lane]);
    for (int lane = 0; lane < kLanes; ++lane) {
      const int q0 = lane & ~3;
      float tile_max[2], alpha[2], m_use[2];
      for (int r = 0; r < 2; ++r) {
        tile_max[r] = quad_max4(part[q0][r], part[q0 + 1][r], part[q0 + 2][r], part[q0 + 3][r]);
      }
      tvf::online_softmax_step(m[lane], tile_max, alpha, m_use);
      tvf::exp2_rows_and_sum(frag[lane], m_use, alpha, l[lane]);
      tvf::rescale_rows(acc[lane], alpha);
    }
    // O += P V: the lane holding O(row, dcol) needs P(row, :) from its quad's fragments.
    static float p_full[kRows][BN];
    for (int lane = 0; lane < kLanes; ++lane)
      for (int i = 0; i < NT; ++i)
        for (int e = 0; e < 4; ++e) p_full[tvf::frag_row(lane, e)][tvf::frag_col(lane, i, e)] = frag[lane][i][e];
    for (int lane = 0; lane < kLanes; ++lane) {
      for (int i = 0; i < ND; ++i) {
        for (int e = 0; e < 4; ++e) {
          const int row = tvf::frag_row(lane, e), dcol = tvf::frag_col(lane, i, e);
          float sum = 0.f;
          for (int c = 0; c < BN && j * BN + c < n_keys; ++c) sum += p_full[row][c] * v[(j * BN + c) * DV + dcol];
          acc[lane][i][e] += sum;
        }
      }
    }
  }
  for (int lane = 0; lane < kLanes; ++lane) {
    const int q0 = lane & ~3;
    float l_total[2], inv_l[2], row_lse[2];
    for (int r = 0; r < 2; ++r) l_total[r] = l[q0][r] + l[q0 + 1][r] + l[q0 + 2][r] + l[q0 + 3][r];
    tvf::finalize_rows(m[lane], l_total, inv_l, row_lse);
    for (int i = 0; i < ND; ++i)
      for (int e = 0; e < 4; ++e)
        out[tvf::frag_row(lane, e) * DV + tvf::frag_col(lane, i, e)] = acc[lane][i][e] * inv_l[e >> 1];
    if ((lane & 3) == 0) {
      lse[tvf::frag_row(lane, 0)] = row_lse[0];
      lse[tvf::frag_row(lane, 2)] = row_lse[1];
    }
  }
}

// Backward, rows = queries (the dQ kernel): one 16 x 64 tile. s, dp: 16 x 64 row-major;
// lse, delta: 16. Columns >= valid_cols are keys past the segment. Writes p and ds (16 x 64).
void tvf_tile_backward_rows(const float* s, const float* dp, const float* lse, const float* delta,
                            float softmax_scale, int valid_cols, float* p_out, float* ds_out) {
  const float scale_log2 = softmax_scale * tvf::kLog2e;
  for (int lane = 0; lane < kLanes; ++lane) {
    float sf[NT][4], dpf[NT][4];
    for (int i = 0; i < NT; ++i)
      for (int e = 0; e < 4; ++e) {
        const int idx = tvf::frag_row(lane, e) * BN + tvf::frag_col(lane, i, e);
        sf[i][e] = s[idx];
        dpf[i][e] = dp[idx];
      }
    const float row_lse[2] = {lse[tvf::frag_row(lane, 0)], lse[tvf::frag_row(lane, 2)]};
    const float row_delta[2] = {delta[tvf::frag_row(lane, 0)], delta[tvf::frag_row(lane, 2)]};
    tvf::recompute_p_rows(sf, row_lse, scale_log2, lane, valid_cols);
    tvf::ds_rows(sf, dpf, row_delta);
    for (int i = 0; i < NT; ++i)
      for (int e = 0; e < 4; ++e) {
        const int idx = tvf::frag_row(lane, e) * BN + tvf::frag_col(lane, i, e);
        p_out[idx] = sf[i][e];
        ds_out[idx] = dpf[i][e];
      }
  }
}

// Backward, transposed (the dK/dV kernel): rows = keys, columns = queries; lse and delta are
// per column (64). Columns >= valid_cols are queries past the segment.
void tvf_tile_backward_cols(const float* s, const float* dp, const float* lse, const float* delta,
                            float softmax_scale, int valid_cols, float* p_out, float* ds_out) {
  const float scale_log2 = softmax_scale * tvf::kLog2e;
  for (int lane = 0; lane < kLanes; ++lane) {
    float sf[NT][4], dpf[NT][4];
    for (int i = 0; i < NT; ++i)
      for (int e = 0; e < 4; ++e) {
        const int idx = tvf::frag_row(lane, e) * BN + tvf::frag_col(lane, i, e);
        sf[i][e] = s[idx];
        dpf[i][e] = dp[idx];
      }
    tvf::recompute_p_cols(sf, lse, scale_log2, lane, valid_cols);
    tvf::ds_cols(sf, dpf, delta, lane);
    for (int i = 0; i < NT; ++i)
      for (int e = 0; e < 4; ++e) {
        const int idx = tvf::frag_row(lane, e) * BN + tvf::frag_col(lane, i, e);
        p_out[idx] = sf[i][e];
        ds_out[idx] = dpf[i][e];
      }
  }
}

}  // extern "C"
