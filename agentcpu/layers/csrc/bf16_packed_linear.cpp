// bf16 linear over a weight packed once at load (CPUs with AVX-512 BF16), for every
// batch size: one-row decode, batched decode and prefill chunks alike.
//
// y[t, n] = sum_k x[t, k] * w[n, k] + bias[n]; x bf16 [M, K], y bf16 [M, N].
//
// Packed layout (`layers/packed_linear.py` writes it): [N / 16][K / 2][16 rows][2 k] bf16,
// the operand layout of VDPBF16PS: one 64-byte line holds 2 k values of 16 weight rows,
// and a 16-row block is one contiguous run of K * 32 bytes. Each multiply takes that line
// and a broadcast pair of activations (x[t, k], x[t, k + 1]) and adds into 16 fp32 lanes,
// one per output row, so a tile ends as whole output vectors: no horizontal sums (the
// in-place kernel, `bf16_dot_linear.cpp`, reduces every accumulator at the end).
//
// Tile: 4 row blocks (64 rows) x up to 6 tokens = 24 zmm accumulators; per k pair 4
// weight lines and 6 broadcasts feed 24 VDPBF16PS. The 4 blocks stay in L1/L2 while every
// token group passes over them. Tokens are taken in panels of 128, so a panel's
// activations stay in L2 while the weights stream past once per panel: prefill chunks
// (512 rows) run at the GEMM's peak without oneDNN (docs/kernels.md has the figures).
//
// The tile itself is in `bf16_packed_tile.h`, which `hardware.native_build` puts before
// this source (the quantized kernels use it too).
#include <ATen/Parallel.h>

using namespace agentcpu_packed;

// Whether this build has the packed path (compiled for a CPU with AVX-512 BF16, or AVX2 + FMA).
bool bf16_packed_available() {
#ifdef AGENTCPU_PACKED
  return true;
#else
  return false;
#endif
}

// Products of at least this many rows run on AMX tiles where the CPU has them (-1: no
// AMX in this build); returns the previous value. `rows` < 0 only reads it.
int64_t bf16_packed_amx_min_rows(int64_t rows) {
#ifdef AGENTCPU_PACKED_AMX
  if (!agentcpu_amx::granted()) return -1;
  return rows < 0 ? amx_min_rows().load() : amx_min_rows().exchange(rows);
#else
  (void)rows;
  return -1;
#endif
}

// x: [..., K] bf16; packed: bf16 [N / 16, K / 2, 16, 2]; bias: [N] or None.
// Returns [..., N] bf16 (fp32 accumulation, bias added in fp32, one rounding).
at::Tensor bf16_packed_linear(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(bf16_packed_available(), "this build has no packed path (needs AVX-512 BF16 or AVX2 + FMA)");
  TORCH_CHECK(packed.scalar_type() == at::kBFloat16 && packed.dim() == 4 && packed.size(2) == kBlockRows &&
                  packed.size(3) == 2 && packed.is_contiguous(),
              "packed weight must be a contiguous bf16 [N/16, K/2, 16, 2] tensor");
  const int64_t N = packed.size(0) * kBlockRows, K = packed.size(1) * 2;
  LinearIO io = linear_io(x, K, N, bias);
  const int64_t M = io.M;
#ifdef AGENTCPU_PACKED
  const float* bp = io.bias;
  const auto* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
  const at::Tensor x_tile = tile_input(io);
  const TileInput* xp = tile_input_ptr(x_tile);
  auto* op = reinterpret_cast<uint16_t*>(io.out.data_ptr<at::BFloat16>());
  const int64_t blocks = N / kBlockRows;
  const int64_t tasks = (blocks + kBlocksPerTile - 1) / kBlocksPerTile;
  // tiny products run on the calling thread: an OpenMP region costs ~10 us
  const int64_t task_macs = kBlocksPerTile * kBlockRows * K * std::max<int64_t>(M, 1);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / task_macs);
  if (M > 0) {
    agentcpu_gil::ReleaseIfHeld no_gil;  // the HTTP thread may run Python meanwhile
    at::parallel_for(0, tasks, grain, [&](int64_t i0, int64_t i1) {
      blocks_range(wp, K, xp, M, op, N, bp, i0 * kBlocksPerTile, std::min(blocks, i1 * kBlocksPerTile));
    });
  }
