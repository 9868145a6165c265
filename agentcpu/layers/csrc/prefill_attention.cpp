// Causal attention of a prefill chunk over its paged context, bf16, on CPUs with
// AVX-512 BF16: the agent case, where a follow-up turn's few hundred new tokens attend
// to thousands of cached ones.
//
// out[i, h] = softmax_j<=p_i(q[i, h] . k_j * scale) v_j, with p_i = C - L + i the
// absolute position of query i of L, and keys/values j < C read from the cache through
// `slots` (the chunk's own K/V are already written there).
//
// PyTorch's SDPA ran these shapes at 100-130 GFLOPS here (a 348-token chunk over 2,646
// keys: 26 ms per layer, as long as the chunk's linear layers). Here every product is a
// VDPBF16PS in the broadcast form of `bf16_packed_linear.cpp`:
// - per KV head, the context's keys are packed once per call as [C/16][D/2][16][2] and
//   the values as [D/16][C/2][16][2] (operand order: a 64-byte line is 2 values of 16
//   keys, resp. of 16 channels for 2 keys);
// - a tile of 6 query rows (query, head) of one KV head walks the key blocks of 64 in
//   order: scores S = q K^T as 6 x 4 zmm (a broadcast query pair against a line of 16
//   keys), online softmax in fp32 (running max and sum per row, probabilities rounded to
//   bf16 as flash attention does), then O += P V in groups of 64 channels as 6 x 4 zmm
//   (a broadcast pair of probabilities against a line of 16 channels), O rescaled when
//   the max moves.
// Key blocks past a tile's last position are skipped; the block holding it is masked.
// `bf16_attention_common.h` comes first (native_build's prelude).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <atomic>
#include <memory>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

using namespace agentcpu_attention;

namespace {

constexpr int64_t kKeyBlock = 64;  // keys per block: 4 zmm of scores per row
constexpr int kRows = 6;           // query rows per tile
constexpr int64_t kQueriesPerItem = 16;

#ifdef AGENTCPU_ATTENTION_BF16

// One KV head's context, packed for the two products (see the header).
struct PackedContext {
  agentcpu_amx::AlignedVector<uint16_t> keys;    // [Cp/16][D/2][16][2], tile rows on cache lines
  agentcpu_amx::AlignedVector<uint16_t> values;  // [D/16][Cp/2][16][2]
  int64_t padded = 0;            // Cp: C rounded up to the key block
};

// Keys: each group of 16 keys is a [D/2][16] transpose of their bf16 pairs, gathered a
// pair index at a time (two VPGATHERQD of 8 dwords, on 64-bit offsets); values: each key
// pair's 16-channel runs interleaved by one VPERMT2W. A scalar copy of every element took
// ~0.8 ms a layer at 2,300 keys (the whole product of 16 queries is ~0.5 ms).
void pack_context(const uint16_t* k_cache, const uint16_t* v_cache, const int64_t* slots, int64_t C,
                  int64_t KVH, int64_t kh, int64_t D, PackedContext& pc) {
  const int64_t Cp = (C + kKeyBlock - 1) / kKeyBlock * kKeyBlock;
  pc.padded = Cp;
  pc.keys.assign(Cp * D, 0);
  pc.values.assign(Cp * D, 0);
  const auto* kbase = reinterpret_cast<const int*>(k_cache);
  for (int64_t j0 = 0; j0 < C; j0 += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, C - j0));
    alignas(64) int64_t rows[16] = {0};  // dword offset of each key's row
    for (int l = 0; l < n; ++l) rows[l] = (slots[j0 + l] * KVH + kh) * D / 2;
    const __m512i lo = _mm512_load_si512(rows), hi = _mm512_load_si512(rows + 8);
    const unsigned valid = (1u << n) - 1;  // keys j0 .. j0 + n - 1; the rest gather zeros
    const auto valid_lo = static_cast<__mmask8>(valid), valid_hi = static_cast<__mmask8>(valid >> 8);
    uint16_t* kdst = pc.keys.data() + (j0 / 16) * D * 16;
    for (int64_t p = 0; p < D / 2; ++p) {
      const __m256i a = _mm512_mask_i64gather_epi32(_mm256_setzero_si256(), valid_lo, lo, kbase + p, 4);
      const __m256i b = _mm512_mask_i64gather_epi32(_mm256_setzero_si256(), valid_hi, hi, kbase + p, 4);
      _mm512_store_si512(kdst + p * 32, _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1));
    }
  }
  const __m512i interleave = pair_interleave_index(0);
  for (int64_t j = 0; j < C; j += 2) {
    const uint16_t* va = v_cache + (slots[j] * KVH + kh) * D;
    const uint16_t* vb = j + 1 < C ? v_cache + (slots[j + 1] * KVH + kh) * D : nullptr;
    uint16_t* vdst = pc.values.data() + (j / 2) * 32;
    for (int64_t c = 0; c < D; c += 16) {
      const __m512i a = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(va + c)));
      const __m512i b = vb ? _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(vb + c)))
                           : _mm512_setzero_si512();
      _mm512_store_si512(vdst + (c / 16) * Cp * 16, _mm512_permutex2var_epi16(a, interleave, b));
    }
  }
}

