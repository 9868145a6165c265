"""The engine loop: `schedule -> run -> postprocess`, one step at a time.

`LLMEngine` is synchronous and single-threaded; `AsyncEngine` drives it from a thread
for the server. Requests enter as token ids (the caller tokenizes), leave as
`RequestOutput`s with incremental text.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from dataclasses import dataclass

import torch

from agentcpu.config import EngineConfig
from agentcpu.engine.constraint import TokenConstraint
from agentcpu.engine.detokenize import OutputText
from agentcpu.engine.outputs import RequestOutput, TokenLogprob
from agentcpu.engine.request import Request
from agentcpu.engine.runner import ModelRunner
from agentcpu.engine.sampler import SampleResult
from agentcpu.engine.sampling_params import SamplingParams
from agentcpu.engine.scheduler import ScheduledRequest, Scheduler
from agentcpu.errors import CapacityError, ContextLengthError, InvalidRequestError
from agentcpu.hardware.allocator import keep_freed_memory
from agentcpu.kvcache.manager import KVCacheManager
from agentcpu.kvcache.spill import DiskKVStore
from agentcpu.kvcache.storage import allocate_kv_pool, layer_views, num_blocks_for_budget
from agentcpu.models.loader import DTYPES
from agentcpu.models.loading import load_model_and_tokenizer

log = logging.getLogger(__name__)

# a file to append one JSON line per engine step to (time, duration, decode and prefill
# tokens, queue lengths, free and pinned KV blocks); unset: no log
STEP_LOG_ENV = "AGENTCPU_STEP_LOG"


def _open_step_log(path: str | None):
    """Line-buffered, so a killed server leaves every finished step in the file."""
    return open(path, "a", buffering=1) if path else None  # noqa: SIM115 (engine-lifetime)


@dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    computed_tokens: int = 0
    generated_tokens: int = 0
    preemptions: int = 0


class LLMEngine:
    def __init__(self, config: EngineConfig, model=None, tokenizer=None):
        self.config = config
        keep_freed_memory()  # a step's activations stay in the heap (hardware/allocator.py)
        if model is None:
            model, tokenizer = load_model_and_tokenizer(config)
        self.model, self.tokenizer = model, tokenizer
        dtype = DTYPES[config.dtype]
        num_blocks = num_blocks_for_budget(config.model_config, config.cache, dtype)
        block_size = config.cache.block_size
        self.kv = KVCacheManager(
            num_blocks,
            block_size,
            config.cache.enable_prefix_caching,
            int(num_blocks * config.cache.pin_budget_fraction),
        )
        self.kv_pool = allocate_kv_pool(config.model_config, num_blocks, block_size, dtype)
        if config.cache.enable_prefix_caching:
            self.kv.copy_tokens = self._copy_block_tokens
        if config.cache.spill_gb > 0 and config.cache.enable_prefix_caching:
            spill_bytes = int(config.cache.spill_gb * (1 << 30))
            store = DiskKVStore(self.kv_pool, block_size, config.cache.spill_dir, spill_bytes)
            self.kv.attach_spill(store)
        self.runner = ModelRunner(model, layer_views(self.kv_pool), block_size)
        self.scheduler = Scheduler(config.scheduler, self.kv)
        self.requests: dict[str, Request] = {}
        self.texts: dict[str, OutputText] = {}
        self.stats = EngineStats()
        self._ids = itertools.count()
        self.eos_token_ids = tokenizer.eos_token_ids if tokenizer is not None else frozenset()
        self.step_log = _open_step_log(os.environ.get(STEP_LOG_ENV))

    def _copy_block_tokens(self, source: int, target: int, num_tokens: int) -> None:
        """The KV of `source`'s first `num_tokens` slots, in every layer, into `target`."""
        bs = self.config.cache.block_size
        src, dst = source * bs, target * bs
        self.kv_pool[:, :, dst : dst + num_tokens] = self.kv_pool[:, :, src : src + num_tokens]

    # ---- front door -------------------------------------------------------------
    def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        constraint: TokenConstraint | None = None,
        session_id: str | None = None,
        pin_ttl_s: float | None = None,
    ) -> Request:
        """Queue a request. With a `session_id`, its KV is pinned for `pin_ttl_s`
        (default: the cache config's) after it finishes, for the session's next turn."""
        request_id = request_id or f"req-{next(self._ids)}"
        self._validate(prompt_token_ids, params, request_id)
        request = Request(request_id, list(prompt_token_ids), params, self.eos_token_ids)
        request.constraint = constraint
        request.session_id = session_id
        if session_id is not None:
            request.pin_ttl_s = self.config.cache.pin_ttl_s if pin_ttl_s is None else pin_ttl_s
        self.requests[request_id] = request
        self.texts[request_id] = OutputText(self.tokenizer, params)
        self.scheduler.add(request)
        return request

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its KV blocks. False if it is unknown or done."""
        request = self.requests.pop(request_id, None)
        self.texts.pop(request_id, None)
        if request is None or request.finished:
            return False
        self.scheduler.finish(request, "abort")
        return True

    def prompt_logits(self, prompt_token_ids: list[int]) -> torch.Tensor:
        """Logits [len(prompt), vocab] of every prompt position, in one forward (for
        scoring and correctness checks; bypasses the scheduler's token budget)."""
        params = SamplingParams(max_tokens=1)
        self._validate(prompt_token_ids, params, "__score__")
        request = Request("__score__", list(prompt_token_ids), params)
        if not self.kv.allocate(request, len(prompt_token_ids)):
            raise CapacityError("not enough free KV blocks to score this prompt now")
        try:
            batch = self.runner.prepare([ScheduledRequest(request, len(prompt_token_ids))])
            with torch.inference_mode():
                hidden = self.model(batch.input_ids, batch.positions, self.runner.kv_caches, batch.meta)
                return self.model.compute_logits(hidden).float()
        finally:
            self.kv.free(request)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def end_session(self, session_id: str) -> bool:
        """Release a session's pinned KV now and forget it. False if it was unknown."""
        return self.kv.pins.forget(session_id)

    def session_info(self, session_id: str) -> dict | None:
        """Turns, last activity, tokens cached and KV bytes pinned for a session."""
        info = self.kv.pins.sessions.get(session_id)
        if info is None:
            return None
        pin = self.kv.pins.pins.get(session_id)
        block_bytes = self.kv_pool[:, :, : self.kv.block_size].numel() * self.kv_pool.element_size()
        return {
            "id": session_id,
            "turns": info.turns,
            "last_activity": info.last_activity,
            "tokens_cached": pin.num_tokens if pin else 0,
            "kv_bytes_pinned": len(pin.blocks) * block_bytes if pin else 0,
            "pin_expires_in_s": max(0.0, pin.expires_at - self.kv.pins.clock()) if pin else 0.0,
            "prefix_tokens_saved": info.cached_tokens_saved,
        }

    # ---- the step ---------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        self.kv.pins.expire()
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        started = time.perf_counter()
        results = self.runner.execute(scheduled)
        decodes = sum(1 for s in scheduled if s.num_new_tokens == 1)
        prefill = sum(s.num_new_tokens for s in scheduled) - decodes
        elapsed = time.perf_counter() - started
        self.scheduler.cost.observe(decodes, prefill, elapsed)
        self.stats.steps += 1
        if self.step_log is not None:
            self._log_step(started, elapsed, decodes, prefill)
        for s in scheduled:
            s.request.num_computed_tokens += s.num_new_tokens
            self.stats.computed_tokens += s.num_new_tokens
            self.kv.publish_computed(s.request)
        return [self._postprocess(self.requests[rid], res) for rid, res in results.items()]

    def _log_step(self, started: float, elapsed: float, decodes: int, prefill: int) -> None:
        """One JSON line per step (`AGENTCPU_STEP_LOG`): where a served run's time went."""
        record = {
            "t": round(started, 4),
            "s": round(elapsed, 4),
            "decodes": decodes,
            "prefill": prefill,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "free_blocks": self.kv.pool.num_free,
            "pinned_blocks": self.kv.pins.num_pinned_blocks,
        }
        self.step_log.write(json.dumps(record) + "\n")

    def _postprocess(self, request: Request, result: SampleResult) -> RequestOutput:
        if not request.output_token_ids:
            request.first_token_time = time.monotonic()
            self.stats.prompt_tokens += request.num_prompt_tokens
            self.stats.cached_prompt_tokens += max(request.num_cached_tokens, 0)
        request.output_token_ids.append(result.token_id)
        self.stats.generated_tokens += 1
        if request.constraint is not None:
            request.constraint.accept(result.token_id)
        logprob = None
        if request.params.logprobs is not None:
            logprob = TokenLogprob(result.token_id, result.logprob, result.top_logprobs or [])
            request.logprobs.append(logprob)
        text = self.texts[request.request_id]
        # a token that ends the request (EOS, stop id) is never part of the text
        reason, stop_reason = self._stop_token(request, result.token_id)
        stop_string = None
        if reason is None:
            stop_string = text.append(result.token_id)
            if stop_string is not None:
                reason, stop_reason = "stop", stop_string
            else:
                reason, stop_reason = self._other_stop(request)
        if reason is not None:
            text.finish(stopped_by_string=stop_string is not None)
            self.scheduler.finish(request, reason)
            self.stats.preemptions += request.num_preemptions
            del self.requests[request.request_id], self.texts[request.request_id]
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            token_ids=request.output_token_ids,
            text=text.text,
            delta_token_ids=[result.token_id],
            delta_text=text.delta(request.finished),
            finished=request.finished,
            finish_reason=request.finish_reason,
            stop_reason=stop_reason,
            num_cached_tokens=max(request.num_cached_tokens, 0),
            logprobs=request.logprobs if logprob is not None else None,
            delta_logprobs=[logprob] if logprob is not None else None,
        )

    @staticmethod
    def _stop_token(request: Request, token: int):
        params = request.params
        if len(request.output_token_ids) >= params.min_tokens:
            if token in params.stop_token_ids:
                return "stop", token
            if not params.ignore_eos and token in request.eos_token_ids:
                return "stop", None
        return None, None

    def _other_stop(self, request: Request):
        if request.constraint is not None and request.constraint.is_finished():
            return "stop", None
        n_out = len(request.output_token_ids)
        if n_out >= request.params.max_tokens or request.num_tokens >= self.config.max_model_len:
            return "length", None
        return None, None

    # ---- validation -------------------------------------------------------------
    def _validate(self, prompt: list[int], params: SamplingParams, request_id: str) -> None:
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if not prompt:
            raise InvalidRequestError("the prompt is empty: at least one token is required")
        vocab = self.config.model_config.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        if len(prompt) + params.max_tokens > self.config.max_model_len:
            raise ContextLengthError(len(prompt), params.max_tokens, self.config.max_model_len)
        blocks = self.kv.blocks_needed(len(prompt) + params.max_tokens)
        if blocks > self.kv.pool.num_blocks:
            raise CapacityError(
                f"the request needs {blocks} KV blocks but the cache holds "
                f"{self.kv.pool.num_blocks}: raise kv_cache_gb or lower max_tokens"
            )
