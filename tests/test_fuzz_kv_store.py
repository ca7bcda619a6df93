"""Hypothesis fuzzing of damaged KV store objects: truncated, extended or bit-flipped objects,
lying headers (with and without a recomputed checksum), oversized header lengths, damaged
CacheGen sections (through the checksums, and straight into the range decoder), damaged objects
in a real `TieredStore` (a counted, deleted miss), and lying Redis manifests. Each is refused
with a KVObjectError whose message names the problem; none decodes to other KV."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tandem.engine.kv_cache import KVBlocks, KVSpec
from tandem.kv_store.codec import codec_for, get_codec
from tandem.kv_store.codec.profile import SHIPPED, CacheGenProfile
from tandem.kv_store.errors import KVChecksumError, KVFormatError, KVObjectError
from tandem.kv_store.kv_object import (
    FORMAT_VERSION,
    MAGIC,
    MAX_META_BYTES,
    MAX_TOKENS,
    PREFIX,
    checksum,
    decode_object,
    decode_tensor,
    encode_object,
    header_length,
    read_header,
)
from tandem.kv_store.store import TieredStore
from tandem.kv_store.tiers.memory import MemoryTier
from tandem.kv_store.tiers.redis import MANIFEST, MAX_OBJECT_BYTES, MAX_PART_BYTES, RedisTier
from tandem.kv_store.tiers.ssd import SsdTier

FUZZ = settings(max_examples=20, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, dtype="bfloat16", block_size=4)
FP = "model-a"
TOKENS = st.integers(1, 9)
KEYS = itertools.count()


def kv_of(num_tokens: int, spec: KVSpec = SPEC, mean=0.0, scale=1.0) -> KVBlocks:
    g = torch.Generator().manual_seed(num_tokens)
    shape = (spec.num_layers, 2, spec.num_blocks_for(num_tokens), spec.block_size,
             spec.num_kv_heads, spec.head_dim)
    return KVBlocks(spec, num_tokens,
                    (mean + scale * torch.randn(shape, generator=g)).to(spec.torch_dtype))


def blob_of(num_tokens: int) -> bytes:
    return encode_object(kv_of(num_tokens), FP, get_codec("raw"))


def refused(data: bytes, match: str, num_tokens: int | None = None, tensor: bool = True,
            error: type[Exception] = KVObjectError) -> None:
    """Both decoders (bytes, and a uint8 tensor as the GPU tier holds it) refuse `data`."""
    with pytest.raises(error, match=match):
        decode_object(data, FP, SPEC, num_tokens)
    if tensor:
        with pytest.raises(error, match=match):
            decode_tensor(torch.tensor(list(data), dtype=torch.uint8), FP, SPEC, num_tokens)


def flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << bit % 8
    return bytes(out)


@FUZZ
@given(TOKENS, st.data())
def test_an_object_truncated_anywhere_is_refused_naming_header_or_payload(num_tokens, data):
    blob = blob_of(num_tokens)
    refused(blob[:data.draw(st.integers(0, len(blob) - 1))], "header|payload")


@FUZZ
@given(TOKENS, st.binary(min_size=1, max_size=64))
def test_an_object_with_bytes_appended_is_refused_naming_the_payload(num_tokens, extra):
    refused(blob_of(num_tokens) + extra, "payload")


@FUZZ
@given(TOKENS, st.data())
def test_a_flipped_bit_anywhere_is_refused_and_never_decodes(num_tokens, data):
    blob = blob_of(num_tokens)
    start = header_length(blob)
    where = data.draw(st.one_of(st.integers(0, start - 1), st.integers(0, len(blob) - 1)))
    damaged = flip(blob, 8 * where + data.draw(st.integers(0, 7)))
    named = ["magic"] * 4 + ["version"] * 2 + ["header"] * 4  # the fixed prefix, by byte
    match = named[where] if where < PREFIX.size else "header|codec" if where < start else \
        r"layer \d checksum mismatch"
    with pytest.raises(KVChecksumError if where >= start else KVObjectError, match=match):
        decode_object(damaged, FP, SPEC)


OTHER_SPECS = [SPEC.model_copy(update={field: value}) for field, value in
               [("num_layers", 3), ("num_kv_heads", 3), ("head_dim", 16), ("dtype", "float16"),
                ("block_size", 8)]]


@functools.cache
def shipped_codec():
    profile = CacheGenProfile.load(next(SHIPPED.glob("*.npz")))
    return codec_for("cachegen:1", profile.fingerprint), profile


N_BYTES = st.integers(-3, 4000)
LIES = {  # field: (its lying values, given the true header; the word the refusal must name)
    "num_tokens": (lambda h: st.integers(-3, MAX_TOKENS + 3).filter(
        lambda n: n != h.num_tokens), "tokens"),
    "payload_bytes": (lambda h: N_BYTES.filter(lambda n: n != h.payload_bytes), "payload"),
    "layer_bytes": (lambda h: st.one_of(st.lists(N_BYTES, max_size=3).map(tuple), st.integers(
        1, 64).map(lambda d: (h.layer_bytes[0] + d, h.layer_bytes[1] - d))).filter(
        lambda b: b != h.layer_bytes), "layer"),
    "layer_checksums": (lambda h: st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=3)
                        .map(tuple).filter(lambda c: c != h.layer_checksums), "layer"),
    "spec": (lambda h: st.sampled_from(OTHER_SPECS), "layout|layer"),
    "fingerprint": (lambda h: st.text(max_size=12).filter(lambda f: f != FP), "model"),
    "codec": (lambda h: st.one_of(st.text(max_size=12), st.just("cachegen:1:0123456789abcdef"),
                                  st.just(shipped_codec()[0].name)).filter(lambda c: c != "raw"),
              "codec|CacheGen"),
    "first_position": (lambda h: st.integers(-2**40, -1), "position"),
    "checksum": (lambda h: st.integers(0, 2**64 - 1).filter(lambda c: c != h.checksum),
                 "checksum"),
    "magic": (lambda h: st.binary(min_size=4, max_size=4).filter(lambda m: m != MAGIC), "magic"),
    "version": (lambda h: st.integers(0, 65535).filter(lambda v: v != FORMAT_VERSION),
                "version"),
    "length": (lambda h: st.one_of(  # of the metadata: past the limit, the data, or the JSON
        st.integers(MAX_META_BYTES + 1, 2**32 - 1), st.integers(0, MAX_META_BYTES),
        st.integers(0, 2 * len(h.encode()))).filter(lambda n: n != len(h.encode()) - PREFIX.size),
        "exceeds|header"),
    "metadata": (lambda h: st.sampled_from(["spec", "num_tokens", "layer_bytes", "checksum",
                                            "codec", "fingerprint"]), "header|codec|layer"),
}


@pytest.mark.parametrize("field", list(LIES))
@FUZZ
@given(TOKENS, st.booleans(), st.data())
def test_a_lying_header_is_refused_naming_the_field_or_the_checksum(field, num_tokens,
                                                                    recompute, data):
    blob = blob_of(num_tokens)
    header, payload = read_header(blob, FP, SPEC), blob[header_length(blob):]
    values, word = LIES[field]
    value = data.draw(values(header))
    if field in ("magic", "version", "length"):  # the fixed prefix
        prefix = dict(zip(("magic", "version", "length"), PREFIX.unpack_from(blob), strict=True))
        lied = PREFIX.pack(*(prefix | {field: value}).values()) + blob[PREFIX.size:]
    elif field == "metadata":  # the JSON itself: a field missing, or of the wrong type
        meta = json.loads(blob[PREFIX.size:header_length(blob)])
        if data.draw(st.booleans()):
            del meta[value]
        else:
            meta[value] = data.draw(st.sampled_from([None, [], {}, "many", [["x"]]]))
        text = json.dumps(meta).encode()
        lied = PREFIX.pack(MAGIC, FORMAT_VERSION, len(text)) + text + payload
    else:
        header = dataclasses.replace(header, **{field: value})
        if recompute and field != "checksum":  # a liar who recomputes the header checksum
            header = dataclasses.replace(header, checksum=header.object_checksum())
        lied = header.encode() + payload
        word = word if recompute else f"{word}|checksum"
    # As the store reads: expecting the chunk's token count. `decode_tensor` (device memory,
    # trusted) does not re-hash sections, so a header lying only about them is the decoder's.
    refused(lied, word, num_tokens, tensor=field not in ("layer_bytes", "layer_checksums"),
            error=KVFormatError if field in ("magic", "version", "length") else KVObjectError)


# -- CacheGen: the shipped model's profile and layout (30 layers x 3 kv heads x 64) ---------------


@pytest.fixture(scope="module")
def cachegen():
    """(codec, fingerprint, spec, a coded 6-token object whose first 2 tokens are sinks)."""
    codec, profile = shipped_codec()
    spec = KVSpec(num_layers=profile.num_layers, num_kv_heads=3, head_dim=64,
                  dtype="bfloat16", block_size=16)
    shape = (profile.num_layers, 2, 1, 1, 3, 64)
    kv = kv_of(6, spec, torch.from_numpy(profile.mean).view(shape),
               torch.from_numpy(profile.scale).view(shape))
    kv.data.view(profile.num_layers, 2, -1, 192)[:, 0, 4, 7] = 1e4  # an escaped outlier
    return codec, profile.fingerprint, spec, encode_object(kv, profile.fingerprint, codec, 2)


def sections(blob: bytes, fingerprint: str, spec: KVSpec):
    header = read_header(blob, fingerprint, spec)
    return header, header_length(blob), [0, *itertools.accumulate(header.layer_bytes)]


def restitched(blob: bytes, fingerprint: str, spec: KVSpec, layer: int, section: bytes) -> bytes:
    """`blob` with one layer's section replaced and every size and checksum made to agree."""
    header, start, ends = sections(blob, fingerprint, spec)
    parts = [blob[start + a:start + b] for a, b in itertools.pairwise(ends)]
    parts[layer] = section
    header = dataclasses.replace(
        header, payload_bytes=sum(map(len, parts)), layer_bytes=tuple(map(len, parts)),
        layer_checksums=tuple(checksum(p) for p in parts))
    header = dataclasses.replace(header, checksum=header.object_checksum())
    return header.encode() + b"".join(parts)


