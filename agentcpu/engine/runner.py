"""Builds the step's tensors from scheduled requests, runs the model, samples.

Tokens of all scheduled requests are packed into one batch: single-token chunks
(decodes) first, so attention can batch them, then multi-token prefill chunks. Only the
last position of each chunk that reaches the end of its request's tokens is projected
to logits and sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from agentcpu.engine.request import Request
from agentcpu.engine.sampler import Sampler, SampleResult, SampleRow
from agentcpu.engine.scheduler import ScheduledRequest
from agentcpu.layers.attention import AttentionMetadata, PrefillChunk


@dataclass
class StepBatch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_index: torch.Tensor  # rows of the packed batch to project to logits
    sampled: list[Request]


class ModelRunner:
    def __init__(self, model: nn.Module, kv_caches, block_size: int, sampler: Sampler | None = None):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.sampler = sampler or Sampler()
        self.vocab_size = model.config.vocab_size

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledRequest]) -> dict[str, SampleResult]:
        batch = self.prepare(scheduled)
        hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta)
        if not batch.sampled:
            return {}
        logits = self.model.compute_logits(hidden[batch.sample_index])
        rows = [self._sample_row(r) for r in batch.sampled]
        results = self.sampler(logits, rows)
        return {r.request_id: res for r, res in zip(batch.sampled, results, strict=True)}

    def prepare(self, scheduled: list[ScheduledRequest]) -> StepBatch:
        ordered = sorted(scheduled, key=lambda s: s.num_new_tokens != 1)
        ids, positions, slots, sample_rows, sampled = [], [], [], [], []
        decode_contexts: list[torch.Tensor] = []
        prefills: list[PrefillChunk] = []
        for s in ordered:
            r, start = s.request, len(ids)
            begin, end = r.num_computed_tokens, r.num_computed_tokens + s.num_new_tokens
            ids.extend(r.tokens(begin, end))
            positions.extend(range(begin, end))
            context = self._slots(r, end)
            slots.append(context[begin:end])
            if s.num_new_tokens == 1:
                decode_contexts.append(context)
            else:
                prefills.append(PrefillChunk(start, s.num_new_tokens, end, context if begin else None))
            if s.samples:
                sample_rows.append(len(ids) - 1)
                sampled.append(r)
        meta = AttentionMetadata(slot_mapping=torch.cat(slots), prefills=prefills)
        if decode_contexts:
            self._add_decode_meta(meta, decode_contexts)
        return StepBatch(
            torch.tensor(ids, dtype=torch.long),
            torch.tensor(positions, dtype=torch.long),
            meta,
            torch.tensor(sample_rows, dtype=torch.long),
            sampled,
        )

    def _slots(self, request: Request, num_tokens: int) -> torch.Tensor:
        """Cache slot of each of the request's first `num_tokens` positions. Kept on the
        request and extended block by block: a decode step only slices it."""
        bs = self.block_size
        blocks = request.block_ids[: -(-num_tokens // bs)]
        cached = request.slot_cache
        if cached is None or cached[0] != blocks[: len(cached[0])]:
            cached = ([], torch.empty(0, dtype=torch.long))
        if len(cached[0]) < len(blocks):
            new = torch.tensor(blocks[len(cached[0]) :], dtype=torch.long)
            new_slots = (new[:, None] * bs + torch.arange(bs)[None, :]).flatten()
            cached = (list(blocks), torch.cat((cached[1], new_slots)))
            request.slot_cache = cached
        return cached[1][:num_tokens]

    @staticmethod
    def _add_decode_meta(meta: AttentionMetadata, contexts: list[torch.Tensor]) -> None:
        lengths = torch.tensor([len(c) for c in contexts])
        padded = torch.nn.utils.rnn.pad_sequence(contexts, batch_first=True)
        meta.num_decode = len(contexts)
        meta.decode_slots = padded
        meta.decode_lens = lengths

    def _sample_row(self, request: Request) -> SampleRow:
        params = request.params
        banned: list[int] = []
        if len(request.output_token_ids) < params.min_tokens:
            banned = [*request.eos_token_ids, *params.stop_token_ids]
        return SampleRow(
            params=params,
            prompt_ids=request.prompt_token_ids,
            output_ids=request.output_token_ids,
            generator=request.generator,
            banned_ids=banned,
            allowed_mask=self._allowed(request),
        )

    def _allowed(self, request: Request) -> torch.Tensor | None:
        if request.constraint is None:
            return None
        return request.constraint.allowed_mask(self.vocab_size)
