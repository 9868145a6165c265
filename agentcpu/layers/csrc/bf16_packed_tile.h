// What the bf16 linear kernels share: their entry (`linear_io`) and the tile of the packed
// layout, used by `bf16_packed_linear.cpp`, `bf16_dot_linear.cpp` (the entry only) and the
// quantized kernels' batched path (`quant/csrc/quant_kernels.cpp`, which dequantizes 64
// weight rows at a time into this layout). `hardware.native_build` puts this text before
// each of those sources (`prelude`, after `avx2_math.h`), so a change here rebuilds them all.
//
// Packed layout: [N / 16][K / 2][16 rows][2 k] bf16, the operand layout of VDPBF16PS:
// one 64-byte line holds 2 k values of 16 weight rows, and a 16-row block is one
// contiguous run of K * 32 bytes.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
#include <atomic>
#include <cstdlib>

#if defined(__AVX512BF16__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#define AGENTCPU_PACKED_BF16 1  // the tile multiplies bf16 pairs with VDPBF16PS
#define AGENTCPU_PACKED 1
#elif defined(__AVX2__) && defined(__FMA__)
#define AGENTCPU_PACKED_AVX2 1  // the tile widens each line to fp32 and uses FMAs
#define AGENTCPU_PACKED 1
#if defined(__AVX512F__)
#define AGENTCPU_PACKED_AVX512 1  // ... on 16 lanes from kMinRows512 tokens
#endif
#endif

namespace agentcpu_packed {

// The common entry of the bf16 linear kernels: x as contiguous [M, K] rows, the bf16
// output [M, N], and the bias in fp32 (null without one), checked against N.
// An optional bias of N values as fp32: an fp32 one read in place, a bf16 one widened
// element by element (no dispatched op on the decode path), anything else converted.
struct FloatBias {
  at::Tensor converted;
  std::vector<float> widened;
  const float* data = nullptr;  // null: no bias
};

inline void read_bias(const c10::optional<at::Tensor>& bias, int64_t N, FloatBias& b) {
  if (!bias.has_value()) return;
  TORCH_CHECK(bias->numel() == N, "bias has ", bias->numel(), " values, weight has ", N, " rows");
  if (bias->is_contiguous() && bias->scalar_type() == at::kFloat) {
    b.data = bias->data_ptr<float>();
  } else if (bias->is_contiguous() && bias->scalar_type() == at::kBFloat16) {
    const at::BFloat16* p = bias->data_ptr<at::BFloat16>();
    b.widened.assign(p, p + N);
    b.data = b.widened.data();
  } else {
    b.converted = bias->to(at::kFloat).contiguous();
    b.data = b.converted.data_ptr<float>();
  }
}

struct LinearIO {
  at::Tensor x2, out;
  FloatBias bias_holder;
  const float* bias = nullptr;
  int64_t M = 0;
};

inline LinearIO linear_io(const at::Tensor& x, int64_t K, int64_t N, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "input must be bf16");
  TORCH_CHECK(x.size(-1) == K, "input has ", x.size(-1), " features, weight expects ", K);
  LinearIO io;
  io.x2 = agentcpu_rows::as_rows(x);
  io.M = io.x2.size(0);
  io.out = at::empty({io.M, N}, io.x2.options());
  read_bias(bias, N, io.bias_holder);
  io.bias = io.bias_holder.data;
  return io;
}

constexpr int64_t kPanelTokens = 128;

// Tokens per group when a panel of `panel` tokens is split into near-equal groups of at
// most `per_tile` (8 = 4 + 4: a small group pays the same weight loads for less).
inline int64_t group_tokens(int64_t panel, int64_t per_tile) {
  const int64_t groups = (panel + per_tile - 1) / per_tile;
  return (panel + groups - 1) / groups;
}

#ifdef AGENTCPU_PACKED_AVX512
// From this many tokens a product takes the AVX-512 tile (fewer: the AVX2 tile, whose
// prefetching keeps a decode step at the bandwidth; at 8 rows the 16-lane tile was
// 1.6-2.3x faster, at 4 no faster).
constexpr int64_t kMinRows512 = 8;
constexpr int64_t kTokensPerTile512 = 8;

