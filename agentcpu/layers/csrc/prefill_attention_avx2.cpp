// Causal attention of a prefill chunk over its paged context, bf16 cache, on CPUs with
// AVX2 + FMA and no bf16 arithmetic (the sibling of `prefill_attention.cpp`, which needs
// AVX-512 BF16): the agent case, where a follow-up turn's few hundred new tokens attend
// to thousands of cached ones.
//
// out[i, h] = softmax_j<=p_i(q[i, h] . k_j * scale) v_j, with p_i = C - L + i the
// absolute position of query i of L, and keys/values j < C read from the cache through
// `slots` (the chunk's own K/V are already written there).
//
// PyTorch's SDPA ran a 300-token chunk over 2,300 keys (Qwen2.5-0.5B heads) at ~77
// GFLOPS on 2 Zen 3 cores, a third of that chunk's prefill time. Here flash attention in
// fp32 FMAs:
// - a thread's span is one KV head and a run of query positions, i.e. rows (query,
//   head) sharing the same keys; the span walks the key blocks of 64 once, widening
//   each block to fp32 into L1 (keys as [8][D][8]: 8 keys in a ymm per channel; values
//   as [D/8][64][8]: 8 channels in a ymm per key), and every 6-row tile of the span uses
//   the widened block while it is hot (widening per 16 queries instead cost 16 % of
//   the time at 300 x 2,300);
// - a tile computes its scores S = q K^T (6 rows x 16 keys = 12 ymm per pass, a
//   broadcast query value against 8 keys), an online softmax in fp32 per row (running
//   max and sum; the output rescaled when the max moves), then O += P V (6 rows x 16
//   channels = 12 ymm per pass, a broadcast probability against 8 channels), O kept in
//   the span's fp32 accumulators between blocks.
// Blocks past a tile's last position are skipped; the block holding it is masked.
// `avx2_math.h` and `bf16_attention_common.h` come first (native_build's prelude).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#define AGENTCPU_PREFILL_AVX2 1
#if defined(__AVX512F__)
#define AGENTCPU_PREFILL_AVX512 1  // the same flash attention on 16 lanes (`tile_block512`)
#endif
#endif

