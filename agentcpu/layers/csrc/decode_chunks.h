// How both decode attention kernels (`decode_attention_bf16.cpp`, and the AVX2 one in
// `fused_ops.cpp`) split their work along the context ("flash decoding"): an item is one
// sequence's run of up to `chunk` keys with *all* its KV heads, so every cache line of a
// slot row (all heads of a token) is used by the thread that fetched it, and one long
// sequence still spreads over every thread. Each item leaves (max, sum, unnormalised
// output) per head; each sequence's chunks are merged afterwards.
// `hardware.native_build` puts this text before those sources (`prelude`).
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#include <vector>

namespace agentcpu_decode {

constexpr int64_t kChunkBytes = 128 << 10;  // K bytes of a chunk (all heads): its V then sits in L2
constexpr int64_t kMinChunk = 64;
constexpr int64_t kKeyStep = 16;  // chunk lengths are multiples of this

// Keys per chunk: its K about kChunkBytes, and fewer where that leaves threads idle (a
// few long sequences: aim at 4 items a thread), in 16-key steps.
inline int64_t chunk_keys(int64_t B, int64_t max_len, int64_t row_bytes) {
  const int64_t cap = std::max<int64_t>(kMinChunk, kChunkBytes / row_bytes / kKeyStep * kKeyStep);
  const int64_t want = std::max<int64_t>(1, (4 * at::get_num_threads() + B - 1) / B);
  const int64_t even = (max_len + want - 1) / want;
  return std::clamp<int64_t>((even + kKeyStep - 1) / kKeyStep * kKeyStep, kMinChunk, cap);
}

// The work items of B sequences of lens[b] keys, `row_bytes` of K per key (all heads):
// item i is sequence seq[i]'s keys [key[i], key[i] + length(i)); a sequence's items are
// consecutive, from first[b] to first[b + 1].
struct ChunkItems {
  int64_t chunk = 0;
  std::vector<int64_t> seq, key, first;

  ChunkItems(const int64_t* lens, int64_t B, int64_t row_bytes) : first(B + 1) {
    int64_t max_len = 1;
    for (int64_t b = 0; b < B; ++b) max_len = std::max(max_len, lens[b]);
    chunk = chunk_keys(B, max_len, row_bytes);
    for (int64_t b = 0; b < B; ++b) {
      first[b] = count();
      for (int64_t k0 = 0; k0 < lens[b]; k0 += chunk) {
        seq.push_back(b);
        key.push_back(k0);
      }
    }
    first[B] = count();
  }
  int64_t count() const { return static_cast<int64_t>(seq.size()); }
  int64_t length(int64_t i, const int64_t* lens) const { return std::min(chunk, lens[seq[i]] - key[i]); }
};

}  // namespace agentcpu_decode