// Running state of the tile's rows: output accumulators (in memory: they live across
// the score product, which needs the registers), max and sum.
struct RowState {
  float* o[kRows];
  float m[kRows], corr[kRows];
  alignas(64) float l[kRows][16];
};

// Scores of T rows against key block kb: s[t][16 j + lane] = q_t . keys[kb*64 + 16 j + lane].
// The accumulators are locals stored once at the end: an array the caller indexes at run
// time would live on the stack, and GCC then stores every accumulator after each
// VDPBF16PS (24 stores per 24 products; the kernel ran at ~35 % of the VDPBF16PS peak).
template <int T>
inline void block_scores(const uint16_t* const* q, int64_t D, const uint16_t* keys, int64_t kb,
                         float (*scores)[kKeyBlock]) {
  const uint16_t* qr[T];
#pragma GCC unroll 6
  for (int t = 0; t < T; ++t) qr[t] = q[t];
  __m512 s[T][4];
#pragma GCC unroll 6
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) s[t][j] = _mm512_setzero_ps();
  const uint16_t* kbase = keys + kb * (kKeyBlock / 16) * D * 16;
  for (int64_t p = 0; p < D / 2; ++p) {
    __m512bh kv[4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) kv[j] = bh(_mm512_loadu_si512(kbase + j * D * 16 + p * 32));
#pragma GCC unroll 6
    for (int t = 0; t < T; ++t) {
      const __m512bh qv = broadcast_pair(qr[t] + 2 * p);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) s[t][j] = _mm512_dpbf16_ps(s[t][j], kv[j], qv);
    }
  }
#pragma GCC unroll 6
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) _mm512_store_ps(scores[t] + 16 * j, s[t][j]);
}

// One row's scores against a 64-key block (4 zmm, keys past `pos` masked) -> bf16
// probabilities in `probs` relative to the running max `m`; `l16` (the running sum of
// the bf16-rounded probabilities that are multiplied, 16 partial sums reduced once at
// the end) and `corr` (the factor the row's output must be rescaled by) follow the max.
// Online softmax in fp32. The max moves in few blocks once a row has seen some keys: a
// block whose scores all stay at or below it skips the horizontal max and the scalar
// exp2 (corr = 1); the sum is one VDPBF16PS against ones per 32 probabilities.
inline void softmax_block(const float* scores, int64_t first_key, int64_t pos, float scale_log2e, float& m,
                          float* l16, float& corr, uint16_t* probs) {
  __m512 s[4];
  for (int j = 0; j < 4; ++j) s[j] = _mm512_load_ps(scores + 16 * j);
  if (first_key + kKeyBlock - 1 > pos) {  // the block crosses this row's position
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int j = 0; j < 4; ++j) {
      const __m512i key = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(first_key + 16 * j)));
      const __mmask16 hidden = _mm512_cmpgt_epi32_mask(key, _mm512_set1_epi32(static_cast<int>(pos)));
      s[j] = _mm512_mask_mov_ps(s[j], hidden, _mm512_set1_ps(-std::numeric_limits<float>::infinity()));
    }
  }
  const __m512 mx4 = _mm512_max_ps(_mm512_max_ps(s[0], s[1]), _mm512_max_ps(s[2], s[3]));
  corr = 1.f;
  if (_mm512_cmp_ps_mask(mx4, _mm512_set1_ps(m), _CMP_GT_OQ)) {
    const float m_new = _mm512_reduce_max_ps(mx4);
    corr = std::exp2((m - m_new) * scale_log2e);  // 0 at the first block
    m = m_new;
  }
  const __m512 sl = _mm512_set1_ps(scale_log2e), shift = _mm512_set1_ps(m * scale_log2e);
  const __m512bh ones = bh(_mm512_set1_epi16(0x3f80));  // bf16 1.0
  __m512 sum = _mm512_mul_ps(_mm512_load_ps(l16), _mm512_set1_ps(corr));
  for (int j = 0; j < 4; j += 2) {
    const __m512 e0 = exp2_nonpositive(_mm512_fmsub_ps(s[j], sl, shift));
    const __m512 e1 = exp2_nonpositive(_mm512_fmsub_ps(s[j + 1], sl, shift));
    const __m512bh pr = _mm512_cvtne2ps_pbh(e1, e0);  // e0 in the low half
    _mm512_storeu_si512(probs + 16 * j, reinterpret_cast<__m512i>(pr));
    sum = _mm512_dpbf16_ps(sum, pr, ones);  // sum what is multiplied: the rounded values
  }
  _mm512_store_ps(l16, sum);
}