// bf16 rows x [M][K] -> fp32 in the AVX-512 tile's order: each panel's token groups
// (`group_tokens`) in turn, a group of T tokens as [K / 2][T][2], so the tile finds every
// broadcast at a constant offset from one pointer. A group occupies the same T * K
// values as its rows did. Per 8 k pairs, each token's 16 values widen in one register and
// scatter as 8 pairs (8-byte lanes) T pairs apart.
inline void widen_interleaved(const uint16_t* x, int64_t M, int64_t K, float* dst) {
  const int64_t K2 = K / 2, panels = (M + kPanelTokens - 1) / kPanelTokens;
  // groups are numbered within each panel, which holds ceil(panel / 8) <= 16 of them
  constexpr int64_t per_panel = (kPanelTokens + kTokensPerTile512 - 1) / kTokensPerTile512;
  at::parallel_for(0, panels * per_panel, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t p0 = g / per_panel * kPanelTokens, panel = std::min(kPanelTokens, M - p0);
      const int64_t pg = group_tokens(panel, kTokensPerTile512), t0 = p0 + g % per_panel * pg;
      if (t0 >= p0 + panel) continue;
      const int64_t T = std::min(pg, p0 + panel - t0);
      double* out = reinterpret_cast<double*>(dst + t0 * K);  // pair kp of token t at out[kp * T + t]
      const __m512i index = _mm512_mullo_epi64(_mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7), _mm512_set1_epi64(T));
      for (int64_t t = 0; t < T; ++t) {
        const uint16_t* row = x + (t0 + t) * K;
        int64_t kp = 0;
        for (; kp + 8 <= K2; kp += 8) {
          const __m512 wide = agentcpu_avx512::widen_bf16(row + 2 * kp);
          _mm512_i64scatter_pd(out + kp * T + t, index, _mm512_castps_pd(wide), 8);
        }
        for (; kp < K2; ++kp) {
          const uint32_t pair[2] = {static_cast<uint32_t>(row[2 * kp]) << 16, static_cast<uint32_t>(row[2 * kp + 1]) << 16};
          std::memcpy(out + kp * T + t, pair, sizeof(pair));
        }
      }
    }
  });
}
#endif

// The activations as the packed tile reads them: bf16 rows for VDPBF16PS; fp32 rows on
// AVX2, whose tile broadcasts fp32 values (widened here, once per call for all threads),
// interleaved by token group for the AVX-512 tile.
#ifdef AGENTCPU_PACKED_AVX2
using TileInput = float;
// Widened here rather than by `to(kFloat)`: that is four dispatched ops a call.
inline at::Tensor tile_input(const LinearIO& io) {
  at::Tensor wide = at::empty(io.x2.sizes(), io.x2.options().dtype(at::kFloat));
  const uint16_t* src = static_cast<const uint16_t*>(io.x2.data_ptr());
  float* dst = wide.data_ptr<float>();
#ifdef AGENTCPU_PACKED_AVX512
  if (io.M >= kMinRows512) {  // K is even: the packed layout holds k pairs
    widen_interleaved(src, io.M, io.x2.size(1), dst);
    return wide;
  }
#endif
  const int64_t n = io.x2.numel();
  at::parallel_for(0, n, 1 << 16, [&](int64_t i0, int64_t i1) {
    int64_t i = i0;
    for (; i + 8 <= i1; i += 8) _mm256_storeu_ps(dst + i, agentcpu_avx2::widen_bf16(src + i));
    for (; i < i1; ++i) {
      const uint32_t bits = static_cast<uint32_t>(src[i]) << 16;
      std::memcpy(dst + i, &bits, sizeof(float));
    }
  });
  return wide;
}
#else
using TileInput = uint16_t;
inline at::Tensor tile_input(const LinearIO& io) { return io.x2; }
#endif

inline const TileInput* tile_input_ptr(const at::Tensor& x) { return static_cast<const TileInput*>(x.data_ptr()); }

// The output in x's leading shape.
inline at::Tensor in_x_shape(const at::Tensor& out, const at::Tensor& x) { return agentcpu_rows::like_rows(out, x); }


constexpr int64_t kBlockRows = 16;   // rows per packed block (one zmm of outputs)
constexpr int kBlocksPerTile = 4;    // 64 rows per tile (a parallel task's unit)
constexpr int kTokensPerTile = 6;    // 24 zmm / 12 ymm accumulators

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

