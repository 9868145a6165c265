"""Build a model on the meta device and fill it from checkpoint tensors.

Building on "meta" allocates nothing; `to_empty` then allocates each parameter once and
the checkpoint tensors are copied in (cast to the model dtype), so host RAM holds one
copy of the weights. Every parameter must be filled exactly once: a missing, unexpected
or mis-shaped tensor raises `ModelLoadError` naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from agentcpu.config import ModelConfig
from agentcpu.errors import ModelLoadError
from agentcpu.hardware import huge_pages
from agentcpu.layers.linear import Linear, copy_checked
from agentcpu.models.registry import model_class

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def build_model(cfg: ModelConfig, dtype: str, max_model_len: int,
                before_allocation: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """An unfilled model with its parameters allocated and rope tables built.

    `before_allocation` sees the model while it is still on the meta device, so it can
    swap modules (e.g. GGUF layers that load straight into quantized formats) at no cost.
    """
    torch_dtype = DTYPES[dtype]
    with torch.device("meta"):
        model = model_class(cfg)(cfg, torch_dtype)
        if before_allocation is not None:
            before_allocation(model)
    model.to_empty(device="cpu")
    huge_pages.place_large_parameters(model)  # before any page of them is touched
    model.rope.build(max_model_len, torch_dtype)
    return model.eval()


def load_weights(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy named checkpoint tensors (Hugging Face names) into `model`."""
    expected = _expected_names(model)
    loaded: set[str] = set()
    for name, tensor in tensors:
        if name.endswith(IGNORED_SUFFIXES) or (name == "lm_head.weight" and model.lm_head is None):
            continue
        if name not in expected:
            raise ModelLoadError(f"checkpoint tensor {name!r} does not belong to this model")
        if name in loaded:
            raise ModelLoadError(f"checkpoint tensor {name!r} appears twice")
        module, param_name, shard = expected[name]
        if isinstance(module, Linear):
            module.load(param_name, tensor, shard, name)
        else:
            copy_checked(getattr(module, param_name).data, tensor, name)
        loaded.add(name)
    missing = sorted(set(expected) - loaded)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelLoadError(f"checkpoint is missing tensor(s) {', '.join(missing[:3])}{more}")


def _expected_names(model: nn.Module) -> dict[str, tuple[nn.Module, str, str | None]]:
    """HF tensor name -> (module, parameter name, shard) for every parameter."""
    unpacked = {}
    for ckpt_name, (fused, shard) in model.packed_modules.items():
        unpacked.setdefault(fused, []).append((ckpt_name, shard))
    expected = {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if param is None:
                continue
            prefix, _, leaf = module_name.rpartition(".")
            if leaf in unpacked:
                for ckpt_leaf, shard in unpacked[leaf]:
                    expected[f"{prefix}.{ckpt_leaf}.{param_name}"] = (module, param_name, shard)
            else:
                expected[f"{module_name}.{param_name}"] = (module, param_name, None)
    return expected
