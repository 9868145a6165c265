"""agentcpu: an inference server and agent runtime for CPUs."""

from agentcpu.engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "LLM":  # lazy: importing the package must not import torch models
        from agentcpu.llm import LLM

        return LLM
    raise AttributeError(name)
