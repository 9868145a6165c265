// Weight-only int8 / int4 linear kernels for x86 AVX2 (also run on AVX-512 CPUs).
//
// Small batches (GEMV-like): activations are quantized on the fly to int8 in blocks of
// 32 (one fp32 scale per block, as llama.cpp's Q8_0 activations), the int8 / int4
// weights are streamed once and multiplied with `maddubs` (u8 x s8 -> s16 pairs) +
// `madd` (-> s32), then each block's integer dot is scaled in fp32.
// Large batches: each thread dequantizes a tile of weight rows to fp32 / bf16 in a
// small buffer and multiplies it with at::mm (oneDNN / MKL), so the big-batch cost is
// the float GEMM plus one pass over the quantized bytes.
//
// Formats (see docs/quantization.md):
//   int8: qweight int8 [N, K]; scales fp32 [N, K / group] (group = K: per channel).
//         w[n, k] = qweight[n, k] * scales[n, k / group]
//   int4: qweight uint8 [N, K / 2]; each 32-weight block is 16 bytes in GGUF Q4_0 order
//         (byte j: low nibble = weight j, high nibble = weight j + 16);
//         scales, offsets fp16 [N, K / group].
//         w[n, k] = nibble(n, k) * scales[n, k / group] + offsets[n, k / group]
//         or interleaved, 8 rows a group (the decode layout where the loader can use it):
//         qweight [N / 8, K / 32, 128], scales / offsets [N / 8, K / group, 8] (below).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int kBlock = 32;      // activation quantization block (weights per fp32 scale)
constexpr int kChunk4 = 64;     // int4 weights per 32-byte load (two Q4_0 blocks)
constexpr int kMaxTokens = 4;   // tokens sharing one pass over a weight row (registers)
constexpr int64_t kRowGrain = 16;
constexpr int64_t kMaxGroups = 2048;  // int4 groups per row (a row's scales go on the stack)
// Software prefetch distance in bytes of weights (~2-4 rows of a K=896 layer). On Zen 3
// the GEMV is close to compute-bound, so the hardware prefetcher alone leaves DRAM idle
// while a row is multiplied: +10-18 % streaming rate measured (int4, 2 threads).
constexpr int64_t kPrefetch = 2048;

inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float half_to_float(at::Half h) { return _cvtsh_ss(h.x); }

// min(n, 8) fp16 values from p as fp32, zeros in the lanes past n. `readable`: whether all
// 8 halves at p lie inside the tensor (then one load and a mask, else lane by lane).
inline __m256 load_halves(const at::Half* p, int64_t n, bool readable) {
  if (n >= 8 || readable) {
    const __m256 v8 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    if (n >= 8) return v8;
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_and_ps(v8, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), lane)));
  }
  alignas(32) float f[8] = {};
  for (int64_t i = 0; i < n; ++i) f[i] = _cvtsh_ss(p[i].x);
  return _mm256_load_ps(f);
}

// Sums of 4 adjacent u8 x s8 products, as int32. With VNNI (AVX512-VNNI + VL, or
// AVX-VNNI) one instruction; on plain AVX2 maddubs (to s16 pairs; the operands here never
// saturate: |a| <= 128, |b| <= 127) + madd against ones.
#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__)
#define AGENTCPU_VNNI 1
// acc + the sums (one instruction where a running int32 sum is kept)
inline __m256i dot4_u8s8_acc(__m256i acc, __m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, a, b);
#else
  return _mm256_dpbusd_avx_epi32(acc, a, b);
#endif
}
inline __m256i dot4_u8s8(__m256i a, __m256i b) { return dot4_u8s8_acc(_mm256_setzero_si256(), a, b); }
#else
inline __m256i dot4_u8s8(__m256i a, __m256i b) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1));
}
#endif

// Quantized activations of B tokens: int8 values, one scale per 32-block, and (int4)
// the fp32 sum of each weight group. For int4 each 64-chunk is stored permuted as
// [0..15, 32..47, 16..31, 48..63] to match the nibble order of two Q4_0 blocks.
struct QuantActs {
  std::vector<int8_t> q;      // [B, K]
  std::vector<float> scales;  // int8: [B, K/32]; int4: [B, K/64, 8] (lane-wise scales)
  std::vector<float> group_sums;  // int4: [B, groups_stride(K/group)], zero past K/group
};

// Row stride of QuantActs::group_sums: the groups rounded up to 8, so the int4 kernel reads
// them 8 at a time with zeros past the end.
inline int64_t groups_stride(int64_t ngroups) { return (ngroups + 7) / 8 * 8; }

// Sums of the *quantized* activations per weight group: then scale * dot(q, xq) +
// offset * sum is exactly dot(w, dequantized x), with no cancellation error between them.
void compute_group_sums(QuantActs& a, int64_t t, int64_t K, int64_t group) {
  const int64_t blocks_per_group = group / kBlock, nchunks = K / kChunk4;
  const int8_t* qr = a.q.data() + t * K;
  for (int64_t g = 0; g < K / group; ++g) {
    float s = 0.f;
    for (int64_t b = g * blocks_per_group; b < (g + 1) * blocks_per_group; ++b) {
      const int8_t* qc = qr + (b / 2) * kChunk4 + (b % 2) * 16;
      int32_t isum = 0;
      for (int i = 0; i < 16; ++i) isum += qc[i] + qc[i + 32];
      s += isum * a.scales[(t * nchunks + b / 2) * 8 + (b % 2) * 4];
    }
    a.group_sums[t * groups_stride(K / group) + g] = s;
  }
}

// 32 floats -> 32 int8 (round to nearest) with scale amax / 127; returns the scale.
inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
inline __m256 load8(const at::BFloat16* x) {
  return agentcpu_avx2::widen_bf16(reinterpret_cast<const uint16_t*>(x));
}

template <typename T>
inline float quantize_block(const T* x, int8_t* q) {
  const __m256 sign_bit = _mm256_set1_ps(-0.0f);
  __m256 v[4], amax = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = load8(x + 8 * i);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_bit, v[i]));
  }
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  const float d = _mm_cvtss_f32(m) / 127.f;
  const __m256 inv = _mm256_set1_ps(d > 0.f ? 1.f / d : 0.f);
  __m256 n[4];
  for (int i = 0; i < 4; ++i)
    n[i] = _mm256_round_ps(_mm256_mul_ps(v[i], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), agentcpu_avx2::to_int8x32(n));
  return d;
}

