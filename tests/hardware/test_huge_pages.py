"""Weights and the KV pool in transparent huge pages (`hardware/huge_pages.py`).

Whether the kernel then backs a mapping with 2 MiB pages depends on its free memory, so
the tests check what we control: the mapping asks for them (the `hg` flag in
/proc/self/smaps), tensors keep their values, views and ties after the move, and a
model decodes the same tokens with and without."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from agentcpu.hardware import huge_pages
from agentcpu.kvcache.storage import allocate_kv_pool
from tests.engine.helpers import greedy, make_engine, random_prompts, run_all


def _enabled_or_skip():
    if not huge_pages.enabled():
        pytest.skip(f"this kernel offers no transparent huge pages ({huge_pages.thp_mode()})")


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping holding `address`, from /proc/self/smaps."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                start, end = (int(part, 16) for part in head.split("-"))
                inside = start <= address < end
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_zeros_are_zero_aligned_and_ask_for_huge_pages():
    _enabled_or_skip()
    t = huge_pages.zeros((3, 1000, 700), torch.bfloat16)
    assert t.shape == (3, 1000, 700) and t.dtype == torch.bfloat16
    assert t.data_ptr() % huge_pages.HUGE_PAGE_BYTES == 0
    assert not t.any()
    t[2, 999, 699] = 5  # writable to the last element
    assert t.sum().item() == 5
    assert "hg" in _vm_flags(t.data_ptr())


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv(huge_pages.DISABLE_ENV, "0")
    assert not huge_pages.enabled()
    t = huge_pages.zeros((4, 4), torch.float32)
    assert torch.equal(t, torch.zeros(4, 4))
    module = nn.Linear(8, 8)
    weight = module.weight.data_ptr()
    assert huge_pages.move_to_huge_pages(module) == 0 and module.weight.data_ptr() == weight


def test_refused_mapping_or_hint_still_gives_zeroed_memory(monkeypatch):
    """No address space for the padded mapping: PyTorch's allocator instead. A kernel
    that refuses the hint: the mapping, in 4 KiB pages."""
    import mmap

    real = mmap.mmap

    class Refusing(real):
        def madvise(self, *args):
            raise OSError(22, "Invalid argument")

    monkeypatch.setattr(huge_pages, "enabled", lambda: True)
    monkeypatch.setattr(mmap, "mmap", Refusing)
    t = huge_pages.zeroed_bytes(3 << 20)
    assert t.numel() == 3 << 20 and not t.any() and "hg" not in _vm_flags(t.data_ptr())

    def no_space(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(mmap, "mmap", no_space)
    t = huge_pages.zeros((5, 7), torch.float32)
    assert torch.equal(t, torch.zeros(5, 7)) and not huge_pages.in_huge_pages(t)


def test_zeroed_bytes_rejects_negative_sizes():
    with pytest.raises(ValueError, match="nbytes"):
        huge_pages.zeroed_bytes(-1)


class _Tied(nn.Module):
    """Parameters, a buffer, a plain tensor attribute, a weight tied between two
    submodules and a view into another tensor's storage."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight
        self.proj = nn.Linear(16, 16)
        self.register_buffer("table", torch.arange(96, dtype=torch.float64).view(8, 12))
        self.packed = torch.randint(0, 255, (33,), dtype=torch.uint8)
        self.row = self.table[3, 2:9]  # a view: storage offset 38, shared storage


def test_move_keeps_values_ties_and_views():
    _enabled_or_skip()
    torch.manual_seed(0)
    model = _Tied()
    x = torch.randint(0, 50, (5,))
    expected = model.head(model.proj(model.embed(x)))
    before = {name: t.clone() for name, t in model.state_dict().items()}
    packed = model.packed.clone()
    tensors = [model.embed.weight, model.proj.weight, model.proj.bias, model.table, model.packed]
    expected_bytes = sum(t.untyped_storage().nbytes() for t in tensors)  # row: table's storage
    assert huge_pages.move_to_huge_pages(model) == expected_bytes
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    assert torch.equal(model.packed, packed)
    assert model.head.weight is model.embed.weight
    storages = {t.untyped_storage().data_ptr() for t in [*tensors, model.row]}
    assert len(storages) == 1, "one mapping holds every tensor"
    assert "hg" in _vm_flags(model.embed.weight.data_ptr())
    assert all(t.data_ptr() % huge_pages.TENSOR_ALIGNMENT == 0 for t in tensors)
    assert model.row.storage_offset() - model.table.storage_offset() == 38
    model.table[3, 2] = -1.0  # the view still aliases the buffer
    assert model.row[0].item() == -1.0
    assert torch.equal(model.head(model.proj(model.embed(x))), expected)