#ifdef AGENTCPU_AMX
#define AGENTCPU_PACKED_AMX 1

// AMX (Sapphire Rapids and later; `amx_tiles.h` comes first in the prelude). The packed
// layout is already the B operand of TDPBF16PS: 16 k pairs x 16 rows x 2 k of one block
// are 1 KB at a 64-byte stride, so a B tile loads straight from the weight; the A tile is
// 16 token rows x 32 k loaded straight from x (row stride K * 2). C tiles are 16 tokens x
// 16 output rows in fp32. Register plan (8 tiles): 2 token tiles x 2 blocks = 4 C, 2 A,
// 2 B; each 32-wide k step loads 4 KB and issues 4 TDPBF16PS. Tokens past M are read from
// a zero-padded copy of the last partial 16-token tile, so every tile is 16 rows and one
// configuration serves.
constexpr int64_t kAmxRows = agentcpu_amx::kRows;
constexpr int64_t kAmxK = agentcpu_amx::kBf16;

// C tile (16 tokens x 16 outputs, fp32) + bias -> bf16 rows of out, for `tokens` rows.
inline void amx_store(const float* c, int64_t tokens, uint16_t* out, int64_t N, const float* bias) {
  const __m512 b = bias != nullptr ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
  for (int64_t t = 0; t < tokens; ++t)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + t * N),
                        reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_add_ps(_mm512_load_ps(c + t * 16), b))));
}

