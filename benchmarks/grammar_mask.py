"""Per-token mask cost of xgrammar vs llguidance on a ~150k-token byte-level BPE vocabulary.

    python benchmarks/grammar_mask.py [--vocab 150000] [--tokens 400] [--out results.json]

Builds (once, cached under /tmp) a byte-level BPE tokenizer trained with Hugging Face
`tokenizers` on generated text to ~150k tokens, then for each library and each JSON schema:
compiles the grammar (timed), and walks it with seeded random choices among the allowed
tokens, timing each step's mask computation (library bitmask fill) and the bitmask -> bool
[vocab] conversion separately. Prints a table and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import string
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]

SCHEMAS = {
    "flat": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city", "days"],
    },
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 40},
                    "age": {"type": "integer", "minimum": 0, "maximum": 150},
                    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
                },
                "required": ["name", "age"],
            },
            "unit": {"enum": ["celsius", "fahrenheit", "kelvin"]},
            "points": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                    "required": ["x", "y"],
                },
                "maxItems": 5,
            },
            "mode": {
                "anyOf": [
                    {"type": "boolean"},
                    {"type": "null"},
                    {"type": "string", "pattern": "^[a-z]{2,8}$"},
                ]
            },
        },
        "required": ["user", "unit", "points"],
    },
    "agent_step": {
        "type": "object",
        "properties": {
            "thought": {"type": "string"},
            "action": {"enum": ["search", "read_file", "write_file", "run_tests", "finish"]},
            "action_input": {
                "type": "object",
                "properties": {
                    "query": {"type": "string"},
                    "path": {"type": "string"},
                    "top_k": {"type": "integer", "minimum": 1, "maximum": 10},
                },
            },
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["thought", "action", "action_input"],
    },
}


def _words(rng: random.Random, n: int) -> list[str]:
    onsets = [*string.ascii_lowercase, "th", "sh", "ch", "st", "tr", "pl", "gr", "br", "qu", "sk"]
    vowels = ["a", "e", "i", "o", "u", "y", "ai", "ou", "ee", "oo", "ia"]
    codas = ["", "", "n", "r", "s", "t", "l", "m", "ng", "ck", "x", "rd"]
    out = set()
    while len(out) < n:
        w = "".join(
            rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
            for _ in range(rng.randint(1, 4))
        )
        out.add(w.capitalize() if rng.random() < 0.2 else w)
    return sorted(out)


def _corpus(rng: random.Random, lines: int) -> list[str]:
    words = _words(rng, 400_000)
    cum_weights = list(itertools.accumulate(1.0 / (i + 1) ** 0.8 for i in range(len(words))))
    punct = [".", ",", ":", ";", "!", "?", '"', "{", "}", "[", "]", "(", ")", "->", "==", "_", "/"]
    cjk = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    text = []
    for _ in range(lines):
        parts = rng.choices(words, cum_weights=cum_weights, k=24)
        parts += [
            str(rng.randint(0, 10 ** rng.randint(1, 6))),
            rng.choice(punct),
            "".join(rng.choices(cjk, k=rng.randint(1, 6))),
        ]
        rng.shuffle(parts)
        text.append(" ".join(parts))
    return text


def big_tokenizer(vocab: int, cache: Path) -> Path:
    path = cache / f"tokenizer-{vocab}.json"
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab - len(SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(random.Random(0), 120_000), trainer)
    tok.add_special_tokens(SPECIAL)
    tok.save(str(path))
    return path


def _closed(schema):
    """additionalProperties: false everywhere, so both libraries enforce the same language
    (xgrammar's strict mode forbids extra keys; llguidance follows the schema)."""
    if isinstance(schema, dict):
        out = {k: _closed(v) for k, v in schema.items()}
        if out.get("type") == "object":
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


TOOL = {"name": "get_weather", "parameters": _closed(SCHEMAS["flat"])}


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok_json: str, vocab: int, eos: int):
        import llguidance

        self.ll = llguidance
        t0 = time.perf_counter()
        self.tok = llguidance.LLTokenizer(tok_json, n_vocab=vocab, eos_token=eos)
        self.tokenizer_s = time.perf_counter() - t0
        self.vocab_ids = Tokenizer.from_str(tok_json).get_vocab(with_added_tokens=True)
        self.bitmask = torch.zeros((vocab + 31) // 32, dtype=torch.int32)

    def compile_json(self, schema):
        from agentcpu.structured.grammar import json_grammar

        return self._compile(json_grammar(schema, lenient=False))

    def compile_tool_auto(self):
        from agentcpu.structured.grammar import tool_grammar
        from agentcpu.structured.schema import ToolSpec

        spec = ToolSpec(TOOL["name"], TOOL["parameters"], strict=True)
        return self._compile(tool_grammar("hermes", "auto", [spec], self._delimiter))

    def _delimiter(self, text):
        i = self.vocab_ids.get(text)
        return f"<[{i}]>" if i is not None and self.tok.is_special_token(i) else json.dumps(text)

    def _compile(self, grammar):
        m = self.ll.LLMatcher(self.tok, grammar, log_level=0)
        assert not m.is_error(), m.get_error()
        return m

    def matcher(self, compiled):
        return compiled.deep_copy()

    def fill(self, m):
        m.unsafe_compute_mask_ptr(self.bitmask.data_ptr(), self.bitmask.numel() * 4)

    def accept(self, m, t):
        return m.consume_token(t)

    def done(self, m):
        return m.is_stopped()


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok_json: str, vocab: int, eos: int):
        import xgrammar as xgr

        self.xgr = xgr
        t0 = time.perf_counter()
        backend = Tokenizer.from_str(tok_json)
        id_to_tok = {i: t for t, i in backend.get_vocab(with_added_tokens=True).items()}
        encoded = [id_to_tok.get(i, "") for i in range(vocab)]
        meta = xgr.TokenizerInfo._detect_metadata_from_hf(tok_json)
        info = xgr.TokenizerInfo(
            encoded,
            meta["vocab_type"],
            vocab_size=vocab,
            stop_token_ids=[eos],
            add_prefix_space=meta["add_prefix_space"],
        )
        self.compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        self.tokenizer_s = time.perf_counter() - t0
        self.bitmask = xgr.allocate_token_bitmask(1, vocab)

    def compile_json(self, schema):
        return self.compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(", ", ": ")
        )

    def compile_tool_auto(self):
        item = self.xgr.StructuralTagItem(
            begin='<tool_call>\n{"name": "' + TOOL["name"] + '", "arguments": ',
            schema=json.dumps(TOOL["parameters"]),
            end="}\n</tool_call>",
        )
        return self.compiler.compile_structural_tag([item], ["<tool_call>"])

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, m):
        m.fill_next_token_bitmask(self.bitmask)

    def accept(self, m, t):
        return m.accept_token(t)

    def done(self, m):
        return m.is_terminated()


