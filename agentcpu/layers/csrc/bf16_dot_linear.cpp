// bf16 linear for decode-sized batches on CPUs with AVX-512 BF16 (Zen 4, Cooper Lake,
// Sapphire Rapids): every multiply-add is a VDPBF16PS, 32 bf16 products per instruction,
// and the weight is read in its nn.Linear layout once per call.
//
// y[t, n] = sum_k x[t, k] * w[n, k] + bias[n]; w bf16 [N, K], x bf16 [M, K], y bf16.
//
// Why not PyTorch: oneDNN's bf16 GEMV streams the weight at 12-15 GB/s here (a third of
// the DRAM bandwidth) and its small-M GEMM reaches 125-250 GFLOPS at 16-64 rows against
// ~400 at prefill sizes (docs/kernels.md). Here each thread takes blocks of weight rows;
// a micro-tile of R rows x T tokens keeps R x T 16-lane fp32 accumulators, and each
// 32-wide k step loads R weight lines and T activation lines and issues R x T VDPBF16PS.
// The R weight rows stay in L1 while every token group passes over them; while the first
// group runs, the next micro-tile's rows are prefetched line by line (rows are short —
// 1.8 KB at K = 896 — and the hardware prefetchers alone ramp up too late). At the end
// the R accumulators of a token are reduced together into R adjacent outputs, the bias is
// added in fp32 and the row is rounded to bf16 once.
// `linear_io` comes from `bf16_packed_tile.h`, which `hardware.native_build` puts first.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cstdint>

#if defined(__AVX512BF16__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#define AGENTCPU_DOT_BF16 1
#endif

using agentcpu_packed::in_x_shape;
using agentcpu_packed::linear_io;
using agentcpu_packed::LinearIO;

namespace {

#ifdef AGENTCPU_DOT_BF16

constexpr int64_t kStep = 32;  // bf16 values per k step (one 64-byte line)
// The first token group prefetches the micro-tile this many tiles ahead (one-row decode,
// 1-30 MB weights from DRAM: 1 tile ahead 25-31 GB/s, 2 ahead 27-31, none 23-29).
constexpr int kPrefetchTiles = 2;

inline __m512bh load_line(const uint16_t* p, __mmask32 mask, bool tail) {
  const __m512i v = tail ? _mm512_maskz_loadu_epi16(mask, p) : _mm512_loadu_si512(p);
  // (tail is a compile-time constant at every call)
  return reinterpret_cast<__m512bh>(v);
}

// Sums of 4 accumulators as one 128-bit vector [a, b, c, d].
inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512 abcd = _mm512_add_ps(
      _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))),
      _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))));
  const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd),
                                    _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}

// Writes the R (<= 8) sums of one token's accumulators (+ bias) as bf16 to out[0..R).
template <int R>
inline void store_row(const __m512 (&acc)[R], const float* bias, uint16_t* out) {
  const __m512 z = _mm512_setzero_ps();
#pragma GCC unroll 2
  for (int r0 = 0; r0 < R; r0 += 4) {
    constexpr int kLast = R - 1;
    const int n = std::min(4, R - r0);
    const __mmask8 mask = static_cast<__mmask8>((1u << n) - 1);
    __m128 s = reduce4(acc[r0], r0 + 1 <= kLast ? acc[std::min(r0 + 1, kLast)] : z,
                       r0 + 2 <= kLast ? acc[std::min(r0 + 2, kLast)] : z,
                       r0 + 3 <= kLast ? acc[std::min(r0 + 3, kLast)] : z);
    if (bias != nullptr) s = _mm_add_ps(s, _mm_maskz_loadu_ps(mask, bias + r0));
    _mm_mask_storeu_epi16(out + r0, mask, reinterpret_cast<__m128i>(_mm_cvtneps_pbh(s)));
  }
}

// acc[t][r] += dot of one 32-wide k step (masked where `mask` is not all ones).
template <int R, int T, bool kTail>
inline void k_step(__m512 (&acc)[T][R], const uint16_t* w, int64_t K, const uint16_t* x, int64_t k,
                   __mmask32 mask) {
  __m512bh wv[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) wv[r] = load_line(w + r * K + k, mask, kTail);
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t) {
    const __m512bh xv = load_line(x + t * K + k, mask, kTail);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[t][r] = _mm512_dpbf16_ps(acc[t][r], wv[r], xv);
  }
}

// out[t * N + r] = dot(w row r, x row t) + bias[r] for r < R, t < T. `next` (or null):
// a later micro-tile's R rows, prefetched R lines per k step.
template <int R, int T>
inline void tile(const uint16_t* w, int64_t K, const uint16_t* x, uint16_t* out, int64_t N,
                 const float* bias, const char* next) {
  __m512 acc[T][R];
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[t][r] = _mm512_setzero_ps();
  const int64_t k_full = K / kStep * kStep;
  for (int64_t k = 0; k < k_full; k += kStep) {
    if (next != nullptr)
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) _mm_prefetch(next + (k * R + r * kStep) * 2, _MM_HINT_T0);
    k_step<R, T, false>(acc, w, K, x, k, 0);
  }
  if (k_full < K) k_step<R, T, true>(acc, w, K, x, k_full, _cvtu32_mask32((1u << (K - k_full)) - 1));
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t) store_row<R>(acc[t], bias, out + t * N);
}

