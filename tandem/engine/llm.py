"""`LLM`: the offline, vLLM-shaped entry point over one `LLMEngine`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from typing import Any

from tandem.engine.config import EngineConfig
from tandem.engine.engine import LLMEngine
from tandem.engine.errors import EngineError
from tandem.engine.outputs import RequestOutput
from tandem.engine.sampling_params import SamplingParams
from tandem.engine.tokenizer import Tokenizer

Prompt = str | list[int]
Message = dict[str, Any]


class LLM:
    """Generate from prompts or chats with one in-process engine.

    `LLM(model=None)` serves the embedded SmolLM2-135M-Instruct; other keyword arguments are
    `EngineConfig` fields (block_size, kv_cache_gb, max_num_seqs, num_threads, ...).
    """

    def __init__(self, model: str | None = None, dtype: str = "bfloat16", **kwargs: Any) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, dtype=dtype, **kwargs))
        self._ids = itertools.count()

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> LLM:
        """Wrap an engine built elsewhere (e.g. one sharing already loaded weights)."""
        llm = cls.__new__(cls)
        llm.engine, llm._ids = engine, itertools.count()
        return llm

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def generate(
        self, prompts: Prompt | Seq[Prompt],
        params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Complete one prompt or a list of them (text or token ids), in input order."""
        if isinstance(prompts, str) or (
                isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        token_lists = [self._tokens(p, i) for i, p in enumerate(prompts)]
        return self._run(token_lists, params)

    def chat(
        self, messages: list[Message] | list[list[Message]],
        params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Answer one conversation or a list of them, rendered with the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        token_lists = [
            self.tokenizer.encode(self.tokenizer.apply_chat_template(c), add_special_tokens=False)
            for c in conversations
        ]
        return self._run(token_lists, params)  # type: ignore[arg-type]

    def _tokens(self, prompt: Prompt, index: int) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError(f"prompts[{index}]: is empty")
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, list | tuple):
            return list(prompt)
        raise ValueError(f"prompts[{index}]: expected a string or a list of token ids, "
                         f"got {type(prompt).__name__}")

    def _run(
        self, token_lists: list[list[int]],
        params: SamplingParams | Seq[SamplingParams] | None,
    ) -> list[RequestOutput]:
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(token_lists)
        if len(params) != len(token_lists):
            raise ValueError(f"params: got {len(params)} for {len(token_lists)} prompts")
        ids = [f"llm-{next(self._ids)}" for _ in token_lists]
        try:
            for rid, tokens, p in zip(ids, token_lists, params, strict=True):
                self.engine.add_request(rid, tokens, p)
        except Exception:
            for rid in ids:
                self.engine.abort(rid)
            raise
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            outputs = self.engine.step()
            if not outputs and not self.engine.has_unfinished_requests():
                raise EngineError("engine stopped with requests unfinished")
            done.update((o.request_id, o) for o in outputs if o.finished)
        return [done[rid] for rid in ids]
