"""Train the embedded demo model: a small Llama that acts as a tool-using agent.

    python scripts/make_demo_data.py --seed 1 --count 80000 --out .runs/demo_train.jsonl
    python scripts/train_demo_model.py --data .runs/demo_train.jsonl \
        --out agentcpu/assets/demo-model --threads 1 --time-budget-min 60

On a shared 2-core machine one thread beats two (the second thread waits at every
barrier while other processes hold the cores).

Continue a saved model (same tokenizer and shape, fresh optimizer) with
`--init-from agentcpu/assets/demo-model --lr 1e-3`; add `--retokenize` to move it onto a
freshly trained tokenizer (e.g. the digit-group one) without losing what it learned.

Writes a Hugging Face directory (config.json, bf16 model.safetensors, tokenizer files,
generation_config.json) at start-up-plus-every-`--checkpoint-every-min` and at the end, so
a crash or a time-out still leaves a usable model. Loss is on assistant tokens only.
Seeded: the same flags give the same model, unless the time budget cuts training short
(the learning-rate schedule follows max(step / steps, elapsed / budget)).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo_model_train_lib import (  # noqa: E402
    IGNORE_INDEX,
    LlamaForCausalLM,
    SPECIAL_TOKENS,
    LlamaShape,
    conversation_text,
    count_parameters,
    encode_weighted_suffix,
    save_hf_directory,
    shared_prefix_text,
    train_tokenizer,
    transplant_vocabulary,
)

TOKENIZER_SAMPLE = 40_000
PREFIX_REPEATS_FOR_TOKENIZER = 20
WARMUP_STEPS = 50
FINAL_LR_FRACTION = 0.1
LOG_EVERY = 20
LENGTH_BUCKET_BATCHES = 4
COPY_MIN_LEN, COPY_MAX_LEN = 8, 32  # 8-32 converged in ~1,350 steps at lr 1e-3; 24-40 not in 400


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="JSONL from make_demo_data.py")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1,
                        help="processes that render and encode the conversations")
    parser.add_argument("--time-budget-min", type=float, default=60.0)
    parser.add_argument("--checkpoint-every-min", type=float, default=5.0)
    parser.add_argument("--max-conversations", type=int, default=40_000, help="0 = all")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--digit-group", type=int, default=3,
                        help="the tokenizer cuts digit runs into chunks of at most this many"
                             " digits (1 = one token per digit)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16 = autocast; pays off only with AMX / AVX512-BF16 or a GPU")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="continue from a saved model directory (its tokenizer, shape and"
                             " weights; the optimizer starts fresh)")
    parser.add_argument("--retokenize", action="store_true",
                        help="with --init-from: train a new tokenizer (e.g. another"
                             " --digit-group) and carry the model over to it"
                             " (transplant_vocabulary)")
    parser.add_argument("--prefix-refresh-steps", type=int, default=1,
                        help="recompute the shared prefix's keys/values (without gradient) every"
                             " N steps; 0 = run it with gradient every step. Keep 1: keys"
                             " even 4 steps stale kept the model from learning to copy")
    parser.add_argument("--copy-weight", type=float, default=0.0,
                        help="add this times the loss of a synthetic copy task (random tokens,"
                             " then the same tokens again) after the shared prefix, every step:"
                             " it teaches attention to copy, which the answers need")
    parser.add_argument("--copy-rows", type=int, default=16)
    parser.add_argument("--copy-lr", type=float, default=1e-3,
                        help="learning rate of the copy pre-training (3e-3 did not converge)")
    parser.add_argument("--copy-pretrain-steps", type=int, default=0,
                        help="first train this many steps on the copy task alone (no prefix):"
                             " lengths 8-32 converge in ~1,350 steps at lr 1e-3, but the skill"
                             " did not carry over to positions after the shared prefix and was"
                             " gone after ~200 conversation steps (README, demo model)")
    parser.add_argument("--oversample", type=parse_oversample, default={},
                        help="repeat the conversations of these task kinds, e.g."
                             " 'convert=3,days=2' (the held-out failures after ~4,000 steps"
                             " were convert, days and compare: README, demo model)")
    parser.add_argument("--answer-weight", type=float, default=1.0,
                        help="loss weight of assistant tokens written after a tool response"
                             " (the answers that must copy the tool's result)")
    return parser.parse_args(argv)


def load_conversations(path: Path, limit: int) -> list[dict]:
    records = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            records.append(json.loads(line))
            if limit and len(records) >= limit:
                break
    return records


def parse_oversample(text: str) -> dict[str, int]:
    """'convert=3,days=2' -> {"convert": 3, "days": 2} (whole repeats, >= 1)."""
    weights = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, _, count = item.partition("=")
        if not count.isdigit() or int(count) < 1:
            raise argparse.ArgumentTypeError(f"{item!r}: use KIND=N with N >= 1")
        weights[kind.strip()] = int(count)
    return weights


def oversample(records: list[dict], weights: dict[str, int]) -> list[dict]:
    """Each record `weights[kind]` times (once for kinds not named)."""
    return [r for r in records for _ in range(weights.get(r["kind"], 1))]


_WORKER_STATE: tuple = ()


def _encode_chunk(chunk: list[dict]) -> list[tuple]:
    """Render and encode conversations in a forked worker (`_WORKER_STATE` set before fork)."""
    tokenizer, prefix, answer_weight = _WORKER_STATE
    return [encode_weighted_suffix(tokenizer, prefix, conversation_text(r["messages"]),
                                   answer_weight) for r in chunk]


def build_examples(records: list[dict], vocab_size: int, log, tokenizer=None,
                   answer_weight: float = 1.0, digit_group: int = 3, workers: int = 1) -> tuple:
    """Tokenized (suffix ids, labels, loss weights) per conversation; trains the tokenizer
    unless given. `workers` > 1 renders and encodes in forked processes (hundreds of
    thousands of conversations take minutes in one)."""
    global _WORKER_STATE
    prefix = shared_prefix_text()
    if tokenizer is None:
        suffixes = [conversation_text(r["messages"])[len(prefix):]
                    for r in records[:TOKENIZER_SAMPLE]]
        tokenizer = train_tokenizer(suffixes + [prefix] * PREFIX_REPEATS_FOR_TOKENIZER, vocab_size,
                                    digit_group)
    prefix_ids = tokenizer.encode(prefix, add_special_tokens=False).ids
    _WORKER_STATE = (tokenizer, prefix, answer_weight)
    if workers > 1:
        import multiprocessing

        size = max(1, len(records) // (workers * 8))
        chunks = [records[i: i + size] for i in range(0, len(records), size)]
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            examples = [e for part in pool.map(_encode_chunk, chunks) for e in part]
    else:
        examples = _encode_chunk(records)
    log(f"rendered and encoded {len(examples)} conversations")
    log(f"tokenizer vocab {tokenizer.get_vocab_size()}, prefix {len(prefix_ids)} tokens,"
        f" mean suffix {sum(len(e[0]) for e in examples) / len(examples):.1f} tokens")
    return tokenizer, prefix_ids, examples


def load_initial(directory: Path) -> tuple:
    """(tokenizer, model) from a directory this script wrote."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    config = json.loads((directory / "config.json").read_text())
    shape = LlamaShape(**{name: config[name] for name in LlamaShape.__dataclass_fields__})
    model = LlamaForCausalLM(shape)
    state = load_file(str(directory / "model.safetensors"))
    model.load_state_dict({name: tensor.float() for name, tensor in state.items()})
    return Tokenizer.from_file(str(directory / "tokenizer.json")), model


