"""`LLM`: the offline, vLLM-shaped entry point over one `LLMEngine`."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from collections.abc import Sequence as Seq
from typing import Any

from tandem.engine.blend import BlendResult
from tandem.engine.blend_planner import BlendPlanner
from tandem.engine.chunk_cache import ChunkCache, MemoryChunkCache
from tandem.engine.config import EngineConfig
from tandem.engine.engine import LLMEngine
from tandem.engine.errors import EngineError
from tandem.engine.outputs import RequestOutput
from tandem.engine.sampling_params import SamplingParams
from tandem.engine.segments import DEFAULT_RECOMPUTE_RATIO, SegmentedPrompt
from tandem.engine.tokenizer import Tokenizer

Prompt = str | list[int] | Mapping[str, Any]  # the mapping: a segmented prompt (see `generate`)
Message = dict[str, Any]
SEGMENT_KEYS = {"segments", "recompute_ratio", "blend"}
CHUNK_CACHE_BYTES = 2**30


class LLM:
    """Generate from prompts or chats with one in-process engine.

    `LLM(model=None)` serves the embedded SmolLM2-135M-Instruct; other keyword arguments are
    `EngineConfig` fields (block_size, kv_cache_gb, max_num_seqs, num_threads, ...).
    `chunk_cache` keeps the chunks' KV of segmented prompts (default: 1 GiB in this process).
    """

    def __init__(self, model: str | None = None, dtype: str = "bfloat16",
                 chunk_cache: ChunkCache | None = None, **kwargs: Any) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, dtype=dtype, **kwargs))
        self._ids = itertools.count()
        self._use_cache(chunk_cache)

    @classmethod
    def from_engine(cls, engine: LLMEngine, chunk_cache: ChunkCache | None = None) -> LLM:
        """Wrap an engine built elsewhere (e.g. one sharing already loaded weights)."""
        llm = cls.__new__(cls)
        llm.engine, llm._ids = engine, itertools.count()
        llm._use_cache(chunk_cache)
        return llm

    def _use_cache(self, chunk_cache: ChunkCache | None) -> None:
        self.chunk_cache = chunk_cache or MemoryChunkCache(CHUNK_CACHE_BYTES)
        self.planner = BlendPlanner(self.engine.loaded.model, self.engine.kv_spec,
                                    self.chunk_cache)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def generate(
        self, prompts: Prompt | Seq[Prompt],
        params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Complete one prompt or a list of them, in input order. A prompt is text, token ids,
        or a segmented prompt `{"segments": [prefix, chunk, ..., question], "recompute_ratio":
        0.15, "blend": True}` (the options may be left out): its chunks' KV is cached on its
        own and blended (CacheBlend); `blend=False` computes the same tokens in full."""
        if isinstance(prompts, str | Mapping) or (
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

    def _tokens(self, prompt: Prompt, index: int) -> list[int] | SegmentedPrompt:
        if isinstance(prompt, Mapping):
            unknown = set(prompt) - SEGMENT_KEYS
            if unknown or "segments" not in prompt:
                raise ValueError(f"prompts[{index}]: a segmented prompt takes the keys "
                                 f"{sorted(SEGMENT_KEYS)} ('segments' required); got "
                                 f"{sorted(map(str, prompt))}")
            try:
                return SegmentedPrompt.tokenize(
                    self.tokenizer, prompt["segments"],
                    prompt.get("recompute_ratio", DEFAULT_RECOMPUTE_RATIO),
                    prompt.get("blend", True))
            except ValueError as e:
                raise ValueError(f"prompts[{index}]: {e}") from None
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError(f"prompts[{index}]: is empty")
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, list | tuple):
            return list(prompt)
        raise ValueError(f"prompts[{index}]: expected a string or a list of token ids, "
                         f"got {type(prompt).__name__}")

    def _run(
        self, token_lists: list[list[int]] | list[list[int] | SegmentedPrompt],
        params: SamplingParams | Seq[SamplingParams] | None,
    ) -> list[RequestOutput]:
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(token_lists)
        if len(params) != len(token_lists):
            raise ValueError(f"params: got {len(params)} for {len(token_lists)} prompts")
        ids = [f"llm-{next(self._ids)}" for _ in token_lists]
        try:
            for rid, tokens, p in zip(ids, token_lists, params, strict=True):
                if isinstance(tokens, SegmentedPrompt):
                    self.engine.add_request(rid, tokens.token_ids, p,
                                            blended=self._blend(tokens, p.cache_salt))
                else:
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

    def _blend(self, prompt: SegmentedPrompt, salt: str | None) -> BlendResult | None:
        """The prompt's blended KV up to its question (None: ordinary prefill). The prefix
        comes from the engine's prefix cache where it holds it."""
        if not prompt.blend or not prompt.chunks:
            return None
        prefix_kv = self.engine.cached_prefix(prompt.prefix + prompt.chunks[0][:1], salt)
        return self.planner.plan(prompt, prefix_kv, salt)
