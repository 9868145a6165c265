// Decode attention (one query token per sequence) over paged bf16 KV slots, on CPUs with
// AVX-512 BF16: the G query heads of a KV head against 16 keys at a time, every product
// a VDPBF16PS.
//
// out[b, h] = softmax_l(q[b, h] . k_l * scale) v_l over the sequence's slots l < len_b.
//
// Work is split along the context in chunks of all KV heads (`decode_chunks.h`; a
// 16-token block's rows are one contiguous run). Per item, three passes over the chunk:
// - scores: for each 16 keys (gathered by slot), the next 16 keys' rows are prefetched
//   into L1 and these keys' value rows into L2; per KV head the 16 key rows are
//   transposed in registers, 16 x 16 32-bit pairs at a time, into lines of "one k pair of
//   16 keys"; a broadcast query pair times such a line adds into 16 lanes, one per key,
//   so a head's 16 scores come out as one vector with no horizontal sum;
// - softmax per head over the chunk in fp32, relative to the chunk's own max,
//   probabilities rounded to bf16 (as flash attention does);
// - values: two keys' rows are interleaved by one VPERMT2W into a line of "16 channels
//   of 2 keys", times the broadcast pair of their probabilities, into 16 channel lanes
//   per head (the rows are in L2 by now).
// A sequence of one chunk is normalised and written by its item; longer ones leave
// (max, sum, unnormalised output) per chunk and head, merged afterwards.
// Before this split (an item per sequence and KV head, each reading half of every
// 256-byte Qwen slot row), the KV streamed at 9-13 GB/s from DRAM (docs/kernels.md).
// `bf16_attention_common.h` and `decode_chunks.h` come first (native_build's prelude).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

using namespace agentcpu_attention;

namespace {

constexpr int kMaxGroup = 8;            // query heads per KV head handled here (else the AVX2 kernel)
constexpr int kKeys = 16;               // keys per score vector

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

// Software prefetch on Zen 4 hides the latency of the scattered KV blocks only when the
// prefetches are spread out, one or two per line the loop consumes: a burst of 64 (a
// block's lines at once) overflowed the miss buffers and measured no faster than none.
// A cursor over the lines of up to 32 rows that the score loop advances two lines per
// step; T1 (into L2), which measured faster than T0 for these streams.
struct LineCursor {
  const char* rows[2 * kKeys];
  int nrows = 0, r = 0;
  int64_t row_bytes = 0, off = 0;

