"""Segmented prompts: `prefix + chunk 1 + ... + chunk N + question`, each tokenized on its own.

The chunks are the reusable parts (retrieved passages): their KV can be cached on its own and
blended wherever they land (see `blend.py`). The full prompt is the concatenation, so ordinary
prefill of `token_ids` is the exact reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from tandem.engine.tokenizer import Tokenizer

DEFAULT_RECOMPUTE_RATIO = 0.15
# Each chunk costs a cache lookup, maybe a dense compute and a read per layer: a prompt of
# thousands of tiny chunks would tie up a prefill worker, so both are bounded.
MAX_SEGMENTS = 64  # the prefix, the chunks and the question
MIN_CHUNK_TOKENS = 8


@dataclass(frozen=True)
class SegmentedPrompt:
    """Token ids per segment; `blend=False` asks for ordinary prefill of the same tokens."""

    prefix: list[int]
    chunks: list[list[int]]
    question: list[int]
    recompute_ratio: float = DEFAULT_RECOMPUTE_RATIO
    blend: bool = True

    def __post_init__(self) -> None:
        r = self.recompute_ratio
        if isinstance(r, bool) or not isinstance(r, int | float) or math.isnan(r) \
                or not 0 <= r <= 1:
            raise ValueError(f"recompute_ratio: {r!r} is not a number in [0, 1]")
        if not isinstance(self.blend, bool):
            raise ValueError(f"blend: {self.blend!r} is not a bool")
        if len(self.chunks) + 2 > MAX_SEGMENTS:
            raise ValueError(f"segments: {len(self.chunks) + 2} segments; at most "
                             f"{MAX_SEGMENTS} (prefix, chunks and question)")
        for i, chunk in enumerate(self.chunks, start=1):
            if not chunk:
                raise ValueError(f"segments[{i}]: a chunk is empty")
            if len(chunk) < MIN_CHUNK_TOKENS:
                raise ValueError(f"segments[{i}]: a chunk of {len(chunk)} tokens; chunks need "
                                 f"at least {MIN_CHUNK_TOKENS} (join it to a neighbour)")
        if not self.question:
            raise ValueError(f"segments[{len(self.chunks) + 1}]: the question (last segment) "
                             "is empty")

    @property
    def token_ids(self) -> list[int]:
        return [t for part in (self.prefix, *self.chunks, self.question) for t in part]

    @property
    def lengths(self) -> tuple[int, ...]:
        """Tokens per segment, prefix first: with `token_ids`, all a remote worker needs."""
        return (len(self.prefix), *map(len, self.chunks), len(self.question))

    @property
    def num_chunk_tokens(self) -> int:
        return sum(map(len, self.chunks))

    @classmethod
    def split(cls, token_ids: Sequence[int], lengths: Sequence[int],
              recompute_ratio: float = DEFAULT_RECOMPUTE_RATIO, blend: bool = True) \
            -> SegmentedPrompt:
        """Cut a concatenated prompt back into its segments."""
        if len(lengths) < 2 or any(n < 0 for n in lengths) or sum(lengths) != len(token_ids):
            raise ValueError(f"segment lengths {list(lengths)} do not split a prompt of "
                             f"{len(token_ids)} tokens into a prefix and a question")
        parts, start = [], 0
        for n in lengths:
            parts.append(list(token_ids[start:start + n]))
            start += n
        return cls(parts[0], parts[1:-1], parts[-1], recompute_ratio, blend)

    @classmethod
    def tokenize(cls, tokenizer: Tokenizer, segments: Sequence[str],
                 recompute_ratio: float = DEFAULT_RECOMPUTE_RATIO, blend: bool = True) \
            -> SegmentedPrompt:
        """Tokenize each segment on its own (special tokens, such as a BOS, only before the
        first), so a chunk has the same tokens wherever it appears."""
        if isinstance(segments, str) or len(segments) < 2:
            raise ValueError("segments: need at least a prefix (may be empty) and a question")
        if len(segments) > MAX_SEGMENTS:  # before tokenizing any of them
            raise ValueError(f"segments: {len(segments)} segments; at most {MAX_SEGMENTS} "
                             "(prefix, chunks and question)")
        for i, text in enumerate(segments):
            if not isinstance(text, str):
                raise ValueError(f"segments[{i}]: expected a string, got "
                                 f"{type(text).__name__}")
        ids = [tokenizer.encode(text, add_special_tokens=i == 0) if text else []
               for i, text in enumerate(segments)]
        return cls(ids[0], ids[1:-1], ids[-1], recompute_ratio, blend)
