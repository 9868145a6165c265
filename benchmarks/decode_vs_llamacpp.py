"""Offline decode and prefill, agentcpu against llama.cpp's `llama-bench`, side by side
on the same checkpoint and threads, each as a share of its own bandwidth roofline.

    python benchmarks/decode_vs_llamacpp.py --model .bench/llama3.2-1b
        [--pairs bf16:bf16 int8:q8_0 int4-g32:q4_0] [--rounds 3] [--threads 2]
        [--output-len 128] [--prompt-len 512] [--depth 0] [--json out.json]

Each pair is (our `--quant`, or bf16; the GGUF type llama.cpp runs). The GGUFs are made
once next to the checkpoint with llama.cpp's own converter and quantizer
(`benchmarks/peers/llamacpp.sh`, which also builds llama.cpp once into `.peers/`).
Rounds alternate engine and pair (ours bf16, llama.cpp bf16, ours int8, ...), so drift
hits both; each round is one decode of `--output-len` tokens after a 32-token prompt and
one prefill of `--prompt-len` tokens (llama-bench: `-n` / `-p`, one repetition). The
figures are medians over rounds. Roofline: the highest read bandwidth the probe measured
(before every round: this VM's bandwidth drifts by a quarter within minutes, and a probe
taken once at the start put a later, faster round above "100 %")
/ the bytes one decode step reads (ours: the checkpoint as quantized at load, LM head
included; llama.cpp: the GGUF's tensors as stored; both plus the KV of the context).

`--depth N` decodes after an N-token context instead (ours: an N-token prompt, its
prefill not timed, as `agentcpu bench decode --context-len N`; llama-bench: `-d N -p
0`), where attention reads
N tokens of KV per layer and step next to the weights; prefill is not measured then.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from agentcpu.bench import offline
from agentcpu.hardware.probe import measure_read_bandwidth
from agentcpu.hardware.roofline import agentcpu_quant_footprint, model_footprint
from agentcpu.hardware.threads import configure_threads
from agentcpu.llm import LLM
from agentcpu.quant import parse_quant

PEER = Path(__file__).parent / "peers" / "llamacpp.sh"


def gguf_for(model: Path, kind: str) -> Path:
    """The checkpoint as a GGUF of `kind` (bf16, q8_0 by the converter; q4_0 etc. by
    llama-quantize from the bf16 file), made once."""
    path = model.parent / f"{model.name}-{kind}.gguf"
    if path.exists():
        return path
    if kind in ("bf16", "f16", "q8_0"):
        subprocess.run([str(PEER), "convert", str(model), str(path), kind], check=True)
    else:
        subprocess.run(
            [str(PEER), "quantize", str(gguf_for(model, "bf16")), str(path), kind], check=True
        )
    return path


def llama_bench(
    gguf: Path, threads: int, output_len: int, prompt_len: int, depth: int = 0
) -> dict[str, float]:
    env = dict(
        os.environ,
        LLAMACPP_BENCH_PP=str(0 if depth else prompt_len),
        LLAMACPP_BENCH_TG=str(output_len),
        LLAMACPP_BENCH_REPS="1",
        LLAMACPP_BENCH_DEPTH=str(depth),
    )
    out = subprocess.run(
        [str(PEER), "bench", str(gguf), str(threads)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    rows = json.loads(out.stdout)
    decode = next(r["avg_ts"] for r in rows if r["n_gen"] > 0)
    if depth:
        return {"decode_tok_s": decode}
    prefill = next(r["avg_ts"] for r in rows if r["n_prompt"] > 0)
    return {"decode_tok_s": decode, "prefill_tok_s": prefill}


def ours(llm: LLM, output_len: int, prompt_len: int, seed: int, depth: int = 0) -> dict[str, float]:
    engine = llm.engine
    # the decode rate after the prompt's prefill (`offline.decode` times from the first token)
    decode = offline.decode(engine, 1, depth or 32, output_len, seed)["decode_tok_s"]
    if depth:
        return {"decode_tok_s": decode}
    engine.kv.pool.enable_prefix_caching = False  # a fresh prompt every time
    prefill = offline.prefill(engine, prompt_len, seed)["prefill_tok_s"]
    engine.kv.pool.enable_prefix_caching = True
    return {"decode_tok_s": decode, "prefill_tok_s": prefill}


def our_decode_bytes(model: Path, quant: str) -> int:
    footprint = model_footprint(model)
    if quant == "bf16":
        return footprint.decode_bytes
    return agentcpu_quant_footprint(footprint, *parse_quant(quant)).decode_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", required=True, help="HF checkpoint dir (e.g. from agentcpu.bench.checkpoints)"
    )
    ap.add_argument("--pairs", nargs="+", default=["bf16:bf16", "int8:q8_0", "int4-g32:q4_0"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--depth", type=int, default=0, help="context tokens before the decode")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    model = Path(args.model).resolve()
    configure_threads(args.threads)
    pairs = [tuple(p.split(":")) for p in args.pairs]
    ggufs = {kind: gguf_for(model, kind) for _, kind in pairs}
    print(f"{args.threads} threads, {args.rounds} rounds", flush=True)
    probes: list[float] = []
    samples: dict[tuple[str, str], list[dict[str, float]]] = {}
    for r in range(args.rounds):
        probes.append(measure_read_bandwidth())
        print(f"round {r} read bandwidth {probes[-1]:.1f} GB/s", flush=True)
        for quant, kind in pairs:
            # one engine at a time (built per round, not kept): a model's bf16, int8 and
            # int4 copies together would not fit next to llama.cpp's for larger shapes
            llm = LLM(
                str(model),
                quant=None if quant == "bf16" else quant,
                kv_cache_gb=1.0 + args.depth * model_footprint(model).kv_bytes_per_token / 2**30,
                max_model_len=max(2048, args.depth + args.output_len + 8),
            )
            ours(llm, 8, 32, 99)  # warm-up of each new engine: kernels built, buffers grown
            samples.setdefault(("ours", quant), []).append(
                ours(llm, args.output_len, args.prompt_len, r, args.depth)
            )
            del llm
            gc.collect()
            samples.setdefault(("llama.cpp", kind), []).append(
                llama_bench(ggufs[kind], args.threads, args.output_len, args.prompt_len, args.depth)
            )
            print(
                f"round {r} {quant}/{kind}: ours {samples['ours', quant][-1]}, "
                f"llama.cpp {samples['llama.cpp', kind][-1]}",
                flush=True,
            )
    bandwidth = max(probes)
    print(f"read bandwidth {min(probes):.1f}-{bandwidth:.1f} GB/s; rooflines use {bandwidth:.1f}")
    rows = []
    kv_bytes = args.depth * model_footprint(model).kv_bytes_per_token  # bf16 / f16 KV, both
    keys = ("decode_tok_s",) if args.depth else ("decode_tok_s", "prefill_tok_s")
    for quant, kind in pairs:
        row = {
            "ours": quant,
            "llamacpp": kind,
            "depth": args.depth,
            "bandwidth_gbs": bandwidth,
            "probes_gbs": probes,
        }
        for engine, name, nbytes in (
            ("ours", quant, our_decode_bytes(model, quant)),
            ("llama.cpp", kind, model_footprint(ggufs[kind]).decode_bytes),
        ):
            for key in keys:
                row[f"{engine}_{key}"] = statistics.median(s[key] for s in samples[engine, name])
            row[f"{engine}_roofline_tok_s"] = bandwidth * 1e9 / (nbytes + kv_bytes)
        rows.append(row)
    prefill_head = " prefill tok/s | ours / llama.cpp |" if not args.depth else ""
    print(
        f"| ours / llama.cpp | decode tok/s | % of own roofline | ours / llama.cpp |{prefill_head}"
    )
    print("|---|--:|--:|--:|" + ("--:|--:|" if not args.depth else ""))
    for row in rows:
        od, ld = row["ours_decode_tok_s"], row["llama.cpp_decode_tok_s"]
        line = (
            f"| {row['ours']} / {row['llamacpp']} | {od:.1f} / {ld:.1f} | "
            f"{od / row['ours_roofline_tok_s']:.0%} / {ld / row['llama.cpp_roofline_tok_s']:.0%} | "
            f"{od / ld:.2f}x |"
        )
        if not args.depth:
            op, lp = row["ours_prefill_tok_s"], row["llama.cpp_prefill_tok_s"]
            line += f" {op:.0f} / {lp:.0f} | {op / lp:.2f}x |"
        print(line)
    if args.json:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        record = {
            "command": "python " + " ".join(sys.argv),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "commit": commit.stdout.strip(),
            "rows": rows,
        }
        Path(args.json).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
