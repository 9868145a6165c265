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
