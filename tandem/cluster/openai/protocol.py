"""The OpenAI API's request bodies that Tandem accepts (pydantic; validated on arrival).

Fields follow OpenAI's API plus vLLM's sampling extras (`top_k`, `min_tokens`, `ignore_eos`,
`stop_token_ids`, `repetition_penalty`) and Tandem's own (`segments`, `recompute_ratio`,
`blend`, `cache_salt`). A field OpenAI defines but Tandem does not support is refused with a
400 naming it, never ignored; so is a field nobody defines (a typo would otherwise change
nothing silently). Ranges are checked once, by the engine's `SamplingParams`, after
translation, so the two APIs report the same limits.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# OpenAI fields Tandem does not implement: a 400 names them.
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "response_format",
               "logit_bias", "best_of", "suffix", "parallel_tool_calls", "audio",
               "modalities", "prediction", "web_search_options", "reasoning_effort")
# OpenAI fields that change nothing in what is generated, accepted as they are.
INFORMATIONAL = ("user", "store", "metadata", "service_tier")

Token = Annotated[int, Field(ge=0)]


class UnsupportedField(ValueError):
    def __init__(self, name: str, known: bool) -> None:
        self.param = name
        why = "is not supported by Tandem" if known else "is not a known field"
        super().__init__(f"{name}: {why}")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Request(BaseModel):
    """Options both endpoints share."""

    model_config = ConfigDict(extra="allow")

    model: str = ""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_k: int | None = None
    min_tokens: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[Token] | None = None
    cache_salt: str | None = None

    @model_validator(mode="after")
    def _no_unknown_fields(self) -> _Request:
        for name in self.model_extra or {}:
            if name in INFORMATIONAL:
                continue
            raise UnsupportedField(name, name in UNSUPPORTED)
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: allowed only with stream=true")
        return self


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    @model_validator(mode="after")
    def _chat_options(self) -> ChatCompletionRequest:
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_completion_tokens: differs from max_tokens; set one")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs=true")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens


Prompt = str | list[Token] | list[str] | list[list[Token]]


class CompletionRequest(_Request):
    prompt: Prompt | None = None
    logprobs: int | None = None
    echo: bool = False
    segments: list[str] | None = None
    recompute_ratio: float | None = None
    blend: bool | None = None

    @model_validator(mode="after")
    def _one_input(self) -> CompletionRequest:
        if (self.prompt is None) == (self.segments is None):
            raise ValueError("prompt: set exactly one of prompt and segments")
        if self.segments is None and (self.recompute_ratio is not None
                                      or self.blend is not None):
            raise ValueError("recompute_ratio: applies to segments only")
        if self.segments is not None and self.echo:
            raise ValueError("echo: is not supported with segments")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request (a list of prompts gives several)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            return [[]]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = ""
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("prompt: set exactly one of prompt and messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = ""
    tokens: list[Token]


def error_body(message: str, kind: str, param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    """OpenAI's error body."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
