// A decode step's decoder layers in one native call (layers/decode_stack.py).
//
// Each layer runs the same compiled ops, in the same order, as the Python modules do
// (models/llama.py): the add + RMSNorm, the qkv projection, the q/k norms (Qwen3), rope
// in place, the KV write, decode attention, the o projection, the add + RMSNorm, the
// gate/up projection, SiLU-and-multiply, the down projection. What goes away is the
// Python between them: at a 0.5B model's 0.4-1 MB layers each op's Python call
// (module call, kernel choice, pybind argument and result wrapping) cost a few µs,
// ~85 µs a layer in all (docs/quantization.md).
//
// The ops live in other extensions; this one calls them through the addresses those
// export (`native_build.address_table`), cast back to the C++ types declared below, which
// must match the ops' declarations in layers/fused_ops.py, layers/bf16_kernel.py,
// layers/amx_kernel.py and quant/kernels.py.
#include <torch/extension.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <tuple>
#include <vector>

namespace {

using Tensor = at::Tensor;
using OptTensor = c10::optional<at::Tensor>;
using Linear1Fn = Tensor (*)(const Tensor&, const Tensor&, const OptTensor&);
using Linear2Fn = Tensor (*)(const Tensor&, const Tensor&, const Tensor&, const OptTensor&);
using Linear3Fn = Tensor (*)(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&);
using RmsNormFn = Tensor (*)(const Tensor&, const Tensor&, double);
using AddRmsNormFn = std::tuple<Tensor, Tensor> (*)(const Tensor&, const Tensor&, const Tensor&, double);
using RopeFn = void (*)(const Tensor&, const Tensor&, const Tensor&, const Tensor&);
using SiluMulFn = Tensor (*)(const Tensor&);
using KvWriteFn = void (*)(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&);
using AttentionFn = Tensor (*)(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double);

// One projection: an op taking (x, 1-3 weight tensors, bias).
struct StackLinear {
  int64_t address = 0;
  std::vector<Tensor> weights;
  OptTensor bias;

  Tensor operator()(const Tensor& x) const {
    switch (weights.size()) {
      case 1: return reinterpret_cast<Linear1Fn>(address)(x, weights[0], bias);
      case 2: return reinterpret_cast<Linear2Fn>(address)(x, weights[0], weights[1], bias);
      default: return reinterpret_cast<Linear3Fn>(address)(x, weights[0], weights[1], weights[2], bias);
    }
  }
};

struct StackLayer {
  Tensor input_norm, post_norm, k_cache, v_cache;
  OptTensor q_norm, k_norm;
  StackLinear qkv, o, gate_up, down;
};

struct Stack {
  RmsNormFn rms_norm;
  AddRmsNormFn add_rms_norm;
  RopeFn rope;
  SiluMulFn silu_mul;
  KvWriteFn kv_write;
  AttentionFn attention;
  int64_t heads, kv_heads, head_dim;
  double eps, scale;
  Tensor final_norm;
  std::vector<StackLayer> layers;
};

std::mutex stacks_lock;
std::vector<std::shared_ptr<Stack>> stacks;  // handle = index; freed entries are null

// A running step keeps its stack alive even if another thread frees the handle.
std::shared_ptr<Stack> stack_at(int64_t handle) {
  std::lock_guard<std::mutex> guard(stacks_lock);
  TORCH_CHECK(handle >= 0 && handle < static_cast<int64_t>(stacks.size()) && stacks[handle],
              "no decode stack ", handle);
  return stacks[handle];
}

// The linears' specs: address, weight count (1-3), has-bias flag each; their weights and
// biases in order, flattened.
std::vector<StackLinear> take_linears(const std::vector<int64_t>& addresses, const std::vector<int64_t>& counts,
                                      const std::vector<int64_t>& has_bias, const std::vector<Tensor>& weights,
                                      const std::vector<Tensor>& biases) {
  TORCH_CHECK(addresses.size() == 4 && counts.size() == 4 && has_bias.size() == 4, "four linears per layer");
  std::vector<StackLinear> out(4);
  size_t w = 0, b = 0;
  for (size_t i = 0; i < 4; ++i) {
    TORCH_CHECK(addresses[i] != 0 && counts[i] >= 1 && counts[i] <= 3, "bad linear spec ", i);
    out[i].address = addresses[i];
    for (int64_t j = 0; j < counts[i]; ++j) {
      TORCH_CHECK(w < weights.size(), "too few linear weights");
      out[i].weights.push_back(weights[w++]);
    }
    if (has_bias[i]) {
      TORCH_CHECK(b < biases.size(), "too few linear biases");
      out[i].bias = biases[b++];
    }
  }
  TORCH_CHECK(w == weights.size() && b == biases.size(), "unused linear weights or biases");
  return out;
}

}  // namespace