template <typename T>
QuantActs quantize_acts_typed(const at::Tensor& x, int64_t group, bool int4) {
  const int64_t B = x.size(0), K = x.size(1), nblocks = K / kBlock, nchunks = K / kChunk4;
  const T* xp = x.data_ptr<T>();
  QuantActs a;
  a.q.resize(B * K);
  a.scales.resize(int4 ? B * nchunks * 8 : B * nblocks);
  if (int4) a.group_sums.assign(B * groups_stride(K / group), 0.f);
  at::parallel_for(0, B, 1, [&](int64_t t_begin, int64_t t_end) {
    alignas(32) int8_t tmp[kBlock];
    for (int64_t t = t_begin; t < t_end; ++t) {
      const T* xr = xp + t * K;
      int8_t* qr = a.q.data() + t * K;
      for (int64_t b = 0; b < nblocks; ++b) {
        if (!int4) {
          a.scales[t * nblocks + b] = quantize_block(xr + b * kBlock, qr + b * kBlock);
          continue;
        }
        // block b is the first (even b) or second half of chunk b / 2
        const float d = quantize_block(xr + b * kBlock, tmp);
        const int64_t c = b / 2, half = b % 2;
        std::memcpy(qr + c * kChunk4 + half * 16, tmp, 16);
        std::memcpy(qr + c * kChunk4 + 32 + half * 16, tmp + 16, 16);
        float* sv = a.scales.data() + (t * nchunks + c) * 8 + half * 4;
        for (int l = 0; l < 4; ++l) sv[l] = d;
      }
      if (int4) compute_group_sums(a, t, K, group);
    }
  });
  return a;
}

// x: contiguous [B, K], fp32 or bf16 (see input_2d)
QuantActs quantize_acts(const at::Tensor& x, int64_t group, bool int4) {
  if (x.scalar_type() == at::kBFloat16) return quantize_acts_typed<at::BFloat16>(x, group, int4);
  return quantize_acts_typed<float>(x, group, int4);
}

// Dot of one int8 weight row with NT quantized tokens. PerChannel: one weight scale,
// applied once at the end; else one per group, folded into each block's scale.
// For 1-2 tokens two accumulators per token alternate blocks, so the FMA latency chain
// does not bound a row (K = 896 is only 28 blocks).
template <int NT, bool PerChannel>
void int8_row(const int8_t* w, const float* wscale, int64_t K, int64_t group,
              const QuantActs& a, int64_t t0, float* out, int64_t out_stride) {
  constexpr int kAcc = NT <= 2 ? 2 : 1;
  const int64_t nblocks = K / kBlock, blocks_per_group = group / kBlock;
  const float* xs[NT];
  __m256 acc[kAcc][NT];
  for (int j = 0; j < NT; ++j) {
    for (int u = 0; u < kAcc; ++u) acc[u][j] = _mm256_setzero_ps();
    xs[j] = a.scales.data() + (t0 + j) * nblocks;
  }
  auto block = [&](int64_t b, __m256* acc_u) {
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * kBlock));
    const __m256i aw = _mm256_abs_epi8(wv);  // |w| as u8: -128 -> 128 stays exact
    // (Q8_0 has a scale per block: skip the division there)
    const __m256 ws = _mm256_set1_ps(PerChannel ? 1.f : wscale[blocks_per_group == 1 ? b : b / blocks_per_group]);
    for (int j = 0; j < NT; ++j) {
      const int8_t* xq = a.q.data() + (t0 + j) * K + b * kBlock;
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
      const __m256i sx = _mm256_sign_epi8(xv, wv);  // x * sign(w): |x| <= 127, no overflow
      const __m256i p = dot4_u8s8(aw, sx);
      __m256 s = _mm256_broadcast_ss(xs[j] + b);
      if (!PerChannel) s = _mm256_mul_ps(s, ws);
      acc_u[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, acc_u[j]);
    }
  };
  int64_t b = 0;
  for (; b + 2 <= nblocks; b += 2) {  // one 64-byte line per step
    prefetch(w + b * kBlock + kPrefetch);
    block(b, acc[0]);
    block(b + 1, acc[kAcc - 1]);
  }
  if (b < nblocks) block(b, acc[0]);
  for (int j = 0; j < NT; ++j) {
    const __m256 sum = kAcc == 2 ? _mm256_add_ps(acc[0][j], acc[kAcc - 1][j]) : acc[0][j];
    out[j * out_stride] = hsum(sum) * (PerChannel ? wscale[0] : 1.f);
  }
}

// One 64-weight int4 chunk (two Q4_0 blocks, 32 bytes) against 64 permuted int8
// activations: lane l of the result sums weights of block l / 4 (see QuantActs).
struct Int4Chunk {
  __m256i lo, hi;  // nibbles of block 0 | block 1: weights 0..15 | 32..47, 16..31 | 48..63
};

inline Int4Chunk load_int4_chunk(const uint8_t* w) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  return {_mm256_and_si256(v, low4), _mm256_and_si256(_mm256_srli_epi16(v, 4), low4)};
}

inline __m256 int4_chunk_dot(const Int4Chunk& c, const int8_t* xq) {
  const __m256i xl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
  const __m256i xh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32));
#ifdef AGENTCPU_VNNI
  const __m256i p = dot4_u8s8_acc(dot4_u8s8(c.lo, xl), c.hi, xh);
#else  // add the s16 pairs first (|sum| <= 2 * 2 * 15 * 127): one madd instead of two
  const __m256i p = _mm256_madd_epi16(
      _mm256_add_epi16(_mm256_maddubs_epi16(c.lo, xl), _mm256_maddubs_epi16(c.hi, xh)),
      _mm256_set1_epi16(1));
#endif
  return _mm256_cvtepi32_ps(p);
}

// Group-32 scales of chunks c..c+3 (8 fp16 -> fp32 in one conversion); `spread(v, i)`
// gives chunk c+i's [s_2i x4, s_2i+1 x4], the lane layout of int4_chunk_dot.
inline __m256 spread_scales(__m256 s8, int i) {
  return _mm256_permutevar8x32_ps(s8, _mm256_setr_epi32(2 * i, 2 * i, 2 * i, 2 * i, 2 * i + 1,
                                                        2 * i + 1, 2 * i + 1, 2 * i + 1));
}

// Shape of an int4 layer, worked out once per call (no divisions per row).
struct Int4Layer {
  const uint8_t* w;
  const at::Half* scales;
  const at::Half* offsets;
  int64_t N, K, ngroups, group, nchunks, gstride;
  int chunk_shift;  // log2(chunks per group) for group >= 64
  // whether the 8 halves from element g of row n's scales / offsets lie inside the tensor
  bool readable(int64_t n, int64_t g) const { return (n * ngroups + g + 8) <= N * ngroups; }
};

