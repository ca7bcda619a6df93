"""The KV object format: a versioned header plus the payload bytes of `KVBlocks`.

    header = magic "TDKV" | u16 format version | u32 length | JSON metadata (that many bytes)

The metadata names the model fingerprint, the `KVSpec` layout, the token count, the codec, the
payload length and its XXH3-64 checksum (~3x faster than CRC-32 here). JSON, never pickle:
headers come from other processes and disks.
The payload is `KVBlocks.data` as raw bytes in the engine's block layout (codec "raw").
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np
import torch
import xxhash
from pydantic import ValidationError

from tandem.engine.kv_cache import KVBlocks, KVSpec
from tandem.kv_store.errors import KVChecksumError, KVFormatError

MAGIC = b"TDKV"
FORMAT_VERSION = 1
MAX_META_BYTES = 1 << 16
_PREFIX = struct.Struct("<4sHI")


@dataclass(frozen=True)
class KVHeader:
    fingerprint: str
    spec: KVSpec
    num_tokens: int
    payload_bytes: int
    checksum: int
    codec: str = "raw"

    def encode(self) -> bytes:
        meta = json.dumps({
            "fingerprint": self.fingerprint, "spec": self.spec.model_dump(),
            "num_tokens": self.num_tokens, "codec": self.codec,
            "payload_bytes": self.payload_bytes, "checksum": self.checksum,
        }, sort_keys=True).encode()
        return _PREFIX.pack(MAGIC, FORMAT_VERSION, len(meta)) + meta

    @classmethod
    def decode(cls, data: bytes) -> KVHeader:
        if len(data) < _PREFIX.size:
            raise KVFormatError(f"KV header is {len(data)} bytes, too short")
        magic, version, length = _PREFIX.unpack_from(data)
        if magic != MAGIC:
            raise KVFormatError(f"not a KV object (magic {magic!r}, expected {MAGIC!r})")
        if version != FORMAT_VERSION:
            raise KVFormatError(f"KV format version {version} is not supported "
                                f"(this build reads version {FORMAT_VERSION})")
        if length > MAX_META_BYTES or len(data) != _PREFIX.size + length:
            raise KVFormatError(f"KV header length {length} does not match its {len(data)} bytes")
        try:
            meta = json.loads(data[_PREFIX.size:])
            header = cls(fingerprint=str(meta["fingerprint"]),
                         spec=KVSpec.model_validate(meta["spec"]),
                         num_tokens=int(meta["num_tokens"]), codec=str(meta["codec"]),
                         payload_bytes=int(meta["payload_bytes"]),
                         checksum=int(meta["checksum"]))
        except (ValueError, KeyError, TypeError, ValidationError) as e:
            raise KVFormatError(f"KV header metadata is malformed: {e}") from None
        if header.codec != "raw":
            raise KVFormatError(f"KV codec {header.codec!r} is not supported")
        if header.num_tokens <= 0 or header.payload_bytes != _payload_size(header):
            raise KVFormatError(f"KV header says {header.num_tokens} tokens and "
                                f"{header.payload_bytes} payload bytes, which do not agree")
        return header

    def check_compatible(self, fingerprint: str, spec: KVSpec) -> None:
        """Raise unless KV with this header can go into an engine with `fingerprint` and `spec`."""
        if self.fingerprint != fingerprint:
            raise KVFormatError(f"KV is for model {self.fingerprint!r}, this engine serves "
                                f"{fingerprint!r}")
        if self.spec != spec:
            raise KVFormatError(f"KV layout {self.spec} differs from this engine's {spec}")


def _payload_size(header: KVHeader) -> int:
    return header.spec.num_blocks_for(header.num_tokens) * header.spec.bytes_per_block


def checksum(payload: bytes | bytearray | memoryview) -> int:
    return xxhash.xxh3_64_intdigest(payload)


def encode_kv(kv: KVBlocks, fingerprint: str) -> tuple[KVHeader, memoryview]:
    """The header and payload of `kv` (the payload shares memory with a CPU tensor)."""
    raw = kv.data.detach().to("cpu").contiguous().view(torch.uint8).numpy()
    payload = memoryview(raw).cast("B")
    header = KVHeader(fingerprint, kv.spec, kv.num_tokens, len(payload), checksum(payload))
    return header, payload


def decode_kv(header: KVHeader, payload: bytes | bytearray | memoryview) -> KVBlocks:
    """Check `payload` against `header` and view it as `KVBlocks` (no copy of a bytearray)."""
    if len(payload) != header.payload_bytes:
        raise KVFormatError(f"KV payload is {len(payload)} bytes, the header says "
                            f"{header.payload_bytes}")
    if checksum(payload) != header.checksum:
        raise KVChecksumError("KV payload checksum mismatch: the data was corrupted")
    s = header.spec
    flat = torch.from_numpy(np.frombuffer(payload, dtype=np.uint8))
    shape = (s.num_layers, 2, s.num_blocks_for(header.num_tokens), s.block_size,
             s.num_kv_heads, s.head_dim)
    return KVBlocks(s, header.num_tokens, flat.view(s.torch_dtype).view(shape))