template <int R>
inline void tile_tokens(int T, const uint16_t* w, int64_t K, const uint16_t* x, uint16_t* out, int64_t N,
                        const float* bias, const char* next) {
  switch (T) {
    case 6: tile<R, 6>(w, K, x, out, N, bias, next); break;
    case 5: tile<R, 5>(w, K, x, out, N, bias, next); break;
    case 4: tile<R, 4>(w, K, x, out, N, bias, next); break;
    case 3: tile<R, 3>(w, K, x, out, N, bias, next); break;
    case 2: tile<R, 2>(w, K, x, out, N, bias, next); break;
    default: tile<R, 1>(w, K, x, out, N, bias, next);
  }
}

// Weight rows [n0, n1) against all M tokens in micro-tiles of R rows x up to T tokens;
// the tokens are split into groups of near-equal size (8 = 4 + 4, not 6 + 2: a small group
// pays the same weight loads for fewer products).
template <int R, int T>
void rows_block(const uint16_t* w, int64_t K, const uint16_t* x, int64_t M, uint16_t* out, int64_t N,
                const float* bias, int64_t n0, int64_t n1) {
  const int64_t groups = (M + T - 1) / T;
  const int64_t group = (M + groups - 1) / groups;
  for (int64_t n = n0; n < n1; n += R) {
    const int rows = static_cast<int>(std::min<int64_t>(R, n1 - n));
    const uint16_t* wr = w + n * K;
    const float* b = bias != nullptr ? bias + n : nullptr;
    const char* next = n + (kPrefetchTiles + 1) * R <= n1
                           ? reinterpret_cast<const char*>(wr + kPrefetchTiles * R * K)
                           : nullptr;
    for (int64_t t0 = 0; t0 < M; t0 += group) {
      const int tokens = static_cast<int>(std::min<int64_t>(group, M - t0));
      const uint16_t* xt = x + t0 * K;
      uint16_t* o = out + t0 * N + n;
      const char* pf = t0 == 0 ? next : nullptr;  // the first token group prefetches
      if (rows == R) {
        tile_tokens<R>(tokens, wr, K, xt, o, N, b, pf);
      } else {
        for (int r = 0; r < rows; ++r) tile_tokens<1>(tokens, wr + r * K, K, xt, o + r, N, b ? b + r : nullptr, nullptr);
      }
    }
  }
}

#endif  // AGENTCPU_DOT_BF16

// One row (single-stream decode) takes 4 weight rows per micro-tile (2, 8 and 16 streamed
// no faster); batches 4 rows x 6 tokens (24 accumulators + 4 weight + 1 activation
// register of 32).
constexpr int kRowsOneToken = 4;
constexpr int kRowsBatch = 4;
constexpr int kTokensBatch = 6;
constexpr int64_t kRowsPerTask = 64;

}  // namespace

// Whether this build has the VDPBF16PS path (compiled for a CPU with AVX-512 BF16).
bool bf16_dot_available() {
#ifdef AGENTCPU_DOT_BF16
  return true;
#else
  return false;
#endif
}

// x: [..., K] bf16; weight: bf16 [N, K] contiguous; bias: [N] or None. Returns [..., N]
// bf16 (fp32 accumulation, one rounding per output).
at::Tensor bf16_dot_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(bf16_dot_available(), "this build has no AVX-512 BF16 path");
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.dim() == 2 && weight.is_contiguous(),
              "weight must be a contiguous 2-D bf16 tensor");
  const int64_t N = weight.size(0), K = weight.size(1);
  LinearIO io = linear_io(x, K, N, bias);
  const int64_t M = io.M;
#ifdef AGENTCPU_DOT_BF16
  const float* bp = io.bias;
  const auto* wp = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  const auto* xp = reinterpret_cast<const uint16_t*>(io.x2.data_ptr<at::BFloat16>());
  auto* op = reinterpret_cast<uint16_t*>(io.out.data_ptr<at::BFloat16>());
  const int64_t tasks = (N + kRowsPerTask - 1) / kRowsPerTask;
  // tiny products run on the calling thread: an OpenMP region costs ~10 us
  const int64_t task_macs = kRowsPerTask * K * std::max<int64_t>(M, 1);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / task_macs);
  if (M > 0) {
    agentcpu_gil::ReleaseIfHeld no_gil;  // the HTTP thread may run Python meanwhile
    at::parallel_for(0, tasks, grain, [&](int64_t i0, int64_t i1) {
      const int64_t n0 = i0 * kRowsPerTask, n1 = std::min(N, i1 * kRowsPerTask);
      if (M == 1) rows_block<kRowsOneToken, 1>(wp, K, xp, M, op, N, bp, n0, n1);
      else rows_block<kRowsBatch, kTokensBatch>(wp, K, xp, M, op, N, bp, n0, n1);
    });
  }
#endif
  return in_x_shape(io.out, x);
}