def record_walk(
    lib, compiled, vocab: int, max_tokens: int, seed: int, closing: torch.Tensor
) -> list[int]:
    """A seeded random walk (as tests/structured does): half the steps prefer closing tokens."""
    from agentcpu.structured import bitmask_to_bool

    rng = random.Random(seed)
    m, ids = lib.matcher(compiled), []
    while not lib.done(m) and len(ids) < max_tokens:
        lib.fill(m)
        allowed = bitmask_to_bool(lib.bitmask.view(-1), vocab)
        pool = allowed & closing if rng.random() < 0.5 and (allowed & closing).any() else allowed
        ids.append(rng.choice(pool.nonzero().view(-1).tolist()))
        assert lib.accept(m, ids[-1])
    return ids


def replay(lib, compiled, ids: list[int], vocab: int, repeats: int = 1):
    """Per-step mask time (µs) along `ids` on a fresh matcher (the fastest of `repeats`
    fills of the same step: computing a mask does not advance the matcher, and the
    fastest one is free of scheduler noise on a busy machine), and conversion times."""
    from agentcpu.structured import bitmask_to_bool

    m, fills, convs = lib.matcher(compiled), [], []
    for t in ids:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            lib.fill(m)
            best = min(best, time.perf_counter() - t0)
        t1 = time.perf_counter()
        bitmask_to_bool(lib.bitmask.view(-1), vocab)
        convs.append((time.perf_counter() - t1) * 1e6)
        fills.append(best * 1e6)
        if not lib.accept(m, t):
            break
    return fills, convs


def _summary(values: list[float]) -> dict:
    v = sorted(values)
    return {
        "n": len(v),
        "median": statistics.median(v),
        "mean": statistics.fmean(v),
        "p90": v[int(0.9 * (len(v) - 1))],
        "p99": v[int(0.99 * (len(v) - 1))],
        "max": v[-1],
    }


def closing_tokens(backend: Tokenizer, vocab: int, eos: int) -> torch.Tensor:
    closing = torch.zeros(vocab, dtype=torch.bool)
    for i in range(backend.get_vocab_size(with_added_tokens=True)):
        text = backend.decode([i], skip_special_tokens=False)
        closing[i] = bool(text.strip()) and set(text) <= set('"}], ')
    closing[eos] = True
    return closing


def text_tokens(backend: Tokenizer, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    ids = []
    while len(ids) < n:
        i = rng.randrange(backend.get_vocab_size())
        text = backend.decode([i])
        if text and "\ufffd" not in text and "<" not in text:
            ids.append(i)
    return ids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=150_000)
    ap.add_argument("--tokens", type=int, default=400)
    ap.add_argument("--walks", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/agentcpu-grammar-bench"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok_json = big_tokenizer(args.vocab, args.cache).read_text()
    backend = Tokenizer.from_str(tok_json)
    vocab = (
        (backend.get_vocab_size(with_added_tokens=True) + 127) // 128 * 128
    )  # padded model vocab
    eos = backend.token_to_id("<|im_end|>")
    libs = [LLGuidance(tok_json, vocab, eos), XGrammar(tok_json, vocab, eos)]
    closing = closing_tokens(backend, vocab, eos)
    results = {
        "tokenizer_vocab": backend.get_vocab_size(with_added_tokens=True),
        "model_vocab": vocab,
        "tokenizer_init_s": {lib.name: lib.tokenizer_s for lib in libs},
        "scenarios": {},
    }
    scenarios = {f"json:{name}": _closed(schema) for name, schema in SCHEMAS.items()}
    scenarios["hermes_auto:free_text"] = None
    for scenario, schema in scenarios.items():
        entry = results["scenarios"][scenario] = {}
        compiled = {}
        for lib in libs:
            t0 = time.perf_counter()
            compiled[lib.name] = (
                lib.compile_json(schema) if schema is not None else lib.compile_tool_auto()
            )
            entry[lib.name] = {"compile_ms": (time.perf_counter() - t0) * 1e3}
        walks = [
            record_walk(libs[0], compiled["llguidance"], vocab, args.tokens, seed, closing)
            if schema is not None
            else text_tokens(backend, args.tokens, seed)
            for seed in range(args.walks)
        ]
        for lib in libs:
            first, steady, conv = [], [], []
            for ids in walks:
                f, c = replay(lib, compiled[lib.name], ids, vocab)
                first += f
                conv += c
                steady += replay(lib, compiled[lib.name], ids, vocab, repeats=3)[0]
            entry[lib.name].update(
                mask_us_first_pass=_summary(first),
                mask_us_steady=_summary(steady),
                to_bool_us=_summary(conv),
            )
        print(scenario, json.dumps(entry))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