// Token tiles tile0 (and tile0 + 1 where TT == 2) against blocks b (and b + 1 where
// RB == 2), k in [k0, k1). `a(t)`: the first row of token tile t (x itself, or the
// padded tail). The sums start at zero where k0 == 0, else from `part` (fp32, [tokens]
// [32]: the two blocks' 16 outputs side by side); they end in `out` where k1 == K, else
// back in `part`.
template <int RB, int TT, typename RowsOf>
inline void amx_tile(const uint16_t* packed, int64_t K, int64_t k0, int64_t k1, int64_t b, int64_t tile0,
                     int64_t M, RowsOf a, float* part, uint16_t* out, int64_t N, const float* bias) {
  const int64_t block_stride = K * kBlockRows, a_stride = K * 2;
  const uint16_t* w0 = packed + b * block_stride;
  const uint16_t* w1 = w0 + block_stride;
  const uint16_t* a0 = a(tile0);
  const uint16_t* a1 = TT == 2 ? a(tile0 + 1) : a0;
  float* p0 = part + tile0 * kAmxRows * 2 * kBlockRows;  // token tile tile0, block b
  float* p1 = p0 + kAmxRows * 2 * kBlockRows;            // token tile tile0 + 1
  constexpr int64_t kPartStride = 2 * kBlockRows * 4;    // bytes per token row of `part`
  if (k0 == 0) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  } else {
    _tile_loadd(0, p0, kPartStride);
    if (TT == 2) _tile_loadd(1, p1, kPartStride);
    if (RB == 2) _tile_loadd(2, p0 + kBlockRows, kPartStride);
    if (RB == 2 && TT == 2) _tile_loadd(3, p1 + kBlockRows, kPartStride);
  }
  for (int64_t k = k0; k < k1; k += kAmxK) {
    _tile_loadd(4, a0 + k, a_stride);
    _tile_loadd(6, w0 + k * kBlockRows, 64);
    _tile_dpbf16ps(0, 4, 6);
    if (TT == 2) {
      _tile_loadd(5, a1 + k, a_stride);
      _tile_dpbf16ps(1, 5, 6);
    }
    if (RB == 2) {
      _tile_loadd(7, w1 + k * kBlockRows, 64);
      _tile_dpbf16ps(2, 4, 7);
      if (TT == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  if (k1 < K) {
    _tile_stored(0, p0, kPartStride);
    if (TT == 2) _tile_stored(1, p1, kPartStride);
    if (RB == 2) _tile_stored(2, p0 + kBlockRows, kPartStride);
    if (RB == 2 && TT == 2) _tile_stored(3, p1 + kBlockRows, kPartStride);
    return;
  }
  alignas(64) float c[kAmxRows * kBlockRows];
  for (int tt = 0; tt < TT; ++tt) {
    const int64_t t0 = (tile0 + tt) * kAmxRows, tokens = std::min(kAmxRows, M - t0);
    for (int rb = 0; rb < RB; ++rb) {
      switch (rb * 2 + tt) {  // tile numbers are immediates
        case 0: _tile_stored(0, c, 64); break;
        case 1: _tile_stored(1, c, 64); break;
        case 2: _tile_stored(2, c, 64); break;
        default: _tile_stored(3, c, 64);
      }
      amx_store(c, tokens, out + t0 * N + (b + rb) * kBlockRows, N,
                bias != nullptr ? bias + (b + rb) * kBlockRows : nullptr);
    }
  }
}

// k values per pass over the token tiles: a pass's two weight blocks (2 x 16 KB at 256)
// stay in L1 while every token tile streams past them (docs/kernels.md, "AMX").
inline int64_t amx_k_chunk() {
  static const int64_t kc = [] {
    const char* env = std::getenv("AGENTCPU_AMX_K_CHUNK");
    return env != nullptr ? std::max<int64_t>(kAmxK, std::atoll(env) / kAmxK * kAmxK) : int64_t{256};
  }();
  return kc;
}

// Activation bytes that K chunking assumes stay in L2.
constexpr int64_t amx_l2_bytes() { return int64_t{1} << 20; }

// Blocks [b0, b1) against all M tokens on tiles (K % 32 == 0). `out` and `bias` are
// indexed from block 0, as in `blocks_range`.
inline void amx_blocks_range(const uint16_t* packed, int64_t K, const uint16_t* x, int64_t M, uint16_t* out,
                             int64_t N, const float* bias, int64_t b0, int64_t b1) {
  const int64_t full = M / kAmxRows, tiles = (M + kAmxRows - 1) / kAmxRows;
  agentcpu_amx::AlignedVector<uint16_t> tail;
  if (tiles > full) {
    tail.assign(kAmxRows * K, 0);
    std::memcpy(tail.data(), x + full * kAmxRows * K, (M - full * kAmxRows) * K * sizeof(uint16_t));
  }
  auto rows_of = [&](int64_t t) { return t < full ? x + t * kAmxRows * K : tail.data(); };
  // K in chunks where the activations stay in L2 (~1 MB: a 512-token chunk at K = 896),
  // so each pass's two weight blocks are reused from L1 by every token tile; one pass
  // over all of K where the tokens are few (the weights stream from memory once) or
  // their rows do not fit (down_proj's 4,864 columns: chunking measured 25 % slower).
  const int64_t kc = tiles > 2 && tiles * kAmxRows * K * 2 <= amx_l2_bytes() ? amx_k_chunk() : K;
  agentcpu_amx::AlignedVector<float> part(kc < K ? tiles * kAmxRows * 2 * kBlockRows : 0);
  agentcpu_amx::configure();
  for (int64_t b = b0; b < b1; b += 2) {
    const bool two = b + 1 < b1;
    for (int64_t k0 = 0; k0 < K; k0 += kc) {
      const int64_t k1 = std::min(K, k0 + kc);
      for (int64_t t = 0; t < tiles; t += 2) {
        if (t + 1 < tiles) {
          if (two) amx_tile<2, 2>(packed, K, k0, k1, b, t, M, rows_of, part.data(), out, N, bias);
          else amx_tile<1, 2>(packed, K, k0, k1, b, t, M, rows_of, part.data(), out, N, bias);
        } else {
          if (two) amx_tile<2, 1>(packed, K, k0, k1, b, t, M, rows_of, part.data(), out, N, bias);
          else amx_tile<1, 1>(packed, K, k0, k1, b, t, M, rows_of, part.data(), out, N, bias);
        }
      }
    }
  }
  _tile_release();
}

// From this many tokens a product goes to the tiles (measured, docs/kernels.md);
// `AGENTCPU_AMX_MIN_ROWS` sets it at start, `set_amx_min_rows` at run time (benchmarks,
// tests). One value per compiled module.
inline std::atomic<int64_t>& amx_min_rows() {
  static std::atomic<int64_t> rows{[] {
    const char* env = std::getenv("AGENTCPU_AMX_MIN_ROWS");
    return env != nullptr ? std::atoll(env) : int64_t{1};
  }()};
  return rows;
}
#endif  // AMX

// Blocks [b0, b1) against all M tokens: panels of 128 tokens, each split into near-equal
// groups of at most 6 (8 = 4 + 4: a small group pays the same weight loads for less).
void blocks_range(const uint16_t* packed, int64_t K, const uint16_t* x, int64_t M, uint16_t* out,
                  int64_t N, const float* bias, int64_t b0, int64_t b1) {
#ifdef AGENTCPU_PACKED_AMX
  if (M >= amx_min_rows().load(std::memory_order_relaxed) && K % kAmxK == 0 && agentcpu_amx::granted()) {
    amx_blocks_range(packed, K, x, M, out, N, bias, b0, b1);
    return;
  }
#endif
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

#ifdef AGENTCPU_PACKED_AVX2

// AVX2 + FMA (no bf16 arithmetic): a 64-byte line is two 32-byte halves of 8 rows x 2 k,
// each a lane of two bf16 values. The high one (k + 1) is already an fp32 once the low 16
// bits are masked off; the low one (k) is one once shifted up 16 bits. So a line costs two
// loads and four integer ops, and feeds 4 FMAs per token against broadcasts of x[t, k] and
// x[t, k + 1] (the activations are widened to fp32 once per call, so a broadcast is a
// plain load). Tile: 1 block x 4 tokens = 8 ymm accumulators; 6 tokens (12 accumulators,
// the AVX-512 tile's shape) left GCC short of registers and ran 10-20 % slower, 3 blocks x
// 2 tokens ~45 % slower (Zen 3, docs/kernels.md). One or two tokens take 4 or 2 blocks a
// tile, so more lines are in flight.
constexpr int kTokensPerTileAvx2 = 4;

inline __m256 low_bf16(__m256i line) { return _mm256_castsi256_ps(_mm256_slli_epi32(line, 16)); }

inline __m256 high_bf16(__m256i line) {
  return _mm256_castsi256_ps(_mm256_and_si256(line, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

using agentcpu_avx2::to_bf16;  // rounded to nearest even, as torch rounds

// out[t * N + b * 16 + (0..15)] for RB blocks from `w` (block b0's run) and T tokens;
// x fp32 [T][K]. `ahead` > 0: prefetch each block's line that many k pairs ahead (the
// first token group over a block reads it from DRAM; the blocks are one contiguous run,
// so the last lines' prefetches fetch the next block's first).
template <int RB, int T>
inline void tile(const uint16_t* w, int64_t K2, const float* x, int64_t K, uint16_t* out, int64_t N,
                 const float* bias, int64_t ahead) {
  constexpr int V = 2 * RB;  // 8-row vectors
  __m256 acc[T][V];
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc[t][v] = _mm256_setzero_ps();
  const int64_t block_stride = K2 * 2 * kBlockRows;
  for (int64_t kp = 0; kp < K2; ++kp) {
    if (ahead > 0) {
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(w + r * block_stride + (kp + ahead) * 2 * kBlockRows),
                     _MM_HINT_T0);
    }
    __m256i line[V];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v)
      line[v] = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(w + (v / 2) * block_stride + kp * 2 * kBlockRows + (v % 2) * 16));
    __m256 wk[V];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) wk[v] = low_bf16(line[v]);
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      const __m256 xv = _mm256_broadcast_ss(x + t * K + 2 * kp);
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) acc[t][v] = _mm256_fmadd_ps(wk[v], xv, acc[t][v]);
    }
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) wk[v] = high_bf16(line[v]);
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      const __m256 xv = _mm256_broadcast_ss(x + t * K + 2 * kp + 1);
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) acc[t][v] = _mm256_fmadd_ps(wk[v], xv, acc[t][v]);
    }
  }
