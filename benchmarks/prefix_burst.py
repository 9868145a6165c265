"""A burst of 32 requests on one fresh 1,500-token prefix (64-token suffixes, 16 output
tokens), with the scheduler waiting for in-flight prefix blocks and with it computing
them again (the check turned off), alternating in one process:
    python benchmarks/prefix_burst.py
"""
import time, torch, statistics
from agentcpu.engine.llm_engine import LLMEngine
from agentcpu.engine.sampling_params import SamplingParams
from agentcpu.engine import scheduler as sched
from agentcpu.models import loading
torch.set_num_threads(2)
cfg = loading.resolve_engine_config(".bench/qwen2.5-0.5b", dtype="bfloat16", max_model_len=4096, kv_cache_gb=1.0)
eng = LLMEngine(cfg)
orig = sched.Scheduler._next_block_in_flight
g = torch.Generator().manual_seed(0)
res = {"waits (new)": [], "computes again (before)": []}
for rnd in range(2):
    for name in res:
        sched.Scheduler._next_block_in_flight = orig if name.startswith("waits") else (lambda self, r, h: False)
        prefix = torch.randint(100, 50000, (1500,), generator=g).tolist()  # fresh prefix each run: no cache from earlier runs
        prompts = [prefix + torch.randint(100, 50000, (64,), generator=g).tolist() for _ in range(32)]
        before = eng.stats.computed_tokens
        t = time.perf_counter()
        for p in prompts: eng.add_request(p, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
        while eng.has_unfinished(): eng.step()
        wall = time.perf_counter() - t
        res[name].append((wall, eng.stats.computed_tokens - before - 32 * 15))
        print(name, f"wall {wall:.1f} s, prompt tokens computed {res[name][-1][1]}", flush=True)
