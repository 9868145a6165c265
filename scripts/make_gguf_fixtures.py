"""Make the GGUF test fixtures in tests/fixtures/gguf/ with llama.cpp's own tools.

For each fixture: a tiny random Hugging Face checkpoint with a tokenizer (kept in
`<name>/hf/`), converted by llama.cpp's `convert_hf_to_gguf.py` (F32/F16/BF16/Q8_0) and
quantized by `llama-quantize --pure` (Q4_0/Q4_K/Q6_K). The tests load both with agentcpu
and compare. Weights are rounded so that bf16, f16 and f32 hold them exactly: the float
GGUFs must then reproduce the HF checkpoint bit for bit.

llama.cpp comes from the llama-cpp-python source distribution, built by
`benchmarks/peers/llamacpp.sh build` (into .peers/llamacpp: the vendored source and
llama-quantize). The converter runs in a venv with its pinned transformers and
sentencepiece (--make-venv creates it in .cache/, over this environment's torch):

    benchmarks/peers/llamacpp.sh build
    python scripts/make_gguf_fixtures.py --make-venv [--only qwen2-bpe]

The converter refuses a tokenizer whose pre-tokenizer hash it does not know (ours are
trained locally); a launcher written at run time overrides `get_vocab_base_pre` to
return the fixture's pre-tokenizer name instead. No llama.cpp code is copied here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agentcpu.bench.synthetic_tokenizer import write_tokenizer_files  # noqa: E402
from tests.tokenizer.templates import LLAMA2_TEMPLATE, QWEN2_5_TEMPLATE  # noqa: E402

OUT_DIR = REPO / "tests" / "fixtures" / "gguf"
PEERS = REPO / ".peers" / "llamacpp"
CONVERTER_VENV = REPO / ".cache" / "gguf-convert-venv"
CONVERTER_REQUIREMENTS = ("transformers==4.57.6", "sentencepiece>=0.1.98,<0.3.0", "protobuf")
CONVERT_TYPES = ("f32", "f16", "bf16", "q8_0")
# fixture type -> llama-quantize arguments; --pure puts every matrix in that one type,
# q4_k_m is llama.cpp's usual mixture (Q4_K with some Q6_K).
QUANTIZE_TYPES = {
    "q4_0": ["--pure", "Q4_0"],
    "q4_k": ["--pure", "Q4_K"],
    "q6_k": ["--pure", "Q6_K"],
    "q4_k_m": ["Q4_K_M"],
}
VOCAB_ONLY = "vocab"
MAX_FIXTURE_BYTES = 1024 * 1024
WEIGHT_STD = 0.05
ROW_SCALE_SIGMA = 1.0
# Weights are kept exactly representable in f16 too: bf16 values below f16's normal
# range would lose bits there, so they become 0.
F16_MIN_NORMAL = 2.0**-14
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

LAUNCHER = """\
import runpy, sys
src, pre = sys.argv.pop(1), sys.argv.pop(1)
sys.path[:0] = [src, src + "/gguf-py"]
from conversion.base import TextModel
known = TextModel.get_vocab_base_pre
def pre_or_fixture(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return pre
TextModel.get_vocab_base_pre = pre_or_fixture
sys.argv[0] = src + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""

# Runs in the converter venv (sentencepiece + the converter's transformers): a
# SentencePiece BPE model with byte fallback, and the tokenizer.json transformers makes
# from it, as Llama 2 / Mistral checkpoints ship both.
SENTENCEPIECE_SCRIPT = """\
import io, sys
import sentencepiece as spm
from transformers import LlamaTokenizerFast
out, vocab_size, corpus = sys.argv[1], int(sys.argv[2]), open(sys.argv[3]).read().splitlines()
model = io.BytesIO()
spm.SentencePieceTrainer.train(
    sentence_iterator=iter(corpus), model_writer=model, model_type="bpe",
    vocab_size=vocab_size, byte_fallback=True, character_coverage=0.9995,
    split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
    normalization_rule_name="identity", minloglevel=2,
)
with open(out + "/tokenizer.model", "wb") as f:
    f.write(model.getvalue())
LlamaTokenizerFast(vocab_file=out + "/tokenizer.model", legacy=True, add_prefix_space=True).save_pretrained(out)
"""


@dataclass(frozen=True)
class Fixture:
    name: str
    model_type: str
    # "qwen2" | "llama3": byte-level BPE; "spm": a SentencePiece model (tokenizer.model
    # + tokenizer.json); "hf-spm": a Llama-2-style tokenizer.json alone.
    tokenizer: str
    pre: str  # the pre-tokenizer name the converter is told
    types: tuple[str, ...]
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    vocab_size: int = 512
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 512
    extra: dict = field(default_factory=dict)

    @property
    def dims(self) -> tuple[int, int, int]:
        head_dim = self.head_dim or self.hidden_size // self.num_heads
        return head_dim, self.num_heads * head_dim, self.num_kv_heads * head_dim


FIXTURES = {
    f.name: f
    for f in (
        # Llama: q/k rows permuted by the converter; llama3 rope scaling becomes the
        # rope_freqs tensor; tied embeddings; a SentencePiece vocabulary with scores.
        Fixture(
            name="llama-spm", model_type="llama", tokenizer="spm", pre="default",
            types=("f16", "bf16", "q8_0", "q4_0"), vocab_size=600,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        ),
        # Qwen2: q/k/v biases, an untied lm_head, byte-level BPE with the qwen2 split.
        Fixture(
            name="qwen2-bpe", model_type="qwen2", tokenizer="qwen2", pre="qwen2",
            types=("f16", "bf16", "q8_0", "q4_0"), rope_theta=1e6, tie_word_embeddings=False,
        ),
        # Qwen3: per-head q/k RMSNorm, head_dim != hidden / heads.
        Fixture(
            name="qwen3-bpe", model_type="qwen3", tokenizer="qwen2", pre="qwen2",
            types=("f16", "q8_0"), head_dim=32, rope_theta=1e6,
        ),
        # A SentencePiece vocabulary known only from tokenizer.json: the converter writes
        # no scores for it (all -1000), so merges come from token order. Vocabulary only.
        Fixture(
            name="llama-hfspm", model_type="llama", tokenizer="hf-spm", pre="default",
            types=(VOCAB_ONLY,), num_layers=1, vocab_size=602,
        ),
        # K-quants need rows of 256: a wider single-layer Llama with a Llama 3 vocabulary.
        Fixture(
            name="llama3-kquant", model_type="llama", tokenizer="llama3", pre="llama-bpe",
            types=("q4_k", "q6_k"), hidden_size=256, intermediate_size=256, num_layers=1,
            rope_theta=500000.0,
        ),
    )
}  # fmt: skip


# ---- the Hugging Face checkpoint ----


def hf_config(f: Fixture, special: dict[str, int]) -> dict:
    head_dim, _, _ = f.dims
    config = {
        "architectures": [ARCHITECTURES[f.model_type]],
        "model_type": f.model_type,
        "hidden_act": "silu",
        "hidden_size": f.hidden_size,
        "intermediate_size": f.intermediate_size,
        "num_hidden_layers": f.num_layers,
        "num_attention_heads": f.num_heads,
        "num_key_value_heads": f.num_kv_heads,
        "head_dim": head_dim,
        "vocab_size": f.vocab_size,
        "max_position_embeddings": f.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": f.rope_theta,
        "rope_scaling": f.rope_scaling,
        "tie_word_embeddings": f.tie_word_embeddings,
        "torch_dtype": "bfloat16",
        "attention_bias": f.model_type == "qwen2",
        "bos_token_id": special.get("bos"),
        "eos_token_id": special.get("eos"),
        "transformers_version": "4.57.6",
        **f.extra,
    }
    return {k: v for k, v in config.items() if v is not None}


def hf_tensor_shapes(f: Fixture) -> dict[str, tuple[int, ...]]:
    head_dim, q_dim, kv_dim = f.dims
    hidden, inter = f.hidden_size, f.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (f.vocab_size, hidden)}
    for i in range(f.num_layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.self_attn.q_proj.weight": (q_dim, hidden),
            f"{p}.self_attn.k_proj.weight": (kv_dim, hidden),
            f"{p}.self_attn.v_proj.weight": (kv_dim, hidden),
            f"{p}.self_attn.o_proj.weight": (hidden, q_dim),
            f"{p}.mlp.gate_proj.weight": (inter, hidden),
            f"{p}.mlp.up_proj.weight": (inter, hidden),
            f"{p}.mlp.down_proj.weight": (hidden, inter),
            f"{p}.input_layernorm.weight": (hidden,),
            f"{p}.post_attention_layernorm.weight": (hidden,),
        }
        if f.model_type == "qwen2":
            shapes |= {
                f"{p}.self_attn.{n}_proj.bias": (d,)
                for n, d in (("q", q_dim), ("k", kv_dim), ("v", kv_dim))
            }
        if f.model_type == "qwen3":
            shapes |= {
                f"{p}.self_attn.q_norm.weight": (head_dim,),
                f"{p}.self_attn.k_norm.weight": (head_dim,),
            }
    shapes["model.norm.weight"] = (hidden,)
    if not f.tie_word_embeddings:
        shapes["lm_head.weight"] = (f.vocab_size, hidden)
    return shapes