// Dot of int4 weight row n with NT quantized tokens (offset term included). As in
// int8_row, 1-2 tokens use two accumulators per token (even / odd chunks).
template <int NT>
void int4_row(const Int4Layer& L, int64_t n, const QuantActs& a, int64_t t0, float* out) {
  constexpr int kAcc = NT <= 2 ? 2 : 1;
  const uint8_t* w = L.w + n * (L.K / 2);
  const at::Half* scales = L.scales + n * L.ngroups;
  const at::Half* offsets = L.offsets + n * L.ngroups;
  const int64_t nchunks = L.nchunks, ngroups = L.ngroups;
  const int8_t* xq[NT];
  const float* xs[NT];
  __m256 acc[kAcc][NT];
  for (int j = 0; j < NT; ++j) {
    xq[j] = a.q.data() + (t0 + j) * L.K;
    xs[j] = a.scales.data() + (t0 + j) * nchunks * 8;
    for (int u = 0; u < kAcc; ++u) acc[u][j] = _mm256_setzero_ps();
  }
  // one chunk, its weight scale(s) already spread over the lanes
  auto chunk = [&](int64_t c, __m256 ws, __m256* acc_u) {
    const Int4Chunk ch = load_int4_chunk(w + c * 32);
    for (int j = 0; j < NT; ++j) {
      const __m256 s = _mm256_mul_ps(_mm256_loadu_ps(xs[j] + c * 8), ws);
      acc_u[j] = _mm256_fmadd_ps(int4_chunk_dot(ch, xq[j] + c * kChunk4), s, acc_u[j]);
    }
  };
  if (L.group == kBlock) {  // two groups per chunk: lanes 0-3 take scale 2c, lanes 4-7 2c+1
    int64_t c = 0;
    for (; c + 4 <= nchunks; c += 4) {
      prefetch(w + c * 32 + kPrefetch);
      prefetch(w + c * 32 + kPrefetch + 64);
      const __m256 s8 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + 2 * c)));
      chunk(c, spread_scales(s8, 0), acc[0]);
      chunk(c + 1, spread_scales(s8, 1), acc[kAcc - 1]);
      chunk(c + 2, spread_scales(s8, 2), acc[0]);
      chunk(c + 3, spread_scales(s8, 3), acc[kAcc - 1]);
    }
    for (; c < nchunks; ++c) {
      int32_t two_halves;
      std::memcpy(&two_halves, scales + 2 * c, sizeof(two_halves));
      chunk(c, spread_scales(_mm256_castps128_ps256(_mm_cvtph_ps(_mm_cvtsi32_si128(two_halves))), 0),
            acc[0]);
    }
  } else {  // 64, 128, ...: the row's scales go to fp32 once, one scale in all lanes
    alignas(32) float scale_f[kMaxGroups + 8];
    for (int64_t g = 0; g < ngroups; g += 8)
      _mm256_store_ps(scale_f + g, load_halves(scales + g, ngroups - g, L.readable(n, g)));
    int64_t c = 0;
    for (; c + 2 <= nchunks; c += 2) {
      prefetch(w + c * 32 + kPrefetch);
      chunk(c, _mm256_broadcast_ss(scale_f + (c >> L.chunk_shift)), acc[0]);
      chunk(c + 1, _mm256_broadcast_ss(scale_f + ((c + 1) >> L.chunk_shift)), acc[kAcc - 1]);
    }
    if (c < nchunks) chunk(c, _mm256_broadcast_ss(scale_f + (c >> L.chunk_shift)), acc[0]);
  }
  // offset term: sum over groups of offset * (sum of the group's dequantized activations);
  // 8 groups per step, the last one zero-padded (K = 896 has 7 groups of 128)
  for (int64_t g = 0; g < ngroups; g += 8) {
    const __m256 m = load_halves(offsets + g, ngroups - g, L.readable(n, g));
    for (int j = 0; j < NT; ++j)
      acc[0][j] = _mm256_fmadd_ps(m, _mm256_loadu_ps(a.group_sums.data() + (t0 + j) * L.gstride + g), acc[0][j]);
  }
  for (int j = 0; j < NT; ++j)
    out[j] = hsum(kAcc == 2 ? _mm256_add_ps(acc[0][j], acc[kAcc - 1][j]) : acc[0][j]);
}

// Calls row(n, t0, nt) for every output row n and run of up to kMaxTokens tokens; each
// thread takes one contiguous range of rows, so its weights are one sequential stream.
template <typename RowFn>
void for_rows_and_tokens(int64_t N, int64_t B, RowFn row) {
  at::parallel_for(0, N, kRowGrain, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t t0 = 0; t0 < B; t0 += kMaxTokens) row(n, t0, std::min<int64_t>(kMaxTokens, B - t0));
  });
}

// [B, K] contiguous view of x; fp32 and bf16 are read as they are, other dtypes as fp32
at::Tensor input_2d(const at::Tensor& x) {
  if (x.scalar_type() != at::kFloat && x.scalar_type() != at::kBFloat16)
    return agentcpu_rows::as_rows(x).to(at::kFloat);
  return agentcpu_rows::as_rows(x);
}

// Writes y[t, n] = v + bias[n] in the activation dtype (no separate cast / add pass).
// A contiguous fp32 or bf16 bias is read as it is: a conversion per call would be one
// more torch op in every decode step's qkv projection.
struct OutputWriter {
  float* f = nullptr;
  at::BFloat16* b = nullptr;
  const float* bias = nullptr;
  const at::BFloat16* bias_bf16 = nullptr;
  int64_t N = 0;
  void operator()(int64_t t, int64_t n, float v) const {
    if (bias) v += bias[n];
    else if (bias_bf16) v += static_cast<float>(bias_bf16[n]);
    if (f) f[t * N + n] = v;
    else b[t * N + n] = at::BFloat16(v);
  }
};