def make_batch(examples: list, indices: list[int], pad_id: int):
    length = max(len(examples[i][0]) for i in indices)
    ids = torch.full((len(indices), length), pad_id, dtype=torch.long)
    labels = torch.full((len(indices), length), IGNORE_INDEX, dtype=torch.long)
    weights = torch.ones((len(indices), length))
    for row, i in enumerate(indices):
        tokens, targets, token_weights = examples[i]
        ids[row, : len(tokens)] = torch.tensor(tokens)
        labels[row, : len(targets)] = torch.tensor(targets)
        weights[row, : len(token_weights)] = torch.tensor(token_weights)
    return ids, labels, weights


def copy_batch(rows: int, vocab: int, first_id: int, separator: int, rng: torch.Generator):
    """Rows of `x SEP x` over random ordinary tokens, labels on the second `x` only: a task
    only attention can solve (the induction-head task). Lengths vary per batch."""
    length = int(torch.randint(COPY_MIN_LEN, COPY_MAX_LEN + 1, (1,), generator=rng))
    x = torch.randint(first_id, vocab, (rows, length), generator=rng)
    sep = torch.full((rows, 1), separator)
    ids = torch.cat((x, sep, x), dim=1)
    labels = ids.clone()
    labels[:, : length + 1] = IGNORE_INDEX
    return ids, labels


def pretrain_copy(model, optimizer, args, vocab: int, first_id: int, separator: int,
                  rng: torch.Generator, device, log) -> None:
    """The copy task alone, without the prefix, at a constant learning rate after warm-up."""
    for step in range(args.copy_pretrain_steps):
        for group in optimizer.param_groups:
            group["lr"] = args.copy_lr * min(1.0, (step + 1) / WARMUP_STEPS)
        ids, labels = copy_batch(args.batch_size, vocab, first_id, separator, rng)
        loss = model.loss(ids.to(device), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % LOG_EVERY == 0 or step == args.copy_pretrain_steps - 1:
            log(f"copy step {step} loss {loss.item():.4f}")


def learning_rate(args: argparse.Namespace, step: int, progress: float) -> float:
    if step < WARMUP_STEPS:
        return args.lr * (step + 1) / WARMUP_STEPS
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return args.lr * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * cosine)