def test_packed_weights_are_made_in_huge_pages_and_not_moved_again():
    _enabled_or_skip()
    from agentcpu.layers.packed_linear import pack_weight, unpack_weight

    big = torch.randn(1024, 1536).bfloat16()  # 3 MiB: its own mapping
    small = torch.randn(32, 64).bfloat16()  # left to the arena
    packed_big, packed_small = pack_weight(big), pack_weight(small)
    assert torch.equal(unpack_weight(packed_big), big)
    assert torch.equal(unpack_weight(packed_small), small)
    assert huge_pages.in_huge_pages(packed_big) and "hg" in _vm_flags(packed_big.data_ptr())
    assert not huge_pages.in_huge_pages(packed_small)
    holder = nn.Module()
    holder.register_buffer("big", packed_big)
    holder.register_buffer("small", packed_small)
    where, small_bytes = packed_big.data_ptr(), packed_small.untyped_storage().nbytes()
    assert huge_pages.move_to_huge_pages(holder) == small_bytes
    assert holder.big.data_ptr() == where and huge_pages.in_huge_pages(holder.small)


def test_interleaved_int4_weights_are_made_in_huge_pages():
    _enabled_or_skip()
    from agentcpu.quant import formats

    w = formats.quantize_int4(torch.randn(2048, 2048), 32, symmetric=True)  # 2 MiB of int4
    qweight, scales, offsets = formats.interleave_int4(w)
    assert huge_pages.in_huge_pages(qweight) and "hg" in _vm_flags(qweight.data_ptr())
    assert torch.equal(formats.deinterleave_int4(qweight, scales, offsets).qweight, w.qweight)


def test_large_parameters_are_placed_before_loading_and_keep_their_ties():
    _enabled_or_skip()
    model = nn.Module()
    model.embed = nn.Embedding(2048, 512)  # 4 MiB of fp32: its own mapping
    model.head = nn.Linear(512, 2048, bias=False)
    model.head.weight = model.embed.weight
    model.small = nn.Linear(16, 16)
    tied = model.embed.weight
    assert huge_pages.place_large_parameters(model) == 1  # the tied pair counts once
    assert model.head.weight is model.embed.weight is tied
    assert huge_pages.in_huge_pages(tied) and not huge_pages.in_huge_pages(model.small.weight)
    assert "hg" in _vm_flags(tied.data_ptr()) and not tied.any()
    assert huge_pages.place_large_parameters(model) == 0  # already there


def test_kv_pool_asks_for_huge_pages(checkpoint_dir):
    _enabled_or_skip()
    from agentcpu.config import ModelConfig

    cfg = ModelConfig.from_model_dir(checkpoint_dir("llama"))
    pool = allocate_kv_pool(cfg, num_blocks=9, block_size=16, dtype=torch.bfloat16)
    assert pool.shape == (cfg.num_layers, 2, 144, cfg.num_kv_heads, cfg.head_dim)
    assert not pool.any() and "hg" in _vm_flags(pool.data_ptr())


@pytest.mark.parametrize("quant", [None, "int4-g32"])
def test_loaded_model_lives_in_huge_pages_and_decodes_the_same(checkpoint_dir, monkeypatch, quant):
    _enabled_or_skip()
    path = checkpoint_dir("qwen2")
    prompts = random_prompts(3, [5, 30, 12], seed=7)
    runs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv(huge_pages.DISABLE_ENV, flag)
        engine = make_engine(path, dtype="bfloat16", quant=quant, kv_cache_gb=0.05)
        flags = {
            "hg" in _vm_flags(t.data_ptr())
            for t in huge_pages.module_tensors(engine.model)
            if t.numel()
        }
        assert flags == {flag == "1"}, "every weight moves, or none"
        runs[flag] = run_all(engine, prompts, greedy(8))
    assert runs["1"] == runs["0"]
