// Row views for kernels that take [..., K] tensors and work on [rows, K]. A reshape or
// view is a dispatched op (~3 us on a slow 2-core VM); on a decode step the kernels are
// called ~200 times with tensors that already are 2-D and contiguous, so these return
// their input as it is then.
#include <torch/extension.h>
#include <vector>

namespace agentcpu_rows {

// x as contiguous [rows, x.size(-1)]
inline at::Tensor as_rows(const at::Tensor& x) {
  if (x.dim() == 2 && x.is_contiguous()) return x;
  return x.reshape({-1, x.size(-1)}).contiguous();
}

// out [rows, N] with x's leading dims: [..., N]
inline at::Tensor like_rows(const at::Tensor& out, const at::Tensor& x) {
  if (x.dim() == 2) return out;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out.size(-1);
  return out.view(shape);
}

}  // namespace agentcpu_rows
