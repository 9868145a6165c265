"""Decodes never wait behind prefill: decode-first scheduling and the step-time cap."""

from __future__ import annotations

from agentcpu.config import SchedulerConfig
from agentcpu.engine.request import Request, RequestStatus
from agentcpu.engine.sampling_params import SamplingParams
from agentcpu.engine.scheduler import Scheduler
from agentcpu.engine.step_cost import StepCostModel
from agentcpu.kvcache.manager import KVCacheManager
from tests.engine.helpers import greedy, make_engine, random_prompts, run_all


def test_cost_model_learns_decode_and_prefill_costs():
    cost = StepCostModel(alpha=1.0, min_chunk=4)
    assert cost.prefill_budget(0.5) is None  # nothing measured: no cap
    cost.observe(num_decodes=8, num_prefill_tokens=0, seconds=0.1)
    cost.observe(num_decodes=8, num_prefill_tokens=200, seconds=0.5)  # 0.4 s for 200 tokens
    assert abs(cost.prefill_token_s - 0.002) < 1e-12
    assert cost.prefill_budget(0.5) == 200  # (0.5 - 0.1) / 0.002
    assert cost.prefill_budget(0.05) == 4  # decodes alone exceed the target: min chunk
    cost.observe(num_decodes=0, num_prefill_tokens=10, seconds=9.0)  # too small to learn from
    assert abs(cost.prefill_token_s - 0.002) < 1e-12


def test_cost_model_averages():
    cost = StepCostModel(alpha=0.5)
    cost.observe(0, 100, 1.0)
    cost.observe(0, 100, 3.0)
    assert abs(cost.prefill_token_s - 0.02) < 1e-12


def _scheduler(max_step_ms: float, budget: int = 64) -> Scheduler:
    kv = KVCacheManager(num_blocks=64, block_size=4)
    return Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget,
                                     max_step_ms=max_step_ms), kv)


def _place_running(scheduler: Scheduler, request_id: str, prompt_len: int, decoding: bool) -> Request:
    """A running request as the engine leaves it: mid-prefill, or one token from the end."""
    request = Request(request_id, list(range(prompt_len)), SamplingParams(max_tokens=100))
    computed = prompt_len if decoding else prompt_len // 4
    assert scheduler.kv.allocate(request, computed)
    request.num_computed_tokens = computed
    if decoding:
        request.output_token_ids.append(0)
    request.status = RequestStatus.RUNNING
    scheduler.running.append(request)
    return request


def test_running_prefill_does_not_starve_later_decodes():
    scheduler = _scheduler(max_step_ms=0, budget=8)
    _place_running(scheduler, "long", 40, decoding=False)  # admitted first, still prefilling
    for i in range(3):
        _place_running(scheduler, f"d{i}", 3, decoding=True)
    step = {s.request.request_id: s.num_new_tokens for s in scheduler.schedule()}
    assert step == {"d0": 1, "d1": 1, "d2": 1, "long": 8 - 3}


def test_step_time_cap_limits_prefill_beside_decodes():
    scheduler = _scheduler(max_step_ms=500)
    decoding = [_place_running(scheduler, f"d{i}", 3, decoding=True) for i in range(2)]
    scheduler.cost = StepCostModel(min_chunk=4, decode_step_s=0.1, prefill_token_s=0.04)
    scheduler.add(Request("new", list(range(50)), SamplingParams(max_tokens=4)))
    step = {s.request.request_id: s.num_new_tokens for s in scheduler.schedule()}
    assert step == {"d0": 1, "d1": 1, "new": 10}  # (0.5 - 0.1) / 0.04 prefill tokens
    new = scheduler.running[-1]
    new.num_computed_tokens += 10
    for r in decoding:
        scheduler.finish(r, "abort")
    step = {s.request.request_id: s.num_new_tokens for s in scheduler.schedule()}
    assert step == {"new": 40}  # no stream waits: the token budget alone


def test_engine_with_step_cap_gives_same_tokens(checkpoint_dir):
    """A learned cap changes chunk sizes, never tokens (fp32, greedy)."""
    path = checkpoint_dir("qwen2")
    prompts = random_prompts(6, [90, 7, 120, 3, 60, 33], seed=3)
    reference = run_all(make_engine(path, max_step_ms=0), prompts, greedy(10))
    engine = make_engine(path, max_step_ms=1e-3)  # cap every prefill beside decodes to min_chunk
    ids = [engine.add_request(p, greedy(10)).request_id for p in prompts[:2]]
    for _ in range(3):
        engine.step()  # the first two are decoding and the cost model has seen prefill
    assert engine.scheduler.cost.prefill_token_s is not None
    ids += [engine.add_request(p, greedy(10)).request_id for p in prompts[2:]]
    chunks, done = [], {}
    while engine.has_unfinished():
        scheduled_before = engine.stats.computed_tokens
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
        chunks.append(engine.stats.computed_tokens - scheduled_before)
    assert [done[i] for i in ids] == reference
    assert max(chunks) < 120  # the 120-token prompt was cut although the budget allowed it
