// bf16-weight linear for a few rows (batched decode) on x86 AVX2 CPUs without native
// bf16 matmul (no AVX-512 BF16 / AMX).
//
// y[t, n] = sum_k x[t, k] * w[n, k] + bias[n], w bf16 [N, K] as stored by nn.Linear.
//
// PyTorch's bf16 GEMM on such CPUs falls back to a slow loop, and widening the whole
// weight to fp32 first costs a write and a re-read of 2x the weight bytes per call. Here
// each thread takes a block of weight rows and, for every group of 4 tokens, forms 3 x 4
// dot products at once: 3 weight rows are widened in registers (bf16 -> fp32 is a 16-bit
// shift), 4 token rows are loaded, 12 fp32 FMA accumulators (16 ymm registers in all).
// The 3 weight rows stay in L1 while all token groups pass over them, so the weights are
// read from memory once per call; the activations (M x K fp32) are re-read from L2.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int kRows = 3;    // weight rows per micro-tile
constexpr int kTokens = 4;  // tokens per micro-tile
constexpr int64_t kRowsPerTask = 3 * 16;

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256 load_bf16(const uint16_t* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

inline float bf16_to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// out[t * ldo + r] = dot(w row r, x row t) for r < R, t < T. If `next` is given, the
// R * K bf16 weights there (the next micro-tile's rows) are prefetched along the way, one
// cache line per k step: with short rows (K = 896 is 1.8 KB) the hardware prefetchers
// alone kept a thread at ~12 GB/s from DRAM; torch's GEMV reached ~20.
template <int R, int T>
inline void tile(const uint16_t* w, int64_t K, const float* x, int64_t K_x, float* out, int64_t ldo,
                 const uint16_t* next) {
  __m256 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  const int64_t K8 = K / 8 * 8;
  const char* ahead = reinterpret_cast<const char*>(next);
  for (int64_t k = 0; k < K8; k += 8) {
    if (ahead != nullptr) _mm_prefetch(ahead + k * 2 * R, _MM_HINT_T0);
    __m256 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load_bf16(w + r * K + k);
    for (int t = 0; t < T; ++t) {
      const __m256 xv = _mm256_loadu_ps(x + t * K_x + k);
      for (int r = 0; r < R; ++r) acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) {
      float s = hsum(acc[r][t]);
      for (int64_t k = K8; k < K; ++k) s += bf16_to_float(w[r * K + k]) * x[t * K_x + k];
      out[t * ldo + r] = s;
    }
}

template <int R>
inline void tile_tokens(int T, const uint16_t* w, int64_t K, const float* x, float* out, int64_t ldo,
                        const uint16_t* next) {
  switch (T) {
    case 4: tile<R, 4>(w, K, x, K, out, ldo, next); break;
    case 3: tile<R, 3>(w, K, x, K, out, ldo, next); break;
    case 2: tile<R, 2>(w, K, x, K, out, ldo, next); break;
    default: tile<R, 1>(w, K, x, K, out, ldo, next);
  }
}

}  // namespace

// x: [..., K] fp32 or bf16; weight: bf16 [N, K] contiguous; bias: [N] or None.
// Returns [..., N] in x's dtype.
at::Tensor bf16_linear_small_batch(const at::Tensor& x, const at::Tensor& weight,
                                   const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.dim() == 2 && weight.is_contiguous(),
              "weight must be a contiguous 2-D bf16 tensor");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.size(-1) == K, "input has ", x.size(-1), " features, weight expects ", K);
  const at::Tensor x2 = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t M = x2.size(0);
  at::Tensor out = at::empty({M, N}, x2.options());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  const float* xp = x2.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t tasks = (N + kRowsPerTask - 1) / kRowsPerTask;
  // tiny products run on the calling thread: an OpenMP region costs ~10 us
  const int64_t task_macs = kRowsPerTask * K * M;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, task_macs));
  at::parallel_for(0, tasks, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t n0 = i0 * kRowsPerTask; n0 < std::min(N, i1 * kRowsPerTask); n0 += kRows) {
      const int R = static_cast<int>(std::min<int64_t>(kRows, N - n0));
      const uint16_t* w = wp + n0 * K;
      const uint16_t* next = n0 + 2 * kRows <= N ? w + kRows * K : nullptr;
      for (int64_t t0 = 0; t0 < M; t0 += kTokens) {
        const int T = static_cast<int>(std::min<int64_t>(kTokens, M - t0));
        float* o = op + t0 * N + n0;
        const float* xt = xp + t0 * K;
        const uint16_t* pf = t0 == 0 ? next : nullptr;  // the first token group prefetches
        if (R == 3) tile_tokens<3>(T, w, K, xt, o, N, pf);
        else if (R == 2) tile_tokens<2>(T, w, K, xt, o, N, pf);
        else tile_tokens<1>(T, w, K, xt, o, N, pf);
      }
    }
  });
  if (bias.has_value()) out.add_(bias->to(at::kFloat));
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return out.to(x.scalar_type()).reshape(shape);
}