// The output in x's shape (last dim N) and dtype, and a writer for it. `bias_keep` holds
// a converted bias (dtypes other than fp32 / bf16, or a strided one) alive.
std::pair<at::Tensor, OutputWriter> make_output(const at::Tensor& x, const at::Tensor& x2, int64_t N,
                                                const c10::optional<at::Tensor>& bias,
                                                at::Tensor& bias_keep) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor out = at::empty(shape, x2.options());
  OutputWriter w;
  w.N = N;
  if (x2.scalar_type() == at::kBFloat16) w.b = out.data_ptr<at::BFloat16>();
  else w.f = out.data_ptr<float>();
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == N, "bias has ", bias->numel(), " values, the layer ", N, " outputs");
    if (bias->is_contiguous() && bias->scalar_type() == at::kBFloat16) {
      w.bias_bf16 = bias->data_ptr<at::BFloat16>();
    } else if (bias->is_contiguous() && bias->scalar_type() == at::kFloat) {
      w.bias = bias->data_ptr<float>();
    } else {
      bias_keep = bias->to(at::kFloat).contiguous();
      w.bias = bias_keep.data_ptr<float>();
    }
  }
  return {out, w};
}

at::Tensor finish(at::Tensor out, const at::Tensor& x, const c10::optional<at::Tensor>& bias) {
  if (bias.has_value()) out.add_(*bias);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out.size(1);
  return out.to(x.scalar_type()).reshape(shape);
}

void check_x(const at::Tensor& x, int64_t K, int64_t multiple) {
  TORCH_CHECK(x.size(-1) == K, "input has ", x.size(-1), " features, weight expects ", K);
  TORCH_CHECK(K % multiple == 0, "in_features must be a multiple of ", multiple);
}

// ---- int4, 8 rows interleaved (quant/formats.py `interleave_int4`) ----
// qweight uint8 [N/8, K/32, 128]: block b of row group g is 128 bytes whose 32-byte vector
// p holds bytes 4p..4p+3 of the Q4_0 block of rows 0..7 in turn, so 32-bit lane r of
// every vector is row r (low nibbles: weights 4p..4p+3, high: 16+4p..16+4p+3). scales,
// offsets fp16 [N/8, K/group, 8], or [N/8, K/group, 0] for a symmetric weight (Q4_0's
// w = scale * (q - 8): each offset is -8 x its scale, not stored). A block's activations are broadcast 4 bytes at a time,
// its 8 rows' integer dots end in the 8 lanes of one vector: no horizontal sums, and the
// nibble unpacking is shared by up to 4 tokens. 1.2-1.6x the row loop's compute rate
// (docs/quantization.md), which is the bound where a core has more than ~12 GB/s.
struct Int4X8Layer {
  const uint8_t* w;
  const at::Half* scales;
  const at::Half* offsets;  // null for a symmetric weight
  int64_t N, K, G, nblocks;
  int block_shift;  // log2(32-blocks per group)
};

bool is_interleaved(const at::Tensor& qweight) { return qweight.dim() == 3; }

// An empty asm that "changes" v, so GCC cannot reassociate the integer sums across it.
// Left alone, GCC 13 hoists all 32 maddubs of a 4-token block above their adds (a
// balanced add tree) and spills 16 of them to the stack; with the barrier each product
// is added as it is made. 1.03-1.22x (median ~1.07x) at 4-256 tokens on Zen 3, A/B in
// one process (docs/quantization.md).
inline void keep_in_register(__m256i& v) { asm("" : "+x"(v)); }

Int4X8Layer x8_layer(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& offsets) {
  TORCH_CHECK(qweight.size(2) == 4 * kBlock && qweight.is_contiguous(),
              "interleaved int4 qweight must be contiguous [N/8, K/32, 128]");
  const bool symmetric = offsets.dim() == 3 && offsets.size(2) == 0;
  TORCH_CHECK(scales.dim() == 3 && scales.size(0) == qweight.size(0) && scales.size(2) == 8 &&
                  scales.is_contiguous() && offsets.is_contiguous() &&
                  (symmetric ? offsets.size(0) == scales.size(0) && offsets.size(1) == scales.size(1)
                             : scales.sizes() == offsets.sizes()),
              "interleaved int4 scales / offsets must be contiguous [N/8, groups, 8] (offsets [N/8, groups, 0] "
              "when symmetric)");
  Int4X8Layer L{qweight.data_ptr<uint8_t>(), scales.data_ptr<at::Half>(),
                symmetric ? nullptr : offsets.data_ptr<at::Half>(),
                qweight.size(0) * 8, qweight.size(1) * kBlock, scales.size(1), qweight.size(1), 0};
  TORCH_CHECK(L.K % L.G == 0, "in_features ", L.K, " is not a whole number of ", L.G, " groups");
  const int64_t blocks_per_group = L.K / L.G / kBlock;
  TORCH_CHECK(blocks_per_group >= 1 && (blocks_per_group & (blocks_per_group - 1)) == 0,
              "interleaved int4 group must be 32 times a power of two");
  while ((int64_t{1} << L.block_shift) < blocks_per_group) ++L.block_shift;
  return L;
}

// Per token and 32-block: scale * (sum of the block's int8 activations), the block's
// share of the offset term (then offset * sum is exactly dot(offsets, dequantized x)).
std::vector<float> block_sums(const QuantActs& a, int64_t B, int64_t K) {
  const int64_t nb = K / kBlock;
  std::vector<float> sums(B * nb);
  for (int64_t i = 0; i < B * nb; ++i) {
    const int8_t* q = a.q.data() + i * kBlock;
    int32_t s = 0;
    for (int k = 0; k < kBlock; ++k) s += q[k];
    sums[i] = a.scales[i] * static_cast<float>(s);
  }
  return sums;
}

// Row group g8 (8 rows) against tokens t0 .. t0 + NT - 1: out[j][r] = row 8 g8 + r.
template <int NT>
void int4_x8_rows(const Int4X8Layer& L, int64_t g8, const QuantActs& a, const float* bsum, int64_t t0,
                  float (*out)[8]) {
  constexpr int kAcc = NT <= 2 ? 2 : 1;  // 1-2 tokens: even / odd blocks in separate sums
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const uint8_t* w = L.w + g8 * L.nblocks * 4 * kBlock;
  const at::Half* sc = L.scales + g8 * L.G * 8;
  const at::Half* of = L.offsets ? L.offsets + g8 * L.G * 8 : nullptr;
  const __m256 minus8 = _mm256_set1_ps(-8.0f);
  const int8_t* xq[NT];
  const float* xs[NT];
  const float* xb[NT];
  __m256 acc[kAcc][NT];
  for (int j = 0; j < NT; ++j) {
    xq[j] = a.q.data() + (t0 + j) * L.K;
    xs[j] = a.scales.data() + (t0 + j) * L.nblocks;
    xb[j] = bsum + (t0 + j) * L.nblocks;
    for (int u = 0; u < kAcc; ++u) acc[u][j] = _mm256_setzero_ps();
  }
  for (int64_t b = 0; b < L.nblocks; ++b) {
    const uint8_t* wb = w + b * 4 * kBlock;
    prefetch(wb + kPrefetch);
    prefetch(wb + kPrefetch + 64);
    __m256i dot[NT];
    for (int j = 0; j < NT; ++j) dot[j] = _mm256_setzero_si256();
    for (int p = 0; p < 4; ++p) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 32 * p));
      const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
      for (int j = 0; j < NT; ++j) {
        int32_t x_lo, x_hi;
        std::memcpy(&x_lo, xq[j] + b * kBlock + 4 * p, 4);
        std::memcpy(&x_hi, xq[j] + b * kBlock + 16 + 4 * p, 4);
#ifdef AGENTCPU_VNNI  // int32 sums, accumulated by the instruction itself
        dot[j] = dot4_u8s8_acc(dot4_u8s8_acc(dot[j], lo, _mm256_set1_epi32(x_lo)), hi, _mm256_set1_epi32(x_hi));
#else  // int16 pair sums: 8 products of <= 15 * 127 per lane, at most 30,480
        dot[j] = _mm256_add_epi16(dot[j], _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(x_lo)),
                                                           _mm256_maddubs_epi16(hi, _mm256_set1_epi32(x_hi))));
