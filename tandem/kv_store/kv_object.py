"""The KV object format: a versioned header, then the payload.

    object = magic "TDKV" | u16 format version | u32 length | JSON metadata | payload

The metadata names the model fingerprint, the `KVSpec` layout, the token count, the codec, the
payload length and an XXH3-64 checksum (~3x faster than CRC-32 here). JSON, never pickle:
headers come from other processes, disks and Redis.

Two payload layouts share the header:
- a transfer (`layer_bytes` empty): `KVBlocks.data` as raw bytes, checked by `checksum`;
- a stored object: one section per layer, each the codec's encoding of that layer, with its
  size and checksum in `layer_bytes` / `layer_checksums`, so one layer (or a group) can be
  read and checked without the rest; `checksum` covers the section checksums.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from dataclasses import dataclass

import torch
import xxhash
from pydantic import ValidationError

from tandem.engine.kv_cache import KVBlocks, KVSpec
from tandem.kv_store.codec import Codec, get_codec
from tandem.kv_store.errors import KVChecksumError, KVFormatError

MAGIC = b"TDKV"
FORMAT_VERSION = 4  # 3: the model fingerprint is a digest of the weights' bytes; 4: dependence
MAX_META_BYTES = 1 << 16
MAX_TOKENS = 1 << 22  # more than any context: a header claiming more is damaged
PREFIX = struct.Struct("<4sHI")
HEADER_ALIGN = 16


@dataclass(frozen=True)
class KVHeader:
    fingerprint: str
    spec: KVSpec
    num_tokens: int
    payload_bytes: int
    checksum: int
    codec: str = "raw"
    layer_bytes: tuple[int, ...] = ()
    layer_checksums: tuple[int, ...] = ()
    first_position: int = 0  # where the KV's first token sits in its sequence
    # A chunk variant's dependence on the chunks before it (chunk_variants); None: not measured
    dependence: float | None = None

    def encode(self) -> bytes:
        meta = json.dumps({
            "fingerprint": self.fingerprint, "spec": self.spec.model_dump(),
            "num_tokens": self.num_tokens, "codec": self.codec,
            "payload_bytes": self.payload_bytes, "checksum": self.checksum,
            "layer_bytes": list(self.layer_bytes), "layer_checksums": list(self.layer_checksums),
            "first_position": self.first_position, "dependence": self.dependence,
        }, sort_keys=True).encode()
        # Pad the JSON with spaces (still valid JSON) so the payload starts 16-byte aligned:
        # an object held in device memory then decodes as a view of its bytes, not a copy.
        meta += b" " * (-(PREFIX.size + len(meta)) % HEADER_ALIGN)
        return PREFIX.pack(MAGIC, FORMAT_VERSION, len(meta)) + meta

    @classmethod
    def decode(cls, data: bytes | memoryview) -> KVHeader:
        """Parse a header that is exactly `data` (see `header_length` to find its end)."""
        length = header_length(data) - PREFIX.size
        if len(data) != PREFIX.size + length:
            raise KVFormatError(f"KV header length {length} does not match its {len(data)} bytes")
        try:
            meta = json.loads(bytes(data[PREFIX.size:]))
            header = cls(fingerprint=str(meta["fingerprint"]),
                         spec=KVSpec.model_validate(meta["spec"]),
                         num_tokens=int(meta["num_tokens"]), codec=str(meta["codec"]),
                         payload_bytes=int(meta["payload_bytes"]),
                         checksum=int(meta["checksum"]),
                         layer_bytes=tuple(int(n) for n in meta["layer_bytes"]),
                         layer_checksums=tuple(int(c) for c in meta["layer_checksums"]),
                         first_position=int(meta["first_position"]),
                         dependence=None if meta["dependence"] is None
                         else float(meta["dependence"]))
        except (ValueError, KeyError, TypeError, ArithmeticError, ValidationError) as e:
            raise KVFormatError(f"KV header metadata is malformed: {e}") from None
        header._check_sizes()
        return header

    def _check_sizes(self) -> None:
        if self.dependence is not None and not 0.0 <= self.dependence <= 1.0:
            raise KVFormatError(f"KV header says dependence {self.dependence}, not in [0, 1]")
        if not 0 < self.num_tokens <= MAX_TOKENS or self.first_position < 0:
            raise KVFormatError(f"KV header says {self.num_tokens} tokens from position "
                                f"{self.first_position}")
        if self.layer_bytes:
            if len(self.layer_bytes) != self.spec.num_layers \
                    or len(self.layer_checksums) != self.spec.num_layers \
                    or sum(self.layer_bytes) != self.payload_bytes \
                    or min(self.layer_bytes) < 0:
                raise KVFormatError("KV header's layer sections do not agree with its "
                                    f"{self.spec.num_layers} layers and {self.payload_bytes} "
                                    "payload bytes")
            get_codec(self.codec)  # raises for an unknown codec
        elif self.codec != "raw" or self.payload_bytes != raw_size(self.spec, self.num_tokens):
            raise KVFormatError(f"KV header says {self.num_tokens} tokens and "
                                f"{self.payload_bytes} payload bytes, which do not agree")

    def check_compatible(self, fingerprint: str, spec: KVSpec) -> None:
        """Raise unless KV with this header can go into an engine with `fingerprint` and `spec`."""
        if self.fingerprint != fingerprint:
            raise KVFormatError(f"KV is for model {self.fingerprint!r}, this engine serves "
                                f"{fingerprint!r}")
        if self.spec != spec:
            raise KVFormatError(f"KV layout {self.spec} differs from this engine's {spec}")

    def object_checksum(self) -> int:
        """What a stored object's `checksum` must be: over every other header field and the
        layer checksums, so a damaged header is caught like a damaged payload."""
        meta = json.dumps([self.fingerprint, self.spec.model_dump(), self.num_tokens, self.codec,
                           self.payload_bytes, list(self.layer_bytes),
                           self.first_position]).encode()
        return combined_checksum([checksum(meta), *self.layer_checksums])

    def layer_span(self, layers: range) -> tuple[int, int]:
        """(offset in the payload, length) of the sections of `layers` in a stored object."""
        start = sum(self.layer_bytes[:layers.start])
        return start, sum(self.layer_bytes[layers.start:layers.stop])


def header_length(data: bytes | memoryview) -> int:
    """Bytes of the header that `data` starts with (at least its fixed prefix is needed)."""
    if len(data) < PREFIX.size:
        raise KVFormatError(f"KV header is {len(data)} bytes, too short")
    magic, version, length = PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise KVFormatError(f"not a KV object (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise KVFormatError(f"KV format version {version} is not supported "
                            f"(this build reads version {FORMAT_VERSION})")
    if length > MAX_META_BYTES:
        raise KVFormatError(f"KV header length {length} exceeds {MAX_META_BYTES}")
    return PREFIX.size + length


def raw_size(spec: KVSpec, num_tokens: int) -> int:
    return spec.num_blocks_for(num_tokens) * spec.bytes_per_block


def checksum(payload: bytes | bytearray | memoryview) -> int:
    return xxhash.xxh3_64_intdigest(payload)


def combined_checksum(checksums: list[int] | tuple[int, ...]) -> int:
    """One checksum over a sequence of checksums (the sections of an object or a transfer)."""
    return checksum(b"".join(c.to_bytes(8, "little") for c in checksums))


# -- stored objects ------------------------------------------------------------------------------


def decode_tensor(data: torch.Tensor, fingerprint: str, spec: KVSpec,
                  num_tokens: int | None = None) -> KVBlocks:
    """A stored object held as a uint8 tensor in device memory, decoded where it lies: only
    the header crosses to the host, and a `raw` payload becomes the KV as a view, with no copy.
    Its sections are not re-hashed: the object was checked when it entered device memory (it
    was encoded here, or decoded and checked on its way up from a lower tier), and device
    memory, like the KV pool itself, is trusted; checksums guard wires and storage media."""
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise KVFormatError(f"a stored KV object is flat bytes, got {data.dtype} "
                            f"{tuple(data.shape)}")
    head = memoryview(data[:PREFIX.size].cpu().numpy())
    size = header_length(head)
    header = read_header(memoryview(data[:size].cpu().numpy()), fingerprint, spec)
    if num_tokens is not None and header.num_tokens != num_tokens:
        raise KVFormatError(f"KV object holds {header.num_tokens} tokens, expected {num_tokens}")
    if data.numel() - size != header.payload_bytes:
        raise KVFormatError(f"KV payload is {data.numel() - size} bytes, the header says "
                            f"{header.payload_bytes}")
    if header.codec != "raw":  # coded payloads decode on the host
        return decode_object(memoryview(data.cpu().numpy()), fingerprint, spec, num_tokens)
    shape = (spec.num_layers, 2, spec.num_blocks_for(header.num_tokens), spec.block_size,
             spec.num_kv_heads, spec.head_dim)
    payload = data[size:]
    if payload.storage_offset() % spec.torch_dtype.itemsize:
        payload = payload.clone()  # the header ended off the element grid: a copy on the device
    return KVBlocks(spec, header.num_tokens, payload.view(spec.torch_dtype).view(shape))


def encode_object(kv: KVBlocks, fingerprint: str, codec: Codec, first_position: int = 0,
                  dependence: float | None = None) -> bytes:
    """`kv` (whose first token sits at `first_position` in its sequence) as a stored object:
    header, then each layer as `codec` encodes it."""
    sections = [codec.encode_layer(layer, kv.data[layer], kv.num_tokens, first_position)
                for layer in range(kv.spec.num_layers)]
    sums = tuple(checksum(s) for s in sections)
    header = KVHeader(fingerprint, kv.spec, kv.num_tokens, sum(map(len, sections)), 0,
                      codec.name, tuple(map(len, sections)), sums, first_position, dependence)
    header = dataclasses.replace(header, checksum=header.object_checksum())
    return b"".join([header.encode(), *sections])


def read_header(data: bytes | memoryview, fingerprint: str, spec: KVSpec) -> KVHeader:
    """The header of a stored object for this model and layout (`data` may be just its start)."""
    view = memoryview(data)
    header = KVHeader.decode(view[:header_length(view)])
    if not header.layer_bytes:
        raise KVFormatError("KV object has no layer sections: it is a transfer, not stored KV")
    if header.object_checksum() != header.checksum:
        raise KVChecksumError("KV header checksum mismatch: the header was corrupted")
    header.check_compatible(fingerprint, spec)
    return header


def decode_layers(header: KVHeader, sections: bytes | memoryview, layers: range) -> torch.Tensor:
    """Decode `layers` from their sections (`header.layer_span(layers)` of the payload), each
    checked against its checksum: [len(layers), 2, num_blocks, block_size, heads, head_dim]."""
    view, codec, out, offset = memoryview(sections), get_codec(header.codec), [], 0
    codec.check(header.fingerprint, header.spec)
    if len(view) != header.layer_span(layers)[1]:
        raise KVFormatError(f"KV sections are {len(view)} bytes, the header says "
                            f"{header.layer_span(layers)[1]}")
    for layer in layers:
        section = view[offset:offset + header.layer_bytes[layer]]
        offset += len(section)
        if checksum(section) != header.layer_checksums[layer]:
            raise KVChecksumError(f"KV layer {layer} checksum mismatch: the data was corrupted")
        out.append(codec.decode_layer(layer, section, header.spec, header.num_tokens))
    return torch.stack(out)


def decode_object(data: bytes | memoryview, fingerprint: str, spec: KVSpec,
                  num_tokens: int | None = None) -> KVBlocks:
    """A whole stored object (of `num_tokens` tokens, when given) back as `KVBlocks`; raises
    KVObjectError if it is unusable."""
    view = memoryview(data)
    header = read_header(view, fingerprint, spec)
    if num_tokens is not None and header.num_tokens != num_tokens:
        raise KVFormatError(f"KV object holds {header.num_tokens} tokens, expected {num_tokens}")
    start = header_length(view)
    if len(view) - start != header.payload_bytes:
        raise KVFormatError(f"KV payload is {len(view) - start} bytes, the header says "
                            f"{header.payload_bytes}")
    return KVBlocks(spec, header.num_tokens,
                    decode_layers(header, view[start:], range(spec.num_layers)),
                    exact=get_codec(header.codec).lossless)
