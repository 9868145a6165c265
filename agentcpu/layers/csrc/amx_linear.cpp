// bf16 linear on Intel AMX tiles (Sapphire Rapids and later), for decode batches and
// prefill chunks alike.
//
// y[t, n] = sum_k x[t, k] * w[n, k] + bias[n], w bf16 [N, K] as stored by nn.Linear.
//
// The product is computed transposed, y^T = w x^T, so the weight is the tile multiply's
// A operand and is loaded straight from its nn.Linear layout (16 rows x 32 k = 16 x 64
// bytes per tile, row stride K * 2): no per-call repacking of the weight, which is what
// makes PyTorch's oneDNN bf16 GEMM slow at decode sizes (it reorders B every call). Only
// the activations are repacked, once per call, into the B operand's VNNI layout (pairs of
// k per 32-bit column: B[k2][t] = x[t][2 k2 .. 2 k2 + 1]), zero-padded to whole tiles.
//
// Register plan (8 tiles): per task, 2 weight row-blocks (32 rows) x 2 token blocks (32
// tokens): C 4 tiles, A 2, B 2. Each k step loads 2 KB of weights, 2 KB of packed
// activations, and issues 4 TDPBF16PS. Batches over 32 tokens take further passes over
// the same 32 weight rows, which by then are in L2. There is no software prefetch: the
// hardware prefetchers follow the 32 row streams, and every prefetch distance tried
// (4-32 k steps, to L1 or L2) lowered the bandwidth (docs/kernels.md).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

constexpr int kTileRows = 16;           // rows of every tile
constexpr int kTileK = 32;              // bf16 values per tile row (64 bytes)

#if defined(__AMX_BF16__) && defined(__AMX_TILE__)

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every tile is 16 rows x 64 bytes: the weights (16 rows x 32 bf16), the packed
// activations (16 k-pairs x 16 tokens x 2 bf16) and the fp32 accumulators (16 x 16).
inline void configure_tiles() {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) {
    cfg.colsb[i] = 64;
    cfg.rows[i] = kTileRows;
  }
  _tile_loadconfig(&cfg);
}

// Linux hands out AMX tile state only to processes that ask for it.
bool request_amx_permission() {
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

// Writes C tile (16 weight rows x 16 tokens, fp32) into y[t, n0 + r] for the tokens that
// exist, adding the bias.
template <typename Out>
inline void store_block(const float* c, int64_t n0, int64_t t0, int64_t M, int64_t N, const float* bias,
                        Out* y) {
  const int64_t tokens = std::min<int64_t>(kTileRows, M - t0);
  for (int64_t t = 0; t < tokens; ++t) {
    Out* row = y + (t0 + t) * N + n0;
    for (int r = 0; r < kTileRows; ++r) {
      float v = c[r * kTileRows + t];
      if (bias != nullptr) v += bias[n0 + r];
      row[r] = static_cast<Out>(v);
    }
  }
}

// One task: weight rows [n0, n0 + 16 NB) against every token, K in 32-wide steps.
// Tile numbers: C = 0..3 (nb * 2 + tb), A = 4..5, B = 6..7.
template <int NB, typename Out>
void rows_task(const uint16_t* w, int64_t K, const uint32_t* xpack, int64_t token_blocks, int64_t M,
               int64_t N, int64_t n0, const float* bias, Out* y) {
  const int64_t ksteps = K / kTileK;
  const int64_t w_stride = K * 2;
  const uint16_t* w0 = w + n0 * K;
  const uint16_t* w1 = w0 + kTileRows * K;
  alignas(64) float c[4][kTileRows * kTileRows];
  for (int64_t tb0 = 0; tb0 < token_blocks; tb0 += 2) {
    const bool two_tb = tb0 + 1 < token_blocks;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    // packed activations: [token block][k step][16 x 16 uint32]
    const uint32_t* b0 = xpack + tb0 * ksteps * 256;
    const uint32_t* b1 = b0 + ksteps * 256;
    for (int64_t ks = 0; ks < ksteps; ++ks) {
      _tile_loadd(6, b0 + ks * 256, 64);
      if (two_tb) _tile_loadd(7, b1 + ks * 256, 64);
      _tile_loadd(4, w0 + ks * kTileK, w_stride);
      _tile_dpbf16ps(0, 4, 6);
      if (two_tb) _tile_dpbf16ps(1, 4, 7);
      if (NB == 2) {
        _tile_loadd(5, w1 + ks * kTileK, w_stride);
        _tile_dpbf16ps(2, 5, 6);
        if (two_tb) _tile_dpbf16ps(3, 5, 7);
      }
    }
    _tile_stored(0, c[0], 64);
    store_block(c[0], n0, tb0 * kTileRows, M, N, bias, y);
    if (two_tb) {
      _tile_stored(1, c[1], 64);
      store_block(c[1], n0, (tb0 + 1) * kTileRows, M, N, bias, y);
    }
    if (NB == 2) {
      _tile_stored(2, c[2], 64);
      store_block(c[2], n0 + kTileRows, tb0 * kTileRows, M, N, bias, y);
      if (two_tb) {
        _tile_stored(3, c[3], 64);
        store_block(c[3], n0 + kTileRows, (tb0 + 1) * kTileRows, M, N, bias, y);
      }
    }
  }
}

// x [M, K] bf16 -> [token block][k step][k pair 16][token 16] uint32 (two bf16), zeros
// past M.
void pack_activations(const uint16_t* x, int64_t M, int64_t K, uint32_t* out) {
  const int64_t ksteps = K / kTileK;
  const int64_t token_blocks = (M + kTileRows - 1) / kTileRows;
  at::parallel_for(0, token_blocks * ksteps, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t tb = i / ksteps, ks = i % ksteps;
      uint32_t* tile = out + i * 256;
      for (int t = 0; t < kTileRows; ++t) {
        const int64_t token = tb * kTileRows + t;
        if (token >= M) {
          for (int p = 0; p < 16; ++p) tile[p * 16 + t] = 0;
          continue;
        }
        const uint32_t* src = reinterpret_cast<const uint32_t*>(x + token * K + ks * kTileK);
        for (int p = 0; p < 16; ++p) tile[p * 16 + t] = src[p];
      }
    }
  });
}

