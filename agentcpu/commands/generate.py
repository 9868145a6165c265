"""`agentcpu generate --model PATH --prompt TEXT`: stream one completion to the terminal."""

from __future__ import annotations

import argparse
import sys
import time

from agentcpu.commands.engine_args import add_engine_arguments, engine_options
from agentcpu.engine.sampling_params import SamplingParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--prompt", required=True, help="prompt text")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    parser.add_argument("--system", default=None, help="system message (with --chat)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-tokens tokens")


def run(args: argparse.Namespace) -> int:
    from agentcpu.llm import LLM

    llm = LLM(args.model, **engine_options(args))
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    )
    prompt_ids = llm.encode_prompt(_prompt_text(llm, args))
    start = time.perf_counter()
    llm.engine.add_request(prompt_ids, params)
    out = None
    while llm.engine.has_unfinished():
        for out in llm.engine.step():
            text = out.delta_text if llm.tokenizer else f"{out.delta_token_ids[0]} "
            sys.stdout.write(text)
            sys.stdout.flush()
    elapsed = time.perf_counter() - start
    n = len(out.token_ids) if out else 0
    print(
        f"\n[{len(prompt_ids)} prompt tokens, {n} generated in {elapsed:.2f} s, "
        f"{n / elapsed:.1f} tok/s, finish: {out.finish_reason if out else '-'}]",
        file=sys.stderr,
    )
    return 0


def _prompt_text(llm, args) -> str:
    if not args.chat:
        return args.prompt
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": args.prompt})
    return llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
