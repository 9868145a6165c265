// Kernels release the GIL while they run, so the HTTP thread can run Python meanwhile;
// called from the decode stack (csrc/decode_stack.cpp), which runs a whole step without
// the GIL, they find it released already and leave it so (pybind11's gil_scoped_release
// alone would abort there: it must be called with the GIL held).
#include <torch/extension.h>
#include <optional>

namespace agentcpu_gil {

struct ReleaseIfHeld {
  std::optional<pybind11::gil_scoped_release> released;
  ReleaseIfHeld() {
    if (PyGILState_Check()) released.emplace();
  }
};

}  // namespace agentcpu_gil
