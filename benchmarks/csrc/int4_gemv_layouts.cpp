// Microbenchmark: the int4 (group 32) GEMV inner loop, batch 1, in two weight layouts.
//
//   row: the layout agentcpu stores (GGUF Q4_0 order, one row after another), the loop
//        of quant/csrc/quant_kernels.cpp: 64 weights (32 bytes) per step, two
//        accumulators, a horizontal sum and an offset step per row.
//   x8:  8 rows interleaved, lane r of every vector = row r (llama.cpp's "repack" idea):
//        per 32-weight block, vector p holds for each row the Q4_0 bytes 4p..4p+3 (low
//        nibbles = weights 4p.., high = 16+4p..), so the layout is a byte permutation of
//        Q4_0 blocks. Activations are broadcast 4 bytes at a time; the int16 sums of the
//        4 vectors of a block are widened once; no horizontal sums; 8 outputs per store.
//   stream: a plain read of the same bytes, the bandwidth ceiling.
//
// Weights are random (timing does not depend on values); copies of the layer are cycled
// through ~256 MB so every call reads DRAM, or set HOT=1 to keep one copy in cache and
// measure compute alone. Methods run round-robin; medians.
//
//   g++ -O3 -march=native -fopenmp benchmarks/csrc/int4_gemv_layouts.cpp -o /tmp/int4_layouts
//   OMP_NUM_THREADS=2 /tmp/int4_layouts 896 9728      # K N (gate_up of Qwen2.5-0.5B)
//   HOT=1 OMP_NUM_THREADS=1 /tmp/int4_layouts 896 1024
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

namespace {

constexpr int kPrefetch = 2048;

float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// xq: int8 activations, each 64-chunk permuted to the nibble order; xs: 8 lane scales per
// chunk; gs: activation sums per 32-group (offset term)
void int4_row(const uint8_t* w, const uint16_t* sc, const uint16_t* of, int K, const int8_t* xq,
              const float* xs, const float* gs, float* out) {
  const int nch = K / 64, ng = K / 32;
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  auto chunk = [&](int c, __m256& acc) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c * 32));
    const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
    int32_t two;
    std::memcpy(&two, sc + 2 * c, 4);
    const __m256 ws = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_cvtph_ps(_mm_cvtsi32_si128(two))),
                                               _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
    const __m256i xl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + c * 64));
    const __m256i xh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + c * 64 + 32));
    const __m256i p = _mm256_madd_epi16(
        _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh)), ones);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(_mm256_loadu_ps(xs + c * 8), ws), acc);
  };
  int c = 0;
  for (; c + 2 <= nch; c += 2) {
    _mm_prefetch(reinterpret_cast<const char*>(w + c * 32 + kPrefetch), _MM_HINT_T0);
    chunk(c, acc0);
    chunk(c + 1, acc1);
  }
  if (c < nch) chunk(c, acc0);
  __m256 a = _mm256_add_ps(acc0, acc1);
  int g = 0;
  for (; g + 8 <= ng; g += 8)
    a = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(of + g))),
                        _mm256_loadu_ps(gs + g), a);
  float r = hsum(a);
  for (; g < ng; ++g) r += _cvtsh_ss(of[g]) * gs[g];
  *out = r;
}

// 8 interleaved rows: w = 128 bytes per 32-weight block; sc / of = 8 fp16 per block;
// xq: activations in natural order; xs32: one scale per 32-block
void int4_x8(const uint8_t* w, const uint16_t* sc, const uint16_t* of, int K, const int8_t* xq,
             const float* xs32, const float* gs, float* out) {
  const int nb = K / 32;
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  auto block = [&](int b, __m256& acc) {
    const uint8_t* wb = w + static_cast<size_t>(b) * 128;
    _mm_prefetch(reinterpret_cast<const char*>(wb + kPrefetch), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wb + kPrefetch + 64), _MM_HINT_T0);
    int32_t x4[8];
    std::memcpy(x4, xq + b * 32, 32);
    __m256i s16 = _mm256_setzero_si256();  // 8 products of <= 15 * 127 per lane: fits
    for (int p = 0; p < 4; ++p) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 32 * p));
      const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
      s16 = _mm256_add_epi16(s16, _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(x4[p])),
                                                   _mm256_maddubs_epi16(hi, _mm256_set1_epi32(x4[4 + p]))));
    }
    const __m256 d = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16, ones));
    const __m256 ws = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + b * 8)));
    const __m256 wo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(of + b * 8)));
    acc = _mm256_fmadd_ps(d, _mm256_mul_ps(ws, _mm256_broadcast_ss(xs32 + b)), acc);
    acc = _mm256_fmadd_ps(wo, _mm256_broadcast_ss(gs + b), acc);
  };
  int b = 0;
  for (; b + 2 <= nb; b += 2) {
    block(b, acc0);
    block(b + 1, acc1);
  }
  if (b < nb) block(b, acc0);
  _mm256_storeu_ps(out, _mm256_add_ps(acc0, acc1));
}