// ops: addresses of rms_norm, add_rms_norm, rope_inplace, silu_mul, kv_write and the
// decode attention op; dims: heads, kv_heads, head_dim; returns the stack's handle.
int64_t decode_stack_create(const std::vector<int64_t>& ops, const std::vector<int64_t>& dims, double eps,
                            double scale, const at::Tensor& final_norm) {
  TORCH_CHECK(ops.size() == 6 && dims.size() == 3, "6 op addresses and 3 dims");
  for (int64_t a : ops) TORCH_CHECK(a != 0, "null op address");
  auto s = std::make_shared<Stack>();
  s->rms_norm = reinterpret_cast<RmsNormFn>(ops[0]);
  s->add_rms_norm = reinterpret_cast<AddRmsNormFn>(ops[1]);
  s->rope = reinterpret_cast<RopeFn>(ops[2]);
  s->silu_mul = reinterpret_cast<SiluMulFn>(ops[3]);
  s->kv_write = reinterpret_cast<KvWriteFn>(ops[4]);
  s->attention = reinterpret_cast<AttentionFn>(ops[5]);
  s->heads = dims[0];
  s->kv_heads = dims[1];
  s->head_dim = dims[2];
  s->eps = eps;
  s->scale = scale;
  s->final_norm = final_norm;
  std::lock_guard<std::mutex> guard(stacks_lock);
  stacks.push_back(std::move(s));
  return static_cast<int64_t>(stacks.size()) - 1;
}

// norms: input, post-attention, then q and k norms where the model has them (Qwen3);
// caches: this layer's k and v cache; the four linears (qkv, o, gate_up, down) as in
// `take_linears`.
void decode_stack_add_layer(int64_t handle, const std::vector<at::Tensor>& norms,
                            const std::vector<at::Tensor>& caches, const std::vector<int64_t>& addresses,
                            const std::vector<int64_t>& counts, const std::vector<int64_t>& has_bias,
                            const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& biases) {
  const std::shared_ptr<Stack> held = stack_at(handle);
  Stack& s = *held;
  TORCH_CHECK(norms.size() == 2 || norms.size() == 4, "2 norms, or 4 with q/k norms");
  TORCH_CHECK(caches.size() == 2, "a k and a v cache");
  std::vector<StackLinear> linears = take_linears(addresses, counts, has_bias, weights, biases);
  StackLayer layer;
  layer.input_norm = norms[0];
  layer.post_norm = norms[1];
  if (norms.size() == 4) {
    layer.q_norm = norms[2];
    layer.k_norm = norms[3];
  }
  layer.k_cache = caches[0];
  layer.v_cache = caches[1];
  layer.qkv = linears[0];
  layer.o = linears[1];
  layer.gate_up = linears[2];
  layer.down = linears[3];
  s.layers.push_back(std::move(layer));
}

void decode_stack_free(int64_t handle) {
  std::lock_guard<std::mutex> guard(stacks_lock);
  if (handle >= 0 && handle < static_cast<int64_t>(stacks.size())) stacks[handle].reset();
}

// x: the step's embeddings [B, hidden], one decode token per sequence; positions,
// slot_mapping int64 [B]; cos_sin the rope table; decode_slots [B, L] / decode_lens [B]
// as in layers/attention.py's AttentionMetadata. Returns the final norm of the last
// layer's residual stream [B, hidden], what LlamaForCausalLM.forward returns.
at::Tensor decode_stack_run(int64_t handle, const at::Tensor& x, const at::Tensor& positions,
                            const at::Tensor& cos_sin, const at::Tensor& slot_mapping,
                            const at::Tensor& decode_slots, const at::Tensor& decode_lens) {
  const std::shared_ptr<Stack> held = stack_at(handle);
  const Stack& s = *held;
  TORCH_CHECK(x.dim() == 2, "x must be [tokens, hidden]");
  const int64_t T = x.size(0), q_size = s.heads * s.head_dim, kv_size = s.kv_heads * s.head_dim;
  // The whole step runs without the GIL (the HTTP thread may run Python meanwhile); the
  // ops that release it themselves see that (csrc/gil.h).
  pybind11::gil_scoped_release no_gil;
  Tensor hidden = x, residual;
  for (const StackLayer& L : s.layers) {
    Tensor h;
    if (!residual.defined()) {
      residual = hidden;
      h = s.rms_norm(hidden, L.input_norm, s.eps);
    } else {
      std::tie(residual, h) = s.add_rms_norm(residual, hidden, L.input_norm, s.eps);
    }
    const Tensor qkv = L.qkv(h);
    Tensor q = qkv.narrow(1, 0, q_size).view({T, s.heads, s.head_dim});
    Tensor k = qkv.narrow(1, q_size, kv_size).view({T, s.kv_heads, s.head_dim});
    const Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({T, s.kv_heads, s.head_dim});
    if (L.q_norm) {
      q = s.rms_norm(q, *L.q_norm, s.eps);
      k = s.rms_norm(k, *L.k_norm, s.eps);
    }
    s.rope(q, k, cos_sin, positions);
    s.kv_write(L.k_cache, L.v_cache, slot_mapping, k, v);
    const Tensor attended = s.attention(q, L.k_cache, L.v_cache, decode_slots, decode_lens, s.scale);
    const Tensor o = L.o(attended.view({T, q_size}));
    std::tie(residual, h) = s.add_rms_norm(residual, o, L.post_norm, s.eps);
    hidden = L.down(s.silu_mul(L.gate_up(h)));
  }
  if (!residual.defined()) return s.rms_norm(hidden, s.final_norm, s.eps);
  return std::get<1>(s.add_rms_norm(residual, hidden, s.final_norm, s.eps));
}
