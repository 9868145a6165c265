// int8 per-channel linear on VNNI (AVX512-VNNI, or AVX-VNNI): activations quantized to int8
// per token and 64-block, products in int32 by VPDPBUSD, no dequantization of the weights
// (docs/quantization.md, "int8 on VNNI").
//
// Why: the GEMV (`int8_row`) re-reads each weight row once per 4 tokens and spends ~6
// instructions per 32 products, and the packed path dequantizes every weight to bf16 on
// every call (~0.2 ns a weight on 2 threads): at 8-64 rows both lost to the bf16 model.
// One zmm VPDPBUSD does 64 products: 178 GMAC/s per core on Zen 4 in a register-only loop,
// against 117 for VDPBF16PS (ymm VPDPBUSD 134).
//
// The product. VPDPBUSD multiplies unsigned by signed bytes, so the weights go in as
// u = w + 128 (w xor 0x80) and the activations as signed q. Per 64-block b of token t,
// dot(u, q) = dot(w, q) + 128 * sum(q): summed over blocks with the block's scale s[t, b],
//   acc[t, n] = sum_b s[t, b] * dot_b(w[n], q[t]) + C[t],  C[t] = 128 * sum_b s[t, b] * sum_b(q[t]),
// a correction per token, the same for every row, so y[t, n] = ws[n] * (acc[t, n] - C[t])
// + bias[n]. Each block's int32 dot is exact and below 2^24 (255 * 127 * 64), so its fp32
// conversion is exact too; the only error beyond the weights' is the activations'
// rounding, |error| <= sum_k |w_k| * max|x_block| / 254 (the GEMV's bound, on 64-blocks).
// Block size, measured on the trained demo model against bf16 (teacher-forced top-1 /
// relative logit error): weight-only int8 0.936 / 7.1 %, 32-blocks 0.929 / 9.3 %,
// 64-blocks 0.923 / 10.2 %, 128-blocks 0.886 / 11.2 %; 64-blocks with the fp32 sums in
// registers ran as fast as 128-blocks folded through L1, 32-blocks 15-20 % slower.
//
// Layout (`formats.int8_panels`, made once at load): panels of 32 rows, each
// [K / 4][32 rows][4 bytes] of u, a k step's 4 bytes of each row, so one 64-byte line is
// 16 rows' operands for one VPDPBUSD against a token's 4 broadcast activation bytes, and the
// int32 sums of 16 rows land in the 16 lanes (no horizontal sums); a panel is one
// contiguous stream. (Laying the rows out per call instead cost 0.2-0.5 ms a call for the
// 8.7 MB gate_up: more than the products at 4-16 rows.) The tile: 2 lines (32 rows) x up to
// 6 tokens, int32 sums of one block and fp32 sums of all blocks in registers.
#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__)
#define AGENTCPU_INT8_VNNI 1
#endif

namespace agentcpu_int8_vnni {

#ifdef AGENTCPU_INT8_VNNI

constexpr int64_t kActBlock = 64;  // activations per fp32 scale (64 where K allows, else 32)
constexpr int64_t kPanelRows = 32;  // weight rows per panel (a parallel task's unit)

// The vector a tile works in: zmm (16 rows a line) where AVX512-VNNI runs on 512 bits,
// ymm (8 rows) on AVX-VNNI. Zen 4, one core, register-only loops: zmm VPDPBUSD 178 GMAC/s,
// ymm 134, VDPBF16PS (zmm) 117.
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
using Vec = __m512i;
using Sum = __m512;
constexpr int kLanes = 16;
constexpr int kTileTokens = 6;  // 12 int32 + 12 fp32 accumulators, 2 lines, 1 broadcast, 1 scale
inline Vec zero() { return _mm512_setzero_si512(); }
inline Sum zero_sum() { return _mm512_setzero_ps(); }
inline Vec load(const uint8_t* p) { return _mm512_loadu_si512(p); }
inline Vec broadcast(int32_t w) { return _mm512_set1_epi32(w); }
inline Vec dpbusd(Vec acc, Vec u, Vec q) { return _mm512_dpbusd_epi32(acc, u, q); }
inline void keep_in_register(Vec& v) { asm("" : "+v"(v)); }
inline Sum fold(Sum f, Vec s, float scale) { return _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(scale), f); }
inline void store(float* o, Sum f) { _mm512_storeu_ps(o, f); }
#else
using Vec = __m256i;
using Sum = __m256;
constexpr int kLanes = 8;
constexpr int kTileTokens = 1;  // AVX-VNNI has 16 ymm: 4 int32 + 4 fp32 accumulators, 4 lines, 1
inline Vec zero() { return _mm256_setzero_si256(); }
inline Sum zero_sum() { return _mm256_setzero_ps(); }
inline Vec load(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline Vec broadcast(int32_t w) { return _mm256_set1_epi32(w); }
inline Vec dpbusd(Vec acc, Vec u, Vec q) { return _mm256_dpbusd_avx_epi32(acc, u, q); }
inline void keep_in_register(Vec& v) { asm("" : "+x"(v)); }
inline Sum fold(Sum f, Vec s, float scale) { return _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(scale), f); }
inline void store(float* o, Sum f) { _mm256_storeu_ps(o, f); }
#endif
constexpr int kLines = kPanelRows / kLanes;  // lines a k step of a panel

