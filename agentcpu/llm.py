"""Offline Python API in the style users know from vLLM.

    llm = LLM(model="path/to/hf-dir")
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
    print(outs[0].text)

All prompts go through the same continuous-batching engine as the server.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agentcpu.engine.llm_engine import LLMEngine
from agentcpu.engine.outputs import RequestOutput
from agentcpu.engine.sampling_params import SamplingParams
from agentcpu.errors import InvalidRequestError
from agentcpu.hardware.threads import configure_threads
from agentcpu.models.loading import resolve_engine_config

Prompt = str | list[int] | dict[str, Any]


class LLM:
    def __init__(self, model: str, dtype: str = "bfloat16", **engine_options: Any):
        config = resolve_engine_config(model, dtype=dtype, **engine_options)
        configure_threads(config.threads or None)
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion, batched; outputs in prompt order."""
        prompts = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompts))
        ids = [self._add(p, sp) for p, sp in zip(prompts, params, strict=True)]
        finished: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    finished[out.request_id] = out
        return [finished[i] for i in ids]

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> list[RequestOutput]:
        """Render each conversation with the model's chat template and generate."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [
            self._tokenizer().apply_chat_template(
                conv, tools=tools, add_generation_prompt=add_generation_prompt, **template_kwargs
            )
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params)

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return list(prompt["prompt_token_ids"])
            prompt = prompt.get("prompt", "")
        if isinstance(prompt, str):
            return self._tokenizer().encode(prompt, add_special_tokens=True)
        return list(prompt)

    def _add(self, prompt: Prompt, params: SamplingParams) -> str:
        return self.engine.add_request(self.encode_prompt(prompt), params).request_id

    def _tokenizer(self):
        if self.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer: pass token-id prompts")
        return self.tokenizer


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if prompts and isinstance(prompts[0], int):
        return [list(prompts)]
    return list(prompts)


def _as_params_list(params, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(n)]
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise InvalidRequestError(f"{len(params)} sampling params given for {n} prompts")
    return list(params)
