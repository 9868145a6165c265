"""`FastModule`: an `nn.Module` whose per-call Python cost is a plain method call.

A decode step runs the decoder's modules about 250 times (24 layers x ~10 calls for a
0.5B model) and reads their submodules and parameters about 750 times. On the 2-core
VMs each `module(x)` costs ~1 µs in `nn.Module._call_impl` (hook checks) and each
`self.sub` ~0.5-1 µs in `nn.Module.__getattr__` (submodules and parameters live in
`_modules` / `_parameters`, not in the instance dict). Together that was ~0.75 ms of a
~3.3 ms per-token floor (a 24-layer model with tiny matrices, 2026-12-06), ~4 % of an
int4 decode step of the Qwen2.5-0.5B shape.

A `FastModule` subclass:
- is called straight through its `forward` (`__call__` is `forward`), so forward hooks
  cannot run on it: registering one raises rather than being silently ignored;
- keeps a copy of every submodule, parameter and buffer in its instance dict, so reading
  them is an ordinary attribute hit. The copies follow every way torch changes those
  entries: assignment and deletion (`__setattr__` / `__delattr__`), `add_module` /
  `register_parameter` / `register_buffer`, `load_state_dict(assign=True)` (which
  assigns), and `_apply` (`.to()`, `.float()`, which replace buffers and may replace a
  parameter object). Writing `module._buffers[name]` (or `_parameters`, `_modules`)
  directly bypasses them: use the methods above.

The quantized linears read 3-4 buffers a call (weights, scales, offsets, bias), the
packed bf16 ones 2: about 400 `__getattr__` calls a decode step of a 24-layer model
before buffers were copied too.
"""

from __future__ import annotations

from torch import nn


class FastModule(nn.Module):
    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__:
            cls.__call__ = cls.forward

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        self._sync_entry(name)

    def __delattr__(self, name: str) -> None:
        super().__delattr__(name)
        self.__dict__.pop(name, None)

    def add_module(self, name: str, module) -> None:
        super().add_module(name, module)
        self._sync_entry(name)

    def register_parameter(self, name: str, param) -> None:
        super().register_parameter(name, param)
        self._sync_entry(name)

    def register_buffer(self, name: str, tensor, persistent: bool = True) -> None:
        super().register_buffer(name, tensor, persistent)
        self._sync_entry(name)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        for name in (*self._parameters, *self._buffers):
            self._sync_entry(name)
        return out

    def _sync_entry(self, name: str) -> None:
        """Copy `name` into the instance dict when it is a submodule, parameter or buffer."""
        for store in ("_modules", "_parameters", "_buffers"):
            entries = self.__dict__.get(store)
            if entries is not None and name in entries:
                object.__setattr__(self, name, entries[name])
                return

    def register_forward_hook(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} is a FastModule: forward hooks never run")

    def register_forward_pre_hook(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} is a FastModule: forward hooks never run")