def words_of(section: bytes) -> range:
    """Byte offsets of the keys' range-coded words in a layer section."""
    return range(16, 16 + 4 * struct.unpack_from("<I", section, 8)[0])


@FUZZ
@given(st.integers(0, 29), st.sampled_from(["flip", "cut", "restitched cut"]), st.data())
def test_damaged_cachegen_sections_are_caught_naming_the_layer(cachegen, layer, kind, data):
    _, fingerprint, spec, blob = cachegen
    _, start, ends = sections(blob, fingerprint, spec)
    section = blob[start + ends[layer]:start + ends[layer + 1]]
    at = data.draw(st.sampled_from(words_of(section)))  # inside the range-coded words
    if kind == "flip":
        bit = 8 * (start + ends[layer] + at) + data.draw(st.integers(0, 7))
        damaged, error = flip(blob, bit), (KVChecksumError, f"layer {layer} checksum")
    elif kind == "cut":
        damaged, error = blob[:start + ends[layer] + at], (KVFormatError, "payload")
    else:  # a coded section cut short under a header whose sizes and checksums agree
        damaged = restitched(blob, fingerprint, spec, layer, section[:at])
        error = (KVFormatError, f"CacheGen layer {layer}: section is truncated")
    with pytest.raises(error[0], match=error[1]):
        decode_object(damaged, fingerprint, spec)


