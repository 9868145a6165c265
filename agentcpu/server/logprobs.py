"""Engine logprobs -> OpenAI's two logprob shapes (chat's `content` list, completions')."""

from __future__ import annotations

from agentcpu.engine.outputs import TokenLogprob

# JSON has no -Infinity; a token the sampler ruled out is reported as this.
MIN_LOGPROB = -9999.0


def token_text(tokenizer, token_id: int) -> str:
    if tokenizer is None:
        return f"token_id:{token_id}"
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _finite(logprob: float) -> float:
    return logprob if logprob > MIN_LOGPROB else MIN_LOGPROB  # also maps NaN


def _chat_entry(tokenizer, token_id: int, logprob: float) -> dict:
    text = token_text(tokenizer, token_id)
    return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode())}


def chat_logprobs(tokenizer, entries: list[TokenLogprob] | None) -> dict | None:
    if entries is None:
        return None
    content = []
    for entry in entries:
        item = _chat_entry(tokenizer, entry.token_id, entry.logprob)
        item["top_logprobs"] = [_chat_entry(tokenizer, t, lp) for t, lp in entry.top]
        content.append(item)
    return {"content": content}


def completion_logprobs(tokenizer, entries: list[TokenLogprob] | None, offset: int) -> dict | None:
    """`offset`: where this text starts in the choice's text (echo, earlier chunks)."""
    if entries is None:
        return None
    result: dict[str, list] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for entry in entries:
        text = token_text(tokenizer, entry.token_id)
        result["tokens"].append(text)
        result["token_logprobs"].append(_finite(entry.logprob))
        result["top_logprobs"].append(
            {token_text(tokenizer, t): _finite(lp) for t, lp in entry.top}
        )
        result["text_offset"].append(offset)
        offset += len(text)
    return result