// The tile of T rows: its queries, positions, outputs and running softmax state.
struct Tile {
  const uint16_t* q[kRows];
  int64_t pos[kRows];
  int64_t last = 0;  // the largest position
  RowState st;
};

template <int T>
void init_tile(Tile& tile, int64_t D) {
  tile.last = 0;
  for (int t = 0; t < T; ++t) {
    std::fill(tile.st.o[t], tile.st.o[t] + D, 0.f);
    tile.st.m[t] = -std::numeric_limits<float>::infinity();
    std::fill(tile.st.l[t], tile.st.l[t] + 16, 0.f);
    tile.last = std::max(tile.last, tile.pos[t]);
  }
}

// The tile's T rows against key block kb: scores, online softmax, O += P V.
template <int T>
void tile_block(Tile& tile, int64_t D, const PackedContext& pc, float scale_log2e, int64_t kb) {
  RowState& st = tile.st;
  alignas(64) uint16_t probs[kRows][kKeyBlock];
  alignas(64) float scores[kRows][kKeyBlock];
  block_scores<T>(tile.q, D, pc.keys.data(), kb, scores);
  const int64_t first_key = kb * kKeyBlock;
  for (int t = 0; t < T; ++t)
    softmax_block(scores[t], first_key, tile.pos[t], scale_log2e, st.m[t], st.l[t], st.corr[t], probs[t]);
  // O += P V over the block's 32 key pairs, 64 channels (4 zmm per row) at a time
  const uint16_t* vbase = pc.values.data() + first_key * 16;
  for (int64_t c0 = 0; c0 < D; c0 += 64) {
    __m512 o[kRows][4];
#pragma GCC unroll 6
    for (int t = 0; t < T; ++t) {
      const __m512 c = _mm512_set1_ps(st.corr[t]);  // rescaled to the new max on load
#pragma GCC unroll 4
      for (int d = 0; d < 4; ++d) o[t][d] = _mm512_mul_ps(_mm512_loadu_ps(st.o[t] + c0 + 16 * d), c);
    }
    const uint16_t* vgroup = vbase + (c0 / 16) * pc.padded * 16;
    for (int64_t kp = 0; kp < kKeyBlock / 2; ++kp) {
      __m512bh vv[4];
#pragma GCC unroll 4
      for (int d = 0; d < 4; ++d) vv[d] = bh(_mm512_loadu_si512(vgroup + d * pc.padded * 16 + kp * 32));
#pragma GCC unroll 6
      for (int t = 0; t < T; ++t) {
        const __m512bh pv = broadcast_pair(probs[t] + 2 * kp);
#pragma GCC unroll 4
        for (int d = 0; d < 4; ++d) o[t][d] = _mm512_dpbf16_ps(o[t][d], vv[d], pv);
      }
    }
#pragma GCC unroll 6
    for (int t = 0; t < T; ++t)
#pragma GCC unroll 4
      for (int d = 0; d < 4; ++d) _mm512_storeu_ps(st.o[t] + c0 + 16 * d, o[t][d]);
  }
}

template <int T>
void finish_tile(Tile& tile, int64_t D) {
  for (int t = 0; t < T; ++t) {
    float* o = tile.st.o[t];
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(_mm512_load_ps(tile.st.l[t])));
    for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(o + d), inv));
  }
}

