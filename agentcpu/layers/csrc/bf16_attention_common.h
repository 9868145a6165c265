// What the bf16 attention kernels share (`prefill_attention.cpp`,
// `decode_attention_bf16.cpp`, and for its checks `prefill_attention_avx2.cpp`): the
// AVX-512 BF16 switch, a vector exp2 for the softmax, VDPBF16PS operand helpers, the
// checks of q and the paged cache, and the prefill kernels' argument checks and row-count
// dispatch.
// `hardware.native_build` puts this text before each of those sources (`prelude`).
#include <torch/extension.h>
#include <immintrin.h>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX512BF16__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#define AGENTCPU_ATTENTION_BF16 1
#endif

namespace agentcpu_attention {

// Whether this build has the AVX-512 BF16 path.
inline bool built_with_avx512_bf16() {
#ifdef AGENTCPU_ATTENTION_BF16
  return true;
#else
  return false;
#endif
}

// q [*, H, D] with a contiguous last dim and bf16 caches [S, KVH, D], contiguous (each
// kernel checks first that its build has its instruction set).
inline void check_q_and_cache(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k_cache.scalar_type() == at::kBFloat16 &&
                  v_cache.scalar_type() == at::kBFloat16,
              "q and the KV cache must be bf16");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "KV cache must be contiguous");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "q must be [tokens, heads, head_dim] with a contiguous last dim");
  TORCH_CHECK(k_cache.size(2) == q.size(2) && q.size(1) % k_cache.size(1) == 0,
              "head_dim mismatch or heads not a multiple of KV heads");
}

// The arguments of a prefill chunk's attention, checked: q [L, H, D] bf16 (last dim
// contiguous), caches [S, KVH, D] bf16 contiguous, slots [C] (C >= L: the context, chunk
// included, in order; as int64), D 64 or 128; `out` [L, H, D] bf16, to be filled.
struct PrefillArgs {
  int64_t L, H, D, KVH, C;
  at::Tensor slots, out;
};

inline PrefillArgs prefill_args(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& slots) {
  check_q_and_cache(q, k_cache, v_cache);
  PrefillArgs a{q.size(0), q.size(1), q.size(2), k_cache.size(1), slots.numel(), slots.to(at::kLong).contiguous(),
                at::Tensor()};
  TORCH_CHECK(a.D == 64 || a.D == 128, "head_dim must be 64 or 128, got ", a.D);
  TORCH_CHECK(a.C >= a.L && a.L >= 1, "context (", a.C, " slots) must hold the chunk (", a.L, " queries)");
  a.out = at::empty({a.L, a.H, a.D}, q.options());
  return a;
}

// f(std::integral_constant<int, T>{}) for a tile of T = 1..6 rows known at run time: the
// kernels' tiles are templates on their row count.
template <typename F>
inline void dispatch_rows(int T, F&& f) {
  switch (T) {
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{});
  }
}

#ifdef AGENTCPU_ATTENTION_BF16

// 2^x for x <= 0 (x = -inf -> 0): 2^n by scalef, 2^f by a degree-4 polynomial on f in
// [-0.5, 0.5] (relative error ~4e-6; the result is rounded to bf16, 4e-3, right after).
inline __m512 exp2_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-150.f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(9.6181291076284772e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

inline __m512bh bh(__m512i v) { return reinterpret_cast<__m512bh>(v); }

inline __m512bh broadcast_pair(const uint16_t* p) {
  int32_t pair;
  std::memcpy(&pair, p, sizeof(pair));
  return bh(_mm512_set1_epi32(pair));
}

// VPERMT2W index that interleaves two keys' bf16 rows a (first operand) and b into the
// VDPBF16PS value line of channels first..first+15: word 2i = a[first + i], word 2i + 1 =
// b[first + i] (the prefill kernel's packed values, the decode kernel's value pass).
inline __m512i pair_interleave_index(int first) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return _mm512_add_epi32(_mm512_set1_epi32(((32 + first) << 16) | first), _mm512_mullo_epi32(lane, _mm512_set1_epi32(0x10001)));
}

#endif  // AGENTCPU_ATTENTION_BF16

}  // namespace agentcpu_attention
