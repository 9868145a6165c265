"""One native call for a decode step's decoder layers (`layers/csrc/decode_stack.cpp`).

A pure decode step (one new token per sequence, no prefill chunk) runs the same compiled
ops as the modules of `llama.py`, in the same order, so the hidden states match theirs
bit for bit. The Python between those ops (module calls, kernel choice, pybind wrapping:
~85 µs a layer, ~2 ms of a 0.5B model's ~14 ms int4 step on a 2-core Zen 3) is gone.

The stack is built at the model's first pure decode step from what each module would
run at decode sizes: every linear's `decode_op` (the compiled op its `forward` picks,
and up to how many rows it picks it), the fused norms / rope / SiLU / KV write and the
decode attention op. It holds references to the weights and KV caches it was built
with; `LlamaForCausalLM.reset_decode_stack()` drops it where a caller replaces them.
Where any piece has no compiled op (fp32 weights, no compiler, unusual shapes) there
is no stack and the modules run as before; so does every mixed or prefill step.

`AGENTCPU_DECODE_STACK=0` turns it off (A/B runs: `benchmarks/decode_stack.py`).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from types import ModuleType

import torch

from agentcpu.hardware.native_build import build_extension, kernel_addresses
from agentcpu.layers.attention import AttentionMetadata, decode_attention_op
from agentcpu.layers.fused_ops import fused_for
from agentcpu.layers.linear import LinearOp

DISABLE_ENV = "AGENTCPU_DECODE_STACK"
SOURCE = Path(__file__).parents[1] / "layers" / "csrc" / "decode_stack.cpp"
DECLARATIONS = """
int64_t decode_stack_create(const std::vector<int64_t>& ops, const std::vector<int64_t>& dims,
    double eps, double scale, const at::Tensor& final_norm);
void decode_stack_add_layer(int64_t handle, const std::vector<at::Tensor>& norms,
    const std::vector<at::Tensor>& caches, const std::vector<int64_t>& addresses,
    const std::vector<int64_t>& counts, const std::vector<int64_t>& has_bias,
    const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& biases);
void decode_stack_free(int64_t handle);
at::Tensor decode_stack_run(int64_t handle, const at::Tensor& x, const at::Tensor& positions,
    const at::Tensor& cos_sin, const at::Tensor& slot_mapping, const at::Tensor& decode_slots,
    const at::Tensor& decode_lens);
"""
FUNCTIONS = [
    "decode_stack_create",
    "decode_stack_add_layer",
    "decode_stack_free",
    "decode_stack_run",
]
FUSED_OPS = ("rms_norm", "add_rms_norm", "rope_inplace", "silu_mul", "kv_write")


@functools.cache
def stack_kernel() -> ModuleType | None:
    return build_extension("decode_stack", SOURCE, DECLARATIONS, FUNCTIONS)


def enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "1") != "0"


class DecodeStack:
    """The decoder layers of one model over one set of KV caches, as one native call
    serving decode batches of 1..`max_rows` sequences."""

    def __init__(self, kernel: ModuleType, handle: int, max_rows: int, dtype: torch.dtype):
        self._kernel, self.handle, self.max_rows, self.dtype = kernel, handle, max_rows, dtype

    def run(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Final-normed hidden states [B, hidden] of a pure decode step."""
        return self._kernel.decode_stack_run(
            self.handle,
            x,
            positions,
            cos_sin,
            meta.slot_mapping,
            meta.decode_slots,
            meta.decode_lens,
        )

    def __del__(self) -> None:
        self._kernel.decode_stack_free(self.handle)


def build_stack(model, kv_caches) -> DecodeStack | None:
    """The stack for `model` (a `llama.LlamaForCausalLM`) over `kv_caches`, or None where
    some piece of it has no compiled op."""
    kernel = stack_kernel() if enabled() else None
    if kernel is None or not kv_caches or len(kv_caches) != len(model.model.layers):
        return None
    cfg, norm = model.config, model.model.norm
    dtype = norm.weight.dtype
    attention = decode_attention_op(dtype, cfg.num_heads, cfg.head_dim, kv_caches[0][0])
    ops = fused_for(norm.weight)
    if attention is None or ops is None or model.rope.cos_sin.dtype != dtype:
        return None
    fused = kernel_addresses(ops)
    addresses = [fused[name] for name in FUSED_OPS] + [kernel_addresses(attention[0])[attention[1]]]
    layers = [
        _layer_parts(layer, caches, dtype, norm.eps)
        for layer, caches in zip(model.model.layers, kv_caches, strict=True)
    ]
    if any(parts is None for parts in layers):
        return None
    dims = [cfg.num_heads, cfg.num_kv_heads, cfg.head_dim]
    first_attn = model.model.layers[0].self_attn
    handle = kernel.decode_stack_create(addresses, dims, norm.eps, first_attn.scale, norm.weight)
    stack = DecodeStack(kernel, handle, min(p[-1] for p in layers), dtype)  # frees on error
    for norms, caches, linears, _ in layers:
        kernel.decode_stack_add_layer(
            handle,
            norms,
            caches,
            [op.address for op in linears],
            [len(op.weights) for op in linears],
            [op.bias is not None for op in linears],
            [w for op in linears for w in op.weights],
            [op.bias for op in linears if op.bias is not None],
        )
    return stack


def _layer_parts(layer, caches, dtype: torch.dtype, eps: float):
    """(norms, caches, linear ops, max rows) of one decoder layer, or None."""
    attn, mlp = layer.self_attn, layer.mlp
    norms = [layer.input_layernorm, layer.post_attention_layernorm]
    if attn.q_norm is not None:
        norms += [attn.q_norm, attn.k_norm]
    if any(n.weight.dtype != dtype or n.eps != eps for n in norms):
        return None
    k_cache, v_cache = caches
    if k_cache.dtype != dtype or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        return None
    linears: list[LinearOp | None] = []
    for module in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
        decode_op = getattr(module, "decode_op", None)
        linears.append(None if decode_op is None else decode_op(dtype))
    if any(op is None for op in linears):
        return None
    return (
        [n.weight for n in norms],
        [k_cache, v_cache],
        linears,
        min(op.max_rows for op in linears),
    )