// An item's tiles (up to kQueriesPerItem queries x G heads, in tiles of kRows rows; the
// last one has `last_rows`) over the key blocks, block by block: a block's 8 KB of keys
// and 8 KB of values stay in L1 while every tile multiplies them, and only the tiles'
// states (1.5 KB of outputs a tile) come from L2. Tile by tile instead (every tile
// streaming the whole packed context, ~600 KB a KV head at 2,300 keys, from L2) took
// 1.05x as long on Zen 4 (session 25, docs/kernels.md).
void item_tiles(std::vector<Tile>& tiles, int last_rows, int64_t D, const PackedContext& pc, float scale_log2e) {
  const int n = static_cast<int>(tiles.size());
  const auto rows_of = [&](int i) { return i + 1 < n ? kRows : last_rows; };
  int64_t last = 0;
  for (int i = 0; i < n; ++i) {
    dispatch_rows(rows_of(i), [&](auto t) { init_tile<decltype(t)::value>(tiles[i], D); });
    last = std::max(last, tiles[i].last);
  }
  for (int64_t kb = 0; kb <= last / kKeyBlock; ++kb)
    for (int i = 0; i < n; ++i)
      if (kb * kKeyBlock <= tiles[i].last)  // blocks wholly past a tile's rows are skipped
        dispatch_rows(rows_of(i), [&](auto t) { tile_block<decltype(t)::value>(tiles[i], D, pc, scale_log2e, kb); });
  for (int i = 0; i < n; ++i) dispatch_rows(rows_of(i), [&](auto t) { finish_tile<decltype(t)::value>(tiles[i], D); });
}

#ifdef AGENTCPU_AMX
// AMX: 16 rows (query, head) a tile, both products on TDPBF16PS, the softmax between
// them in AVX-512 as above. The packed context is already in B-operand order for both:
// 16 keys' D/2 pairs are a [D/2][16][2] run (the scores' B tile: 16 pairs of d at a
// 64-byte stride), and 16 channels' key pairs are a [Cp/2][16][2] run (P V's B tile: 16
// key pairs). The A operands are the 16 query rows (copied to a [16][D] buffer: the
// rows of a KV head's group are not evenly spaced in q) and the block's probabilities,
// [16][64] bf16. Tiles: C 0..3 (a 64-key block's scores, then 64 channels of P V), A 4,
// B 6 and 7.
constexpr int64_t kAmxRows = agentcpu_amx::kRows;

struct AmxScratch {
  alignas(64) uint16_t q[kAmxRows * 128];        // query rows, [16][D]
  alignas(64) float s[kAmxRows * kKeyBlock];     // a block's scores, [16][64]
  alignas(64) uint16_t p[kAmxRows * kKeyBlock];  // its bf16 probabilities
  alignas(64) float pv[kAmxRows * 64];           // P V for 64 channels
  alignas(64) float l[kAmxRows][16];
  float m[kAmxRows], corr[kAmxRows];
};

// s = q K^T for key block kb: 4 tiles of 16 keys, D / 32 steps each.
inline void amx_scores(const uint16_t* q, int64_t D, const uint16_t* keys, int64_t kb, float* s) {
  const uint16_t* k0 = keys + kb * (kKeyBlock / 16) * D * 16;
  const int64_t tile_keys = D * 16;  // bf16 values per 16 keys
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t ks = 0; ks < D / 32; ++ks) {
    _tile_loadd(4, q + ks * 32, D * 2);
    _tile_loadd(6, k0 + ks * 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, k0 + tile_keys + ks * 512, 64);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(6, k0 + 2 * tile_keys + ks * 512, 64);
    _tile_dpbf16ps(2, 4, 6);
    _tile_loadd(7, k0 + 3 * tile_keys + ks * 512, 64);
    _tile_dpbf16ps(3, 4, 7);
  }
  _tile_stored(0, s, kKeyBlock * 4);
  _tile_stored(1, s + 16, kKeyBlock * 4);
  _tile_stored(2, s + 32, kKeyBlock * 4);
  _tile_stored(3, s + 48, kKeyBlock * 4);
}

