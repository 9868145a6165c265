// Weight quantization at load: `formats.quantize_int8` / `formats.quantize_int4` call
// these where the kernels build, in place of their PyTorch code, which stays as the
// reference and the fallback. Each function does the reference's fp32 arithmetic in the
// same order, element by element (one fp32 rounding per operation, no contraction
// possible), so both give the same bytes: `tests/quant/test_quantize_native.py` checks
// that bit for bit. One pass over the weight per row range, no temporaries: the
// reference's dozen tensor ops per row slab made quantizing the bulk of a load
// (Llama-3.2-1B shape, int4-g32-sym: ~7.6 of ~14.7 s).
//
// The reference's rules (formats.py):
//   int8, per group (the whole row when per channel): s = amax|w| / 127,
//     q = clamp(round(w * (1 / s)), -127, 127), 0 where s == 0.
//   int4 asymmetric: scale = fp16((max - min) / 15), offset = fp16(min).
//   int4 symmetric (Q4_0): e = the first weight of largest magnitude,
//     scale = fp16(e / -8), offset = fp16(-8 * scale).
//   then q = clamp(round((w - offset) * (1 / scale)), 0, 15), 0 where scale == 0,
//   packed in Q4_0 order (byte j of a 32-block: q[j] | q[j + 16] << 4).
// Rounding is to nearest, ties to even, as torch.round and the fp16 conversion.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <atomic>
#include <cmath>
#include <tuple>

namespace agentcpu_quantize {

constexpr float kFp16Max = 65504.f;

// The weight rows as fp32, one row at a time (a row of the largest layers is ~32 KB).
struct RowReader {
  const at::Tensor& w;
  int64_t K;
  void read(int64_t r, float* dst) const {
    switch (w.scalar_type()) {
      case at::kFloat: std::copy_n(w.data_ptr<float>() + r * K, K, dst); break;
      case at::kBFloat16: {
        const at::BFloat16* s = w.data_ptr<at::BFloat16>() + r * K;
        int64_t k = 0;
        for (; k + 8 <= K; k += 8)
          _mm256_storeu_ps(dst + k, agentcpu_avx2::widen_bf16(reinterpret_cast<const uint16_t*>(s + k)));
        for (; k < K; ++k) dst[k] = static_cast<float>(s[k]);
        break;
      }
      default: {
        const at::Half* s = w.data_ptr<at::Half>() + r * K;
        for (int64_t k = 0; k < K; ++k) dst[k] = static_cast<float>(s[k]);
      }
    }
  }
};

inline __m256 round_even(__m256 v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

inline __m256 clamp(__m256 v, __m256 lo, __m256 hi) { return _mm256_min_ps(hi, _mm256_max_ps(lo, v)); }

// max |w| over n values (n a multiple of 8).
inline float abs_max(const float* w, int64_t n) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 m = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(w + i)));
  return agentcpu_avx2::hmax(m);
}

// fn(r, g, w) for every group g of every row r, w its fp32 values; rows split over the
// threads, each reading its rows one at a time.
template <typename GroupFn>
void for_each_group(const RowReader& reader, int64_t N, int64_t group, GroupFn fn) {
  const int64_t K = reader.K, G = K / group;
  at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> row(K);
    for (int64_t r = r0; r < r1; ++r) {
      reader.read(r, row.data());
      for (int64_t g = 0; g < G; ++g) fn(r, g, row.data() + g * group);
    }
  });
}

void check_weight(const at::Tensor& w, int64_t group) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "weight must be a contiguous 2-D tensor");
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kHalf,
              "weight must be fp32, bf16 or fp16");
  TORCH_CHECK(group > 0 && w.size(1) % group == 0, "group ", group, " does not divide ", w.size(1), " columns");
}

}  // namespace agentcpu_quantize

