// Decode attention (one query token per sequence) over paged bf16 KV slots, on CPUs with
// AVX-512 BF16: the G query heads of a KV head against 16 keys at a time, every product
// a VDPBF16PS.
//
// out[b, h] = softmax_l(q[b, h] . k_l * scale) v_l over the sequence's slots l < len_b.
//
// The AVX2 kernel in `fused_ops.cpp` forms each score as an fp32 dot product and one
// horizontal sum per key (~70 vector ops per key for 7 heads of 64). Here, per 16 keys:
// - scores: the 16 key rows (gathered by slot) are transposed in registers, 16 x 16
//   32-bit pairs at a time, into lines of "one k pair of 16 keys"; a broadcast query pair
//   times such a line adds into 16 lanes, one per key, so a head's 16 scores come out as
//   one vector with no horizontal sum (D/2 VDPBF16PS per head);
// - values: two keys' rows are interleaved by one VPERMT2W into a line of "16 channels
//   of 2 keys", times the broadcast pair of their probabilities (rounded to bf16, as
//   flash attention does), into 16 channel lanes per head.
// The softmax runs over the scores of all keys in fp32 between the two passes.
// `bf16_attention_common.h` comes first (native_build's prelude).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

using namespace agentcpu_attention;

namespace {

constexpr int kMaxGroup = 8;  // query heads per KV head handled here (else the AVX2 kernel)
constexpr int kKeys = 16;     // keys per score vector

#ifdef AGENTCPU_ATTENTION_BF16

// 16 x 16 32-bit transpose in place: r[i] lane j <-> r[j] lane i.
inline void transpose16(__m512i (&r)[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // now 128-bit lane q of r[4a + b] holds column 4q + b of rows 4a..4a+3; two stages of
  // 128-bit shuffles gather lane q of r[b], r[4 + b], r[8 + b], r[12 + b] into r[4q + b]
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
  }
}

inline void prefetch_row(const uint16_t* row, int64_t D) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < D * 2; b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
}

struct Scratch {
  std::vector<float> scores;     // [G][Lp]
  std::vector<uint16_t> probs;   // [G][Lp] bf16
  std::vector<float> acc;        // [G][D]
};

// One (sequence, KV head): G query heads (rows of q at stride q_head), len slots.
template <int G>
void decode_item(const uint16_t* q, int64_t q_head, const uint16_t* kc, const uint16_t* vc,
                 const int64_t* slots, int64_t len, int64_t KVH, int64_t kh, int64_t D, float scale_log2e,
                 Scratch& sc, uint16_t* out, int64_t out_head) {
  const int64_t groups = (len + kKeys - 1) / kKeys, Lp = groups * kKeys, row_stride = KVH * D;
  sc.scores.resize(G * Lp);
  sc.probs.resize(G * Lp + 2);
  sc.acc.assign(G * D, 0.f);
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  alignas(64) static thread_local uint16_t zero_row[512] = {};
  // scores, 16 keys at a time
  for (int64_t g16 = 0; g16 < groups; ++g16) {
    const uint16_t* rows[kKeys];
    const int valid = static_cast<int>(std::min<int64_t>(kKeys, len - g16 * kKeys));
    for (int i = 0; i < kKeys; ++i)
      rows[i] = i < valid ? kc + slots[g16 * kKeys + i] * row_stride + kh * D : zero_row;
    // the next 16 keys' rows (blocks are scattered: the hardware prefetcher restarts)
    for (int64_t i = (g16 + 1) * kKeys; i < std::min(len, (g16 + 2) * kKeys); ++i)
      prefetch_row(kc + slots[i] * row_stride + kh * D, D);
    __m512 s[G];
    for (int g = 0; g < G; ++g) s[g] = _mm512_setzero_ps();
    for (int64_t d0 = 0; d0 < D; d0 += 32) {  // 16 pairs of 16 keys per round
      __m512i lines[16];
      for (int i = 0; i < kKeys; ++i) lines[i] = _mm512_loadu_si512(rows[i] + d0);
      transpose16(lines);  // lines[p]: pair p of the 16 keys
      for (int p = 0; p < 16; ++p)
        for (int g = 0; g < G; ++g)
          s[g] = _mm512_dpbf16_ps(s[g], bh(lines[p]), broadcast_pair(q + g * q_head + d0 + 2 * p));
    }
    const __mmask16 live = static_cast<__mmask16>((1u << valid) - 1);
    for (int g = 0; g < G; ++g)
      _mm512_storeu_ps(sc.scores.data() + g * Lp + g16 * kKeys, _mm512_mask_mov_ps(neg_inf, live, s[g]));
  }
  // softmax per head (fp32), probabilities rounded to bf16; sums of what is multiplied
  float denom[kMaxGroup];
  for (int g = 0; g < G; ++g) {
    const float* sg = sc.scores.data() + g * Lp;
    __m512 mx = neg_inf;
    for (int64_t l = 0; l < Lp; l += kKeys) mx = _mm512_max_ps(mx, _mm512_loadu_ps(sg + l));
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    const __m512 sl = _mm512_set1_ps(scale_log2e);
    __m512 sum = _mm512_setzero_ps();
    uint16_t* pg = sc.probs.data() + g * Lp;
    for (int64_t l = 0; l < Lp; l += kKeys) {
      const __m512 e = exp2_nonpositive(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(sg + l), m), sl));
      const __m256i e16 = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(e));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pg + l), e16);
      sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(e16), 16)));
    }
    denom[g] = _mm512_reduce_add_ps(sum);
  }
  // values: O[g] += p[g, l] v_l, two keys and 16 channels per line
  const __m512i lo_idx = pair_interleave_index(0), hi_idx = pair_interleave_index(16);
  for (int64_t d0 = 0; d0 < D; d0 += 32) {
    __m512 o_lo[G], o_hi[G];  // channels d0..d0+15, d0+16..d0+31
    for (int g = 0; g < G; ++g) o_lo[g] = o_hi[g] = _mm512_setzero_ps();
    for (int64_t l = 0; l < len; l += 2) {
      if (l + kKeys + 1 < len) {
        _mm_prefetch(reinterpret_cast<const char*>(vc + slots[l + kKeys] * row_stride + kh * D + d0), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(vc + slots[l + kKeys + 1] * row_stride + kh * D + d0), _MM_HINT_T0);
      }
      const __m512i a = _mm512_loadu_si512(vc + slots[l] * row_stride + kh * D + d0);
      const __m512i b = l + 1 < len ? _mm512_loadu_si512(vc + slots[l + 1] * row_stride + kh * D + d0)
                                    : _mm512_setzero_si512();
      const __m512bh lo = bh(_mm512_permutex2var_epi16(a, lo_idx, b));
      const __m512bh hi = bh(_mm512_permutex2var_epi16(a, hi_idx, b));
      for (int g = 0; g < G; ++g) {
        // p[g, l], p[g, l + 1] (0 past the end: the probs row is padded)
        const __m512bh pv = broadcast_pair(sc.probs.data() + g * Lp + l);
        o_lo[g] = _mm512_dpbf16_ps(o_lo[g], lo, pv);
        o_hi[g] = _mm512_dpbf16_ps(o_hi[g], hi, pv);
      }
    }
    for (int g = 0; g < G; ++g) {
      const __m512 inv = _mm512_set1_ps(1.f / denom[g]);
      uint16_t* o = out + g * out_head + d0;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o),
                          reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_mul_ps(o_lo[g], inv))));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16),
                          reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_mul_ps(o_hi[g], inv))));
    }
  }
}

