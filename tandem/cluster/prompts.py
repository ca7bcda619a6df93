"""A request's prompt as token ids: text, token ids, chat messages or CacheBlend segments."""

from __future__ import annotations

from tandem.cluster.errors import InvalidRequest
from tandem.engine.segments import DEFAULT_RECOMPUTE_RATIO, SegmentedPrompt
from tandem.engine.tokenizer import Tokenizer
from tandem.proto.v1 import tandem_pb2 as pb

CHAT_ROLES = ("system", "user", "assistant", "tool")
MAX_MESSAGES = 1024


def build_prompt(tokenizer: Tokenizer, request: pb.GenerateRequest, vocab_size: int,
                 max_model_len: int) -> tuple[list[int], SegmentedPrompt | None]:
    """The prompt's token ids, and its segments when it came as `segments`; the prompt leaves
    at least one token of context to generate."""
    kind = request.WhichOneof("input")
    segments = None
    if kind is None:
        raise InvalidRequest("prompt: missing; set text, token_ids, messages or segments")
    if kind == "text":
        ids = tokenizer.encode(request.text) if request.text else []
    elif kind == "token_ids":
        ids = list(request.token_ids.ids)
        bad = next((t for t in ids if t >= vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"prompt: token id {bad} is outside the vocabulary "
                                 f"[0, {vocab_size})")
    elif kind == "segments":
        segments = _segmented(tokenizer, request.segments)
        ids = segments.token_ids
    else:
        ids = _chat(tokenizer, request.messages.messages)
    if not ids:
        if kind == "messages":  # the field to fix is `messages` (the HTTP API's param)
            raise InvalidRequest("messages: there are none, so the prompt is empty")
        raise InvalidRequest(f"prompt: {kind} is empty")
    if len(ids) >= max_model_len:
        raise InvalidRequest(f"prompt: {len(ids)} tokens leave no room to generate within "
                             f"the context of {max_model_len} tokens")
    return ids, segments


def _chat(tokenizer: Tokenizer, messages) -> list[int]:
    if not messages:
        return []
    if len(messages) > MAX_MESSAGES:
        raise InvalidRequest(f"messages: {len(messages)} messages; at most {MAX_MESSAGES}")
    for i, m in enumerate(messages):
        if m.role not in CHAT_ROLES:
            raise InvalidRequest(f"messages[{i}].role: {m.role!r} is not one of "
                                 f"{', '.join(CHAT_ROLES)}")
    try:
        text = tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=True)
    except ValueError as e:
        raise InvalidRequest(str(e)) from None
    return tokenizer.encode(text, add_special_tokens=False)


def _segmented(tokenizer: Tokenizer, segments: pb.Segments) -> SegmentedPrompt:
    """Tokenize a `segments` input segment by segment; unset options take their defaults."""
    try:
        return SegmentedPrompt.tokenize(
            tokenizer, list(segments.texts),
            round(segments.recompute_ratio, 6) if segments.HasField("recompute_ratio")
            else DEFAULT_RECOMPUTE_RATIO,
            segments.blend if segments.HasField("blend") else True)
    except ValueError as e:  # the message names a segment or an option
        message = str(e)
        raise InvalidRequest(message if message.startswith("segments")
                             else f"segments.{message}") from None
