import pytest
import torch

from agentcpu.errors import InvalidRequestError
from agentcpu.hardware.threads import configure_threads, default_threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_configure_threads_sets_torch(restore_threads):
    assert configure_threads(1) == 1 == torch.get_num_threads()


def test_configure_threads_defaults_to_physical_cores(restore_threads):
    assert configure_threads(None) == default_threads() >= 1


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_configure_threads_rejects_bad_counts(bad, restore_threads):
    with pytest.raises(InvalidRequestError):
        configure_threads(bad)
