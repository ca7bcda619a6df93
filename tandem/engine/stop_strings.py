"""Incremental stop-string search: each step decodes and searches only the new text.

Decoding the whole output every step to look for stop strings is quadratic in its length. The
matcher keeps the text decoded so far (through `IncrementalDetokenizer`, which re-decodes only
the tokens since the last whole character) and searches the new part plus the
`len(longest stop) - 1` characters before it, where a match that ends in the new part may start.
Earlier text held no match, so the first match in that window is the first in the whole text.
"""

from __future__ import annotations

from tandem.engine.detokenizer import IncrementalDetokenizer
from tandem.engine.tokenizer import Tokenizer


class StopStringMatcher:
    def __init__(self, tokenizer: Tokenizer, stop: list[str]) -> None:
        self.stop = stop
        self.longest = max(map(len, stop))
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self.text = ""

    def add(self, token_id: int) -> int | None:
        """Take the next output token; the index in `text` where the first stop string starts
        once one has appeared, else None."""
        searched = max(0, len(self.text) - self.longest + 1)
        self.text += self._detokenizer.add([token_id])
        found = [i for i in (self.text.find(s, searched) for s in self.stop) if i >= 0]
        return min(found) if found else None