#endif
  return in_x_shape(io.out, x);
}

// The packed layout written at load (`packed_linear.pack_weight`): weight bf16 [N, K]
// (contiguous, N % 16 == 0, K even) into `packed` [N / 16, K / 2, 16, 2]. Each k pair is
// one int32, so a 16-row block is a 16 x K/2 int32 transpose: 8 x 8 tiles through
// registers, written in order (~2.5x PyTorch's strided copy of the same transpose). A
// block keeps the bytes of its 16 rows, so `packed` may be `weight` itself: each block is
// copied aside first (K * 32 bytes), and packing in place needs no second buffer.
void bf16_pack_weight(const at::Tensor& weight, at::Tensor& packed) {
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.dim() == 2 && weight.is_contiguous(),
              "weight must be a contiguous bf16 [N, K] tensor");
  const int64_t N = weight.size(0), K = weight.size(1), K2 = K / 2;
  TORCH_CHECK(N % kBlockRows == 0 && K % 2 == 0, "weight [", N, ", ", K, "] does not pack");
  TORCH_CHECK(packed.scalar_type() == at::kBFloat16 && packed.is_contiguous() && packed.numel() == N * K,
              "packed must be a contiguous bf16 tensor of the weight's size");
  const int32_t* src = reinterpret_cast<const int32_t*>(weight.data_ptr<at::BFloat16>());
  int32_t* dst = reinterpret_cast<int32_t*>(packed.data_ptr<at::BFloat16>());
  const bool in_place = static_cast<const void*>(src) == static_cast<const void*>(dst);
  TORCH_CHECK(in_place || src + N * K2 <= dst || dst + N * K2 <= src, "packed partly overlaps the weight");
  agentcpu_gil::ReleaseIfHeld no_gil;
  at::parallel_for(0, N / kBlockRows, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int32_t> aside(in_place ? kBlockRows * K2 : 0);
    for (int64_t b = b0; b < b1; ++b) {
      const int32_t* s = src + b * kBlockRows * K2;  // row r, pair p at s[r * K2 + p]
      if (in_place) {
        std::memcpy(aside.data(), s, aside.size() * sizeof(int32_t));
        s = aside.data();
      }
      int32_t* d = dst + b * kBlockRows * K2;        // pair p, row r at d[p * 16 + r]
      int64_t p = 0;
#if defined(__AVX2__)
      for (; p + 8 <= K2; p += 8) {
        for (int half = 0; half < 2; ++half) {  // rows 0-7, then 8-15
          __m256 r[8];
          for (int i = 0; i < 8; ++i)
            r[i] = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + (half * 8 + i) * K2 + p)));
          // 8 x 8 transpose: rows i, pairs j -> pairs j, rows i
          const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
          const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
          const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
          const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
          const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
          const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
          const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
          const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
          const __m256 o[8] = {
              _mm256_permute2f128_ps(u0, u4, 0x20), _mm256_permute2f128_ps(u1, u5, 0x20),
              _mm256_permute2f128_ps(u2, u6, 0x20), _mm256_permute2f128_ps(u3, u7, 0x20),
              _mm256_permute2f128_ps(u0, u4, 0x31), _mm256_permute2f128_ps(u1, u5, 0x31),
              _mm256_permute2f128_ps(u2, u6, 0x31), _mm256_permute2f128_ps(u3, u7, 0x31)};
          for (int j = 0; j < 8; ++j)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + (p + j) * kBlockRows + half * 8), _mm256_castps_si256(o[j]));
        }
      }
#endif
      for (; p < K2; ++p)
        for (int64_t r = 0; r < kBlockRows; ++r) d[p * kBlockRows + r] = s[r * K2 + p];
    }
  });
}