def random_weight(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Norms near 1, small biases, N(0, WEIGHT_STD) matrices; exact in bf16 and f16."""
    noise = torch.randn(shape, generator=generator)
    if "norm" in name:
        value = 1 + 0.1 * noise
    elif name.endswith("bias"):
        value = 0.1 * noise
    else:
        value = WEIGHT_STD * noise
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        # Unequal row norms, as trained vocabularies have (frequent tokens stand out),
        # so the next token is not a near-tie among hundreds of equally likely ones.
        value *= torch.exp(ROW_SCALE_SIGMA * torch.randn(shape[0], 1, generator=generator))
    value = value.to(torch.bfloat16).float()
    value[value.abs() < F16_MIN_NORMAL] = 0
    assert torch.equal(value.half().float(), value)
    return value.to(torch.bfloat16)


def write_weights(f: Fixture, hf_dir: Path, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        name: random_weight(name, shape, generator) for name, shape in hf_tensor_shapes(f).items()
    }
    save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})


# ---- the tokenizer ----

BPE_SPECIALS = {
    "qwen2": ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    "llama3": ("<|begin_of_text|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"),
}


def write_bpe_tokenizer(f: Fixture, hf_dir: Path) -> dict[str, int]:
    names = BPE_SPECIALS[f.tokenizer]
    first = f.vocab_size - len(names)
    special = {text: first + i for i, text in enumerate(names)}
    bos = "<|begin_of_text|>" if f.tokenizer == "llama3" else None
    write_tokenizer_files(
        hf_dir, f.vocab_size, special, "llama" if f.tokenizer == "llama3" else "qwen2",
        bos=bos, eos="<|im_end|>", pad="<|endoftext|>",
    )  # fmt: skip
    config_path = hf_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if f.tokenizer == "llama3":
        config["add_bos_token"] = True
        _make_llama3_like(hf_dir / "tokenizer.json")
    else:
        config["chat_template"] = QWEN2_5_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    eos, pad = special["<|im_end|>"], special["<|endoftext|>"]
    generation = {"eos_token_id": [eos, pad], "pad_token_id": pad}
    if bos:
        generation["bos_token_id"] = special[bos]
    (hf_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return {"bos": special.get(bos) if bos else None, "eos": eos}


def _make_llama3_like(tokenizer_json: Path) -> None:
    """As Llama 3's tokenizer.json: no normalizer, whole words looked up before merging,
    BOS prepended by the post-processor."""
    from tokenizers import Tokenizer, processors

    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    spec["model"]["ignore_merges"] = True
    spec["normalizer"] = None
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    bos = "<|begin_of_text|>"
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
        special_tokens=[(bos, tokenizer.token_to_id(bos))],
    )  # fmt: skip
    tokenizer.save(str(tokenizer_json))


def write_sentencepiece_tokenizer(f: Fixture, hf_dir: Path, python: str) -> dict[str, int]:
    from tests.tokenizer.fixtures import METASPACE_TRAINING_LINES, corpus

    with tempfile.TemporaryDirectory() as tmp:
        corpus_file = Path(tmp) / "corpus.txt"
        # Only the first lines: other scripts are left to <0xNN> byte fallback.
        corpus_file.write_text("\n".join(corpus(METASPACE_TRAINING_LINES)), encoding="utf-8")
        script = Path(tmp) / "make_spm.py"
        script.write_text(SENTENCEPIECE_SCRIPT)
        run([python, str(script), str(hf_dir), str(f.vocab_size), str(corpus_file)])
    config_path = hf_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = LLAMA2_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    (hf_dir / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2) + "\n"
    )
    return {"bos": 1, "eos": 2}


def write_hf_spm_tokenizer(f: Fixture, hf_dir: Path) -> dict[str, int]:
    from tests.tokenizer.fixtures import make_metaspace_tokenizer_dir

    make_metaspace_tokenizer_dir(hf_dir, LLAMA2_TEMPLATE)
    size = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    if len(size) != f.vocab_size:
        raise SystemExit(f"{f.name}: the tokenizer has {len(size)} tokens, not {f.vocab_size}")
    return {"bos": 1, "eos": 2}


# ---- conversion ----


def run(command: list) -> None:
    command = [str(part) for part in command]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def make_fixture(f: Fixture, tools: argparse.Namespace, seed: int) -> list[Path]:
    out = tools.out / f.name
    hf_dir = out / "hf"
    shutil.rmtree(out, ignore_errors=True)
    hf_dir.mkdir(parents=True)
    if f.tokenizer == "spm":
        special = write_sentencepiece_tokenizer(f, hf_dir, tools.python)
    elif f.tokenizer == "hf-spm":
        special = write_hf_spm_tokenizer(f, hf_dir)
    else:
        special = write_bpe_tokenizer(f, hf_dir)
    (hf_dir / "config.json").write_text(json.dumps(hf_config(f, special), indent=2) + "\n")
    write_weights(f, hf_dir, seed)
    made = []
    with tempfile.TemporaryDirectory() as tmp:
        launcher = Path(tmp) / "convert.py"
        launcher.write_text(LAUNCHER)
        if f.types == (VOCAB_ONLY,):
            target = out / "vocab.gguf"
            run([tools.python, str(launcher), str(tools.llama_cpp), f.pre, str(hf_dir),
                 "--outfile", str(target), "--vocab-only"])  # fmt: skip
            (hf_dir / "model.safetensors").unlink()  # only the tokenizer is compared
            return [target]
        base = Path(tmp) / "model-f32.gguf"
        run([tools.python, str(launcher), str(tools.llama_cpp), f.pre, str(hf_dir),
             "--outfile", str(base), "--outtype", "f32"])  # fmt: skip
        for gguf_type in f.types:
            target = out / f"model-{gguf_type}.gguf"
            if gguf_type == "f32":
                shutil.copy(base, target)
            elif gguf_type in CONVERT_TYPES:
                run([tools.python, str(launcher), str(tools.llama_cpp), f.pre, str(hf_dir),
                     "--outfile", str(target), "--outtype", gguf_type])  # fmt: skip
            else:
                *flags, qtype = QUANTIZE_TYPES[gguf_type]
                run([str(tools.quantize), *flags, str(base), str(target), qtype])
            made.append(target)
    for path in made:
        if path.stat().st_size > MAX_FIXTURE_BYTES:
            raise SystemExit(f"{path} is {path.stat().st_size} bytes: over the fixture limit")
    return made


def describe(paths: list[Path]) -> dict:
    from agentcpu.loaders.gguf_header import read_header

    files = {}
    for path in paths:
        tensors = read_header(path).tensors.values()
        files[str(path.relative_to(OUT_DIR))] = {
            "bytes": path.stat().st_size,
            "tensor_types": sorted({t.ggml_type.name for t in tensors}),
        }
    return files


def provenance(args: argparse.Namespace) -> dict:
    """Which llama.cpp and transformers made the files."""
    build_info = args.llama_cpp.parent / "BUILD_INFO"
    version = subprocess.run(
        [args.python, "-c", "import transformers; print(transformers.__version__)"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    return {
        "script": "scripts/make_gguf_fixtures.py",
        "llama_cpp": build_info.read_text().splitlines()[0] if build_info.is_file() else "",
        "converter_transformers": version,
    }


def make_converter_venv(python: Path) -> None:
    """The converter's pins (transformers 4.57.6) over this environment's torch, plus
    sentencepiece and a protobuf its generated code accepts."""
    venv = python.parent.parent
    run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)])
    run([str(python), "-m", "pip", "install", "-q", *CONVERTER_REQUIREMENTS])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--llama-cpp",
        type=Path,
        default=PEERS / "src",
        help="the llama.cpp source tree (with convert_hf_to_gguf.py, gguf-py)",
    )
    parser.add_argument(
        "--python",
        type=Path,
        default=CONVERTER_VENV / "bin" / "python",
        help="python with the converter's requirements and sentencepiece (--make-venv)",
    )
    parser.add_argument(
        "--make-venv", action="store_true", help="create the --python venv if it is missing"
    )
    parser.add_argument("--quantize", type=Path, default=PEERS / "build" / "bin" / "llama-quantize")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--only", action="append", choices=sorted(FIXTURES))
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.make_venv and not args.python.exists():
        make_converter_venv(args.python)
    for required in (args.llama_cpp / "convert_hf_to_gguf.py", args.quantize, args.python):
        if not required.exists():
            raise SystemExit(
                f"{required} not found: run benchmarks/peers/llamacpp.sh build (llama.cpp) "
                "and pass --make-venv (converter python)"
            )
    manifest_path = args.out / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    for name in args.only or sorted(FIXTURES):
        paths = make_fixture(FIXTURES[name], args, args.seed)
        manifest[name] = describe(paths)
    manifest["_made_by"] = provenance(args)
    manifest_path.write_text(json.dumps(dict(sorted(manifest.items())), indent=2) + "\n")
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