@FUZZ
@given(st.sampled_from(["flip words", "flip counts", "flip anywhere", "cut", "extend"]),
       st.data())
def test_the_cachegen_decoder_refuses_a_damaged_section_or_keeps_its_shape(cachegen, kind, data):
    """No checksum here: the range decoder itself meets the damage. Counts, lengths and cuts
    are always refused; a flipped word either is, or (range coding has no redundancy) decodes
    to other values of the right shape, which the section checksum catches (test above)."""
    codec, fingerprint, spec, blob = cachegen
    layer = 5
    _, start, ends = sections(blob, fingerprint, spec)
    section = blob[start + ends[layer]:start + ends[layer + 1]]
    where = {"flip words": st.sampled_from(words_of(section)), "flip counts": st.integers(0, 15),
             "flip anywhere": st.integers(0, len(section) - 1)}
    if kind in where:
        damaged = flip(section, 8 * data.draw(where[kind]) + data.draw(st.integers(0, 7)))
    elif kind == "cut":
        damaged = section[:data.draw(st.integers(0, len(section) - 1))]
    else:
        damaged = section + data.draw(st.binary(min_size=1, max_size=16))
    try:
        out = codec.decode_layer(layer, memoryview(damaged), spec, 6)
    except KVFormatError as e:
        assert str(e).startswith(f"CacheGen layer {layer}: "), e
        return
    assert kind in ("flip words", "flip anywhere"), f"{kind} decoded without an error"
    assert out.shape == (2, 1, 16, 3, 64) and out.dtype == torch.bfloat16


# -- tiers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tiers = [MemoryTier("cpu", 1 << 24), SsdTier(tmp_path_factory.mktemp("ssd"), 1 << 24)]
    store = TieredStore(tiers, FP, SPEC, chunk_tokens=4, promote_on_hit=False)
    yield store
    store.close()


def damage(data, blob: bytes, kinds: list[str]) -> bytes:
    kind = data.draw(st.sampled_from(kinds))
    if kind == "cut":
        return blob[:data.draw(st.integers(0, len(blob) - 1))]
    if kind == "extend":
        return blob + data.draw(st.binary(min_size=1, max_size=32))
    return flip(blob, data.draw(st.integers(0, 8 * len(blob) - 1)))


