"""The blocking client."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem.client._request import (
    HEALTH_TIMEOUT_S,
    Message,
    Prompt,
    SamplingExtras,
    build_generate_request,
    call_metadata,
    channel_credentials,
    channel_options,
    resolve_timeout,
    tokenize_request,
)
from tandem.client.errors import missing_finish_reason, rpc_errors
from tandem.client.types import Chunk, Completion, ModelInfo
from tandem.proto.v1 import admin_pb2 as apb
from tandem.proto.v1 import admin_pb2_grpc as apb_grpc
from tandem.proto.v1 import tandem_pb2 as pb
from tandem.proto.v1 import tandem_pb2_grpc as pb_grpc


class Client:
    """A blocking client for a Tandem gateway at `address` ("host:port")."""

    def __init__(
        self,
        address: str,
        *,
        tls: bool = False,
        root_certificates: bytes | None = None,
        client_certificate: bytes | None = None,
        client_key: bytes | None = None,
        api_key: str | None = None,
        timeout: float | None = None,
        max_retries: int = 3,
    ) -> None:
        options = channel_options(max_retries)
        credentials = channel_credentials(tls, root_certificates, client_certificate, client_key)
        self._metadata = call_metadata(api_key)
        if credentials is None:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            self._channel = grpc.secure_channel(address, credentials, options=options)
        self._stub = pb_grpc.TandemStub(self._channel)
        self._admin = apb_grpc.AdminStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._timeout = timeout

    def generate(
        self,
        prompt: Prompt | None = None,
        *,
        messages: Sequence[Message] | None = None,
        segments: Sequence[str] | None = None,
        recompute_ratio: float | None = None,
        blend: bool | None = None,
        max_tokens: int | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        model: str | None = None,
        ignore_eos: bool = False,
        cache_salt: str | None = None,
        n: int | None = None,
        min_tokens: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        repetition_penalty: float | None = None,
    ) -> Completion:
        """Generate a completion for exactly one of a prompt (str or token ids), chat messages,
        or segments.

        `segments` is a segmented prompt (CacheBlend): prefix (may be empty), chunk...,
        question. Each is tokenized on its own, so a chunk (say, a retrieved passage) has the
        same tokens wherever it lands: its KV is cached on its own and blended in, with a
        `recompute_ratio` share of its tokens (server default 0.15; in [0, 1]) recomputed to
        restore attention across segments. `blend=False` prefills the same tokens the ordinary
        way. `usage.recomputed_tokens` counts the recomputed tokens.
        """
        request = build_generate_request(
            prompt, messages=messages, segments=segments, recompute_ratio=recompute_ratio,
            blend=blend, max_tokens=max_tokens, temperature=temperature,
            top_p=top_p, top_k=top_k, seed=seed, stop=stop, request_id=request_id,
            model=model, ignore_eos=ignore_eos, cache_salt=cache_salt,
            options=SamplingExtras(n, min_tokens, stop_token_ids, logprobs, prompt_logprobs,
                                   presence_penalty, frequency_penalty, repetition_penalty))
        return Completion.from_chunks(list(self._chunks(request, timeout)))

    def stream(
        self,
        prompt: Prompt | None = None,
        *,
        messages: Sequence[Message] | None = None,
        segments: Sequence[str] | None = None,
        recompute_ratio: float | None = None,
        blend: bool | None = None,
        max_tokens: int | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        model: str | None = None,
        ignore_eos: bool = False,
        cache_salt: str | None = None,
        n: int | None = None,
        min_tokens: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        repetition_penalty: float | None = None,
    ) -> Iterator[Chunk]:
        """Like generate(), but yield chunks as the server decodes them."""
        request = build_generate_request(
            prompt, messages=messages, segments=segments, recompute_ratio=recompute_ratio,
            blend=blend, max_tokens=max_tokens, temperature=temperature,
            top_p=top_p, top_k=top_k, seed=seed, stop=stop, request_id=request_id,
            model=model, ignore_eos=ignore_eos, cache_salt=cache_salt,
            options=SamplingExtras(n, min_tokens, stop_token_ids, logprobs, prompt_logprobs,
                                   presence_penalty, frequency_penalty, repetition_penalty))
        return self._chunks(request, timeout)

    def _chunks(self, request: pb.GenerateRequest, timeout: float | None) -> Iterator[Chunk]:
        """Run Generate and yield its chunks up to and including each choice's final one."""
        unfinished = request.sampling.n if request.sampling.HasField("n") else 1
        call = self._stub.Generate(request, timeout=resolve_timeout(timeout, self._timeout),
                                            metadata=self._metadata)
        try:
            with rpc_errors():
                for response in call:
                    chunk = Chunk.from_proto(response)
                    yield chunk
                    if chunk.finish_reason is not None:
                        unfinished -= 1
                        if not unfinished:  # every choice has ended
                            return
        finally:
            call.cancel()  # no-op once finished; stops the request if the caller quits early
        raise missing_finish_reason()

    def abort(self, request_id: str, *, timeout: float | None = None) -> bool:
        """Stop a running request; False when no such request was running."""
        with rpc_errors():
            response = self._stub.Abort(pb.AbortRequest(request_id=request_id),
                                        timeout=resolve_timeout(timeout, self._timeout),
                                        metadata=self._metadata)
        return response.found

    def tokenize(
        self,
        text: str,
        add_special_tokens: bool = True,
        model: str | None = None,
        *,
        timeout: float | None = None,
    ) -> list[int]:
        """Tokenize text with the served model's tokenizer."""
        with rpc_errors():
            response = self._stub.Tokenize(tokenize_request(text, add_special_tokens, model),
                                           timeout=resolve_timeout(timeout, self._timeout),
                                           metadata=self._metadata)
        return list(response.token_ids)

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """The models the gateway serves."""
        with rpc_errors():
            response = self._stub.ListModels(pb.ListModelsRequest(),
                                             timeout=resolve_timeout(timeout, self._timeout),
                                             metadata=self._metadata)
        return [ModelInfo.from_proto(m) for m in response.models]

    def status(self, *, timeout: float | None = None) -> apb.StatusResponse:
        """The Admin service's view of the cluster: pools, and each worker's state and load."""
        with rpc_errors():
            return self._admin.Status(apb.StatusRequest(),
                                      timeout=resolve_timeout(timeout, self._timeout),
                                      metadata=self._metadata)

    def drain(self, worker_id: str, *, timeout: float | None = None) -> apb.DrainResponse:
        """Take a worker out of service (Admin); its running requests move to other workers
        and their streams go on. Returns once it is removed."""
        with rpc_errors():
            return self._admin.Drain(apb.DrainRequest(worker_id=worker_id),
                                     timeout=resolve_timeout(timeout, self._timeout),
                                     metadata=self._metadata)

    def health(self, *, timeout: float = HEALTH_TIMEOUT_S) -> bool:
        """True when the gateway reports SERVING; False when not serving or unreachable."""
        try:
            response = self._health.Check(health_pb2.HealthCheckRequest(service=""),
                                          timeout=timeout)
        except grpc.RpcError:
            return False
        return response.status == health_pb2.HealthCheckResponse.SERVING

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
