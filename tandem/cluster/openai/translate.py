"""OpenAI requests into `tandem.v1.GenerateRequest`s, and `GenerateResponse`s back into OpenAI
responses and stream chunks. The HTTP API adds no sampling logic of its own: everything it
accepts maps onto the gRPC `SamplingOptions`, so the two APIs cannot drift."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from tandem.cluster.openai.protocol import ChatCompletionRequest, CompletionRequest, _Request
from tandem.engine.tokenizer import Tokenizer
from tandem.proto.v1 import tandem_pb2 as pb


def sampling_of(body: _Request, max_tokens: int | None, logprobs: int | None,
                prompt_logprobs: int | None = None) -> pb.SamplingOptions:
    s = pb.SamplingOptions(ignore_eos=body.ignore_eos)
    values = {"max_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p,
              "top_k": body.top_k, "seed": body.seed, "n": body.n,
              "min_tokens": body.min_tokens, "logprobs": logprobs,
              "presence_penalty": body.presence_penalty,
              "frequency_penalty": body.frequency_penalty,
              "repetition_penalty": body.repetition_penalty, "cache_salt": body.cache_salt,
              "prompt_logprobs": prompt_logprobs}
    for name, value in values.items():
        if value is not None:
            _set(s, name, value)
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
    s.stop.extend(stop)
    s.stop_token_ids.extend(body.stop_token_ids or [])
    return s


def _set(s: pb.SamplingOptions, name: str, value: Any) -> None:
    """Set a field, refusing what its protobuf type cannot hold rather than wrapping it."""
    try:
        setattr(s, name, value)
    except (ValueError, TypeError):
        raise ValueError(f"{name}: {value!r} is out of range") from None


def chat_request(body: ChatCompletionRequest, request_id: str) -> pb.GenerateRequest:
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return pb.GenerateRequest(
        model=body.model, request_id=request_id,
        messages=pb.ChatMessages(messages=[pb.ChatMessage(role=m.role, content=m.text())
                                           for m in body.messages]),
        sampling=sampling_of(body, body.token_limit, logprobs))


def completion_requests(body: CompletionRequest, request_id: str) -> list[pb.GenerateRequest]:
    """One request per prompt (a list of prompts gives several, as in OpenAI's API)."""
    echo_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
    sampling = sampling_of(body, body.max_tokens, body.logprobs, echo_logprobs)
    if body.segments is not None:
        segments = pb.Segments(texts=body.segments)
        if body.recompute_ratio is not None:
            segments.recompute_ratio = body.recompute_ratio
        if body.blend is not None:
            segments.blend = body.blend
        return [pb.GenerateRequest(model=body.model, request_id=request_id, segments=segments,
                                   sampling=sampling)]
    prompts = body.prompts()
    requests = []
    for i, prompt in enumerate(prompts):
        rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
        if isinstance(prompt, str):
            requests.append(pb.GenerateRequest(model=body.model, request_id=rid, text=prompt,
                                               sampling=sampling))
        else:
            requests.append(pb.GenerateRequest(model=body.model, request_id=rid,
                                               token_ids=pb.TokenIds(ids=prompt),
                                               sampling=sampling))
    return requests


def usage_of(finals: list[pb.GenerateResponse]) -> dict[str, Any]:
    """Usage over the finished choices; each prompt counts once (its choice 0)."""
    prompt = sum(m.usage.prompt_tokens for m in finals if m.index == 0)
    cached = sum(m.usage.cached_tokens for m in finals if m.index == 0)
    completion = sum(m.usage.completion_tokens for m in finals)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


@dataclass
class Choice:
    """One choice being put together from its messages."""

    index: int
    text: list[str] = field(default_factory=list)
    logprobs: list[pb.TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[pb.TokenLogprob] = field(default_factory=list)
    final: pb.GenerateResponse | None = None

    def add(self, message: pb.GenerateResponse) -> None:
        self.text.append(message.text)
        self.logprobs.extend(message.logprobs)
        self.prompt_logprobs.extend(message.prompt_logprobs)
        if message.finish_reason:
            self.final = message


class Renderer:
    """Token strings for logprobs, decoded once per id."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def token(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self.tokenizer.decode([token_id],
                                                                 skip_special_tokens=False)
        return text

    def chat_logprobs(self, logprobs: list[pb.TokenLogprob]) -> dict[str, Any]:
        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            text = self.token(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**entry(lp.token_id, lp.logprob),
                             "top_logprobs": [entry(t.token_id, t.logprob) for t in lp.top]}
                            for lp in logprobs]}

    def completion_logprobs(self, logprobs: list[pb.TokenLogprob], offset: int = 0,
                            prompt: list[pb.TokenLogprob] | None = None,
                            first_prompt_token: int | None = None) -> dict[str, Any]:
        """OpenAI's legacy logprobs: parallel lists; with echo the prompt's tokens come first
        (its first token has no logprob: nothing precedes it)."""
        tokens: list[str] = []
        values: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        entries: list[tuple[int, float | None, list[pb.TopLogprob] | None]] = []
        if first_prompt_token is not None:
            entries.append((first_prompt_token, None, None))
        entries += [(lp.token_id, lp.logprob, list(lp.top)) for lp in prompt or ()]
        entries += [(lp.token_id, lp.logprob, list(lp.top)) for lp in logprobs]
        for token_id, value, top in entries:
            text = self.token(token_id)
            offsets.append(offset)
            offset += len(text)
            tokens.append(text)
            values.append(value)
            tops.append(None if top is None else {self.token(t.token_id): t.logprob
                                                  for t in top})
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
                "text_offset": offsets}


def created() -> int:
    return int(time.time())
