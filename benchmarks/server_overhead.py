"""What the HTTP layer costs per token at 32 concurrent streams, against the engine step.

    python benchmarks/server_overhead.py [--shape qwen2.5-0.5b | --model PATH]
        [--streams 32] [--max-tokens 64] [--prompt-tokens 32] [--out FILE.json]

Runs one workload (`--streams` requests, `--prompt-tokens` random prompt ids each,
exactly `--max-tokens` output tokens via ignore_eos) twice on the same engine:

1. direct: `LLMEngine.add_request` + `step()` until done (no HTTP);
2. served: the FastAPI app under uvicorn in this process, the same number of streaming
   `/v1/completions` clients in a separate process (so their CPU is not the server's).

The HTTP layer's cost is the CPU time of the server's event-loop thread (parsing,
validation, SSE formatting, socket writes) divided by the tokens it streamed; the
engine step time is the wall time inside `LLMEngine.step`. The figure that matters is
their ratio per step: `streams x HTTP time per token / step time` (target < 5 %).
The end-to-end throughput of both runs is printed too (on a small machine it also
pays for the client process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINTS = ROOT / ".bench"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", default=None, help="HF model dir (default: a random --shape checkpoint)"
    )
    p.add_argument("--shape", default="qwen2.5-0.5b", help="agentcpu.bench.checkpoints shape")
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument(
        "--http", default="auto", choices=["auto", "h11", "httptools"], help="uvicorn's HTTP parser"
    )
    p.add_argument("--served-first", action="store_true", help="run the served pass first")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    return p.parse_args(argv)


def model_dir(args) -> Path:
    if args.model:
        return Path(args.model)
    path = DEFAULT_CHECKPOINTS / args.shape
    if not (path / "config.json").is_file():
        from agentcpu.bench.checkpoints import make_random_checkpoint

        print(f"writing a random {args.shape} checkpoint to {path} ...", file=sys.stderr)
        make_random_checkpoint(args.shape, path)
    return path


def prompts(args, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(args.prompt_tokens)] for _ in range(args.streams)]


class StepTimer:
    """Wraps `engine.step` (an instance attribute, so only this engine) to time it."""

    def __init__(self, engine):
        self.times: list[float] = []
        inner = engine.step

        def step():
            start = time.perf_counter()
            outputs = inner()
            if outputs:
                self.times.append(time.perf_counter() - start)
            return outputs

        engine.step = step


def thread_cpu(thread: threading.Thread) -> float:
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def run_direct(engine, args, timer: StepTimer) -> dict:
    from agentcpu.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    timer.times.clear()
    start = time.perf_counter()
    for prompt in prompts(args, engine.config.model_config.vocab_size, seed=1):
        engine.add_request(prompt, params)
    tokens = 0
    while engine.has_unfinished():
        tokens += len(engine.step())
    wall = time.perf_counter() - start
    return {
        "wall_s": wall,
        "tokens": tokens,
        "steps": len(timer.times),
        "step_ms_mean": 1e3 * statistics.mean(timer.times),
        "tokens_per_s": tokens / wall,
    }


# ---- the client process ----------------------------------------------------------------


def client_main(url: str, bodies: list[dict], results) -> None:
    import httpx

    async def one(client: httpx.AsyncClient, body: dict) -> int:
        usage = 0
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line.startswith("data: {") and '"usage":{' in line:
                    usage = json.loads(line[6:])["usage"]["completion_tokens"]
        return usage

    async def main():
        limits = httpx.Limits(max_connections=len(bodies) + 1)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            start = time.perf_counter()
            counts = await asyncio.gather(*(one(client, b) for b in bodies))
            return counts, time.perf_counter() - start

    counts, wall = asyncio.run(main())
    results.put({"tokens": sum(counts), "client_wall_s": wall})


def run_served(engine, args, timer: StepTimer) -> dict:
    import uvicorn

    from agentcpu.engine.async_engine import AsyncEngine
    from agentcpu.server import ServerSettings, create_app

    front = AsyncEngine(engine)
    app = create_app(front, ServerSettings())
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", lifespan="off", http=args.http)
    )
    http_thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    http_thread.start()
    while not server.started:
        time.sleep(0.01)
    engine_thread = next(t for t in threading.enumerate() if t.name == "agentcpu-engine")
    vocab = engine.config.model_config.vocab_size
    try:
        warm = [
            {"prompt": p, "max_tokens": 4, "ignore_eos": True} for p in prompts(args, vocab, 2)[:4]
        ]
        _client_run(url, warm)
        bodies = [
            {
                "prompt": p,
                "max_tokens": args.max_tokens,
                "ignore_eos": True,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            for p in prompts(args, vocab, seed=3)
        ]
        timer.times.clear()
        http_cpu0, engine_cpu0 = thread_cpu(http_thread), thread_cpu(engine_thread)
        process_cpu0 = time.process_time()
        start = time.perf_counter()
        client = _client_run(url, bodies)
        wall = time.perf_counter() - start
        http_cpu = thread_cpu(http_thread) - http_cpu0
        engine_cpu = thread_cpu(engine_thread) - engine_cpu0
        compute_cpu = time.process_time() - process_cpu0 - http_cpu  # engine + torch workers
    finally:
        server.should_exit = True
        http_thread.join(timeout=30)
        front.shutdown()
    tokens = client["tokens"]
    step_s = statistics.mean(timer.times)
    per_token = http_cpu / tokens
    return {
        "wall_s": wall,
        "tokens": tokens,
        "steps": len(timer.times),
        "step_ms_mean": 1e3 * step_s,
        "tokens_per_s": tokens / wall,
        "http_cpu_s": http_cpu,
        "engine_thread_cpu_s": engine_cpu,
        "compute_cpu_s": compute_cpu,
        "http_us_per_token": 1e6 * per_token,
        "http_share_of_step": args.streams * per_token / step_s,
        # CPU seconds are less distorted than wall time on a machine shared with others
        "http_cpu_over_compute_cpu": http_cpu / compute_cpu,
    }


def _client_run(url: str, bodies: list[dict]) -> dict:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    process = ctx.Process(target=client_main, args=(url, bodies, results))
    process.start()
    out = results.get(timeout=900)
    process.join()
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from agentcpu.engine.llm_engine import LLMEngine
    from agentcpu.hardware.threads import configure_threads
    from agentcpu.models.loading import resolve_engine_config

    path = model_dir(args)
    config = resolve_engine_config(
        str(path),
        dtype=args.dtype,
        max_model_len=args.prompt_tokens + args.max_tokens + 16,
        max_num_seqs=max(args.streams, 1),
        kv_cache_gb=1.0,
    )
    threads = configure_threads(None)
    engine = LLMEngine(config)
    timer = StepTimer(engine)
    run_direct(engine, argparse.Namespace(**{**vars(args), "max_tokens": 4}), timer)  # warm-up
    if args.served_first:  # to see whether the order, not the HTTP layer, moves step times
        served = run_served(engine, args, timer)
        direct = run_direct(engine, args, timer)
    else:
        direct = run_direct(engine, args, timer)
        served = run_served(engine, args, timer)
    report = {
        "command": "python benchmarks/server_overhead.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "model": str(path),
        "streams": args.streams,
        "max_tokens": args.max_tokens,
        "prompt_tokens": args.prompt_tokens,
        "dtype": args.dtype,
        "torch_threads": threads,
        "http": args.http,
        "direct": direct,
        "served": served,
        "end_to_end_throughput_loss": 1 - served["tokens_per_s"] / direct["tokens_per_s"],
    }
    print(json.dumps(report, indent=2))
    print(
        f"\nHTTP layer: {served['http_us_per_token']:.0f} us/token; at {args.streams} streams "
        f"{100 * served['http_share_of_step']:.1f} % of a {served['step_ms_mean']:.1f} ms step "
        f"(target < 5 %); {100 * served['http_cpu_over_compute_cpu']:.1f} % of the engine's "
        f"CPU time. Step: {direct['step_ms_mean']:.1f} ms direct, "
        f"{served['step_ms_mean']:.1f} ms served. Throughput: {direct['tokens_per_s']:.0f} tok/s "
        f"direct, {served['tokens_per_s']:.0f} tok/s served "
        f"({100 * report['end_to_end_throughput_loss']:.1f} % less, client process included)."
    )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
