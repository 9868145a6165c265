#!/usr/bin/env python3
"""Decode and prefill figures from an OpenAI-compatible server, with token-id prompts.

Works against vLLM, llama-server and agentcpu alike: every request sends its prompt as
a list of token ids to `/v1/completions`, forces the output length with `ignore_eos` and
`min_tokens`, and streams, so time-to-first-token and the decode rate are measured on
the client. Each request gets fresh random ids, so no engine's prefix cache can help.

    python benchmarks/peers/served_bench.py --base-url http://127.0.0.1:8000 --runs 5

Prints one JSON object. Workloads follow BENCH.md: decode = 1 stream, 32-token prompt,
256 output tokens; prefill = 512- and 2,048-token prompts, 1 output token.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import httpx

READY_POLL_SECONDS = 2.0
REQUEST_TIMEOUT_SECONDS = 1800.0
# Prompt ids come from a range every checkpoint of ours has as ordinary tokens.
PROMPT_TOKEN_RANGE = (300, 900)


@dataclass
class RequestTiming:
    prompt_tokens: int
    output_tokens: int
    ttft_s: float
    total_s: float

    @property
    def decode_tok_s(self) -> float | None:
        decode_s = self.total_s - self.ttft_s
        if self.output_tokens < 2 or decode_s <= 0:
            return None
        return (self.output_tokens - 1) / decode_s


def wait_until_ready(base_url: str, timeout_s: float) -> float:
    """Poll /v1/models until it answers 200; return the seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            if httpx.get(f"{base_url}/v1/models", timeout=5.0).status_code == 200:
                return time.monotonic() - start
        except httpx.TransportError:
            pass
        time.sleep(READY_POLL_SECONDS)
    raise TimeoutError(f"{base_url} not ready after {timeout_s:.0f} s")


def random_prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(*PROMPT_TOKEN_RANGE) for _ in range(length)]


def timed_completion(
    client: httpx.Client, model: str, prompt: list[int], max_tokens: int
) -> RequestTiming:
    """One streamed completion of exactly `max_tokens` tokens."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "min_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first_token_at: float | None = None
    streamed_chunks, usage = 0, None
    with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read().decode()[:500]}")
        for event in _sse_events(response):
            if event.get("usage"):
                usage = event["usage"]
            if event.get("choices"):
                streamed_chunks += 1
                first_token_at = first_token_at or time.perf_counter()
    end = time.perf_counter()
    output_tokens = usage["completion_tokens"] if usage else streamed_chunks
    if output_tokens != max_tokens:
        raise RuntimeError(f"asked for {max_tokens} tokens, got {output_tokens}")
    return RequestTiming(len(prompt), output_tokens, (first_token_at or end) - start, end - start)


def _sse_events(response: httpx.Response):
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue
        payload = line[len("data:") :].strip()
        if payload == "[DONE]":
            return
        yield json.loads(payload)


def measure(
    client: httpx.Client,
    model: str,
    rng: random.Random,
    prompt_len: int,
    output_len: int,
    runs: int,
    warmup: int,
) -> list[RequestTiming]:
    for _ in range(warmup):
        timed_completion(client, model, random_prompt(rng, prompt_len), output_len)
    return [
        timed_completion(client, model, random_prompt(rng, prompt_len), output_len)
        for _ in range(runs)
    ]


def decode_summary(timings: list[RequestTiming]) -> dict:
    rates = [t.decode_tok_s for t in timings if t.decode_tok_s is not None]
    return {
        "prompt_tokens": timings[0].prompt_tokens,
        "output_tokens": timings[0].output_tokens,
        "median_decode_tok_s": statistics.median(rates) if rates else None,
        "median_ttft_s": statistics.median(t.ttft_s for t in timings),
        "runs": [asdict(t) | {"decode_tok_s": t.decode_tok_s} for t in timings],
    }


def prefill_summary(timings: list[RequestTiming]) -> dict:
    ttft = statistics.median(t.ttft_s for t in timings)
    return {
        "prompt_tokens": timings[0].prompt_tokens,
        "median_ttft_s": ttft,
        "median_prefill_tok_s": timings[0].prompt_tokens / ttft,
        "runs": [asdict(t) for t in timings],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", default="model", help="served model name")
    parser.add_argument("--engine", default="unknown", help="label written into the JSON")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--decode-prompt", type=int, default=32)
    parser.add_argument("--decode-output", type=int, default=256)
    parser.add_argument("--prefill-lengths", default="512,2048")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--skip-prefill", action="store_true")
    parser.add_argument(
        "--wait-ready",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to this long for the server",
    )
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or args.decode_prompt < 1 or args.decode_output < 1:
        parser.error("--runs, --decode-prompt and --decode-output must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result: dict = {"engine": args.engine, "base_url": args.base_url, "runs": args.runs}
    if args.wait_ready:
        result["ready_wait_s"] = wait_until_ready(args.base_url, args.wait_ready)
    rng = random.Random(args.seed)
    with httpx.Client(base_url=args.base_url, timeout=REQUEST_TIMEOUT_SECONDS) as client:
        if not args.skip_decode:
            timings = measure(
                client,
                args.model,
                rng,
                args.decode_prompt,
                args.decode_output,
                args.runs,
                args.warmup,
            )
            result["decode"] = decode_summary(timings)
        if not args.skip_prefill:
            result["prefill"] = {
                length: prefill_summary(
                    measure(client, args.model, rng, int(length), 1, args.runs, args.warmup)
                )
                for length in args.prefill_lengths.split(",")
            }
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