// Activations of M tokens: int8 [M][K], one scale per token and block, and C[t].
struct Acts {
  std::vector<int8_t> q;
  std::vector<float> scales;      // [M][K / block]
  std::vector<float> correction;  // [M]: 128 * sum_b scale * sum(q over b)
  int64_t block = 0;
};

inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
inline __m256 load8(const at::BFloat16* x) { return agentcpu_avx2::widen_bf16(reinterpret_cast<const uint16_t*>(x)); }

// One block of n (a multiple of 32) activations -> int8 (round to nearest, scale
// amax / 127); returns the scale and the block's sum of q in *qsum.
template <typename T>
inline float quantize_block(const T* x, int64_t n, int8_t* q, int32_t* qsum) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 amax = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, load8(x + i)));
  const float d = agentcpu_avx2::hmax(amax) / 127.f;
  const __m256 inv = _mm256_set1_ps(d > 0.f ? 1.f / d : 0.f);
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  __m256i sum = _mm256_setzero_si256();  // 4 x 64-bit sums of q + 128
  for (int64_t i = 0; i < n; i += 32) {
    __m256 v[4];
    for (int j = 0; j < 4; ++j)
      v[j] = _mm256_round_ps(_mm256_mul_ps(load8(x + i + 8 * j), inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i b = agentcpu_avx2::to_int8x32(v);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), b);
    sum = _mm256_add_epi64(sum, _mm256_sad_epu8(_mm256_xor_si256(b, flip), _mm256_setzero_si256()));
  }
  const __m128i s = _mm_add_epi64(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
  *qsum = static_cast<int32_t>(_mm_cvtsi128_si64(s) + _mm_extract_epi64(s, 1) - 128 * n);
  return d;
}

template <typename T>
Acts quantize_acts(const T* xp, int64_t M, int64_t K) {
  Acts a;
  a.block = K % kActBlock == 0 ? kActBlock : 32;
  const int64_t nb = K / a.block;
  a.q.resize(M * K);
  a.scales.resize(M * nb);
  a.correction.resize(M);
  at::parallel_for(0, M, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float c = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        int32_t qsum = 0;
        const float d = quantize_block(xp + t * K + b * a.block, a.block, a.q.data() + t * K + b * a.block, &qsum);
        a.scales[t * nb + b] = d;
        c += d * static_cast<float>(qsum);
      }
      a.correction[t] = 128.f * c;
    }
  });
  return a;
}

// acc[T][32 rows] = sum over blocks of scale * int32 dot, for tokens t0 .. t0 + T: the int32
// sums of a block and the fp32 sums all stay in registers.
template <int T>
void tile(const uint8_t* panel, int64_t K, const Acts& a, int64_t t0, float* acc) {
  const int64_t nb = K / a.block, steps = a.block / 4;
  const int8_t* xq[T];
  for (int t = 0; t < T; ++t) xq[t] = a.q.data() + (t0 + t) * K;
  Sum f[T][kLines];
  for (int t = 0; t < T; ++t)
    for (int l = 0; l < kLines; ++l) f[t][l] = zero_sum();
  for (int64_t b = 0; b < nb; ++b) {
    Vec s[T][kLines];
    for (int t = 0; t < T; ++t)
      for (int l = 0; l < kLines; ++l) s[t][l] = zero();
    const uint8_t* line = panel + b * steps * kPanelRows * 4;
    const int64_t k0 = b * a.block;
    for (int64_t st = 0; st < steps; ++st, line += kPanelRows * 4) {
      Vec u[kLines];
      for (int l = 0; l < kLines; ++l) u[l] = load(line + l * kLanes * 4);
      for (int t = 0; t < T; ++t) {
        int32_t word;
        std::memcpy(&word, xq[t] + k0 + st * 4, 4);
        const Vec q = broadcast(word);
        for (int l = 0; l < kLines; ++l) {
          s[t][l] = dpbusd(s[t][l], u[l], q);
          keep_in_register(s[t][l]);
        }
      }
    }
    for (int t = 0; t < T; ++t) {
      const float scale = a.scales[(t0 + t) * nb + b];
      for (int l = 0; l < kLines; ++l) f[t][l] = fold(f[t][l], s[t][l], scale);
    }
  }
  for (int t = 0; t < T; ++t)
    for (int l = 0; l < kLines; ++l) store(acc + t * kPanelRows + l * kLanes, f[t][l]);
}

