"""How much of a quantized decode step is not the GEMVs: the engine decodes with the
real int8 / int4 GEMV kernels, then with them replaced by kernels that only allocate
their output, alternating rounds; the second is the floor that faster GEMVs cannot
remove (Python and torch dispatch, attention, norms, sampling, scheduling).

It runs the modules (`AGENTCPU_DECODE_STACK=0`): the native decode stack calls the real
GEMVs through their addresses, which this substitution cannot reach. The stack's gain
over the modules is measured by `benchmarks/decode_stack.py`.

    python benchmarks/decode_floor.py --model .bench/qwen2.5-0.5b --quant int4-g32
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from agentcpu.bench import offline
from agentcpu.engine.llm_engine import LLMEngine
from agentcpu.models import decode_stack, loading
from agentcpu.quant import ops


class OutputOnlyKernels:
    """The compiled kernels, except that the GEMVs return an uninitialised output."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def int4_linear_gemv(self, x, qweight, scales, offsets, bias):
        out_features = ops.int4_shape(qweight)[0]  # rows or 8-row interleaved layout
        return torch.empty(*x.shape[:-1], out_features, dtype=x.dtype)

    def int8_linear_gemv(self, x, qweight, scales, bias):
        return torch.zeros(*x.shape[:-1], qweight.shape[0], dtype=x.dtype)  # argmax-safe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--quant", default="int4-g32")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    os.environ[decode_stack.DISABLE_ENV] = "0"
    torch.set_num_threads(args.threads)
    cfg = loading.resolve_engine_config(
        args.model, dtype="bfloat16", max_model_len=4096, kv_cache_gb=1.0, quant=args.quant
    )
    engine = LLMEngine(cfg)
    real = ops.kernels()
    if real is None:
        raise SystemExit("no compiled quantized kernels on this machine")
    variants = {"real GEMVs": real, "GEMVs output only": OutputOnlyKernels(real)}
    tpot: dict[str, list[float]] = {name: [] for name in variants}
    saved = ops.kernels
    try:
        offline.decode(engine, 1, 16, 8, 0)  # warm-up
        for r in range(args.rounds):
            for name, k in variants.items():
                ops.kernels = lambda k=k: k
                tpot[name].append(offline.decode(engine, 1, 16, args.output_len, r)["tpot_ms_p50"])
    finally:
        ops.kernels = saved
    real_ms = statistics.median(tpot["real GEMVs"])
    floor_ms = statistics.median(tpot["GEMVs output only"])
    print(
        f"| {args.quant}, 1 stream, {args.threads} threads | ms per token (median of {args.rounds}) |"
    )
    print("|---|--:|")
    print(f"| real GEMVs | {real_ms:.1f} |")
    print(
        f"| GEMVs output only (the floor) | {floor_ms:.1f} ({floor_ms / real_ms:.0%} of the step) |"
    )


if __name__ == "__main__":
    main()