using ItemFn = void (*)(const uint16_t*, int64_t, const uint16_t*, const uint16_t*, const int64_t*, int64_t,
                        int64_t, int64_t, int64_t, float, Scratch&, uint16_t*, int64_t);

ItemFn item_for(int64_t G) {
  switch (G) {
    case 1: return decode_item<1>;
    case 2: return decode_item<2>;
    case 3: return decode_item<3>;
    case 4: return decode_item<4>;
    case 5: return decode_item<5>;
    case 6: return decode_item<6>;
    case 7: return decode_item<7>;
    case 8: return decode_item<8>;
    default: return nullptr;
  }
}

#endif  // AGENTCPU_ATTENTION_BF16

}  // namespace

// Whether this build has the AVX-512 BF16 path.
bool decode_attention_bf16_available() { return built_with_avx512_bf16(); }

// q [B, H, D] bf16 (last dim contiguous); caches [S, KVH, D] bf16 contiguous; slots int64
// [B, L] (padded); lens int64 [B] (1 <= len <= L). D a multiple of 32 up to 512, at most
// 8 query heads per KV head. Returns [B, H, D].
at::Tensor decode_attention_bf16(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& slots, const at::Tensor& lens, double scale) {
  TORCH_CHECK(built_with_avx512_bf16(), "this build has no AVX-512 BF16 path");
  check_q_and_cache(q, k_cache, v_cache);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = k_cache.size(1);
  TORCH_CHECK(D % 32 == 0 && D <= 512, "head_dim must be a multiple of 32 up to 512");
  TORCH_CHECK(H / KVH <= kMaxGroup, "at most ", kMaxGroup, " query heads per KV head");
  TORCH_CHECK(slots.scalar_type() == at::kLong && lens.scalar_type() == at::kLong, "int64 slots/lens");
  TORCH_CHECK(slots.size(0) == B && lens.numel() == B, "one slot row per sequence");
  const at::Tensor sl = slots.contiguous(), ln = lens.contiguous();
  const int64_t L = sl.size(1);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = ln.data_ptr<int64_t>()[b];
    TORCH_CHECK(len >= 1 && len <= L, "sequence ", b, " has context length ", len);
  }
  at::Tensor out = at::empty({B, H, D}, q.options());
#ifdef AGENTCPU_ATTENTION_BF16
  agentcpu_gil::ReleaseIfHeld no_gil;  // the HTTP thread may run Python meanwhile
  const int64_t G = H / KVH;
  const ItemFn fn = item_for(G);
  const auto* qp = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  const auto* kp = reinterpret_cast<const uint16_t*>(k_cache.data_ptr<at::BFloat16>());
  const auto* vp = reinterpret_cast<const uint16_t*>(v_cache.data_ptr<at::BFloat16>());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const int64_t* sp = sl.data_ptr<int64_t>();
  const int64_t* lp = ln.data_ptr<int64_t>();
  const float scale_log2e = static_cast<float>(scale) * 1.4426950408889634f;
  at::parallel_for(0, B * KVH, 1, [&](int64_t i0, int64_t i1) {
    Scratch scratch;
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t b = item / KVH, kh = item % KVH;
      fn(qp + b * q.stride(0) + kh * G * q.stride(1), q.stride(1), kp, vp, sp + b * L, lp[b], KVH, kh, D,
         scale_log2e, scratch, op + (b * H + kh * G) * D, D);
    }
  });
#endif
  return out;
}
