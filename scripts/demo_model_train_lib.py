"""Plain-torch Llama and data plumbing for training the demo model (no transformers).

Weight names and math follow Hugging Face's LlamaForCausalLM, so the saved directory
loads there and in agentcpu's own loader. Training uses one trick: every training
conversation starts with the same system prompt + tool schemas, so each batch runs that
shared prefix once and lets every conversation attend to its keys and values.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agentcpu.demo.chat_format import (  # noqa: E402
    CHAT_TEMPLATE,
    EOS_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    assistant_spans,
    render_chat,
)
from agentcpu.demo.tasks import SYSTEM_PROMPT, TOOL_SCHEMAS  # noqa: E402

IGNORE_INDEX = -100


@dataclass(frozen=True)
class LlamaShape:
    vocab_size: int = 4096
    hidden_size: int = 384
    intermediate_size: int = 1024
    num_hidden_layers: int = 8
    num_attention_heads: int = 6
    num_key_value_heads: int = 2
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def hf_config(self, eos_token_id: int, pad_token_id: int) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            **asdict(self), "head_dim": self.head_dim, "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
            "initializer_range": 0.02, "tie_word_embeddings": True, "use_cache": True,
            "rope_scaling": None, "bos_token_id": None, "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id, "torch_dtype": "bfloat16",
        }


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(shape: LlamaShape, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    dim = shape.head_dim
    inv_freq = 1.0 / (shape.rope_theta ** (torch.arange(0, dim, 2, device=device).float() / dim))
    freqs = torch.outer(torch.arange(length, device=device).float(), inv_freq)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, shape: LlamaShape):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (
            shape.num_attention_heads, shape.num_key_value_heads, shape.head_dim)
        self.q_proj = nn.Linear(shape.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(shape.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(shape.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, shape.hidden_size, bias=False)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
        repeat = self.heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        batch, _, length, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class DecoderLayer(nn.Module):
    def __init__(self, shape: LlamaShape):
        super().__init__()
        self.self_attn = Attention(shape)
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(shape.hidden_size, shape.intermediate_size, bias=False)
        self.mlp.up_proj = nn.Linear(shape.hidden_size, shape.intermediate_size, bias=False)
        self.mlp.down_proj = nn.Linear(shape.intermediate_size, shape.hidden_size, bias=False)
        self.input_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.post_attention_layernorm(x)
        return x + self.mlp.down_proj(F.silu(self.mlp.gate_proj(h)) * self.mlp.up_proj(h))

    def prefix_forward(self, prefix, rope_prefix):
        """Run the shared prefix (1, P, D); returns its output and this layer's (k, v)."""
        q, k, v = self.self_attn.qkv(self.input_layernorm(prefix), *rope_prefix)
        return self.feed_forward(prefix + self.self_attn.attend(q, k, v, None)), (k, v)

    def forward(self, suffix, prefix_kv, rope_suffix, suffix_mask):
        """suffix (B, S, D) attends to the shared prefix's (k, v), if any, then to itself."""
        q, k, v = self.self_attn.qkv(self.input_layernorm(suffix), *rope_suffix)
        if prefix_kv is not None:
            batch = suffix.shape[0]
            k = torch.cat((prefix_kv[0].expand(batch, -1, -1, -1), k), dim=2)
            v = torch.cat((prefix_kv[1].expand(batch, -1, -1, -1), v), dim=2)
        return self.feed_forward(suffix + self.self_attn.attend(q, k, v, suffix_mask))