// weight [N, K] -> (qweight int8 [N, K], scales fp32 [N, K / group]).
std::tuple<at::Tensor, at::Tensor> quantize_int8_native(const at::Tensor& weight, int64_t group) {
  using namespace agentcpu_quantize;
  check_weight(weight, group);
  const int64_t N = weight.size(0), K = weight.size(1), G = K / group;
  at::Tensor q = at::empty({N, K}, weight.options().dtype(at::kChar));
  at::Tensor scales = at::empty({N, G}, weight.options().dtype(at::kFloat));
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scales.data_ptr<float>();
  const bool vector = group % 32 == 0;  // else the scalar loops
  for_each_group(RowReader{weight, K}, N, group, [&](int64_t r, int64_t g, const float* w) {
    int8_t* qg = qp + r * K + g * group;
    float amax = 0.f;
    if (vector) amax = abs_max(w, group);
    else
      for (int64_t i = 0; i < group; ++i) amax = std::max(amax, std::fabs(w[i]));
    const float s = amax / 127.f;
    const float inverse = s > 0.f ? 1.f / s : 0.f;
    if (vector) {
      const __m256 inv = _mm256_set1_ps(inverse), lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
      for (int64_t i = 0; i < group; i += 32) {
        __m256 v[4];
        for (int j = 0; j < 4; ++j)
          v[j] = clamp(round_even(_mm256_mul_ps(_mm256_loadu_ps(w + i + 8 * j), inv)), lo, hi);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(qg + i), agentcpu_avx2::to_int8x32(v));
      }
    } else {
      for (int64_t i = 0; i < group; ++i)
        qg[i] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(w[i] * inverse))));
    }
    sp[r * G + g] = s;
  });
  return {q, scales};
}

// weight [N, K] -> (qweight uint8 [N, K / 2], scales fp16 [N, K / group], offsets fp16
// [N, K / group], status): status 0, or bit 1 / bit 2 set where a scale / an offset
// (before the fp16 conversion) exceeds the fp16 range; the caller raises then.
std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t> quantize_int4_native(const at::Tensor& weight,
                                                                              int64_t group, bool symmetric) {
  using namespace agentcpu_quantize;
  check_weight(weight, group);
  TORCH_CHECK(group % 32 == 0, "int4 groups are multiples of 32");
  const int64_t N = weight.size(0), K = weight.size(1), G = K / group;
  at::Tensor q = at::empty({N, K / 2}, weight.options().dtype(at::kByte));
  at::Tensor scales = at::empty({N, G}, weight.options().dtype(at::kHalf));
  at::Tensor offsets = at::empty({N, G}, weight.options().dtype(at::kHalf));
  uint8_t* qp = q.data_ptr<uint8_t>();
  at::Half* sp = scales.data_ptr<at::Half>();
  at::Half* op = offsets.data_ptr<at::Half>();
  std::atomic<int64_t> status{0};
  for_each_group(RowReader{weight, K}, N, group, [&](int64_t r, int64_t g, const float* w) {
    at::Half scale, offset;
    if (symmetric) {
      const float amax = abs_max(w, group);
      int64_t at_max = 0;  // the first index of the largest |w|, as argmax
      while (at_max + 1 < group && std::fabs(w[at_max]) != amax) ++at_max;
      const float s = w[at_max] / -8.f;
      if (std::fabs(s) > kFp16Max) status.fetch_or(1);
      scale = at::Half(s);
      offset = at::Half(-8.f * static_cast<float>(scale));
    } else {
      __m256 vlo = _mm256_loadu_ps(w), vhi = vlo;
      for (int64_t i = 8; i < group; i += 8) {
        vlo = _mm256_min_ps(vlo, _mm256_loadu_ps(w + i));
        vhi = _mm256_max_ps(vhi, _mm256_loadu_ps(w + i));
      }
      const float hi = agentcpu_avx2::hmax(vhi), lo = agentcpu_avx2::hmin(vlo);
      const float s = (hi - lo) / 15.f;
      if (std::fabs(s) > kFp16Max) status.fetch_or(1);
      if (std::fabs(lo) > kFp16Max) status.fetch_or(2);
      scale = at::Half(s);
      offset = at::Half(lo);
    }
    sp[r * G + g] = scale;
    op[r * G + g] = offset;
    const float sc = static_cast<float>(scale), m = static_cast<float>(offset);
    const float inverse = sc != 0.f ? 1.f / sc : 0.f;
    const __m256 vm = _mm256_set1_ps(m), inv = _mm256_set1_ps(inverse);
    const __m256 zero = _mm256_setzero_ps(), top = _mm256_set1_ps(15.f);
    for (int64_t b = 0; b < group; b += 32) {
      __m256 v[4];
      for (int j = 0; j < 4; ++j)
        v[j] = clamp(round_even(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(w + b + 8 * j), vm), inv)), zero, top);
      const __m256i levels = agentcpu_avx2::to_int8x32(v);  // 0..15: shifting 16-bit lanes by 4 stays in each byte
      const __m128i packed = _mm_or_si128(_mm256_castsi256_si128(levels),
                                          _mm_slli_epi16(_mm256_extracti128_si256(levels, 1), 4));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qp + r * (K / 2) + (g * group + b) / 2), packed);
    }
  });
  return {q, scales, offsets, status.load()};
}