#pragma GCC unroll 8
  for (int v = 0; v < V; ++v) {
    const int64_t row = (v / 2) * kBlockRows + (v % 2) * 8;
    const __m256 b = bias != nullptr ? _mm256_loadu_ps(bias + row) : _mm256_setzero_ps();
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + t * N + row), to_bf16(_mm256_add_ps(acc[t][v], b)));
  }
}

// Prefetch distances in k pairs (64 bytes each), measured on Zen 3 from DRAM: 2-4 tokens
// a tile gained 15-40 % with 24-64 pairs ahead, one token (4 blocks, 4 streams) with 8;
// token groups after the first find the block in cache and prefetch nothing (doing so
// cost up to 25 % at 32 rows).
constexpr int64_t kAheadOneToken = 8;
constexpr int64_t kAhead = 32;

// One group of T tokens over blocks [b, b1) from `w` (block b's run); returns the blocks
// taken: 1 for 3-4 tokens, up to 2 for 2, up to 4 for 1. `first`: the first group over
// these blocks (it prefetches).
inline int64_t tile_group(int T, int64_t b, int64_t b1, const uint16_t* w, int64_t K2, const float* x,
                          int64_t K, uint16_t* out, int64_t N, const float* bias, bool first) {
  const int64_t ahead = first ? kAhead : 0;
  switch (T) {
    case 4: tile<1, 4>(w, K2, x, K, out, N, bias, ahead); return 1;
    case 3: tile<1, 3>(w, K2, x, K, out, N, bias, ahead); return 1;
    case 2:
      if (b + 2 <= b1) { tile<2, 2>(w, K2, x, K, out, N, bias, ahead); return 2; }
      tile<1, 2>(w, K2, x, K, out, N, bias, ahead);
      return 1;
    default:
      if (b + 4 <= b1) { tile<4, 1>(w, K2, x, K, out, N, bias, first ? kAheadOneToken : 0); return 4; }
      tile<1, 1>(w, K2, x, K, out, N, bias, first ? kAheadOneToken : 0);
      return 1;
  }
}