#endif
        keep_in_register(dot[j]);
      }
    }
    const int64_t g = b >> L.block_shift;
    const __m256 ws = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + g * 8)));
    const __m256 wo = of ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(of + g * 8)))
                         : _mm256_mul_ps(ws, minus8);
    __m256* acc_u = acc[b % kAcc];
    for (int j = 0; j < NT; ++j) {
#ifdef AGENTCPU_VNNI
      const __m256 d = _mm256_cvtepi32_ps(dot[j]);
#else
      const __m256 d = _mm256_cvtepi32_ps(_mm256_madd_epi16(dot[j], _mm256_set1_epi16(1)));
#endif
      acc_u[j] = _mm256_fmadd_ps(d, _mm256_mul_ps(ws, _mm256_broadcast_ss(xs[j] + b)), acc_u[j]);
      acc_u[j] = _mm256_fmadd_ps(wo, _mm256_broadcast_ss(xb[j] + b), acc_u[j]);
    }
  }
  for (int j = 0; j < NT; ++j)
    _mm256_storeu_ps(out[j], kAcc == 2 ? _mm256_add_ps(acc[0][j], acc[kAcc - 1][j]) : acc[0][j]);
}

#if defined(AGENTCPU_VNNI) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define AGENTCPU_VNNI512 1
inline void keep_in_register(__m512i& v) { asm("" : "+v"(v)); }

// Two adjacent row groups g8 and g8 + 1 on zmm (AVX-512 VNNI): `int4_x8_rows` with group
// g8's 32-byte vector in the low half and g8 + 1's in the high one, so each VPDPBUSD
// multiplies 16 rows and the per-block scale work serves both groups. out[j][r] = row
// 8 g8 + r, r < 16. Qwen2.5-0.5B shape, 2 Ice Lake cores, old and new build alternated:
// gate_up at 512 rows 57 -> 32 ms, at 128 14 -> 8 ms, down at 512 24 -> 14.5 ms; but
// one-token decode (two weight streams per thread) 44-50 -> 43-45 tok/s, so only from
// kMinTokensX16 tokens.
constexpr int64_t kMinTokensX16 = 4;
template <int NT>
void int4_x16_rows(const Int4X8Layer& L, int64_t g8, const QuantActs& a, const float* bsum, int64_t t0,
                   float (*out)[16]) {
  constexpr int kAcc = NT <= 2 ? 2 : 1;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const int64_t group_bytes = L.nblocks * 4 * kBlock;
  const uint8_t* w0 = L.w + g8 * group_bytes;
  const uint8_t* w1 = w0 + group_bytes;
  const at::Half* sc = L.scales + g8 * L.G * 8;  // group g8 + 1's at sc + L.G * 8
  const at::Half* of = L.offsets ? L.offsets + g8 * L.G * 8 : nullptr;
  const int8_t* xq[NT];
  const float* xs[NT];
  const float* xb[NT];
  __m512 acc[kAcc][NT];
  for (int j = 0; j < NT; ++j) {
    xq[j] = a.q.data() + (t0 + j) * L.K;
    xs[j] = a.scales.data() + (t0 + j) * L.nblocks;
    xb[j] = bsum + (t0 + j) * L.nblocks;
    for (int u = 0; u < kAcc; ++u) acc[u][j] = _mm512_setzero_ps();
  }
  // 8 fp16 values of each group at index i, as 16 fp32 lanes
  auto halves16 = [&](const at::Half* p, int64_t i) {
    const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i));
    const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + L.G * 8 + i));
    return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1));
  };
  for (int64_t b = 0; b < L.nblocks; ++b) {
    const uint8_t* wb0 = w0 + b * 4 * kBlock;
    const uint8_t* wb1 = w1 + b * 4 * kBlock;
    prefetch(wb0 + kPrefetch);
    prefetch(wb0 + kPrefetch + 64);
    prefetch(wb1 + kPrefetch);
    prefetch(wb1 + kPrefetch + 64);
    __m512i dot[NT];
    for (int j = 0; j < NT; ++j) dot[j] = _mm512_setzero_si512();
    for (int p = 0; p < 4; ++p) {
      const __m512i v = _mm512_inserti64x4(
          _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb0 + 32 * p))),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb1 + 32 * p)), 1);
      const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      for (int j = 0; j < NT; ++j) {
        int32_t x_lo, x_hi;
        std::memcpy(&x_lo, xq[j] + b * kBlock + 4 * p, 4);
        std::memcpy(&x_hi, xq[j] + b * kBlock + 16 + 4 * p, 4);
        dot[j] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(dot[j], lo, _mm512_set1_epi32(x_lo)), hi,
                                     _mm512_set1_epi32(x_hi));
        keep_in_register(dot[j]);
      }
    }
    const int64_t g = (b >> L.block_shift) * 8;
    const __m512 ws = halves16(sc, g);
    const __m512 wo = of ? halves16(of, g) : _mm512_mul_ps(ws, _mm512_set1_ps(-8.0f));
    __m512* acc_u = acc[b % kAcc];
    for (int j = 0; j < NT; ++j) {
      acc_u[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[j]), _mm512_mul_ps(ws, _mm512_set1_ps(xs[j][b])), acc_u[j]);
      acc_u[j] = _mm512_fmadd_ps(wo, _mm512_set1_ps(xb[j][b]), acc_u[j]);
    }
  }
  for (int j = 0; j < NT; ++j)
    _mm512_storeu_ps(out[j], kAcc == 2 ? _mm512_add_ps(acc[0][j], acc[kAcc - 1][j]) : acc[0][j]);
}
#endif