namespace {

#ifdef AGENTCPU_PREFILL_AVX2
using namespace agentcpu_avx2;

constexpr int64_t kKeyBlock = 64;  // keys per block: 8 ymm (4 zmm) of scores per row
constexpr int kRows = 6;           // rows per tile: 6 x 2 accumulators + 2 operands + 1 broadcast
constexpr int64_t kQueriesPerItem = 16;
#ifdef AGENTCPU_PREFILL_AVX512
constexpr int64_t kLanes = 16;  // fp32 lanes of a vector register
#else
constexpr int64_t kLanes = 8;
#endif

// One key block of one KV head, widened to fp32; keys past the context are zero.
struct WideBlock {
  std::vector<float> keys;    // [kKeyBlock / kLanes][D][kLanes]
  std::vector<float> values;  // [D / kLanes][kKeyBlock][kLanes]
};

void widen_block(const uint16_t* k_cache, const uint16_t* v_cache, const int64_t* slots, int64_t C,
                 int64_t KVH, int64_t kh, int64_t D, int64_t first, WideBlock& wb) {
  const int64_t n = std::min(kKeyBlock, C - first);
  if (n < kKeyBlock) {
    std::fill(wb.keys.begin(), wb.keys.end(), 0.f);
    std::fill(wb.values.begin(), wb.values.end(), 0.f);
  }
  for (int64_t j = 0; j < n; ++j) {
    const int64_t row = (slots[first + j] * KVH + kh) * D;
    const uint16_t* k = k_cache + row;
    const uint16_t* v = v_cache + row;
    float* kdst = wb.keys.data() + (j / kLanes) * D * kLanes + j % kLanes;
    for (int64_t d = 0; d < D; ++d) {
      const uint32_t bits = static_cast<uint32_t>(k[d]) << 16;
      std::memcpy(kdst + d * kLanes, &bits, sizeof(bits));
    }
    float* vdst = wb.values.data() + j * kLanes;
#ifdef AGENTCPU_PREFILL_AVX512
    for (int64_t c = 0; c < D; c += 16) _mm512_storeu_ps(vdst + (c / 16) * kKeyBlock * 16, agentcpu_avx512::widen_bf16(v + c));
#else
    for (int64_t c = 0; c < D; c += 8) _mm256_storeu_ps(vdst + (c / 8) * kKeyBlock * 8, widen_bf16(v + c));
#endif
  }
}

// The running state of a span's rows: fp32 queries, output accumulators, max and sum,
// and each row's query position.
struct SpanRows {
  std::vector<float> q, o, m, l;
  std::vector<int64_t> pos;
};

#ifdef AGENTCPU_PREFILL_AVX512
// Rows [r0, r0 + T) of a span against the widened block at `first`, on 16 lanes: the
// scores of all 64 keys in one pass (T x 4 zmm, a broadcast query value against 16 keys),
// then O += P V 64 channels a pass (T x 4 zmm). D is a template parameter so every row's
// query and output sit at constant offsets from one pointer.
template <int T, int D>
void tile_block512(SpanRows& rows, int64_t r0, const WideBlock& wb, int64_t first, float scale) {
  using namespace agentcpu_avx512;
  constexpr int V = kKeyBlock / 16;  // zmm per row of scores, and per pass of channels
  alignas(64) float s[kRows][kKeyBlock];
  const int64_t* pos = rows.pos.data() + r0;
  const float* q = rows.q.data() + r0 * D;
  {
    __m512 acc[T][V];
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t)
#pragma GCC unroll 4
      for (int g = 0; g < V; ++g) acc[t][g] = _mm512_setzero_ps();
    const float* k = wb.keys.data();
    for (int64_t d = 0; d < D; ++d) {
      __m512 kv[V];
#pragma GCC unroll 4
      for (int g = 0; g < V; ++g) kv[g] = _mm512_loadu_ps(k + (g * D + d) * 16);
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) {
        const __m512 qv = _mm512_set1_ps(q[t * D + d]);
#pragma GCC unroll 4
        for (int g = 0; g < V; ++g) acc[t][g] = _mm512_fmadd_ps(qv, kv[g], acc[t][g]);
      }
    }
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t)
#pragma GCC unroll 4
      for (int g = 0; g < V; ++g) _mm512_store_ps(s[t] + g * 16, acc[t][g]);
  }
  // online softmax per row: s becomes the probabilities
  float corr[kRows];
  for (int t = 0; t < T; ++t) {
    const int64_t r = r0 + t;
    for (int64_t j = std::max<int64_t>(0, pos[t] + 1 - first); j < kKeyBlock; ++j)
      s[t][j] = -std::numeric_limits<float>::infinity();
    __m512 mx = _mm512_load_ps(s[t]);
    for (int64_t j = 16; j < kKeyBlock; j += 16) mx = _mm512_max_ps(mx, _mm512_load_ps(s[t] + j));
    const float m_new = std::max(rows.m[r], _mm512_reduce_max_ps(mx) * scale);
    const __m512 sc = _mm512_set1_ps(scale), shift = _mm512_set1_ps(m_new);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < kKeyBlock; j += 16) {
      const __m512 e = exp_nonpositive(_mm512_fmsub_ps(_mm512_load_ps(s[t] + j), sc, shift));
      _mm512_store_ps(s[t] + j, e);
      sum = _mm512_add_ps(sum, e);
    }
    corr[t] = std::exp(rows.m[r] - m_new);  // 0 at the first block (m = -inf)
    rows.l[r] = rows.l[r] * corr[t] + _mm512_reduce_add_ps(sum);
    rows.m[r] = m_new;
  }
  // O = O * corr + P V; keys past the tile's last position add 0
  const int64_t keys = std::min(kKeyBlock, pos[T - 1] + 1 - first);
  float* o = rows.o.data() + r0 * D;
  for (int64_t c = 0; c < D; c += V * 16) {
    __m512 acc[T][V];
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      const __m512 cv = _mm512_set1_ps(corr[t]);
#pragma GCC unroll 4
      for (int g = 0; g < V; ++g) acc[t][g] = _mm512_mul_ps(_mm512_loadu_ps(o + t * D + c + g * 16), cv);
    }
    const float* v = wb.values.data() + (c / 16) * kKeyBlock * 16;  // channel group g at v + g * kKeyBlock * 16
    for (int64_t j = 0; j < keys; ++j) {
      __m512 vv[V];
#pragma GCC unroll 4
      for (int g = 0; g < V; ++g) vv[g] = _mm512_loadu_ps(v + (g * kKeyBlock + j) * 16);
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) {
        const __m512 p = _mm512_set1_ps(s[t][j]);
#pragma GCC unroll 4
        for (int g = 0; g < V; ++g) acc[t][g] = _mm512_fmadd_ps(p, vv[g], acc[t][g]);
      }
    }
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t)
#pragma GCC unroll 4
      for (int g = 0; g < V; ++g) _mm512_storeu_ps(o + t * D + c + g * 16, acc[t][g]);
  }
}
#else
// Rows [r0, r0 + T) of a span against the widened block at `first`.
template <int T>
void tile_block(SpanRows& rows, int64_t r0, int64_t D, const WideBlock& wb, int64_t first,
                float scale) {
  alignas(32) float s[kRows][kKeyBlock];
  const int64_t* pos = rows.pos.data() + r0;
  const float* q = rows.q.data() + r0 * D;
  // S = q K^T, 16 keys a pass
  for (int64_t g = 0; g < kKeyBlock / 8; g += 2) {
    __m256 acc[T][2];
#pragma GCC unroll 6
    for (int t = 0; t < T; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
    const float* k0 = wb.keys.data() + g * D * 8;
    const float* k1 = k0 + D * 8;
    for (int64_t d = 0; d < D; ++d) {
      const __m256 a = _mm256_loadu_ps(k0 + d * 8), b = _mm256_loadu_ps(k1 + d * 8);
#pragma GCC unroll 6
      for (int t = 0; t < T; ++t) {
        const __m256 qv = _mm256_broadcast_ss(q + t * D + d);
        acc[t][0] = _mm256_fmadd_ps(qv, a, acc[t][0]);
        acc[t][1] = _mm256_fmadd_ps(qv, b, acc[t][1]);
      }
    }
#pragma GCC unroll 6
    for (int t = 0; t < T; ++t) {
      _mm256_store_ps(s[t] + g * 8, acc[t][0]);
      _mm256_store_ps(s[t] + g * 8 + 8, acc[t][1]);
    }
  }
  // online softmax per row: s becomes the probabilities
  float corr[kRows];
  for (int t = 0; t < T; ++t) {
    const int64_t r = r0 + t;
    for (int64_t j = std::max<int64_t>(0, pos[t] + 1 - first); j < kKeyBlock; ++j)
      s[t][j] = -std::numeric_limits<float>::infinity();
    __m256 mx = _mm256_load_ps(s[t]);
    for (int64_t j = 8; j < kKeyBlock; j += 8) mx = _mm256_max_ps(mx, _mm256_load_ps(s[t] + j));
    const float m_new = std::max(rows.m[r], hmax(mx) * scale);
    const __m256 sc = _mm256_set1_ps(scale), shift = _mm256_set1_ps(m_new);
    __m256 sum = _mm256_setzero_ps();
    for (int64_t j = 0; j < kKeyBlock; j += 8) {
      const __m256 e = exp_nonpositive(_mm256_fmsub_ps(_mm256_load_ps(s[t] + j), sc, shift));
      _mm256_store_ps(s[t] + j, e);
      sum = _mm256_add_ps(sum, e);
    }
    corr[t] = std::exp(rows.m[r] - m_new);  // 0 at the first block (m = -inf)
    rows.l[r] = rows.l[r] * corr[t] + hsum(sum);
    rows.m[r] = m_new;
  }
  // O = O * corr + P V, 16 channels a pass; keys past the tile's last position add 0
  const int64_t keys = std::min(kKeyBlock, pos[T - 1] + 1 - first);
  for (int64_t c = 0; c < D; c += 16) {
    __m256 acc[T][2];
#pragma GCC unroll 6
    for (int t = 0; t < T; ++t) {
      float* o = rows.o.data() + (r0 + t) * D + c;
      const __m256 cv = _mm256_set1_ps(corr[t]);
      acc[t][0] = _mm256_mul_ps(_mm256_loadu_ps(o), cv);
      acc[t][1] = _mm256_mul_ps(_mm256_loadu_ps(o + 8), cv);
    }
    const float* v0 = wb.values.data() + (c / 8) * kKeyBlock * 8;
    const float* v1 = v0 + kKeyBlock * 8;
    for (int64_t j = 0; j < keys; ++j) {
      const __m256 a = _mm256_loadu_ps(v0 + j * 8), b = _mm256_loadu_ps(v1 + j * 8);
#pragma GCC unroll 6
      for (int t = 0; t < T; ++t) {
        const __m256 p = _mm256_broadcast_ss(s[t] + j);
        acc[t][0] = _mm256_fmadd_ps(p, a, acc[t][0]);
        acc[t][1] = _mm256_fmadd_ps(p, b, acc[t][1]);
      }
    }
#pragma GCC unroll 6
    for (int t = 0; t < T; ++t) {
      float* o = rows.o.data() + (r0 + t) * D + c;
      _mm256_storeu_ps(o, acc[t][0]);
      _mm256_storeu_ps(o + 8, acc[t][1]);
    }
  }
}
#endif  // AGENTCPU_PREFILL_AVX512

// A tile of T rows against the widened block, on the widest path this build has.
template <int T>
void tile_rows(SpanRows& rows, int64_t r0, int64_t D, const WideBlock& wb, int64_t first, float scale) {
#ifdef AGENTCPU_PREFILL_AVX512
  if (D == 64) tile_block512<T, 64>(rows, r0, wb, first, scale);
  else tile_block512<T, 128>(rows, r0, wb, first, scale);
#else
  tile_block<T>(rows, r0, D, wb, first, scale);
#endif
}

#endif  // AGENTCPU_PREFILL_AVX2

}  // namespace