  void reset(int64_t bytes) {
    nrows = r = 0;
    off = 0;
    row_bytes = bytes;
  }
  // The rows of keys [j0, j0 + 16) ∩ [0, n) of `cache` (slots), all heads.
  void add_group(const uint16_t* cache, const int64_t* slots, int64_t j0, int64_t n, int64_t row) {
    for (int64_t j = j0; j < std::min(n, j0 + kKeys); ++j) rows[nrows++] = reinterpret_cast<const char*>(cache + slots[j] * row);
  }
  inline void next() {
    if (r >= nrows) return;
    _mm_prefetch(rows[r] + off, _MM_HINT_T1);
    off += 64;
    if (off >= row_bytes) {
      off = 0;
      ++r;
    }
  }
  void all() {
    while (r < nrows) next();
  }
};

struct Scratch {
  std::vector<float> scores;     // [H][np]
  std::vector<uint16_t> probs;   // [H][np] bf16 (+ a pair of padding)
};

// A chunk's result per query head h: the max score m[h] (raw, unscaled), the sum l[h] of
// the bf16 probabilities exp2((s - m) * scale * log2 e) that were multiplied, and the
// unnormalised output o[h * D ..].
struct ChunkOut {
  float* m;
  float* l;
  float* o;
};

// One sequence's keys slots[0 .. n) (a chunk of its context), all KV heads; q holds the
// H = KVH * G query rows at stride q_head.
template <int G>
void chunk_item(const uint16_t* q, int64_t q_head, const uint16_t* kc, const uint16_t* vc, const int64_t* slots,
                int64_t n, int64_t KVH, int64_t D, float scale_log2e, Scratch& sc, ChunkOut res) {
  const int64_t groups = (n + kKeys - 1) / kKeys, np = groups * kKeys, row = KVH * D, H = KVH * G;
  sc.scores.resize(H * np);
  sc.probs.resize(H * np + 2);
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  LineCursor ahead;  // the first two groups' keys now (once per chunk), then spread
  ahead.reset(row * 2);
  ahead.add_group(kc, slots, 0, n, row);
  ahead.add_group(kc, slots, kKeys, n, row);
  ahead.all();
  // scores, 16 keys at a time, every KV head while the keys' rows are in cache
  for (int64_t g16 = 0; g16 < groups; ++g16) {
    const int64_t j0 = g16 * kKeys;
    const int valid = static_cast<int>(std::min<int64_t>(kKeys, n - j0));
    const uint16_t* rows[kKeys];
    // past the chunk's end: any valid row (the first), its scores are masked to -inf
    for (int i = 0; i < kKeys; ++i) rows[i] = kc + slots[j0 + (i < valid ? i : 0)] * row;
    // while these keys are scored: the keys two groups on (blocks are scattered, the
    // hardware prefetcher restarts at each) and these keys' values, for the value pass
    ahead.reset(row * 2);
    ahead.add_group(kc, slots, j0 + 2 * kKeys, n, row);
    ahead.add_group(vc, slots, j0, n, row);
    const __mmask16 live = static_cast<__mmask16>((1u << valid) - 1);
    for (int64_t kh = 0; kh < KVH; ++kh) {
      const uint16_t* qh = q + kh * G * q_head;
      __m512 s[G];
      for (int g = 0; g < G; ++g) s[g] = _mm512_setzero_ps();
      for (int64_t d0 = 0; d0 < D; d0 += 32) {  // 16 pairs of 16 keys per round
        __m512i lines[16];
        for (int i = 0; i < kKeys; ++i) lines[i] = _mm512_loadu_si512(rows[i] + kh * D + d0);
        transpose16(lines);  // lines[p]: pair p of the 16 keys
        for (int p = 0; p < 16; ++p) {
          ahead.next();  // KVH * D / 2 steps a group, 2 lines each: the group's lines
          ahead.next();
          for (int g = 0; g < G; ++g)
            s[g] = _mm512_dpbf16_ps(s[g], bh(lines[p]), broadcast_pair(qh + g * q_head + d0 + 2 * p));
        }
      }
      for (int g = 0; g < G; ++g)
        _mm512_storeu_ps(sc.scores.data() + (kh * G + g) * np + j0, _mm512_mask_mov_ps(neg_inf, live, s[g]));
    }
  }
  // softmax per head (fp32) relative to the chunk's max, probabilities rounded to bf16;
  // sums of what is multiplied
  const __m512 sl = _mm512_set1_ps(scale_log2e);
  for (int64_t h = 0; h < H; ++h) {
    const float* sh = sc.scores.data() + h * np;
    __m512 mx = neg_inf;
    for (int64_t l = 0; l < np; l += kKeys) mx = _mm512_max_ps(mx, _mm512_loadu_ps(sh + l));
    const float m = _mm512_reduce_max_ps(mx);
    const __m512 mv = _mm512_set1_ps(m);
    __m512 sum = _mm512_setzero_ps();
    uint16_t* ph = sc.probs.data() + h * np;
    for (int64_t l = 0; l < np; l += kKeys) {
      const __m512 e = exp2_nonpositive(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(sh + l), mv), sl));
      const __m256i e16 = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(e));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(ph + l), e16);
      sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(e16), 16)));
    }
    res.m[h] = m;
    res.l[h] = _mm512_reduce_add_ps(sum);
  }
  // values: O[g] += p[g, l] v_l, two keys and 16 channels per line
  const __m512i lo_idx = pair_interleave_index(0), hi_idx = pair_interleave_index(16);
  for (int64_t kh = 0; kh < KVH; ++kh) {
    const uint16_t* vh = vc + kh * D;
    const uint16_t* ph = sc.probs.data() + kh * G * np;
    for (int64_t d0 = 0; d0 < D; d0 += 32) {
      __m512 o_lo[G], o_hi[G];  // channels d0..d0+15, d0+16..d0+31
      for (int g = 0; g < G; ++g) o_lo[g] = o_hi[g] = _mm512_setzero_ps();
      for (int64_t l = 0; l < n; l += 2) {
        const __m512i a = _mm512_loadu_si512(vh + slots[l] * row + d0);
        const __m512i b = l + 1 < n ? _mm512_loadu_si512(vh + slots[l + 1] * row + d0) : _mm512_setzero_si512();
        const __m512bh lo = bh(_mm512_permutex2var_epi16(a, lo_idx, b));
        const __m512bh hi = bh(_mm512_permutex2var_epi16(a, hi_idx, b));
        for (int g = 0; g < G; ++g) {
          // p[g, l], p[g, l + 1] (0 past the end: masked scores, and the row's padding)
          const __m512bh pv = broadcast_pair(ph + g * np + l);
          o_lo[g] = _mm512_dpbf16_ps(o_lo[g], lo, pv);
          o_hi[g] = _mm512_dpbf16_ps(o_hi[g], hi, pv);
        }
      }
      for (int g = 0; g < G; ++g) {
        float* o = res.o + (kh * G + g) * D + d0;
        _mm512_storeu_ps(o, o_lo[g]);
        _mm512_storeu_ps(o + 16, o_hi[g]);
      }
    }
  }
}