at::Tensor int4_x8_gemv(const at::Tensor& x, const Int4X8Layer& L, const c10::optional<at::Tensor>& bias) {
  check_x(x, L.K, kBlock);
  const at::Tensor x2 = input_2d(x);
  const int64_t B = x2.size(0);
  const QuantActs a = quantize_acts(x2, kBlock, false);  // int8-style: natural order, a scale per block
  const std::vector<float> bsum = block_sums(a, B, L.K);
  at::Tensor bias_keep;
  auto [out, write] = make_output(x, x2, L.N, bias, bias_keep);
  // Rows [8 g8, 8 g8 + R) against every token, kMaxTokens at a time: rows(nt, t0, r) fills
  // r[j][i] for token t0 + j and row 8 g8 + i, nt a std::integral_constant.
  auto all_tokens = [&](int64_t g8, auto width, auto rows) {
    constexpr int R = decltype(width)::value;
    for (int64_t t0 = 0; t0 < B; t0 += kMaxTokens) {
      const int64_t nt = std::min<int64_t>(kMaxTokens, B - t0);
      float r[kMaxTokens][R];
      switch (nt) {
        case 4: rows(std::integral_constant<int, 4>{}, t0, r); break;
        case 3: rows(std::integral_constant<int, 3>{}, t0, r); break;
        case 2: rows(std::integral_constant<int, 2>{}, t0, r); break;
        default: rows(std::integral_constant<int, 1>{}, t0, r);
      }
      for (int64_t j = 0; j < nt; ++j)
        for (int i = 0; i < R; ++i) write(t0 + j, g8 * 8 + i, r[j][i]);
    }
  };
  at::parallel_for(0, L.N / 8, kRowGrain / 8, [&](int64_t g0, int64_t g1) {
    int64_t g8 = g0;
#ifdef AGENTCPU_VNNI512
    for (; B >= kMinTokensX16 && g8 + 2 <= g1; g8 += 2)
      all_tokens(g8, std::integral_constant<int, 16>{}, [&](auto nt, int64_t t0, float (*r)[16]) {
        int4_x16_rows<decltype(nt)::value>(L, g8, a, bsum.data(), t0, r);
      });
#endif
    for (; g8 < g1; ++g8)
      all_tokens(g8, std::integral_constant<int, 8>{}, [&](auto nt, int64_t t0, float (*r)[8]) {
        int4_x8_rows<decltype(nt)::value>(L, g8, a, bsum.data(), t0, r);
      });
  });
  return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
}

}  // namespace

at::Tensor int8_linear_gemv(const at::Tensor& x, const at::Tensor& qweight,
                            const at::Tensor& scales, const c10::optional<at::Tensor>& bias) {
  const int64_t N = qweight.size(0), K = qweight.size(1), G = scales.size(1), group = K / G;
  check_x(x, K, kBlock);
  TORCH_CHECK(group % kBlock == 0, "int8 group size must be a multiple of ", kBlock);
  const at::Tensor x2 = input_2d(x);
  const int64_t B = x2.size(0);
  const QuantActs a = quantize_acts(x2, group, false);
  at::Tensor bias_keep;
  auto [out, write] = make_output(x, x2, N, bias, bias_keep);
  const int8_t* wp = qweight.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  for_rows_and_tokens(N, B, [&](int64_t n, int64_t t0, int64_t nt) {
    const int8_t* w = wp + n * K;
    const float* ws = sp + n * G;
    float r[kMaxTokens];
    if (G == 1) {
      switch (nt) {
        case 4: int8_row<4, true>(w, ws, K, group, a, t0, r, 1); break;
        case 3: int8_row<3, true>(w, ws, K, group, a, t0, r, 1); break;
        case 2: int8_row<2, true>(w, ws, K, group, a, t0, r, 1); break;
        default: int8_row<1, true>(w, ws, K, group, a, t0, r, 1);
      }
    } else {
      switch (nt) {
        case 4: int8_row<4, false>(w, ws, K, group, a, t0, r, 1); break;
        case 3: int8_row<3, false>(w, ws, K, group, a, t0, r, 1); break;
        case 2: int8_row<2, false>(w, ws, K, group, a, t0, r, 1); break;
        default: int8_row<1, false>(w, ws, K, group, a, t0, r, 1);
      }
    }
    for (int64_t j = 0; j < nt; ++j) write(t0 + j, n, r[j]);
  });
  return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
}

// qweight [N, K/2] (rows) or [N/8, K/32, 128] (interleaved, formats.interleave_int4)
at::Tensor int4_linear_gemv(const at::Tensor& x, const at::Tensor& qweight,
                            const at::Tensor& scales, const at::Tensor& offsets,
                            const c10::optional<at::Tensor>& bias) {
  if (is_interleaved(qweight)) return int4_x8_gemv(x, x8_layer(qweight, scales, offsets), bias);
  const int64_t N = qweight.size(0), K = qweight.size(1) * 2, G = scales.size(1);
  const int64_t group = K / G;
  check_x(x, K, kChunk4);
  TORCH_CHECK(group % kBlock == 0, "int4 group size must be a multiple of ", kBlock);
  TORCH_CHECK(group == kBlock || (group % kChunk4 == 0 && ((group / kChunk4) & (group / kChunk4 - 1)) == 0),
              "int4 group must be 32 or 64 times a power of two, got ", group);
  TORCH_CHECK(G <= kMaxGroups, "int4 GEMV takes at most ", kMaxGroups, " groups per row, got ", G);
  const at::Tensor x2 = input_2d(x);
  const int64_t B = x2.size(0);
  const QuantActs a = quantize_acts(x2, group, true);
  at::Tensor bias_keep;
  auto [out, write] = make_output(x, x2, N, bias, bias_keep);
  Int4Layer L{qweight.data_ptr<uint8_t>(), scales.data_ptr<at::Half>(), offsets.data_ptr<at::Half>(),
              N, K, G, group, K / kChunk4, groups_stride(G), 0};
  while ((kChunk4 << L.chunk_shift) < group) ++L.chunk_shift;
  for_rows_and_tokens(N, B, [&](int64_t n, int64_t t0, int64_t nt) {
    float r[kMaxTokens];
    switch (nt) {
      case 4: int4_row<4>(L, n, a, t0, r); break;
      case 3: int4_row<3>(L, n, a, t0, r); break;
      case 2: int4_row<2>(L, n, a, t0, r); break;
      default: int4_row<1>(L, n, a, t0, r);
    }
    for (int64_t j = 0; j < nt; ++j) write(t0 + j, n, r[j]);
  });
  return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
}