// pv = P V for channels [c0, c0 + 64) of the block starting at `first_key`.
inline void amx_pv(const uint16_t* p, const uint16_t* values, int64_t Cp, int64_t first_key, int64_t c0, float* pv) {
  const uint16_t* v0 = values + (c0 / 16) * Cp * 16 + (first_key / 2) * 32;
  const int64_t group = Cp * 16;  // bf16 values per 16 channels
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t ks = 0; ks < kKeyBlock / 32; ++ks) {  // 32 keys (16 pairs) a step
    _tile_loadd(4, p + ks * 32, kKeyBlock * 2);
    _tile_loadd(6, v0 + ks * 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, v0 + group + ks * 512, 64);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(6, v0 + 2 * group + ks * 512, 64);
    _tile_dpbf16ps(2, 4, 6);
    _tile_loadd(7, v0 + 3 * group + ks * 512, 64);
    _tile_dpbf16ps(3, 4, 7);
  }
  _tile_stored(0, pv, 64 * 4);
  _tile_stored(1, pv + 16, 64 * 4);
  _tile_stored(2, pv + 32, 64 * 4);
  _tile_stored(3, pv + 48, 64 * 4);
}

// T <= 16 rows over every key block they see; out_rows[t] gets row t's D outputs (fp32).
void amx_tile_rows(int T, const uint16_t* const* q, const int64_t* pos, int64_t D, const PackedContext& pc,
                   float scale_log2e, float* const* out_rows, AmxScratch& sc) {
  int64_t last = 0;
  for (int t = 0; t < T; ++t) last = std::max(last, pos[t]);
  for (int t = 0; t < kAmxRows; ++t) {
    if (t < T) std::memcpy(sc.q + t * D, q[t], D * sizeof(uint16_t));
    else std::memset(sc.q + t * D, 0, D * sizeof(uint16_t));  // rows past T: zero, unused
    sc.m[t] = -std::numeric_limits<float>::infinity();
    std::fill(sc.l[t], sc.l[t] + 16, 0.f);
  }
  for (int t = 0; t < T; ++t) std::fill(out_rows[t], out_rows[t] + D, 0.f);
  const int64_t blocks = last / kKeyBlock + 1;
  for (int64_t kb = 0; kb < blocks; ++kb) {
    const int64_t first_key = kb * kKeyBlock;
    amx_scores(sc.q, D, pc.keys.data(), kb, sc.s);
    for (int t = 0; t < T; ++t)
      softmax_block(sc.s + t * kKeyBlock, first_key, pos[t], scale_log2e, sc.m[t], sc.l[t], sc.corr[t],
                    sc.p + t * kKeyBlock);
    for (int64_t c0 = 0; c0 < D; c0 += 64) {
      amx_pv(sc.p, pc.values.data(), pc.padded, first_key, c0, sc.pv);
      for (int t = 0; t < T; ++t) {
        const __m512 c = _mm512_set1_ps(sc.corr[t]);
        float* o = out_rows[t] + c0;
        for (int d = 0; d < 64; d += 16)
          _mm512_storeu_ps(o + d, _mm512_fmadd_ps(_mm512_loadu_ps(o + d), c, _mm512_load_ps(sc.pv + t * 64 + d)));
      }
    }
  }
  for (int t = 0; t < T; ++t) {
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(_mm512_load_ps(sc.l[t])));
    for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(out_rows[t] + d, _mm512_mul_ps(_mm512_loadu_ps(out_rows[t] + d), inv));
  }
}
#endif  // AGENTCPU_AMX

std::atomic<bool>& amx_enabled() {
#ifdef AGENTCPU_AMX
  static std::atomic<bool> on{agentcpu_amx::granted()};
#else
  static std::atomic<bool> on{false};
#endif
  return on;
}

#endif  // AGENTCPU_ATTENTION_BF16

}  // namespace

// Whether this build has the AVX-512 BF16 path.
bool prefill_attention_available() { return built_with_avx512_bf16(); }

// Whether a prefill runs on AMX tiles (where this build and the OS have them); `use` 0 or
// 1 sets it (A/B benchmarks, tests), -1 only reads. Returns the previous value, or -1
// where there is no AMX.
int64_t prefill_attention_uses_amx(int64_t use) {
#if defined(AGENTCPU_ATTENTION_BF16) && defined(AGENTCPU_AMX)
  if (!agentcpu_amx::granted()) return -1;
  return use < 0 ? amx_enabled().load() : amx_enabled().exchange(use != 0);
#else
  (void)use;
  return -1;
#endif
}

