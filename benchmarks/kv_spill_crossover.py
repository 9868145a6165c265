"""When is reading a session's KV back from disk cheaper than recomputing it?

Times DiskKVStore.spill/restore for the KV geometry of a model (default: the
qwen2.5-0.5b shape, bf16) and compares with a measured prefill of the same tokens
through the engine. Usage: python benchmarks/kv_spill_crossover.py [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from agentcpu.bench.offline import prefill
from agentcpu.kvcache.spill import DiskKVStore
from agentcpu.llm import LLM

BLOCK = 16


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=".bench/qwen2.5-0.5b")
    parser.add_argument("--tokens", default="64,512,2048")
    args = parser.parse_args()
    llm = LLM(args.model, kv_cache_gb=1)
    engine = llm.engine
    rows = []
    for n in (int(t) for t in args.tokens.split(",")):
        blocks = n // BLOCK
        store = DiskKVStore(engine.kv_pool, BLOCK, tempfile.mkdtemp(), 8 << 30)
        start = time.perf_counter()
        for b in range(blocks):
            store.spill(b, hash(("bench", n, b)))
        spill_s = time.perf_counter() - start
        start = time.perf_counter()
        for b in range(blocks):
            store.restore(hash(("bench", n, b)), b)
        restore_s = time.perf_counter() - start
        store.clear()
        engine.kv.pool.enable_prefix_caching = False
        recompute_s = min(prefill(engine, n, seed=s)["ttft_s"] for s in range(2))
        rows.append({"tokens": n, "spill_s": spill_s, "restore_s": restore_s, "recompute_s": recompute_s,
                     "restore_speedup": recompute_s / max(restore_s, 1e-9)})
        print(json.dumps(rows[-1]))


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