uint64_t stream(const uint8_t* p, size_t n) {
  __m256i a = _mm256_setzero_si256(), b = a;
  for (size_t i = 0; i + 64 <= n; i += 64) {
    a = _mm256_add_epi64(a, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
    b = _mm256_add_epi64(b, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 32)));
  }
  a = _mm256_add_epi64(a, b);
  return _mm256_extract_epi64(a, 0) + _mm256_extract_epi64(a, 3);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s K N   (K a multiple of 64, N of 8; HOT=1: one cached copy)\n", argv[0]);
    return 2;
  }
  const int K = std::atoi(argv[1]), N = std::atoi(argv[2]);
  const size_t layer = static_cast<size_t>(N) * K / 2;
  const int copies = std::getenv("HOT") ? 1 : std::max(2, static_cast<int>(256e6 / layer));
  std::vector<uint8_t> w(copies * layer);
  std::vector<uint16_t> sc(static_cast<size_t>(copies) * N * K / 32, 0x3c00), of(sc.size(), 0xc000);
  for (auto& v : w) v = static_cast<uint8_t>(std::rand());
  std::vector<int8_t> xq(K);
  for (auto& v : xq) v = static_cast<int8_t>(std::rand() % 255 - 127);
  std::vector<float> xs(K / 8, 0.1f), xs32(K / 32, 0.1f), gs(K / 32, 1.f), out(N);
  const size_t bytes = layer + static_cast<size_t>(N) * K / 32 * 4;
  volatile uint64_t sink = 0;

  struct Method { const char* name; size_t bytes; std::function<void(size_t)> run; std::vector<double> t; };
  std::vector<Method> methods = {
      {"stream", layer, [&](size_t cp) {
         uint64_t s = 0;
#pragma omp parallel for reduction(+ : s) schedule(static)
         for (int n = 0; n < N; n += 8) s += stream(w.data() + cp * layer + static_cast<size_t>(n) * K / 2, 4 * K);
         sink = sink + s;
       }, {}},
      {"int4 row", bytes, [&](size_t cp) {
#pragma omp parallel for schedule(static)
         for (int n = 0; n < N; ++n) {
           const size_t r = cp * N + n;
           int4_row(w.data() + r * K / 2, sc.data() + r * K / 32, of.data() + r * K / 32, K, xq.data(),
                    xs.data(), gs.data(), &out[n]);
         }
       }, {}},
      {"int4 x8", bytes, [&](size_t cp) {
#pragma omp parallel for schedule(static)
         for (int n = 0; n < N; n += 8) {
           const size_t r = cp * N + n;
           int4_x8(w.data() + r * K / 2, sc.data() + r * K / 32, of.data() + r * K / 32, K, xq.data(),
                   xs32.data(), gs.data(), &out[n]);
         }
       }, {}},
  };
  const int iters = std::getenv("ITERS") ? std::atoi(std::getenv("ITERS")) : 60;
  for (int it = 0; it < iters; ++it)
    for (size_t m = 0; m < methods.size(); ++m) {
      const size_t cp = (it * 7 + m) % copies;
      const auto t0 = std::chrono::steady_clock::now();
      methods[m].run(cp);
      methods[m].t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
  std::printf("K=%d N=%d, %d thread(s)%s; GB/s = bytes read / median (int4: with fp16 scales, offsets)\n", K, N,
              omp_get_max_threads(), copies == 1 ? ", weights cached (HOT)" : ", weights from DRAM");
  for (auto& m : methods) {
    std::sort(m.t.begin(), m.t.end());
    const double med = m.t[m.t.size() / 2];
    std::printf("  %-9s median %8.1f us  %5.1f GB/s  (best %5.1f)\n", m.name, med * 1e6, m.bytes / med / 1e9,
                m.bytes / m.t[0] / 1e9);
  }
  return 0;
}