template <int T = kTileTokens>
void tile_dispatch(int nt, const uint8_t* panel, int64_t K, const Acts& a, int64_t t0, float* acc) {
  if constexpr (T > 1) {
    if (nt < T) return tile_dispatch<T - 1>(nt, panel, K, a, t0, acc);
  }
  tile<T>(panel, K, a, t0, acc);
}

// y = ws[n] * (acc[t, n] - C[t]) + bias[n] for every panel and token group; Out is float or
// at::BFloat16 (the input's dtype).
template <typename In, typename Out>
void run(const In* xp, int64_t M, int64_t N, int64_t K, const uint8_t* panels, const float* ws,
         const float* bias, Out* out) {
  const Acts a = quantize_acts(xp, M, K);
  const int64_t per_group = agentcpu_packed::group_tokens(M, kTileTokens);
  at::parallel_for(0, N / kPanelRows, 1, [&](int64_t p0, int64_t p1) {
    alignas(64) float acc[kTileTokens * kPanelRows];
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t r0 = p * kPanelRows;
      for (int64_t t0 = 0; t0 < M; t0 += per_group) {
        const int nt = static_cast<int>(std::min(per_group, M - t0));
        tile_dispatch(nt, panels + r0 * K, K, a, t0, acc);
        for (int t = 0; t < nt; ++t) {
          const float c = a.correction[t0 + t];
          Out* o = out + (t0 + t) * N + r0;
          for (int64_t r = 0; r < kPanelRows; ++r)
            o[r] = static_cast<Out>(ws[r0 + r] * (acc[t * kPanelRows + r] - c) + (bias != nullptr ? bias[r0 + r] : 0.f));
        }
      }
    }
  });
}

#endif  // AGENTCPU_INT8_VNNI

}  // namespace agentcpu_int8_vnni

// Whether this build has the VNNI batch path.
bool int8_vnni_available() {
#ifdef AGENTCPU_INT8_VNNI
  return true;
#else
  return false;
#endif
}

// y = x @ (w * scales).T + bias for a per-channel int8 weight laid out in panels
// (`formats.int8_panels`: uint8 [N / 32, K / 4, 128]) and scales fp32 [N, 1]; x fp32 or
// bf16 (other dtypes as fp32), any number of rows; the output has x's dtype.
at::Tensor int8_linear_vnni(const at::Tensor& x, const at::Tensor& panels, const at::Tensor& scales,
                            const c10::optional<at::Tensor>& bias) {
  using namespace agentcpu_int8_vnni;
  TORCH_CHECK(int8_vnni_available(), "this build has no int8 VNNI path (needs AVX512-VNNI + VL or AVX-VNNI)");
  TORCH_CHECK(panels.dim() == 3 && panels.size(2) == 128 && panels.scalar_type() == at::kByte && panels.is_contiguous(),
              "int8 VNNI weight must be contiguous uint8 panels [N / 32, K / 4, 128], got ", panels.sizes());
  const int64_t N = panels.size(0) * 32, K = panels.size(1) * 4;
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == N,
              "int8 VNNI scales must be contiguous fp32 [", N, ", 1]");
  TORCH_CHECK(K % 32 == 0, "int8 VNNI panels need in_features % 32 == 0, got ", K);
  TORCH_CHECK(x.size(-1) == K, "input has ", x.size(-1), " features, weight expects ", K);
  at::Tensor x2 = agentcpu_rows::as_rows(x);
  if (x2.scalar_type() != at::kFloat && x2.scalar_type() != at::kBFloat16) x2 = x2.to(at::kFloat).contiguous();
  const int64_t M = x2.size(0);
  at::Tensor out = at::empty({M, N}, x2.options());
  agentcpu_packed::FloatBias b;
  agentcpu_packed::read_bias(bias, N, b);
#ifdef AGENTCPU_INT8_VNNI
  const uint8_t* wp = panels.data_ptr<uint8_t>();
  const float* ws = scales.data_ptr<float>();
  if (M > 0) {
    if (x2.scalar_type() == at::kBFloat16)
      run(x2.data_ptr<at::BFloat16>(), M, N, K, wp, ws, b.data, out.data_ptr<at::BFloat16>());
    else
      run(x2.data_ptr<float>(), M, N, K, wp, ws, b.data, out.data_ptr<float>());
  }
#endif
  return agentcpu_rows::like_rows(out, x);
}