#ifdef AGENTCPU_PACKED_AVX512

// AVX-512F without BF16 arithmetic (Skylake-SP, Cascade Lake, Ice Lake servers): the AVX2
// widening on whole 64-byte lines, 16 rows x 2 k each (k shifted up 16 bits, k + 1 masked),
// and 16-lane FMAs. Tile: 3 blocks x up to 8 tokens = 24 zmm accumulators; per k pair 3
// lines widen twice (6 integer ops) and feed 48 FMAs. The activations of a token group
// are interleaved first ([K / 2][T][2] fp32, `widen_interleaved`), so the tile reads every
// broadcast at a constant offset from one pointer: with T row pointers GCC ran short of
// registers. Measured on an Ice Lake (2 cores, 512 tokens): 3 x 8 at 245-275 GFLOPS, 2 x
// 12-14 at 230-255, 4 x 6 at 190-210 (200-210 without the interleaving); FMAs with
// embedded broadcasts (inline asm) 130-160 (the loads then bound it). docs/kernels.md,
// "AVX-512 without BF16".
constexpr int kBlocksPerTile512 = 3;
static_assert(kBlocksPerTile512 == 3, "blocks_range512 switches over 1-3 blocks");

// out[t * N + b * 16 + (0..15)] for RB blocks from `w` and T tokens; xg: the group's
// activations interleaved [K2][T][2].
template <int RB, int T>
inline void tile512(const uint16_t* w, int64_t K2, const float* xg, uint16_t* out, int64_t N, const float* bias) {
  __m512 acc[T][RB];
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) acc[t][r] = _mm512_setzero_ps();
  const int64_t block_stride = K2 * 2 * kBlockRows;
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t kp = 0; kp < K2; ++kp) {
    const float* xk = xg + kp * 2 * T;
    const uint16_t* wk = w + kp * 2 * kBlockRows;
    __m512 wv[RB];
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r)
      wv[r] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_loadu_si512(wk + r * block_stride), 16));
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) {
      const __m512 xv = _mm512_set1_ps(xk[2 * t]);
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r) acc[t][r] = _mm512_fmadd_ps(wv[r], xv, acc[t][r]);
    }
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r)
      wv[r] = _mm512_castsi512_ps(_mm512_and_si512(_mm512_loadu_si512(wk + r * block_stride), high));
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) {
      const __m512 xv = _mm512_set1_ps(xk[2 * t + 1]);
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r) acc[t][r] = _mm512_fmadd_ps(wv[r], xv, acc[t][r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r) {
    const __m512 b = bias != nullptr ? _mm512_loadu_ps(bias + r * kBlockRows) : _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + t * N + r * kBlockRows),
                          agentcpu_avx512::to_bf16(_mm512_add_ps(acc[t][r], b)));
  }
}

