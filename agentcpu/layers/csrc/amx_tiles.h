// Intel AMX tile set-up shared by the kernels that multiply on tiles (the packed bf16
// linear, `bf16_packed_tile.h`, and prefill attention): the OS permission and the one
// tile configuration they all use, 8 tiles of 16 rows x 64 bytes. `hardware.native_build`
// puts this text before those sources (`prelude`). Everything here but `AlignedVector`
// (which the same kernels also use without AMX) exists only in a build for a CPU with
// AMX-BF16 (`-march=native` on Sapphire Rapids and later).
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <cstdint>
#include <new>
#include <vector>

namespace agentcpu_amx {

// std::vector storage on 64-byte boundaries. A tile row (64 bytes) that straddles two
// cache lines costs two loads: tiles read from a 16-byte-aligned std::vector ran ~2x
// slower in a microbenchmark (docs/kernels.md, "AMX GEMM rate").
template <typename T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <typename U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{64})); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t{64}); }
  template <typename U>
  bool operator==(const Aligned64<U>&) const { return true; }
  template <typename U>
  bool operator!=(const Aligned64<U>&) const { return false; }
};
template <typename T>
using AlignedVector = std::vector<T, Aligned64<T>>;

}  // namespace agentcpu_amx

#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
#define AGENTCPU_AMX 1

namespace agentcpu_amx {

constexpr int64_t kRows = 16;   // rows of every tile
constexpr int64_t kBf16 = 32;   // bf16 values per tile row (64 bytes)

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Linux hands the AMX tile state only to a process that asks for it (asked once).
inline bool granted() {
  static const bool ok = [] {
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

// Tiles 0..7 as 16 rows x 64 bytes (per thread; `_tile_release()` when done).
inline void configure() {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) {
    cfg.colsb[i] = 64;
    cfg.rows[i] = kRows;
  }
  _tile_loadconfig(&cfg);
}

}  // namespace agentcpu_amx

#endif  // AMX
