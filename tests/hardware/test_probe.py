import pytest
import torch

from agentcpu.errors import InvalidRequestError
from agentcpu.hardware.probe import (
    ProbeUnsupportedError,
    measure_matmul_flops,
    measure_read_bandwidth,
)


def test_read_bandwidth_is_positive():
    assert measure_read_bandwidth(bytes=32 << 20, repeats=2) > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_matmul_flops_is_positive(dtype):
    assert measure_matmul_flops(dtype, n=64, budget_s=0.05) > 0


def test_matmul_flops_picks_a_size_within_budget():
    assert measure_matmul_flops(torch.float32, budget_s=0.05) > 0


def test_int8_matmul_is_positive_or_unsupported():
    try:
        assert measure_matmul_flops(torch.int8, n=64, budget_s=0.05) > 0
    except ProbeUnsupportedError:
        pytest.skip("no int8 matmul in this torch build")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dtype": torch.float16},
        {"dtype": torch.float32, "n": 60},
        {"dtype": torch.float32, "n": 0},
        {"dtype": torch.float32, "budget_s": 0},
    ],
)
def test_matmul_rejects_bad_arguments(kwargs):
    with pytest.raises(InvalidRequestError):
        measure_matmul_flops(**kwargs)


def test_read_bandwidth_rejects_bad_arguments():
    with pytest.raises(InvalidRequestError):
        measure_read_bandwidth(bytes=1024)
    with pytest.raises(InvalidRequestError):
        measure_read_bandwidth(bytes=32 << 20, repeats=0)
