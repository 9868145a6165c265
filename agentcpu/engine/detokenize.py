"""Per-request output text: incremental detokenization and exact stop-string cuts.

While a request runs, the last `len(longest stop string) - 1` characters are held back
from the streamed deltas, since they may turn out to start a stop string.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agentcpu.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from agentcpu.tokenizer import Tokenizer


class OutputText:
    def __init__(self, tokenizer: Tokenizer | None, params: SamplingParams):
        self.detokenizer = None
        if tokenizer is not None:
            from agentcpu.tokenizer import IncrementalDetokenizer

            self.detokenizer = IncrementalDetokenizer(tokenizer, params.skip_special_tokens)
        self.stops = params.stop
        self.holdback = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.sent = 0

    def append(self, token_id: int) -> str | None:
        """Add a token's text; returns the stop string if one now matches (text is cut)."""
        if self.detokenizer is None:
            return None
        before = len(self.text)
        self.text += self.detokenizer.add(token_id)
        return self._cut_at_stop(before)

    def finish(self, stopped_by_string: bool) -> None:
        if self.detokenizer is not None and not stopped_by_string:
            before = len(self.text)
            self.text += self.detokenizer.flush()
            self._cut_at_stop(before)

    def delta(self, finished: bool) -> str:
        limit = len(self.text) if finished else max(len(self.text) - self.holdback, self.sent)
        out = self.text[self.sent : limit]
        self.sent = limit
        return out

    def _cut_at_stop(self, before: int) -> str | None:
        if not self.stops:
            return None
        hits = []
        for stop in self.stops:
            i = self.text.find(stop, max(0, before - len(stop) + 1))
            if i >= 0:
                hits.append((i, stop))
        if not hits:
            return None
        index, stop = min(hits)
        self.text = self.text[:index]
        return stop
