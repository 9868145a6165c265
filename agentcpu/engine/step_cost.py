"""How long a step takes, learned online, so prefill chunks fit a step-time target.

A token budget alone does not bound the gap between two tokens of a running stream: on a
2-core machine 1,024 prefill tokens are ~7 s of compute, on a 64-core AMX server ~0.2 s.
Sarathi-Serve sizes its chunks from a latency target by profiling offline; we learn the
two numbers that matter while serving:

- `decode_step_s`: wall time of a step that carries only decodes (one token per stream);
- `prefill_token_s`: extra wall time per prefill token in a mixed or prefill step.

Both are exponential moving averages. `prefill_budget(target_s)` is then how many
prefill tokens fit beside the decodes in `target_s`, never fewer than `min_chunk` so a
prompt always progresses. Until a prefill step has been seen there is no estimate and no
cap (the first step of a cold engine runs at the token budget).
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_PREFILL_SAMPLE = 32  # smaller prefill chunks are dominated by the fixed cost of a step


@dataclass
class StepCostModel:
    alpha: float = 0.2  # weight of the newest observation
    min_chunk: int = 16
    decode_step_s: float | None = None
    prefill_token_s: float | None = None

    def observe(self, num_decodes: int, num_prefill_tokens: int, seconds: float) -> None:
        """Record one step: how many single-token rows and prefill tokens it ran."""
        if num_prefill_tokens == 0:
            if num_decodes > 0:
                self.decode_step_s = self._ema(self.decode_step_s, seconds)
            return
        if num_prefill_tokens < MIN_PREFILL_SAMPLE:
            return
        fixed = (self.decode_step_s or 0.0) if num_decodes else 0.0
        per_token = max(seconds - fixed, 0.0) / num_prefill_tokens
        self.prefill_token_s = self._ema(self.prefill_token_s, per_token)

    def prefill_budget(self, target_s: float) -> int | None:
        """Prefill tokens that fit beside this step's decodes in `target_s` (None: no
        estimate yet, so no cap)."""
        if self.prefill_token_s is None or self.prefill_token_s <= 0:
            return None
        spare = target_s - (self.decode_step_s or 0.0)
        return max(self.min_chunk, int(spare / self.prefill_token_s))

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.alpha * (new - old)
