"""`FastModule` keeps instance-dict copies of its submodules and parameters in step with
every way torch changes them, and is called straight through `forward`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from agentcpu.layers.fast_module import FastModule


class Scale(FastModule):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.full((3,), 2.0), requires_grad=False)
        self.inner = nn.Identity()

    def forward(self, x):
        return self.inner(x) * self.weight


def _bound(m: nn.Module, name: str):
    return m.__dict__.get(name)


def test_call_runs_forward_and_reads_bound_entries():
    m = Scale()
    assert _bound(m, "weight") is m._parameters["weight"]
    assert _bound(m, "inner") is m._modules["inner"]
    assert torch.equal(m(torch.ones(3)), torch.full((3,), 2.0))
    assert type(m).__call__ is Scale.forward


def test_reassigned_submodule_and_parameter_are_what_forward_sees():
    m = Scale()
    m.inner = nn.ReLU()
    m.weight = nn.Parameter(torch.full((3,), 5.0), requires_grad=False)
    assert (
        _bound(m, "inner") is m._modules["inner"] and _bound(m, "weight") is m._parameters["weight"]
    )
    assert torch.equal(m(-torch.ones(3)), torch.zeros(3))
    m.add_module("inner", nn.Identity())  # replaced without __setattr__
    assert torch.equal(m(torch.ones(3)), torch.full((3,), 5.0))
    m.inner = None
    assert m.inner is None and m._modules["inner"] is None


def test_deleted_entries_are_gone_from_the_instance_dict():
    m = Scale()
    del m.inner
    assert "inner" not in m.__dict__
    with pytest.raises(AttributeError):
        _ = m.inner


def test_apply_that_replaces_parameters_keeps_the_copies_in_step():
    m = Scale()
    previous = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        m.double()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(previous)
    assert m.weight is m._parameters["weight"] and m.weight.dtype == torch.float64
    assert m(torch.ones(3, dtype=torch.float64)).dtype == torch.float64


def test_forward_hooks_are_refused_not_ignored():
    with pytest.raises(NotImplementedError, match="FastModule"):
        Scale().register_forward_hook(lambda *a: None)
    with pytest.raises(NotImplementedError, match="FastModule"):
        Scale().register_forward_pre_hook(lambda *a: None)


class Shift(FastModule):
    def __init__(self):
        super().__init__()
        self.register_buffer("offset", torch.full((3,), 1.0))
        self.register_buffer("bias", None)

    def forward(self, x):
        out = x + self.offset
        return out if self.bias is None else out + self.bias


def test_buffers_are_bound_and_follow_assignment_and_apply():
    m = Shift()
    assert _bound(m, "offset") is m._buffers["offset"] and "bias" in m.__dict__
    m.bias = torch.full((3,), 10.0)  # None -> tensor stays a buffer
    assert _bound(m, "bias") is m._buffers["bias"]
    assert torch.equal(m(torch.zeros(3)), torch.full((3,), 11.0))
    m.double()  # _apply replaces every buffer object
    assert m.offset is m._buffers["offset"] and m.offset.dtype == torch.float64
    assert m(torch.zeros(3, dtype=torch.float64)).dtype == torch.float64
    del m.bias
    assert "bias" not in m.__dict__ and "bias" not in m._buffers


def test_state_dict_loaded_by_assignment_is_what_forward_sees():
    m = Shift()
    m.load_state_dict({"offset": torch.full((3,), 4.0)}, assign=True)
    assert m.offset is m._buffers["offset"]
    assert torch.equal(m(torch.zeros(3)), torch.full((3,), 4.0))
    m.load_state_dict({"offset": torch.full((3,), 6.0)})  # in-place copy: same object
    assert torch.equal(m(torch.zeros(3)), torch.full((3,), 6.0))