using ItemFn = void (*)(const uint16_t*, int64_t, const uint16_t*, const uint16_t*, const int64_t*, int64_t, int64_t,
                        int64_t, float, Scratch&, ChunkOut);

ItemFn item_for(int64_t G) {
  switch (G) {
    case 1: return chunk_item<1>;
    case 2: return chunk_item<2>;
    case 3: return chunk_item<3>;
    case 4: return chunk_item<4>;
    case 5: return chunk_item<5>;
    case 6: return chunk_item<6>;
    case 7: return chunk_item<7>;
    case 8: return chunk_item<8>;
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
  const int64_t* lp = ln.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= L, "sequence ", b, " has context length ", lp[b]);
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
  const float scale_log2e = static_cast<float>(scale) * 1.4426950408889634f;
  const agentcpu_decode::ChunkItems items(lp, B, KVH * D * 2);
  const std::vector<int64_t>& first = items.first;
  // per item and head: max, sum, then D outputs; chunk_item writes every value, so the
  // buffer is not zeroed first (~300 KB a layer at 16 streams x 2,500 tokens)
  const int64_t per_item = H * (D + 2);
  const std::unique_ptr<float[]> part(new float[items.count() * per_item]);
  at::parallel_for(0, items.count(), 1, [&](int64_t i0, int64_t i1) {
    Scratch scratch;
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t seq = items.seq[it];
      float* base = part.get() + it * per_item;
      const ChunkOut res{base, base + H, base + 2 * H};
      fn(qp + seq * q.stride(0), q.stride(1), kp, vp, sp + seq * L + items.key[it], items.length(it, lp), KVH, D,
         scale_log2e, scratch, res);
    }
  });
  // merge each sequence's chunks: weights 2^((m_c - M) * scale log2 e), then normalise
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> acc(D);
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t h = 0; h < H; ++h) {
        float M = -std::numeric_limits<float>::infinity();
        for (int64_t it = first[b]; it < first[b + 1]; ++it) M = std::max(M, part[it * per_item + h]);
        float total = 0.f;
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t it = first[b]; it < first[b + 1]; ++it) {
          const float* base = part.get() + it * per_item;
          const float w = std::exp2((base[h] - M) * scale_log2e);
          total += w * base[H + h];
          const __m512 wv = _mm512_set1_ps(w);
          const float* o = base + 2 * H + h * D;
          for (int64_t d = 0; d < D; d += 16)
            _mm512_storeu_ps(acc.data() + d, _mm512_fmadd_ps(_mm512_loadu_ps(o + d), wv, _mm512_loadu_ps(acc.data() + d)));
        }
        const __m512 inv = _mm512_set1_ps(1.f / total);
        uint16_t* dst = op + (b * H + h) * D;
        for (int64_t d = 0; d < D; d += 32) {  // round to nearest even
          const __m512bh r = _mm512_cvtne2ps_pbh(_mm512_mul_ps(_mm512_loadu_ps(acc.data() + d + 16), inv),
                                                 _mm512_mul_ps(_mm512_loadu_ps(acc.data() + d), inv));
          _mm512_storeu_si512(dst + d, reinterpret_cast<__m512i>(r));
        }
      }
    }
  });
#endif
  return out;
}
