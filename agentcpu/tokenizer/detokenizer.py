"""Streaming detokenization: turn generated ids into text deltas, one token at a time.

A token's text depends on its neighbours: byte-level BPE splits one character's UTF-8
bytes over several tokens, and SentencePiece-style decoders drop the leading space of the
first token. So, as vLLM and TGI do, we decode a short window of recent tokens and diff:
the window starts at the previous emission point (`prefix`) and the new text is what the
window decodes to beyond the prefix's text. While the window's text ends in U+FFFD (an
incomplete character) the tail is held back; text before it is final and goes out at once.
Each step decodes only the window, so the work per token does not grow with the output.
"""

from __future__ import annotations

from agentcpu.tokenizer.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
# A UTF-8 character spans at most 4 bytes, hence at most 4 byte tokens. A window pending
# for far longer holds a permanently invalid sequence (a model emitting garbage bytes);
# release it as replacement characters rather than let the window grow without bound.
MAX_PENDING_TOKENS = 32


class IncrementalDetokenizer:
    """Decode one sequence's generated tokens incrementally.

    Concatenating every `add` delta and the final `flush` equals
    `tokenizer.decode(all_ids, skip_special_tokens)` for the ids given (no prompt context:
    a SentencePiece model's first "▁Hello" streams as "Hello", as decode() gives it). One
    exception: for invalid byte sequences, a byte-fallback decoder turns the whole run of
    byte tokens into U+FFFD, valid bytes included, after the valid ones have streamed out.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # Skipped special tokens never change the text; keeping them out of the window also
        # keeps a window from starting at one, where a decoder's strip-the-first-space
        # rule (SentencePiece) would then apply to the wrong token.
        self._skipped_ids = tokenizer.special_token_ids if skip_special_tokens else frozenset()
        self._window: list[int] = []  # ids from the prefix's start to the newest token
        self._prefix_len = 0  # window[:prefix_len] is the prefix
        self._prefix_text = ""  # decode(window[:prefix_len])
        self._emitted = 0  # chars beyond the prefix text already emitted from a pending tail
        self._chunks: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def add(self, token_id: int) -> str:
        """Append one generated token; return the text it completes (maybe "")."""
        if token_id in self._skipped_ids:
            return ""
        self._window.append(token_id)
        text = self._decode(self._window)
        if len(self._window) - self._prefix_len <= MAX_PENDING_TOKENS:
            if text.endswith(REPLACEMENT_CHAR):
                return self._emit_final_part(text)
            if len(text) <= len(self._prefix_text):
                return ""  # nothing visible yet (e.g. a space the decoder strips)
        return self._emit_and_advance(text)

    def flush(self) -> str:
        """At the end of generation: return whatever is still held back."""
        if len(self._window) == self._prefix_len:
            return ""
        return self._emit_and_advance(self._decode(self._window))

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _emit_final_part(self, text: str) -> str:
        """Emit the text before the trailing replacement characters, which may still
        become a character when the next tokens arrive."""
        start = len(self._prefix_text) + self._emitted
        end = len(text.rstrip(REPLACEMENT_CHAR))
        if end <= start:
            return ""
        self._emitted += end - start
        return self._record(text[start:end])

    def _emit_and_advance(self, text: str) -> str:
        delta = text[len(self._prefix_text) + self._emitted :]
        self._window = self._window[self._prefix_len :]
        self._prefix_len = len(self._window)
        self._prefix_text = self._decode(self._window)
        self._emitted = 0
        return self._record(delta)

    def _record(self, delta: str) -> str:
        if delta:
            self._chunks.append(delta)
        return delta