// Whether this build has the AVX2 path.
bool prefill_attention_avx2_available() {
#ifdef AGENTCPU_PREFILL_AVX2
  return true;
#else
  return false;
#endif
}

// q [L, H, D] bf16 (last dim contiguous); caches [S, KVH, D] bf16 contiguous; slots int64
// [C] (C >= L: the context, chunk included, in order). D must be 64 or 128.
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& slots, double scale) {
  TORCH_CHECK(prefill_attention_avx2_available(), "this build has no AVX2 path");
  const agentcpu_attention::PrefillArgs args = agentcpu_attention::prefill_args(q, k_cache, v_cache, slots);
  const int64_t L = args.L, H = args.H, D = args.D, KVH = args.KVH, C = args.C;
  const at::Tensor& sl = args.slots;
  const at::Tensor& out = args.out;
#ifdef AGENTCPU_PREFILL_AVX2
  const int64_t G = H / KVH;
  const auto* qp = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  const auto* kc = reinterpret_cast<const uint16_t*>(k_cache.data_ptr<at::BFloat16>());
  const auto* vc = reinterpret_cast<const uint16_t*>(v_cache.data_ptr<at::BFloat16>());
  const int64_t* sp = sl.data_ptr<int64_t>();
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const float fscale = static_cast<float>(scale);
  const int64_t qblocks = (L + kQueriesPerItem - 1) / kQueriesPerItem;
  pybind11::gil_scoped_release no_gil;  // the HTTP thread may run Python meanwhile
  // Items are (KV head, 16 queries); a thread takes each run of its items that share a
  // KV head as one span, so each key block is widened once per thread and head.
  at::parallel_for(0, KVH * qblocks, 1, [&](int64_t i0, int64_t i1) {
    WideBlock wb{std::vector<float>(kKeyBlock * D), std::vector<float>(kKeyBlock * D)};
    SpanRows rows;
    for (int64_t g0 = i0; g0 < i1;) {
      const int64_t kh = g0 / qblocks, g1 = std::min(i1, (kh + 1) * qblocks);
      const int64_t i_begin = (g0 % qblocks) * kQueriesPerItem;
      const int64_t i_end = std::min(L, ((g1 - 1) % qblocks + 1) * kQueriesPerItem);
      const int64_t R = (i_end - i_begin) * G;  // row r: query i_begin + r / G, head kh * G + r % G
      rows.q.resize(R * D);
      rows.o.assign(R * D, 0.f);
      rows.m.assign(R, -std::numeric_limits<float>::infinity());
      rows.l.assign(R, 0.f);
      rows.pos.resize(R);
      for (int64_t r = 0; r < R; ++r) {
        const int64_t i = i_begin + r / G, h = kh * G + r % G;
        const uint16_t* src = qp + i * q.stride(0) + h * q.stride(1);
        for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(rows.q.data() + r * D + d, widen_bf16(src + d));
        rows.pos[r] = C - L + i;
      }
      const int64_t blocks = rows.pos[R - 1] / kKeyBlock + 1;
      for (int64_t kb = 0; kb < blocks; ++kb) {
        const int64_t first = kb * kKeyBlock;
        widen_block(kc, vc, sp, C, KVH, kh, D, first, wb);
        for (int64_t r0 = 0; r0 < R; r0 += kRows) {
          const int T = static_cast<int>(std::min<int64_t>(kRows, R - r0));
          if (rows.pos[r0 + T - 1] < first) continue;  // this tile sees no key of the block
          agentcpu_attention::dispatch_rows(T, [&](auto t) { tile_rows<decltype(t)::value>(rows, r0, D, wb, first, fscale); });
        }
      }
      for (int64_t r = 0; r < R; ++r) {
        const int64_t i = i_begin + r / G, h = kh * G + r % G;
        const __m256 inv = _mm256_set1_ps(1.f / rows.l[r]);
        const float* o = rows.o.data() + r * D;
        uint16_t* dst = op + (i * H + h) * D;
        for (int64_t d = 0; d < D; d += 8)
          _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + d), to_bf16(_mm256_mul_ps(_mm256_loadu_ps(o + d), inv)));
      }
      g0 = g1;
    }
  });
#endif
  return out;
}