class LlamaModel(nn.Module):
    def __init__(self, shape: LlamaShape):
        super().__init__()
        self.shape = shape
        self.embed_tokens = nn.Embedding(shape.vocab_size, shape.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(shape) for _ in range(shape.num_hidden_layers))
        self.norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, shape: LlamaShape):
        super().__init__()
        self.shape = shape
        self.model = LlamaModel(shape)
        self.apply(self._init)
        for name, param in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(param, std=0.02 / math.sqrt(2 * shape.num_hidden_layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def prefix_cache(self, prefix_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's (k, v) for the shared prefix (P,); differentiable unless under no_grad."""
        cos, sin = rope_tables(self.shape, prefix_ids.numel(), prefix_ids.device)
        hidden, cache = self.model.embed_tokens(prefix_ids.view(1, -1)), []
        for layer in self.model.layers:
            hidden, kv = layer.prefix_forward(hidden, (cos, sin))
            cache.append(kv)
        return cache

    def hidden_states(self, input_ids: torch.Tensor, prefix_ids: torch.Tensor | None = None,
                      prefix_kv: list | None = None):
        """Final-norm hidden states for input_ids (B, S), which follow the shared prefix,
        given as token ids (P,) or as a `prefix_cache` (e.g. one computed a few steps ago)."""
        if prefix_kv is None and prefix_ids is not None:
            prefix_kv = self.prefix_cache(prefix_ids)
        device, length = input_ids.device, input_ids.shape[1]
        prefix_len = 0 if prefix_kv is None else prefix_kv[0][0].shape[2]
        cos, sin = rope_tables(self.shape, prefix_len + length, device)
        mask = None
        if prefix_len:
            rows = torch.arange(length, device=device).view(-1, 1)
            cols = torch.arange(prefix_len + length, device=device).view(1, -1)
            mask = cols <= rows + prefix_len
        hidden = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            kv = None if prefix_kv is None else prefix_kv[i]
            hidden = layer(hidden, kv, (cos[prefix_len:], sin[prefix_len:]), mask)
        return self.model.norm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.model.embed_tokens.weight.t()

    def forward(self, input_ids: torch.Tensor, prefix_ids: torch.Tensor | None = None,
                prefix_kv: list | None = None):
        return self.logits(self.hidden_states(input_ids, prefix_ids, prefix_kv))

    def loss(self, input_ids, labels, prefix_ids=None, prefix_kv=None, weights=None) -> torch.Tensor:
        """Next-token loss over positions whose label is not IGNORE_INDEX: the mean, or
        the `weights`-weighted mean (weights (B, S) aligned with labels)."""
        hidden = self.hidden_states(input_ids, prefix_ids, prefix_kv)[:, :-1]
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = self.logits(hidden[keep])
        if weights is None:
            return F.cross_entropy(logits.float(), targets[keep])
        losses = F.cross_entropy(logits.float(), targets[keep], reduction="none")
        kept = weights[:, 1:][keep]
        return (losses * kept).sum() / kept.sum()


def transplant_vocabulary(model: LlamaForCausalLM, old_tokenizer, new_tokenizer,
                          seed: int = 0) -> LlamaForCausalLM:
    """`model` over `new_tokenizer`'s vocabulary: every layer as trained; a token both
    vocabularies hold keeps its embedding; a new one starts as the mean embedding of its
    text's pieces under the old tokenizer (plus a little noise, so "144" and "414" differ).
    This carries what a model learned (format, lookups) over to a changed tokenizer."""
    new = LlamaForCausalLM(replace(model.shape, vocab_size=new_tokenizer.get_vocab_size()))
    state = {k: v for k, v in model.state_dict().items() if k != "model.embed_tokens.weight"}
    missing, unexpected = new.load_state_dict(state, strict=False)
    assert missing == ["model.embed_tokens.weight"] and not unexpected, (missing, unexpected)
    old = model.model.embed_tokens.weight.detach()
    old_vocab = old_tokenizer.get_vocab()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        table = new.model.embed_tokens.weight
        for token, new_id in new_tokenizer.get_vocab().items():
            if token in old_vocab:
                table[new_id] = old[old_vocab[token]]
                continue
            text = new_tokenizer.decode([new_id], skip_special_tokens=False)
            pieces = old_tokenizer.encode(text, add_special_tokens=False).ids
            noise = torch.randn(old.shape[1], generator=generator) * old.std() * 0.1
            table[new_id] = (old[pieces].mean(0) if pieces else 0) + noise
    return new


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- tokenizer

def shared_prefix_text() -> str:
    """System prompt + tool schemas: identical at the start of every demo conversation."""
    text = render_chat([{"role": "system", "content": SYSTEM_PROMPT}], TOOL_SCHEMAS)
    assert text.endswith("<|im_end|>\n")
    return text


def conversation_text(messages: list[dict]) -> str:
    return render_chat(messages, TOOL_SCHEMAS)


def train_tokenizer(texts: list[str], vocab_size: int, digit_group: int = 3):
    """Byte-level BPE with digit runs cut into chunks of at most `digit_group` digits (as
    Llama 3's tokenizer does). The model never computes with numbers (the tools do); it
    copies them, and a number of 1-3 tokens is a lookup where one token per digit needs a
    full induction circuit, which the ~3 M-parameter model did not learn in hours of
    training (digit_group=1 was the tokenizer of the first shipped model)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    digits = (pre_tokenizers.Digits(individual_digits=True) if digit_group == 1 else
              pre_tokenizers.Split(Regex(rf"\d{{1,{digit_group}}}"), behavior="isolated"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        digits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def save_tokenizer_files(tokenizer, out: Path) -> None:
    tokenizer.save(str(out / "tokenizer.json"))
    added = {
        str(tokenizer.token_to_id(tok)): {
            "content": tok, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}
        for tok in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": added,
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in (EOS_TOKEN, PAD_TOKEN)],
        "bos_token": None, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN, "unk_token": None,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 2048, "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    generation = {"bos_token_id": None, "do_sample": False,
                  "eos_token_id": [tokenizer.token_to_id(EOS_TOKEN), tokenizer.token_to_id(PAD_TOKEN)],
                  "pad_token_id": tokenizer.token_to_id(PAD_TOKEN)}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))


# ---------------------------------------------------------------- examples

def encode_suffix(tokenizer, prefix: str, text: str) -> tuple[list[int], list[int]]:
    """Token ids of text after the shared prefix, and labels (assistant tokens only)."""
    ids, labels, _ = encode_weighted_suffix(tokenizer, prefix, text, 1.0)
    return ids, labels


def encode_weighted_suffix(tokenizer, prefix: str, text: str, answer_weight: float
                           ) -> tuple[list[int], list[int], list[float]]:
    """`encode_suffix` plus a loss weight per token: `answer_weight` for what the assistant
    writes after it has seen a <tool_response> (the answers that must copy a tool's result),
    1.0 elsewhere. Session 2 found the model copying the user's values into tool calls but
    answering with memorised numbers: those answer tokens are a small share of the loss."""
    assert text.startswith(prefix)
    suffix = text[len(prefix):]
    encoding = tokenizer.encode(suffix, add_special_tokens=False)
    spans = assistant_spans(suffix)
    first_response = suffix.find("<tool_response>")
    labels, weights = [], []
    for token, (start, _) in zip(encoding.ids, encoding.offsets, strict=True):
        span = next(((a, b) for a, b in spans if a <= start < b), None)
        labels.append(IGNORE_INDEX if span is None else token)
        after_tool = span is not None and first_response != -1 and span[0] > first_response
        weights.append(answer_weight if after_tool else 1.0)
    return encoding.ids, labels, weights


def save_hf_directory(model: LlamaForCausalLM, tokenizer, out: Path) -> None:
    """config.json + bf16 model.safetensors + tokenizer files, written atomically per file."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().to('cpu', torch.bfloat16).contiguous()
             for name, tensor in model.state_dict().items()}
    tmp = out / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.chmod(0o644)
    os.replace(tmp, out / "model.safetensors")
    config = model.shape.hf_config(tokenizer.token_to_id(EOS_TOKEN), tokenizer.token_to_id(PAD_TOKEN))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_tokenizer_files(tokenizer, out)