template <int RB, int T = static_cast<int>(kTokensPerTile512)>
inline void tile512_tokens(int tokens, const uint16_t* w, int64_t K2, const float* xg, uint16_t* out, int64_t N,
                           const float* bias) {
  if constexpr (T > 1) {
    if (tokens < T) return tile512_tokens<RB, T - 1>(tokens, w, K2, xg, out, N, bias);
  }
  tile512<RB, T>(w, K2, xg, out, N, bias);
}

// `blocks_range` on the AVX-512 tile: x as `widen_interleaved` wrote it; each panel's
// token groups pass over kBlocksPerTile512 blocks while they are in L1/L2.
inline void blocks_range512(const uint16_t* packed, int64_t K, const float* x, int64_t M, uint16_t* out,
                            int64_t N, const float* bias, int64_t b0, int64_t b1) {
  const int64_t K2 = K / 2, block_stride = K2 * 2 * kBlockRows;
  for (int64_t p0 = 0; p0 < M; p0 += kPanelTokens) {
    const int64_t panel = std::min(kPanelTokens, M - p0);
    const int64_t group = group_tokens(panel, kTokensPerTile512);
    for (int64_t b = b0; b < b1;) {
      const int rb = static_cast<int>(std::min<int64_t>(kBlocksPerTile512, b1 - b));
      const uint16_t* w = packed + b * block_stride;
      const float* bb = bias != nullptr ? bias + b * kBlockRows : nullptr;
      for (int64_t t0 = p0; t0 < p0 + panel; t0 += group) {
        const int tokens = static_cast<int>(std::min(group, p0 + panel - t0));
        uint16_t* o = out + t0 * N + b * kBlockRows;
        const float* xt = x + t0 * K;
        switch (rb) {
          case 3: tile512_tokens<3>(tokens, w, K2, xt, o, N, bb); break;
          case 2: tile512_tokens<2>(tokens, w, K2, xt, o, N, bb); break;
          default: tile512_tokens<1>(tokens, w, K2, xt, o, N, bb);
        }
      }
      b += rb;
    }
  }
}
#endif  // AGENTCPU_PACKED_AVX512

// Blocks [b0, b1) against all M tokens (x widened to fp32 [M][K] by the caller, once
// for all threads): panels of 128 tokens, each split into near-equal groups of at most 4.
// For each group of blocks, every token group passes over them while they are in L1/L2.
void blocks_range(const uint16_t* packed, int64_t K, const float* x, int64_t M, uint16_t* out,
                  int64_t N, const float* bias, int64_t b0, int64_t b1) {
#ifdef AGENTCPU_PACKED_AVX512
  if (M >= kMinRows512) {
    blocks_range512(packed, K, x, M, out, N, bias, b0, b1);
    return;
  }
#endif
  const int64_t K2 = K / 2, block_stride = K2 * 2 * kBlockRows;
  for (int64_t p0 = 0; p0 < M; p0 += kPanelTokens) {
    const int64_t panel = std::min(kPanelTokens, M - p0);
    const int64_t groups = (panel + kTokensPerTileAvx2 - 1) / kTokensPerTileAvx2;
    const int64_t group = (panel + groups - 1) / groups;
    for (int64_t b = b0; b < b1;) {
      const uint16_t* w = packed + b * block_stride;
      const float* bb = bias != nullptr ? bias + b * kBlockRows : nullptr;
      // every group takes as many blocks as the first (a smaller last group takes them in
      // steps of its own)
      int64_t taken = 0;
      for (int64_t t0 = 0; t0 < panel; t0 += group) {
        const int tokens = static_cast<int>(std::min(group, panel - t0));
        uint16_t* o = out + (p0 + t0) * N + b * kBlockRows;
        const float* xt = x + (p0 + t0) * K;
        if (t0 == 0) {
          taken = tile_group(tokens, b, b1, w, K2, xt, K, o, N, bb, true);  // the largest group
        } else {
          for (int64_t d = 0; d < taken;)
            d += tile_group(tokens, b + d, b + taken, w + d * block_stride, K2, xt, K, o + d * kBlockRows, N,
                            bb != nullptr ? bb + d * kBlockRows : nullptr, false);
        }
      }
      b += taken;
    }
  }
}

#endif  // AGENTCPU_PACKED_AVX2

}  // namespace agentcpu_packed