template <typename Out>
void amx_linear_impl(const at::Tensor& x2, const at::Tensor& weight, const float* bias, Out* y) {
  const int64_t M = x2.size(0), K = x2.size(1), N = weight.size(0);
  const int64_t ksteps = K / kTileK;
  const int64_t token_blocks = (M + kTileRows - 1) / kTileRows;
  at::Tensor packed = at::empty({token_blocks * ksteps * 256}, x2.options().dtype(at::kInt));
  uint32_t* xpack = reinterpret_cast<uint32_t*>(packed.data_ptr<int32_t>());
  pack_activations(reinterpret_cast<const uint16_t*>(x2.data_ptr<at::BFloat16>()), M, K, xpack);
  const uint16_t* w = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  const int64_t row_pairs = (N / kTileRows + 1) / 2;
  at::parallel_for(0, row_pairs, 1, [&](int64_t i0, int64_t i1) {
    configure_tiles();
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n0 = i * 2 * kTileRows;
      if (n0 + 2 * kTileRows <= N) rows_task<2>(w, K, xpack, token_blocks, M, N, n0, bias, y);
      else rows_task<1>(w, K, xpack, token_blocks, M, N, n0, bias, y);
    }
    _tile_release();
  });
}

#endif  // AMX

}  // namespace

// Whether this build has the AMX path and the OS granted the tile state.
bool amx_bf16_available() {
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
  static const bool granted = request_amx_permission();
  return granted;
#else
  return false;
#endif
}

// x: [..., K] bf16; weight: bf16 [N, K] contiguous, N % 16 == 0, K % 32 == 0; bias: [N]
// or None. Returns [..., N] bf16 (fp32 accumulation, one rounding at the end).
at::Tensor amx_bf16_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(amx_bf16_available(), "AMX bf16 tiles are not available on this CPU / OS");
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.dim() == 2 && weight.is_contiguous(),
              "weight must be a contiguous 2-D bf16 tensor");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(N % kTileRows == 0 && K % kTileK == 0, "AMX linear needs N % 16 == 0 and K % 32 == 0, got N=", N,
              " K=", K);
  TORCH_CHECK(x.size(-1) == K, "input has ", x.size(-1), " features, weight expects ", K);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "input must be bf16");
  const at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  at::Tensor out = at::empty({M, N}, x2.options());
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
  at::Tensor bias_f;
  const float* bias_p = nullptr;
  if (bias.has_value()) {
    bias_f = bias->to(at::kFloat).contiguous();
    bias_p = bias_f.data_ptr<float>();
  }
  if (M > 0) amx_linear_impl(x2, weight, bias_p, out.data_ptr<at::BFloat16>());
#endif
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return out.reshape(shape);
}