// ---- large batch: dequantize row tiles, multiply with at::mm ----

namespace {

void dequant_int8_rows(const int8_t* w, const float* scales, int64_t K, int64_t G, int64_t rows,
                       float* dst) {
  const int64_t group = K / G;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < G; ++g) {
      const __m256 s = _mm256_set1_ps(scales[r * G + g]);
      const int8_t* src = w + r * K + g * group;
      float* d = dst + r * K + g * group;
      int64_t i = 0;
      for (; i + 8 <= group; i += 8) {
        const __m128i q8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + i));
        const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8));
        _mm256_storeu_ps(d + i, _mm256_mul_ps(f, s));
      }
      for (; i < group; ++i) d[i] = static_cast<float>(src[i]) * scales[r * G + g];
    }
}

// 16 packed bytes (one Q4_0-order block) -> 32 floats q * s + m
inline void dequant_int4_block(const uint8_t* b, __m256 s, __m256 m, float* o) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(v, low4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low4);
  const __m128i halves[2] = {lo, hi};
  for (int h = 0; h < 2; ++h)
    for (int i = 0; i < 2; ++i) {
      const __m128i q8 = i == 0 ? halves[h] : _mm_srli_si128(halves[h], 8);
      const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q8));
      _mm256_storeu_ps(o + h * 16 + i * 8, _mm256_fmadd_ps(f, s, m));
    }
}

void dequant_int4_rows(const uint8_t* w, const at::Half* scales, const at::Half* offsets,
                       int64_t K, int64_t G, int64_t rows, float* dst) {
  const int64_t group = K / G;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t blk = 0; blk < K / kBlock; ++blk) {
      const int64_t g = r * G + blk * kBlock / group;
      dequant_int4_block(w + r * K / 2 + blk * 16, _mm256_set1_ps(half_to_float(scales[g])),
                         _mm256_set1_ps(half_to_float(offsets[g])), dst + r * K + blk * kBlock);
    }
}

// Rows [r0, r0 + rows) as fp32 [rows][K] (r0 and rows multiples of 8): each row's 16
// bytes of a block are gathered back into Q4_0 order, then dequantized as in the row layout.
void dequant_int4_x8_rows(const Int4X8Layer& L, int64_t r0, int64_t rows, float* dst) {
  for (int64_t g8 = r0 / 8; g8 < (r0 + rows) / 8; ++g8)
    for (int64_t b = 0; b < L.nblocks; ++b) {
      const uint8_t* wb = L.w + (g8 * L.nblocks + b) * 4 * kBlock;
      const int64_t g = (g8 * L.G + (b >> L.block_shift)) * 8;
      for (int r = 0; r < 8; ++r) {
        alignas(16) uint8_t block[16];
        for (int p = 0; p < 4; ++p) std::memcpy(block + 4 * p, wb + 32 * p + 4 * r, 4);
        const float scale = half_to_float(L.scales[g + r]);
        const float offset = L.offsets ? half_to_float(L.offsets[g + r]) : -8.0f * scale;
        dequant_int4_block(block, _mm256_set1_ps(scale), _mm256_set1_ps(offset),
                           dst + (g8 * 8 + r - r0) * L.K + b * kBlock);
      }
    }
}

constexpr int64_t kTileBytes = 256 * 1024;  // fp32 weight tile kept in L2 while it is used

template <typename Dequant>
at::Tensor tiled_matmul(const at::Tensor& x, int64_t N, int64_t K, bool bf16, Dequant dequant) {
  const at::Tensor xc = x.reshape({-1, K}).to(bf16 ? at::kBFloat16 : at::kFloat).contiguous();
  const int64_t B = xc.size(0);
  const int64_t rows = std::max<int64_t>(16, kTileBytes / (K * 4)) / 16 * 16;
  const int64_t ntiles = (N + rows - 1) / rows;
  at::Tensor out_t = at::empty({N, B}, xc.options().dtype(at::kFloat));
  const at::Tensor xt = xc.t();
  // InferenceMode is thread-local: worker threads take the caller's, or writing into the
  // caller's inference tensors would be refused there.
  const bool inference = c10::InferenceMode::is_enabled();
  at::parallel_for(0, ntiles, 1, [&](int64_t i0, int64_t i1) {
    c10::InferenceMode guard(inference);
    at::Tensor tile = at::empty({rows, K}, at::kFloat);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r0 = i * rows, nr = std::min(rows, N - r0);
      dequant(r0, nr, tile.data_ptr<float>());
      at::Tensor wt = tile.narrow(0, 0, nr);
      if (bf16) wt = wt.to(at::kBFloat16);
      at::Tensor o = out_t.narrow(0, r0, nr);
      o.copy_(at::mm(wt, xt));
    }
  });
  return out_t.t().contiguous();
}

}  // namespace

at::Tensor int8_linear_tiled(const at::Tensor& x, const at::Tensor& qweight,
                             const at::Tensor& scales, const c10::optional<at::Tensor>& bias,
                             bool bf16) {
  const int64_t N = qweight.size(0), K = qweight.size(1), G = scales.size(1);
  check_x(x, K, 1);
  const int8_t* wp = qweight.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  at::Tensor out = tiled_matmul(x, N, K, bf16, [&](int64_t r0, int64_t nr, float* dst) {
    dequant_int8_rows(wp + r0 * K, sp + r0 * G, K, G, nr, dst);
  });
  return finish(out, x, bias);
}

at::Tensor int4_linear_tiled(const at::Tensor& x, const at::Tensor& qweight,
                             const at::Tensor& scales, const at::Tensor& offsets,
                             const c10::optional<at::Tensor>& bias, bool bf16) {
  if (is_interleaved(qweight)) {
    const Int4X8Layer L = x8_layer(qweight, scales, offsets);
    check_x(x, L.K, kBlock);
    return finish(tiled_matmul(x, L.N, L.K, bf16,
                               [&](int64_t r0, int64_t nr, float* dst) { dequant_int4_x8_rows(L, r0, nr, dst); }),
                  x, bias);
  }
  const int64_t N = qweight.size(0), K = qweight.size(1) * 2, G = scales.size(1);
  check_x(x, K, kBlock);
  const uint8_t* wp = qweight.data_ptr<uint8_t>();
  const at::Half* sp = scales.data_ptr<at::Half>();
  const at::Half* mp = offsets.data_ptr<at::Half>();
  at::Tensor out = tiled_matmul(x, N, K, bf16, [&](int64_t r0, int64_t nr, float* dst) {
    dequant_int4_rows(wp + r0 * K / 2, sp + r0 * G, mp + r0 * G, K, G, nr, dst);
  });
  return finish(out, x, bias);
}

