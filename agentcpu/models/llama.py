"""One decoder for the Llama family: Llama 2/3/3.x, Mistral, Qwen2/2.5 (q/k/v bias),
Qwen3 (per-head q/k RMSNorm). Works on a packed batch of tokens from many sequences.

Checkpoint names map onto fused modules through `PACKED_MODULES`; everything else maps
one-to-one from Hugging Face names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from agentcpu.config import ModelConfig
from agentcpu.layers.attention import AttentionMetadata, paged_attention
from agentcpu.layers.fast_module import FastModule
from agentcpu.layers.fused_ops import fused_for
from agentcpu.layers.linear import Linear, dense_linear
from agentcpu.layers.norm import RMSNorm
from agentcpu.layers.rope import RotaryEmbedding
from agentcpu.models import decode_stack
from agentcpu.models.decode_stack import DecodeStack

# checkpoint module name -> (our fused module, shard name)
PACKED_MODULES = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"),
    "up_proj": ("gate_up_proj", "up"),
}


class Attention(FastModule):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = Linear(
            cfg.hidden_size,
            q_size + 2 * kv_size,
            cfg.qkv_bias,
            dtype,
            shards={"q": q_size, "k": kv_size, "v": kv_size},
        )
        self.o_proj = Linear(q_size, cfg.hidden_size, False, dtype)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.sizes = (q_size, kv_size, kv_size)
        self.scale = cfg.head_dim**-0.5

    def forward(self, x, positions, rope: RotaryEmbedding, kv_cache, meta: AttentionMetadata):
        tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope(positions, q, k)
        out = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        return self.o_proj(out.reshape(tokens, -1))


class MLP(FastModule):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        inter = cfg.intermediate_size
        self.gate_up_proj = Linear(
            cfg.hidden_size, 2 * inter, False, dtype, shards={"gate": inter, "up": inter}
        )
        self.down_proj = Linear(inter, cfg.hidden_size, False, dtype)
        self.intermediate = inter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if (ops := fused_for(gate_up)) is not None:
            return self.down_proj(ops.silu_mul(gate_up))
        gate, up = gate_up.split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(FastModule):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.self_attn = Attention(cfg, dtype)
        self.mlp = MLP(cfg, dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, x, residual, positions, rope, kv_cache, meta):
        """`x`: the previous layer's MLP output (the embeddings for the first layer, with
        `residual` None); `residual`: the stream it is added to. Returns this layer's
        (MLP output, residual): each residual add is fused with the norm after it, so
        the sum x + mlp(...) happens in the next layer (or the final norm)."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            residual, h = self.input_layernorm.add_forward(residual, x)
        h = self.self_attn(h, positions, rope, kv_cache, meta)
        residual, h = self.post_attention_layernorm.add_forward(residual, h)
        return self.mlp(h), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        # an empty table, not nn.Embedding's random init: on the meta device that init
        # imports torch._dynamo (~2 s of every model load), and the checkpoint fills it
        table = torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=table)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, dtype) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


class LlamaForCausalLM(nn.Module):
    """The decoder plus LM head. `forward` returns final hidden states of all tokens;
    `compute_logits` projects only the rows that will be sampled."""

    packed_modules = PACKED_MODULES

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg, dtype)
        self.rope = RotaryEmbedding(
            cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings
        )
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, False, dtype)
        self.reset_decode_stack()

    def reset_decode_stack(self) -> None:
        """Forget the native decode stack (`decode_stack.py`), which holds the weights and
        KV caches it was built with: call after replacing either."""
        self._stack_caches: object = None
        self._stack: DecodeStack | None = None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        x, residual = self.model.embed_tokens(input_ids), None
        stack = self._decode_stack(kv_caches, meta)
        if stack is not None and x.dtype == stack.dtype == self.rope.cos_sin.dtype:
            return stack.run(x, positions, self.rope.cos_sin, meta)
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, positions, self.rope, kv_cache, meta)
        if residual is None:  # no layers
            return self.model.norm(x)
        return self.model.norm.add_forward(residual, x)[1]

    def _decode_stack(self, kv_caches, meta: AttentionMetadata) -> DecodeStack | None:
        """The stack over `kv_caches` if it serves this step (a pure decode step of at
        most its rows); built at the first decode step that uses those caches."""
        if meta.num_decode != len(meta.slot_mapping) or meta.prefills:
            return None
        if self._stack_caches is not kv_caches:
            self._stack = decode_stack.build_stack(self, kv_caches)
            self._stack_caches = kv_caches
        stack = self._stack
        return stack if stack is not None and meta.num_decode <= stack.max_rows else None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return dense_linear(hidden, self.model.embed_tokens.weight, None)
        return self.lm_head(hidden)
