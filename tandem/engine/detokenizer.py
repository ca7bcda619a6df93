"""Streaming text: turn a growing list of generated tokens into text deltas."""

from __future__ import annotations

from tandem.engine.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Yields text as tokens arrive, so that the deltas concatenate to the final text.

    It holds back a trailing partial UTF-8 character and, when stop strings are set, the last
    `len(longest stop) - 1` characters: those may turn out to start a stop string, and the final
    text is cut before it. Assumes decoding a prefix of the tokens gives a prefix of the text,
    which holds for byte-level BPE tokenizers. Text up to a token boundary that ends on a whole
    character is kept, and only the tokens after it are decoded again, together with the one
    before them so that decoders which treat a leading token specially (SentencePiece spaces)
    see the same context: linear, not quadratic, in the output length.
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = list(stop or ())
        self.holdback = max((len(s) for s in stop or ()), default=1) - 1
        self.token_ids: list[int] = []
        self.num_emitted_chars = 0
        self._stable_text = ""  # decoded text of token_ids[:_num_stable]
        self._num_stable = 0
        self._anchor = ""  # decoded text of the token just before _num_stable

    def add(self, token_ids: list[int], final_text: str | None = None) -> str:
        """Take new tokens; `final_text` is the engine's text once the request has finished."""
        self.token_ids.extend(token_ids)
        if final_text is not None:
            delta = final_text[self.num_emitted_chars:]
            self.num_emitted_chars = max(self.num_emitted_chars, len(final_text))
            return delta
        start = max(self._num_stable - 1, 0)
        tail = self.tokenizer.decode(self.token_ids[start:])[len(self._anchor):]
        text = self._stable_text + tail
        if not tail.endswith("\ufffd"):
            self._stable_text, self._num_stable = text, len(self.token_ids)
            self._anchor = self.tokenizer.decode(self.token_ids[-1:])
        safe = len(text) - self.holdback
        if text.endswith("\ufffd"):
            safe = min(safe, len(text) - 1)
        if safe <= self.num_emitted_chars:
            return ""
        delta = text[self.num_emitted_chars:safe]
        self.num_emitted_chars = safe
        return delta

    def finish(self) -> str:
        """The text still held back, once no token will come and the engine's final text is
        not known (a request resumed on another worker): all tokens decoded, cut before the
        first stop string."""
        text = self.tokenizer.decode(self.token_ids)
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            text = text[:min(cuts)]
        delta = text[self.num_emitted_chars:]
        self.num_emitted_chars = max(self.num_emitted_chars, len(text))
        return delta
