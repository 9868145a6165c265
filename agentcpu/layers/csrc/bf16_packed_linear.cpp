// bf16 linear over a weight packed once at load (CPUs with AVX-512 BF16), for every
// batch size: one-row decode, batched decode and prefill chunks alike.
//
// y[t, n] = sum_k x[t, k] * w[n, k] + bias[n]; x bf16 [M, K], y bf16 [M, N].
//
// Packed layout (`layers/packed_linear.py` writes it): [N / 16][K / 2][16 rows][2 k] bf16,
// the operand layout of VDPBF16PS: one 64-byte line holds 2 k values of 16 weight rows,
// and a 16-row block is one contiguous run of K * 32 bytes. Each multiply takes that line
// and a broadcast pair of activations (x[t, k], x[t, k + 1]) and adds into 16 fp32 lanes,
// one per output row, so a tile ends as whole output vectors: no horizontal sums (the
// in-place kernel, `bf16_dot_linear.cpp`, reduces every accumulator at the end).
//
// Tile: 4 row blocks (64 rows) x up to 6 tokens = 24 zmm accumulators; per k pair 4
// weight lines and 6 broadcasts feed 24 VDPBF16PS. The 4 blocks stay in L1/L2 while every
// token group passes over them. Tokens are taken in panels of 128, so a panel's
// activations stay in L2 while the weights stream past once per panel: prefill chunks
// (512 rows) run at the GEMM's peak without oneDNN (docs/kernels.md has the figures).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX512BF16__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#define AGENTCPU_PACKED_BF16 1
#endif

namespace {

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

}  // namespace

// Whether this build has the packed path (compiled for a CPU with AVX-512 BF16).
bool bf16_packed_available() {
#ifdef AGENTCPU_PACKED_BF16
  return true;
#else
  return false;
#endif
}

// x: [..., K] bf16; packed: bf16 [N / 16, K / 2, 16, 2]; bias: [N] or None.
// Returns [..., N] bf16 (fp32 accumulation, bias added in fp32, one rounding).
at::Tensor bf16_packed_linear(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(bf16_packed_available(), "this build has no AVX-512 BF16 path");
  TORCH_CHECK(packed.scalar_type() == at::kBFloat16 && packed.dim() == 4 && packed.size(2) == kBlockRows &&
                  packed.size(3) == 2 && packed.is_contiguous(),
              "packed weight must be a contiguous bf16 [N/16, K/2, 16, 2] tensor");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "input must be bf16");
  const int64_t N = packed.size(0) * kBlockRows, K = packed.size(1) * 2;
  TORCH_CHECK(x.size(-1) == K, "input has ", x.size(-1), " features, weight expects ", K);
  const at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  at::Tensor out = at::empty({M, N}, x2.options());
#ifdef AGENTCPU_PACKED_BF16
  at::Tensor bias_f;
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == N, "bias has ", bias->numel(), " values, weight has ", N, " rows");
    bias_f = bias->to(at::kFloat).contiguous();
    bp = bias_f.data_ptr<float>();
  }
  const auto* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
  const auto* xp = reinterpret_cast<const uint16_t*>(x2.data_ptr<at::BFloat16>());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const int64_t blocks = N / kBlockRows;
  const int64_t tasks = (blocks + kBlocksPerTile - 1) / kBlocksPerTile;
  // tiny products run on the calling thread: an OpenMP region costs ~10 us
  const int64_t task_macs = kBlocksPerTile * kBlockRows * K * std::max<int64_t>(M, 1);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / task_macs);
  if (M > 0) {
    at::parallel_for(0, tasks, grain, [&](int64_t i0, int64_t i1) {
      blocks_range(wp, K, xp, M, op, N, bp, i0 * kBlocksPerTile, std::min(blocks, i1 * kBlocksPerTile));
    });
  }
#endif
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return out.reshape(shape);
}
