"""OpenAI response bodies and stream chunks, built from the frontend's `GenerateResponse`s.

A request may hold several prompts (completions) and several choices per prompt (`n`): the
OpenAI choice index is prompt * n + choice, as in OpenAI's API.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from tandem.cluster.openai.translate import Choice, Renderer, created, usage_of
from tandem.proto.v1 import tandem_pb2 as pb


@dataclass(frozen=True)
class Shape:
    """What kind of response, and what it carries besides the text."""

    chat: bool
    response_id: str
    model: str
    n: int  # choices per prompt
    logprobs: bool
    echo_texts: list[str] | None = None  # completions with echo: each prompt's text
    first_prompt_tokens: list[int] | None = None  # each prompt's first token (echo logprobs)

    def index(self, prompt: int, message: pb.GenerateResponse) -> int:
        return prompt * self.n + message.index

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"


async def collect(shape: Shape, messages: AsyncIterator[tuple[int, pb.GenerateResponse]],
                  renderer: Renderer) -> dict[str, Any]:
    """The whole (non-streaming) response."""
    choices: dict[int, Choice] = {}
    prompts: dict[int, int] = {}
    async for prompt, message in messages:
        index = shape.index(prompt, message)
        choices.setdefault(index, Choice(index)).add(message)
        prompts[index] = prompt
    finals = [c.final for c in choices.values() if c.final is not None]
    body = []
    for index in sorted(choices):
        c, prompt = choices[index], prompts[index]
        text = "".join(c.text)
        entry: dict[str, Any] = {"index": index,
                                 "finish_reason": c.final.finish_reason if c.final else None}
        if shape.chat:
            entry["message"] = {"role": "assistant", "content": text}
            entry["logprobs"] = renderer.chat_logprobs(c.logprobs) if shape.logprobs else None
        else:
            echo = shape.echo_texts[prompt] if shape.echo_texts else ""
            entry["text"] = echo + text
            entry["logprobs"] = _completion_logprobs(shape, renderer, c.logprobs,
                                                     c.prompt_logprobs, prompt, echo) \
                if shape.logprobs else None
        body.append(entry)
    return {"id": shape.response_id, "object": shape.object, "created": created(),
            "model": shape.model, "choices": body, "usage": usage_of(finals)}


def _completion_logprobs(shape: Shape, renderer: Renderer, logprobs: list[pb.TokenLogprob],
                         prompt_logprobs: list[pb.TokenLogprob], prompt: int,
                         echo: str) -> dict[str, Any]:
    first = shape.first_prompt_tokens[prompt] if shape.echo_texts and \
        shape.first_prompt_tokens else None
    if first is None:
        return renderer.completion_logprobs(logprobs, offset=len(echo))
    return renderer.completion_logprobs(logprobs, 0, prompt_logprobs, first)


async def stream_events(shape: Shape, include_usage: bool,
                        messages: AsyncIterator[tuple[int, pb.GenerateResponse]],
                        renderer: Renderer) -> AsyncIterator[str]:
    """Server-sent events: one per token delta, a usage chunk when asked, then [DONE]."""
    started: set[int] = set()
    finals: list[pb.GenerateResponse] = []
    stamp = created()
    async for prompt, message in messages:
        index = shape.index(prompt, message)
        first = index not in started
        started.add(index)
        choice: dict[str, Any] = {"index": index,
                                  "finish_reason": message.finish_reason or None}
        if shape.chat:
            delta: dict[str, Any] = {"content": message.text}
            if first:
                delta["role"] = "assistant"
            choice["delta"] = delta
            choice["logprobs"] = renderer.chat_logprobs(list(message.logprobs)) \
                if shape.logprobs else None
        else:
            echo = shape.echo_texts[prompt] if first and shape.echo_texts else ""
            choice["text"] = echo + message.text
            choice["logprobs"] = _completion_logprobs(
                shape, renderer, list(message.logprobs), list(message.prompt_logprobs), prompt,
                echo) if shape.logprobs and (first or not shape.echo_texts) else (
                renderer.completion_logprobs(list(message.logprobs)) if shape.logprobs
                else None)
        chunk: dict[str, Any] = {"id": shape.response_id, "object": _chunk_object(shape),
                                 "created": stamp, "model": shape.model, "choices": [choice]}
        if include_usage:
            chunk["usage"] = None
        if message.finish_reason:
            finals.append(message)
        yield sse(chunk)
    if include_usage:
        yield sse({"id": shape.response_id, "object": _chunk_object(shape), "created": stamp,
                   "model": shape.model, "choices": [], "usage": usage_of(finals)})
    yield "data: [DONE]\n\n"


def _chunk_object(shape: Shape) -> str:
    return "chat.completion.chunk" if shape.chat else "text_completion"


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"