// ---- batches on AVX-512 BF16 / AVX2: dequantize 64 rows at a time into the packed bf16 layout
// of `layers/csrc/bf16_packed_tile.h` (prepended to this source by native_build) and run
// its tile over every token: the batch then costs what a bf16 batch costs, plus one
// dequantization of the weights per call (docs/quantization.md).

namespace {

#ifdef AGENTCPU_PACKED

#ifdef AGENTCPU_PACKED_BF16
// fp32 rows [16][K] -> one packed block [K / 2][16][2] bf16: for each k pair, the 16 rows'
// pairs are gathered as 64-bit lanes and rounded to bf16 together.
void pack_block(const float* rows, int64_t K, uint16_t* dst) {
  const int64_t pairs = K / 2;
  const __m512i lo = _mm512_mullo_epi64(_mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7), _mm512_set1_epi64(pairs));
  const __m512i hi = _mm512_add_epi64(lo, _mm512_set1_epi64(8 * pairs));
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512i step = _mm512_set1_epi64(p);
    const __m512d a = _mm512_i64gather_pd(_mm512_add_epi64(lo, step), rows, 8);
    const __m512d b = _mm512_i64gather_pd(_mm512_add_epi64(hi, step), rows, 8);
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_castpd_ps(b), _mm512_castpd_ps(a));
    _mm512_storeu_si512(dst + p * 32, reinterpret_cast<__m512i>(v));
  }
}
#else
// AVX2: the same, 4 rows' pairs per 64-bit gather, rounded to nearest even 8 values at a time.
void pack_block(const float* rows, int64_t K, uint16_t* dst) {
  const int64_t pairs = K / 2;
  const __m256i base = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 0, 0, 0, 0), _mm256_set1_epi32(static_cast<int>(pairs)));
  const __m128i lanes = _mm256_castsi256_si128(base);
  for (int64_t p = 0; p < pairs; ++p) {
    const auto* src = reinterpret_cast<const double*>(rows) + p;
    for (int q = 0; q < 4; ++q) {  // rows 4q .. 4q + 3
      const __m256d v = _mm256_i32gather_pd(src + q * 4 * pairs, lanes, 8);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + p * 32 + q * 8), agentcpu_avx2::to_bf16(_mm256_castpd_ps(v)));
    }
  }
}
#endif

// Dequant(r0, rows, dst): weight rows [r0, r0 + rows) as fp32 [rows][K].
template <typename Dequant>
at::Tensor packed_matmul(const at::Tensor& x, int64_t N, int64_t K, const c10::optional<at::Tensor>& bias,
                         Dequant dequant) {
  using namespace agentcpu_packed;
  TORCH_CHECK(N % kBlockRows == 0 && K % 2 == 0, "packed path needs N % 16 == 0 and even K, got N=", N,
              " K=", K);
  LinearIO io = linear_io(x, K, N, bias);
  const int64_t M = io.M;
  const float* bp = io.bias;
  const at::Tensor x_tile = tile_input(io);
  const TileInput* xp = tile_input_ptr(x_tile);
  auto* op = reinterpret_cast<uint16_t*>(io.out.data_ptr<at::BFloat16>());
  const int64_t tile_rows = kBlocksPerTile * kBlockRows;
  const int64_t tasks = (N + tile_rows - 1) / tile_rows;
  if (M > 0) {
    at::parallel_for(0, tasks, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> rows(tile_rows * K);
      std::vector<uint16_t> packed(tile_rows * K);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t r0 = i * tile_rows, nb = std::min(tile_rows, N - r0) / kBlockRows;
        dequant(r0, nb * kBlockRows, rows.data());
        for (int64_t b = 0; b < nb; ++b) pack_block(rows.data() + b * kBlockRows * K, K, packed.data() + b * kBlockRows * K);
        blocks_range(packed.data(), K, xp, M, op + r0, N, bp != nullptr ? bp + r0 : nullptr, 0, nb);
      }
    });
  }
  return in_x_shape(io.out, x);
}

#endif  // AGENTCPU_PACKED

}  // namespace

// Whether this build has the packed batch path (AVX-512 BF16, or AVX2 + FMA).
bool quant_packed_available() {
#ifdef AGENTCPU_PACKED
  return true;
#else
  return false;
#endif
}

at::Tensor int8_linear_packed(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                              const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(quant_packed_available(), "this build has no packed batch path (needs AVX-512 BF16 or AVX2 + FMA)");
  const int64_t N = qweight.size(0), K = qweight.size(1), G = scales.size(1);
  check_x(x, K, 1);
  at::Tensor out;
#ifdef AGENTCPU_PACKED
  const int8_t* wp = qweight.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  out = packed_matmul(x, N, K, bias, [&](int64_t r0, int64_t nr, float* dst) {
    dequant_int8_rows(wp + r0 * K, sp + r0 * G, K, G, nr, dst);
  });
#endif
  return out;
}

at::Tensor int4_linear_packed(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                              const at::Tensor& offsets, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(quant_packed_available(), "this build has no packed batch path (needs AVX-512 BF16 or AVX2 + FMA)");
#ifdef AGENTCPU_PACKED
  if (is_interleaved(qweight)) {
    const Int4X8Layer L = x8_layer(qweight, scales, offsets);
    check_x(x, L.K, kBlock);
    return packed_matmul(x, L.N, L.K, bias,
                         [&](int64_t r0, int64_t nr, float* dst) { dequant_int4_x8_rows(L, r0, nr, dst); });
  }
#endif
  const int64_t N = qweight.size(0), K = qweight.size(1) * 2, G = scales.size(1);
  check_x(x, K, kBlock);
  at::Tensor out;
#ifdef AGENTCPU_PACKED
  const uint8_t* wp = qweight.data_ptr<uint8_t>();
  const at::Half* sp = scales.data_ptr<at::Half>();
  const at::Half* mp = offsets.data_ptr<at::Half>();
  out = packed_matmul(x, N, K, bias, [&](int64_t r0, int64_t nr, float* dst) {
    dequant_int4_rows(wp + r0 * K / 2, sp + r0 * G, mp + r0 * G, K, G, nr, dst);
  });
#endif
  return out;
}