def batch_order(lengths: list[int], batch_size: int, rng: random.Random):
    """Endless shuffled batches; rows of similar length share a batch to cut padding."""
    window = batch_size * LENGTH_BUCKET_BATCHES
    while True:
        order = list(range(len(lengths)))
        rng.shuffle(order)
        for start in range(0, len(order) - window + 1, window):
            chunk = sorted(order[start: start + window], key=lengths.__getitem__)
            batches = [chunk[i: i + batch_size] for i in range(0, window, batch_size)]
            rng.shuffle(batches)
            yield from batches


def train(args: argparse.Namespace) -> dict:
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:7.1f}s] {message}", flush=True)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    records = oversample(load_conversations(args.data, args.max_conversations), args.oversample)
    initial = load_initial(args.init_from) if args.init_from else None
    tokenizer, prefix_ids, examples = build_examples(
        records, args.vocab_size, log, initial[0] if initial and not args.retokenize else None,
        args.answer_weight, args.digit_group, args.workers)
    if initial and args.retokenize:
        initial = (tokenizer, transplant_vocabulary(initial[1], initial[0], tokenizer, args.seed))
    shape = LlamaShape(vocab_size=tokenizer.get_vocab_size(), hidden_size=args.hidden,
                       intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, num_key_value_heads=args.kv_heads)
    if initial:
        shape = initial[1].shape
    model = initial[1] if initial else LlamaForCausalLM(shape)
    device = torch.device(args.device)
    model = model.to(device)
    log(f"model {count_parameters(model) / 1e6:.2f} M parameters, shape {shape}")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16)
                if args.precision == "bf16" else contextlib.nullcontext())
    prefix = torch.tensor(prefix_ids, device=device)
    pad_id = tokenizer.token_to_id("<|endoftext|>")
    batches = batch_order([len(e[0]) for e in examples], args.batch_size,
                          random.Random(args.seed))
    budget_s = args.time_budget_min * 60
    train_started = last_checkpoint = time.monotonic()
    tokens = supervised = 0
    prefix_kv = None
    copy_rng = torch.Generator().manual_seed(args.seed)
    first_ordinary = max(tokenizer.token_to_id(t) for t in SPECIAL_TOKENS) + 1
    newline = tokenizer.token_to_id("Ċ")
    losses: list[float] = []
    step = 0
    if args.copy_pretrain_steps:
        pretrain_copy(model, optimizer, args, shape.vocab_size, first_ordinary, newline,
                      copy_rng, device, log)
        train_started = time.monotonic()
    for step in range(args.steps):
        elapsed = time.monotonic() - train_started
        if elapsed > budget_s:
            log(f"time budget reached at step {step}")
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args, step, max(step / args.steps, elapsed / budget_s))
        ids, labels, weights = make_batch(examples, next(batches), pad_id)
        ids, labels, weights = ids.to(device), labels.to(device), weights.to(device)
        with autocast:
            if args.prefix_refresh_steps and step % args.prefix_refresh_steps == 0:
                with torch.no_grad():
                    prefix_kv = model.prefix_cache(prefix)
            if args.prefix_refresh_steps:
                loss = model.loss(ids, labels, prefix_kv=prefix_kv, weights=weights)
            else:
                loss = model.loss(ids, labels, prefix, weights=weights)
            if args.copy_weight:
                copy_ids, copy_labels = copy_batch(args.copy_rows, shape.vocab_size,
                                                   first_ordinary, newline, copy_rng)
                copy_kv = prefix_kv if args.prefix_refresh_steps else model.prefix_cache(prefix)
                loss = loss + args.copy_weight * model.loss(
                    copy_ids.to(device), copy_labels.to(device), prefix_kv=copy_kv)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        tokens += ids.numel() + prefix.numel()
        supervised += int((labels != IGNORE_INDEX).sum())
        if step % LOG_EVERY == 0 or step == args.steps - 1:
            rate = tokens / max(time.monotonic() - train_started, 1e-9)
            log(f"step {step} loss {sum(losses[-LOG_EVERY:]) / len(losses[-LOG_EVERY:]):.4f}"
                f" lr {optimizer.param_groups[0]['lr']:.2e} tokens {tokens} ({rate:.0f}/s)")
        if time.monotonic() - last_checkpoint > args.checkpoint_every_min * 60:
            save_hf_directory(model, tokenizer, args.out)
            last_checkpoint = time.monotonic()
            log(f"checkpoint at step {step} -> {args.out}")
    save_hf_directory(model, tokenizer, args.out)
    summary = {"steps": len(losses), "final_loss": sum(losses[-LOG_EVERY:]) / max(1, len(losses[-LOG_EVERY:])),
               "first_loss": losses[0] if losses else None, "tokens": tokens,
               "supervised_tokens": supervised, "parameters": count_parameters(model),
               "train_seconds": time.monotonic() - train_started}
    log(f"done: {json.dumps(summary)}")
    return {**summary, "losses": losses}


if __name__ == "__main__":
    train(parse_args())