// q [L, H, D] bf16 (last dim contiguous); caches [S, KVH, D] bf16 contiguous; slots int64
// [C] (C >= L: the context, chunk included, in order). D must be 64 or 128.
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& slots, double scale) {
  TORCH_CHECK(built_with_avx512_bf16(), "this build has no AVX-512 BF16 path");
  const PrefillArgs args = prefill_args(q, k_cache, v_cache, slots);
  const int64_t L = args.L, H = args.H, D = args.D, KVH = args.KVH, C = args.C;
  const at::Tensor& sl = args.slots;
  const at::Tensor& out = args.out;
#ifdef AGENTCPU_ATTENTION_BF16
  const int64_t G = H / KVH;
  const auto* qp = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  const auto* kc = reinterpret_cast<const uint16_t*>(k_cache.data_ptr<at::BFloat16>());
  const auto* vc = reinterpret_cast<const uint16_t*>(v_cache.data_ptr<at::BFloat16>());
  const int64_t* sp = sl.data_ptr<int64_t>();
  auto* op = out.data_ptr<at::BFloat16>();
  pybind11::gil_scoped_release no_gil;  // the HTTP thread may run Python meanwhile
  std::vector<PackedContext> packed(KVH);
  at::parallel_for(0, KVH, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t kh = h0; kh < h1; ++kh) pack_context(kc, vc, sp, C, KVH, kh, D, packed[kh]);
  });
  const float scale_log2e = static_cast<float>(scale) * 1.4426950408889634f;
  const int64_t qblocks = (L + kQueriesPerItem - 1) / kQueriesPerItem;
  const bool amx = amx_enabled().load();
  at::parallel_for(0, KVH * qblocks, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> acc;  // the item's rows' fp32 outputs
#ifdef AGENTCPU_AMX
    constexpr int kMaxRows = 16;  // rows an AMX tile takes
    std::unique_ptr<AmxScratch> scratch;
    if (amx) {
      scratch = std::make_unique<AmxScratch>();
      agentcpu_amx::configure();
    }
#endif
    std::vector<Tile> tiles;
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t kh = item / qblocks, i_begin = (item % qblocks) * kQueriesPerItem;
      const int64_t i_end = std::min(L, i_begin + kQueriesPerItem);
      const int64_t rows = (i_end - i_begin) * G;  // row r: query i_begin + r / G, head r % G
      if (static_cast<int64_t>(acc.size()) < rows * D) acc.resize(rows * D);
      const auto query = [&](int64_t r) { return qp + (i_begin + r / G) * q.stride(0) + (kh * G + r % G) * q.stride(1); };
      if (!amx) {
        tiles.resize((rows + kRows - 1) / kRows);
        for (int64_t r = 0; r < rows; ++r) {
          Tile& tile = tiles[r / kRows];
          tile.q[r % kRows] = query(r);
          tile.pos[r % kRows] = C - L + i_begin + r / G;
          tile.st.o[r % kRows] = acc.data() + r * D;
        }
        item_tiles(tiles, static_cast<int>(rows - (tiles.size() - 1) * kRows), D, packed[kh], scale_log2e);
      }
#ifdef AGENTCPU_AMX
      for (int64_t r0 = 0; amx && r0 < rows; r0 += kMaxRows) {
        const int T = static_cast<int>(std::min<int64_t>(kMaxRows, rows - r0));
        const uint16_t* qrows[kMaxRows];
        int64_t pos[kMaxRows];
        float* orows[kMaxRows];
        for (int t = 0; t < T; ++t) {
          qrows[t] = query(r0 + t);
          pos[t] = C - L + i_begin + (r0 + t) / G;
          orows[t] = acc.data() + (r0 + t) * D;
        }
        amx_tile_rows(T, qrows, pos, D, packed[kh], scale_log2e, orows, *scratch);
      }
#endif
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i_begin + r / G, h = kh * G + r % G;
        const float* src = acc.data() + r * D;
        auto* o = reinterpret_cast<uint16_t*>(op + (i * H + h) * D);
        for (int64_t d = 0; d < D; d += 32) {  // round to nearest even, as at::BFloat16 does
          const __m512bh rr = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + d + 16), _mm512_loadu_ps(src + d));
          _mm512_storeu_si512(o + d, reinterpret_cast<__m512i>(rr));
        }
      }
    }
#ifdef AGENTCPU_AMX
    if (amx) _tile_release();
#endif
  });
#endif
  return out;
}
