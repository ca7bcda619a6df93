"""After sampling: append each request's token, decide whether it stops, build its output.

Stop checks cost O(new text) per step: EOS and stop token ids by id, stop strings through an
incremental matcher that decodes and searches only what the new token added.
"""

from __future__ import annotations

from tandem.engine.outputs import RequestOutput
from tandem.engine.sampler import TokenLogprobs
from tandem.engine.sequence import Sequence
from tandem.engine.stop_strings import StopStringMatcher
from tandem.engine.tokenizer import Tokenizer


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, max_model_len: int) -> None:
        self.tokenizer, self.max_model_len = tokenizer, max_model_len
        self.eos_token_id = tokenizer.eos_token_id

    def append(self, seq: Sequence, token_id: int, logprobs: TokenLogprobs | None = None,
               error: str | None = None) -> None:
        """Record one sampled token (or this request's failure) and check the stop rules."""
        if error is not None:
            seq.error, seq.finish_reason = error, "error"
            return
        seq.token_ids.append(token_id)
        if seq.output_logprobs is not None and logprobs is not None:
            seq.output_logprobs.append(logprobs)
        self.check_stop(seq, 1)

    def check_stop(self, seq: Sequence, num_new: int) -> None:
        """Whether the last `num_new` output tokens end the request; sets `finish_reason` (and
        the text cut before a stop string)."""
        p = seq.params
        stop_ids = p.stop_token_ids or ()
        for token in seq.token_ids[len(seq.token_ids) - num_new:]:
            if (token == self.eos_token_id and not p.ignore_eos) or token in stop_ids:
                seq.finish_reason = "stop"
            elif p.stop:
                if seq.stop_matcher is None:
                    seq.stop_matcher = StopStringMatcher(self.tokenizer, p.stop)
                cut = seq.stop_matcher.add(token)
                if cut is not None:
                    seq.text, seq.finish_reason = seq.stop_matcher.text[:cut], "stop"
            if seq.finish_reason is not None:
                return
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"

    def output(self, seq: Sequence) -> RequestOutput:
        text = seq.text
        if text is None:
            text = self.tokenizer.decode(seq.output_token_ids) if seq.finish_reason else ""
        logprobs = list(seq.output_logprobs) if seq.output_logprobs is not None else None
        return RequestOutput(seq.request_id, seq.token_ids[:seq.num_prompt_tokens],
                             seq.output_token_ids, text, seq.finish_reason, seq.num_cached_tokens,
                             seq.num_recomputed_tokens, logprobs, seq.error)
