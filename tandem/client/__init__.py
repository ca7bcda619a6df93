"""Client SDK for a Tandem gateway; needs only grpcio and protobuf.

    from tandem.client import Client, TandemError

    with Client("localhost:50051", timeout=30) as client:
        out = client.generate("The capital of France is", max_tokens=8, temperature=0)
        print(out.text, out.finish_reason, out.usage.completion_tokens, out.ttft_s)
        for chunk in client.stream(messages=[{"role": "user", "content": "Hi!"}]):
            print(chunk.text, end="", flush=True)
        # prefix, retrieved passages (KV cached and blended), question
        out = client.generate(segments=["Answer from the passages.", doc_a, doc_b, "Who won?"])

`AsyncClient` has the same methods as coroutines (`stream` is an async iterator) and is
used with `async with`. Failed calls raise `TandemError`, whose `code()` is the
`grpc.StatusCode` and whose message is the server's.
"""

from tandem.client.aio import AsyncClient
from tandem.client.errors import TandemError
from tandem.client.sync import Client
from tandem.client.types import Chunk, Completion, ModelInfo, Timings, Usage

__all__ = [
    "AsyncClient",
    "Chunk",
    "Client",
    "Completion",
    "ModelInfo",
    "TandemError",
    "Timings",
    "Usage",
]