@FUZZ
@given(st.sampled_from(["cpu", "ssd"]), st.booleans(), TOKENS, st.data())
def test_a_damaged_object_in_a_tier_is_a_counted_deleted_miss(store, name, by_layers,
                                                               num_tokens, data):
    tier = {t.name: t for t in store.tiers}[name]
    good, bad, blob = f"k{next(KEYS)}", f"k{next(KEYS)}", blob_of(num_tokens)
    tier.put(good, blob)  # ranged reads never look past the last section: no "extend" for them
    tier.put(bad, damage(data, blob, ["cut", "flip"] + ([] if by_layers else ["extend"])))

    def read(key: str) -> torch.Tensor | None:
        if by_layers:
            return store.get_layers(key, range(SPEC.num_layers), num_tokens)
        return getattr(store.get(key, num_tokens), "data", None)

    before = {t.name: t.corrupt for t in store.stats().tiers}[name]
    assert read(bad) is None
    assert {t.name: t.corrupt for t in store.stats().tiers}[name] == before + 1
    assert not tier.contains(bad) and tier.get(bad) is None
    assert name != "ssd" or not (tier.directory / f"{bad}.kv").exists()
    assert torch.equal(read(good).view(torch.int16), kv_of(num_tokens).data.view(torch.int16))


@pytest.fixture(scope="module")
def redis_tier(redis_server):
    tier = RedisTier(redis_server.url, 64 << 20, part_bytes=1000)
    tier.client.flushall()
    yield tier
    tier.close()


def part_reads(tier: RedisTier) -> int:
    """MGET and GETRANGE calls the Redis server has served: the only ways parts are read."""
    stats = tier.client.info("commandstats")
    return sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("mget", "getrange"))


@st.composite
def lying_manifests(draw) -> bytes:
    kind = draw(st.sampled_from(["magic", "json", "types", "parts", "bounds"]))
    if kind == "magic":
        return draw(st.binary(max_size=40).filter(lambda b: not b.startswith(MANIFEST)))
    if kind == "json":
        return MANIFEST + draw(st.binary(max_size=40))
    size, part = draw(st.integers(0, MAX_OBJECT_BYTES)), draw(st.integers(1, MAX_PART_BYTES))
    meta = {"parts": max(1, -(-size // part)), "size": size, "part": part}
    field = draw(st.sampled_from(sorted(meta)))
    if kind == "types":
        meta[field] = draw(st.sampled_from([None, "many", [], {}, float("nan"), float("inf")]))
    elif kind == "parts":
        meta["parts"] += draw(st.integers(-2**40, 2**40).filter(bool))
    elif field == "part":
        meta["part"] = draw(st.one_of(st.integers(-2**40, 0), st.integers(MAX_PART_BYTES + 1)))
    else:
        meta["size"] = draw(st.one_of(st.integers(-2**40, -1),
                                      st.integers(MAX_OBJECT_BYTES + 1, 2**70)))
    return MANIFEST + json.dumps(meta).encode()


@FUZZ
@given(lying_manifests(), st.integers(0, 1 << 20), st.integers(0, 1 << 20))
def test_a_lying_redis_manifest_is_a_miss_that_reads_no_part(redis_tier, manifest, offset,
                                                             length):
    key, good, blob = f"m{next(KEYS)}", f"m{next(KEYS)}", blob_of(9)
    redis_tier.client.set(key, manifest)
    redis_tier.client.set(f"{key}#0", blob)  # a part under it, which must not be read
    before = part_reads(redis_tier)
    assert redis_tier.get(key) is None
    assert redis_tier.get_range(key, offset, length) is None
    assert part_reads(redis_tier) == before
    redis_tier.put(good, blob)  # the tier still serves a sound object
    assert redis_tier.get(good) == blob and redis_tier.get_range(good, 5, 100) == blob[5:105]


def test_a_manifest_of_a_million_one_byte_parts_is_not_fetched(redis_tier, monkeypatch):
    n, mget = 1 << 20, redis_tier.client.mget

    def bounded_mget(keys):
        assert len(keys) <= 1 << 16, f"asked Redis for {len(keys)} parts of one object"
        return mget(keys)

    monkeypatch.setattr(redis_tier.client, "mget", bounded_mget)
    redis_tier.client.set("huge", MANIFEST + json.dumps({"parts": n, "size": n, "part": 1})
                          .encode())
    assert redis_tier.get("huge") is None
