"""Hypothesis fuzzing of malformed KV transfer streams, sent raw to one real gRPC receiver over
loopback: no Begin or a bad Begin header, piece headers outside the request or overlapping,
payloads shorter or longer than their piece, flipped bits, an early or lying End. Each is
refused with a status and a message naming the problem, no piece that failed its check is
written, and after each the receiver holds no piece in flight and still takes a correct
handoff."""

from __future__ import annotations

import asyncio
import itertools
import random
import re
import threading
from dataclasses import dataclass

import grpc
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tandem.engine.kv_cache import KVCache
from tandem.kv_store.kv_object import FORMAT_VERSION, MAGIC, MAX_TOKENS, PREFIX, KVHeader
from tandem.proto.v1 import kv_transfer_pb2 as pb
from tandem.transfer import make_transport
from tandem.transfer.base import Handoff
from tandem.transfer.grpc_receiver import OPTIONS, PAYLOAD_TAG, PUSH_KV, varint
from tandem.transfer.layout import Piece, checksum_bytes, combined_checksum, transfer_header

from .test_transfer import IDENTITY, SPEC, Sink

FUZZ = settings(max_examples=20, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
DATA_LOSS = grpc.StatusCode.DATA_LOSS
FP, TOKENS = IDENTITY.fingerprint, 20
BLOCKS = SPEC.num_blocks_for(TOKENS)  # 2
LAYERS = range(SPEC.num_layers)  # 4
REFUSED_BLOCKS, GOOD_BLOCKS = [0, 1], [8, 9]
IDS = itertools.count()
OTHER_SPECS = [SPEC.model_copy(update={field: value}) for field, value in
               [("num_layers", 3), ("num_kv_heads", 2), ("head_dim", 32), ("dtype", "float16"),
                ("block_size", 8)]]


@dataclass
class Receiver:
    transport: object
    cache: KVCache
    sink: Sink
    push: object  # the raw PushKV call: an iterator of wire-form KVChunks in


@pytest.fixture(scope="module")
def rx():
    """One receiver for the module, served by an event loop on its own thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    cache, sink = KVCache(SPEC, 16, torch.device("cpu")), Sink({})

    async def start():
        transport = make_transport("grpc")
        return transport, await transport.start_receiver("127.0.0.1", IDENTITY, cache, sink)

    transport, info = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    channel = grpc.insecure_channel(info.address, options=OPTIONS)
    try:
        yield Receiver(transport, cache, sink, channel.stream_unary(PUSH_KV))
    finally:
        channel.close()
        asyncio.run_coroutine_threadsafe(transport.close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def chunk(**part) -> bytes:
    return pb.KVChunk(**part).SerializeToString()


def header(num_tokens: int = TOKENS, checksum: int = 0, **changes) -> bytes:
    base = transfer_header(changes.pop("fingerprint", FP), changes.pop("spec", SPEC), num_tokens,
                           checksum)
    return KVHeader(**{**vars(base), **changes}).encode()


def begin(rid: str, kv_header: bytes | None = None) -> bytes:
    return chunk(begin=pb.Begin(request_id=rid, kv_header=header() if kv_header is None
                                else kv_header))


def frame(data: bytes) -> bytes:
    """A payload KVChunk in its wire form."""
    return PAYLOAD_TAG + varint(len(data)) + data


def piece(layers: range, first_block: int = 0, num_blocks: int = BLOCKS, seed: int = 0) \
        -> tuple[Piece, bytes, bytes]:
    """(the piece, its PieceHeader message, its payload bytes) of random KV."""
    data = random.Random(seed).randbytes(Piece(layers, first_block, num_blocks).num_bytes(SPEC))
    p = Piece(layers, first_block, num_blocks, checksum_bytes(data))
    return p, chunk(piece=pb.PieceHeader(
        first_layer=layers.start, num_layers=len(layers), first_block=first_block,
        num_blocks=num_blocks, checksum=p.checksum, payload_bytes=len(data))), data


def layerwise(seed: int) -> tuple[list[Piece], list[list[bytes]], list[bytes]]:
    """Per layer: (pieces, [header, payload frame] each, payloads)."""
    made = [piece(range(layer, layer + 1), seed=seed + layer) for layer in LAYERS]
    return [m[0] for m in made], [[m[1], frame(m[2])] for m in made], [m[2] for m in made]


def end(pieces: list[Piece], kv_header: bytes | None = None) -> bytes:
    kv_header = header(checksum=combined_checksum(pieces)) if kv_header is None else kv_header
    return chunk(end=pb.End(kv_header=kv_header, output_token_ids=[7]))


def still_serving(rx: Receiver, seed: int) -> None:
    """A correct handoff is taken, and its KV lands byte-identical in its blocks."""
    rid = f"ok{next(IDS)}"
    rx.sink.blocks[rid] = GOOD_BLOCKS
    pieces, wires, payloads = layerwise(seed)
    rx.push(iter([begin(rid), *itertools.chain(*wires), end(pieces)]), timeout=10)
    assert rx.sink.completed[-1] == Handoff(rid, [7])
    landed = rx.cache.gather(LAYERS, GOOD_BLOCKS).contiguous().view(torch.uint8)
    assert landed.numpy().tobytes() == b"".join(payloads)
    del rx.sink.blocks[rid]


def refused(rx: Receiver, rid: str, wires: list[bytes], code: grpc.StatusCode, match: str,
            reserve: list[int] | None = REFUSED_BLOCKS) -> None:
    """The stream is refused with `code` and a message matching `match`; nothing of it is
    left in flight, and the receiver takes the next correct handoff."""
    if reserve is not None:
        rx.sink.blocks[rid] = reserve
    rx.cache.data.zero_()
    with pytest.raises(grpc.RpcError) as caught:
        rx.push(iter(wires), timeout=10)
    assert caught.value.code() == code, caught.value.details()
    assert re.search(match, caught.value.details()), caught.value.details()
    receiver = rx.transport._receiver
    assert not receiver.writing(rid) and not receiver._writing  # no piece left in flight
    assert rid not in [h.request_id for h in rx.sink.completed]
    rx.sink.blocks.pop(rid, None)  # what the decode worker does with a refused request
    still_serving(rx, seed=len(wires))


def untouched(rx: Receiver, layers: range) -> bool:
    return not rx.cache.gather(layers, REFUSED_BLOCKS).view(torch.int16).any()


BEGINS = ["no begin", "garbage first", "truncated", "garbage header", "other model",
          "other layout", "version", "tokens", "payload bytes", "unreserved", "too few blocks"]


@pytest.mark.parametrize("kind", BEGINS)
@FUZZ
@given(st.data())
def test_a_stream_without_a_sound_begin_is_refused_naming_the_header(rx, kind, data):
    rid, pieces, wires, _ = f"r{next(IDS)}", *layerwise(0)
    body = [*itertools.chain(*wires), end(pieces)]
    good, reserve = header(), REFUSED_BLOCKS
    code, match = PRECONDITION, "header"
    if kind == "no begin":
        wires = data.draw(st.sampled_from([[], body, body[1:], body[-1:]]))
        refused(rx, rid, wires, INVALID, "must open with a Begin")
        return
    if kind == "garbage first":
        first = data.draw(st.binary(max_size=32))
        try:
            opens = pb.KVChunk.FromString(first).WhichOneof("part") == "begin"
        except Exception:  # not a message at all
            opens = False
        code, match = (PRECONDITION, "header") if opens else (INVALID, "Begin")
        refused(rx, rid, [first, *body], code, match)
        return
    if kind == "truncated":
        kv_header = good[:data.draw(st.integers(0, len(good) - 1))]
    elif kind == "garbage header":
        kv_header, match = data.draw(st.binary(max_size=64)), "header|magic|version"
    elif kind == "other model":
        kv_header, match = header(fingerprint=data.draw(st.text(max_size=12).filter(
            lambda f: f != FP))), "for model"
    elif kind == "other layout":
        kv_header, match = header(spec=data.draw(st.sampled_from(OTHER_SPECS))), "layout"
    elif kind == "version":
        version = data.draw(st.integers(0, 65535).filter(lambda v: v != FORMAT_VERSION))
        kv_header = PREFIX.pack(MAGIC, version, len(good) - PREFIX.size) + good[PREFIX.size:]
        match = "version"
    elif kind == "tokens":
        n = data.draw(st.one_of(st.integers(-3, 0), st.integers(IDENTITY.max_tokens + 1,
                                                                 MAX_TOKENS + 3)))
        kv_header = header(n) if n > 0 else KVHeader(FP, SPEC, n, 0, 0).encode()
        match = "tokens"
        code = INVALID if IDENTITY.max_tokens < n <= MAX_TOKENS else PRECONDITION
    elif kind == "payload bytes":
        lie = data.draw(st.integers(-1, 10**9).filter(lambda b: b != BLOCKS * SPEC.bytes_per_block))
        kv_header, match = header(payload_bytes=lie), "payload bytes"
    else:  # a sound header, but the request holds no blocks here, or too few for its KV
        kv_header, match = good, "reserved"
        reserve = None if kind == "unreserved" else REFUSED_BLOCKS[:1]
    refused(rx, rid, [begin(rid, kv_header), *body], code, match, reserve)
    assert untouched(rx, LAYERS)


@pytest.mark.parametrize("kind", ["outside", "overlap", "codec"])
@FUZZ
@given(st.data())
def test_a_piece_outside_the_request_or_overlapping_is_refused_naming_the_piece(rx, kind, data):
    rid = f"r{next(IDS)}"
    _, first_header, first_payload = piece(range(0, 2), 0, 1, seed=1)
    wires, code, match = [begin(rid), first_header, frame(first_payload)], INVALID, "piece"
    codec = ""
    if kind == "outside":
        coordinate = st.one_of(st.integers(0, 5), st.just(2**32 - 1))
        fl, nl, fb, nb = (data.draw(coordinate) for _ in range(4))
        assume(not (0 <= fl < fl + nl <= SPEC.num_layers and 0 <= fb < fb + nb <= BLOCKS))
        match = "outside the request"
    else:  # inside the request: over what the first piece wrote, or beside it
        fl = data.draw(st.integers(0, 1) if kind == "overlap" else st.integers(0, 3))
        fb = 0 if kind == "overlap" else data.draw(st.integers(0 if fl >= 2 else 1, 1))
        nl = data.draw(st.integers(1, SPEC.num_layers - fl))
        nb = data.draw(st.integers(1, BLOCKS - fb))
        match = "overlaps"
    if kind == "codec":
        codec = data.draw(st.one_of(st.text(min_size=1, max_size=12),
                                    st.just("cachegen:1:0123456789abcdef")))
        code, match = PRECONDITION, "codec|CacheGen"
    bad = pb.PieceHeader(first_layer=fl, num_layers=nl, first_block=fb, num_blocks=nb,
                         checksum=1, codec=codec, payload_bytes=64)
    refused(rx, rid, [*wires, chunk(piece=bad), frame(bytes(64)), end([])], code, match)


@pytest.mark.parametrize("kind", ["short, then End", "short, then nothing",
                                  "short, then a piece", "long", "before any piece", "bad frame"])
@FUZZ
@given(st.data())
def test_a_payload_of_the_wrong_length_is_refused_naming_it(rx, kind, data):
    rid = f"r{next(IDS)}"
    p, piece_header, payload = piece(LAYERS, seed=2)
    cut = data.draw(st.integers(0, len(payload) - 1))
    _, next_header, _ = piece(LAYERS, seed=3)
    tail, match = {
        "short, then End": ([frame(payload[:cut]), end([p])], "piece cut short"),
        "short, then nothing": ([frame(payload[:cut])], "ended before its End"),
        "short, then a piece": ([frame(payload[:cut]), next_header], "piece cut short"),
        "long": ([frame(payload + data.draw(st.binary(min_size=1, max_size=64)))],
                 "beyond the current piece"),
        "before any piece": ([], "beyond the current piece"),
        "bad frame": ([data.draw(st.sampled_from([
            PAYLOAD_TAG + varint(len(payload) + 1) + payload,
            PAYLOAD_TAG + varint(len(payload)) + payload[:-1], PAYLOAD_TAG + b"\x80"]))],
            "payload chunk"),
    }[kind]
    if kind == "before any piece":
        wires = [begin(rid), frame(payload), piece_header, frame(payload), end([p])]
    else:
        wires = [begin(rid), piece_header, *tail]
    refused(rx, rid, wires, INVALID, match)
    assert untouched(rx, LAYERS)


@FUZZ
@given(st.integers(0, SPEC.num_layers - 1), st.booleans(), st.data())
def test_a_flipped_bit_in_a_piece_is_data_loss_and_never_written(rx, layer, in_header, data):
    rid = f"r{next(IDS)}"
    pieces, wires, payloads = layerwise(4)
    if in_header:  # the piece header's checksum field
        message = pb.KVChunk.FromString(wires[layer][0])
        message.piece.checksum ^= 1 << data.draw(st.integers(0, 63))
        wires[layer][0] = message.SerializeToString()
    else:
        damaged = bytearray(payloads[layer])
        damaged[data.draw(st.integers(0, len(damaged) - 1))] ^= 1 << data.draw(st.integers(0, 7))
        split = data.draw(st.integers(0, len(damaged)))  # in one or two frames
        wires[layer][1:] = [frame(bytes(damaged[:split])), frame(bytes(damaged[split:]))]
    stream = [begin(rid), *itertools.chain(*wires), end(pieces)]
    refused(rx, rid, stream, DATA_LOSS, f"checksum mismatch in layers {layer}")
    assert untouched(rx, range(layer, SPEC.num_layers))


ENDS = ["missing pieces", "other tokens", "other model", "wrong checksum", "garbage header",
        "no End", "second Begin"]


@pytest.mark.parametrize("kind", ENDS)
@FUZZ
@given(st.data())
def test_an_early_or_lying_end_is_refused(rx, kind, data):
    rid, (pieces, wires, _) = f"r{next(IDS)}", layerwise(5)
    checksum = combined_checksum(pieces)
    code, last = INVALID, None
    if kind == "missing pieces":
        kept = data.draw(st.lists(st.sampled_from(LAYERS), max_size=3, unique=True))
        wires = [wires[layer] for layer in sorted(kept)]
        last, match = end([pieces[layer] for layer in kept]), "never arrived"
    elif kind == "other tokens":
        n = data.draw(st.integers(1, IDENTITY.max_tokens).filter(lambda n: n != TOKENS))
        last, match = end(pieces, header(n, checksum)), "differs from Begin"
    elif kind == "other model":
        last, match = end(pieces, header(checksum=checksum, fingerprint="model-b")), "differs"
    elif kind == "wrong checksum":
        lie = data.draw(st.integers(0, 2**64 - 1).filter(lambda c: c != checksum))
        code, last, match = DATA_LOSS, end(pieces, header(checksum=lie)), "checksum"
    elif kind == "garbage header":
        last = end(pieces, data.draw(st.binary(max_size=64)))
        match = "header|magic|version"
    elif kind == "no End":
        match = "ended before its End"
    else:
        last, match = begin(rid), "unexpected begin"
    stream = [begin(rid), *itertools.chain(*wires), *([last] if last else [])]
    refused(rx, rid, stream, code, match)
