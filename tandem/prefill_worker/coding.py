"""How a prefill worker codes the KV it hands over by gRPC (`kv_codec`)."""

from __future__ import annotations

from tandem.engine.kv_cache import KVSpec
from tandem.kv_store.codec import Codec, codec_for
from tandem.kv_store.codec.cachegen import LEVELS
from tandem.transfer.coded_piece import AdaptiveCoding
from tandem.worker_base import WorkerConfig


def wire_coding(config: WorkerConfig, fingerprint: str, spec: KVSpec) \
        -> Codec | AdaptiveCoding:
    """What `kv_codec` asks of gRPC handoffs: one codec, or a level per piece."""
    if config.kv_codec != "cachegen:auto":
        return codec_for(config.kv_codec, fingerprint)
    codecs = {level: codec_for(f"cachegen:{level}", fingerprint) for level in LEVELS}
    return AdaptiveCoding(codecs, spec, config.kv_codec_budget_s)
