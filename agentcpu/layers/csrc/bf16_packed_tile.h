// What the bf16 linear kernels share: their entry (`linear_io`) and the tile of the packed
// layout, used by `bf16_packed_linear.cpp`, `bf16_dot_linear.cpp` (the entry only) and the
// quantized kernels' batched path (`quant/csrc/quant_kernels.cpp`, which dequantizes 64
// weight rows at a time into this layout). `hardware.native_build` puts this text before
// each of those sources (`prelude`), so a change here rebuilds them all.
//
// Packed layout: [N / 16][K / 2][16 rows][2 k] bf16, the operand layout of VDPBF16PS:
// one 64-byte line holds 2 k values of 16 weight rows, and a 16-row block is one
// contiguous run of K * 32 bytes.
#include <torch/extension.h>
#include <immintrin.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#define AGENTCPU_PACKED_BF16 1
#endif

namespace agentcpu_packed {

// The common entry of the bf16 linear kernels: x as contiguous [M, K] rows, the bf16
// output [M, N], and the bias in fp32 (null without one), checked against N.
struct LinearIO {
  at::Tensor x2, out, bias_f;
  const float* bias = nullptr;
  int64_t M = 0;
};

inline LinearIO linear_io(const at::Tensor& x, int64_t K, int64_t N, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "input must be bf16");
  TORCH_CHECK(x.size(-1) == K, "input has ", x.size(-1), " features, weight expects ", K);
  LinearIO io;
  io.x2 = x.reshape({-1, K}).contiguous();
  io.M = io.x2.size(0);
  io.out = at::empty({io.M, N}, io.x2.options());
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == N, "bias has ", bias->numel(), " values, weight has ", N, " rows");
    io.bias_f = bias->to(at::kFloat).contiguous();
    io.bias = io.bias_f.data_ptr<float>();
  }
  return io;
}

// The output in x's leading shape.
inline at::Tensor in_x_shape(const at::Tensor& out, const at::Tensor& x) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out.size(1);
  return out.reshape(shape);
}


constexpr int64_t kBlockRows = 16;   // rows per packed block (one zmm of outputs)
constexpr int kBlocksPerTile = 4;    // 64 rows per tile
constexpr int kTokensPerTile = 6;    // 24 accumulators
constexpr int64_t kPanelTokens = 128;

#ifdef AGENTCPU_PACKED_BF16


// out[t * N + b * 16 + (0..15)] for RB blocks from `w` (block b0's run) and T tokens.
template <int RB, int T>
inline void tile(const uint16_t* w, int64_t K2, const uint16_t* x, int64_t K, uint16_t* out, int64_t N,
                 const float* bias) {
  __m512 acc[T][RB];
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) acc[t][r] = _mm512_setzero_ps();
  const int64_t block_stride = K2 * 2 * kBlockRows;  // bf16 values per packed block
  for (int64_t kp = 0; kp < K2; ++kp) {
    __m512bh wv[RB];
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r)
      wv[r] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(w + r * block_stride + kp * 2 * kBlockRows));
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      int32_t pair;
      std::memcpy(&pair, x + t * K + 2 * kp, sizeof(pair));
      const __m512bh xv = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r) acc[t][r] = _mm512_dpbf16_ps(acc[t][r], wv[r], xv);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r) {
    const __m512 b = bias != nullptr ? _mm512_loadu_ps(bias + r * kBlockRows) : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + t * N + r * kBlockRows),
                          reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_add_ps(acc[t][r], b))));
  }
}

template <int RB>
inline void tile_tokens(int T, const uint16_t* w, int64_t K2, const uint16_t* x, int64_t K, uint16_t* out,
                        int64_t N, const float* bias) {
  switch (T) {
    case 6: tile<RB, 6>(w, K2, x, K, out, N, bias); break;
    case 5: tile<RB, 5>(w, K2, x, K, out, N, bias); break;
    case 4: tile<RB, 4>(w, K2, x, K, out, N, bias); break;
    case 3: tile<RB, 3>(w, K2, x, K, out, N, bias); break;
    case 2: tile<RB, 2>(w, K2, x, K, out, N, bias); break;
    default: tile<RB, 1>(w, K2, x, K, out, N, bias);
  }
}

// Blocks [b0, b1) against all M tokens: panels of 128 tokens, each split into near-equal
// groups of at most 6 (8 = 4 + 4: a small group pays the same weight loads for less).
void blocks_range(const uint16_t* packed, int64_t K, const uint16_t* x, int64_t M, uint16_t* out,
                  int64_t N, const float* bias, int64_t b0, int64_t b1) {
  const int64_t K2 = K / 2, block_stride = K2 * 2 * kBlockRows;
  for (int64_t p0 = 0; p0 < M; p0 += kPanelTokens) {
    const int64_t panel = std::min(kPanelTokens, M - p0);
    const int64_t groups = (panel + kTokensPerTile - 1) / kTokensPerTile;
    const int64_t group = (panel + groups - 1) / groups;
    for (int64_t b = b0; b < b1;) {
      const int rb = b + kBlocksPerTile <= b1 ? kBlocksPerTile : 1;
      const uint16_t* w = packed + b * block_stride;
      const float* bb = bias != nullptr ? bias + b * kBlockRows : nullptr;
      for (int64_t t0 = p0; t0 < p0 + panel; t0 += group) {
        const int tokens = static_cast<int>(std::min(group, p0 + panel - t0));
        uint16_t* o = out + t0 * N + b * kBlockRows;
        if (rb == kBlocksPerTile) tile_tokens<kBlocksPerTile>(tokens, w, K2, x + t0 * K, K, o, N, bb);
        else tile_tokens<1>(tokens, w, K2, x + t0 * K, K, o, N, bb);
      }
      b += rb;
    }
  }
}



#endif  // AGENTCPU_PACKED_BF16

}  // namespace agentcpu_packed
