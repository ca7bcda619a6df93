"""`CacheGenProfile`: a model's KV statistics, measured once offline, that every CacheGen
stream of that model is coded against (CacheGen profiles its symbol distributions offline).

Per (layer, K|V, channel): the mean and the Laplace scale of the KV values, and the
quantization step at level scale 1, larger where the model is less sensitive. Sensitivity is
measured per (layer, K|V), not assumed: that layer's keys or values alone are quantized
coarsely and the KL divergence of the next-token distributions from the exact ones is taken;
steps then follow reverse water-filling (step ~ 1/sqrt(sensitivity)). (Measuring it per head
as well took 3x longer and did not lower the KL at equal size.) Shipping these ~35K
numbers once per model is what keeps the side information in each 256-token object to a few
bytes.

A profile is an .npz of plain arrays (loaded with allow_pickle=False) named after the model
fingerprint; the stream names the profile's id, so KV coded against another profile is refused.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xxhash

from tandem.engine.kv_cache import KVBlocks, KVSpec
from tandem.kv_store.errors import KVFormatError

logger = logging.getLogger(__name__)

PROFILE_VERSION = 1
SHIPPED = Path(__file__).parent / "profiles"
SINK_TOKENS = 4  # the first tokens of a sequence draw most attention: kept exact
PROBE_STEP = 0.7  # x the part's RMS: how coarsely one part is quantized to measure sensitivity


@dataclass(frozen=True, eq=False)
class CacheGenProfile:
    fingerprint: str
    num_layers: int
    channels: int  # kv_heads * head_dim
    mean: np.ndarray  # [layers, 2, channels] float32
    scale: np.ndarray  # [layers, 2, channels] float32: Laplace scale of (x - mean)
    step: np.ndarray  # [layers, 2, channels] float32: quantization step at level scale 1

    @property
    def id(self) -> str:
        digest = xxhash.xxh3_64(json.dumps([PROFILE_VERSION, self.fingerprint]).encode())
        for array in (self.mean, self.scale, self.step):
            digest.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
        return digest.hexdigest()

    def check(self, spec: KVSpec) -> None:
        channels = spec.num_kv_heads * spec.head_dim
        if (self.num_layers, self.channels) != (spec.num_layers, channels):
            raise KVFormatError(f"CacheGen profile is for {self.num_layers} layers x "
                                f"{self.channels} channels, the KV has {spec.num_layers} x "
                                f"{channels}")

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, version=np.int32(PROFILE_VERSION),
                            fingerprint=np.array(self.fingerprint), mean=self.mean,
                            scale=self.scale, step=self.step)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> CacheGenProfile:
        with np.load(path, allow_pickle=False) as f:
            if int(f["version"]) != PROFILE_VERSION:
                raise KVFormatError(f"{path}: CacheGen profile version {int(f['version'])}, "
                                    f"this build reads {PROFILE_VERSION}")
            mean, scale, step = (f[k].astype(np.float32) for k in ("mean", "scale", "step"))
            return cls(str(f["fingerprint"]), mean.shape[0], mean.shape[2], mean, scale, step)


def profile_path(fingerprint: str, directory: Path) -> Path:
    return directory / f"{xxhash.xxh3_64_hexdigest(fingerprint.encode())}.npz"


def cache_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "tandem" / "cachegen"


def find_profile(fingerprint: str) -> CacheGenProfile | None:
    """The shipped profile of this model, else one built here earlier, else None."""
    for directory in (SHIPPED, cache_dir()):
        path = profile_path(fingerprint, directory)
        if path.exists():
            return CacheGenProfile.load(path)
    return None


@functools.cache
def _profiles_by_id() -> dict[str, CacheGenProfile]:
    found = {}
    for directory in (SHIPPED, cache_dir()):
        for path in sorted(directory.glob("*.npz")) if directory.exists() else ():
            try:
                profile = CacheGenProfile.load(path)
            except (OSError, ValueError, KeyError, KVFormatError) as e:
                logger.warning("skipping CacheGen profile %s: %s", path, e)
                continue
            found[profile.id] = profile
    return found


def profile_by_id(profile_id: str) -> CacheGenProfile:
    """The profile a stream names; KVFormatError if this machine does not have it."""
    profile = _profiles_by_id().get(profile_id)
    if profile is None:
        _profiles_by_id.cache_clear()  # built since the last look?
        profile = _profiles_by_id().get(profile_id)
    if profile is None:
        raise KVFormatError(f"CacheGen profile {profile_id} is not on this machine (looked in "
                            f"{SHIPPED} and {cache_dir()})")
    return profile


# -- building one (offline: `tandem cachegen-profile`) -------------------------------------------


def kv_matrix(kv: KVBlocks) -> torch.Tensor:
    """[layers, 2, tokens, channels] float32 view of `kv`'s first num_tokens tokens."""
    s = kv.spec
    flat = kv.data.float().reshape(s.num_layers, 2, -1, s.num_kv_heads * s.head_dim)
    return flat[:, :, :kv.num_tokens]


def build_profile(engine, tokens: list[int], scored_tokens: int = 256) -> CacheGenProfile:
    """Measure a profile on `tokens` (natural text; ~2K tokens): statistics over all of them,
    sensitivity as next-token KL over the last `scored_tokens` given the rest as context."""
    from tandem.engine.sampling_params import SamplingParams

    if len(tokens) < scored_tokens + 256:
        raise ValueError(f"need at least {scored_tokens + 256} calibration tokens, "
                         f"got {len(tokens)}")
    engine.add_request("profile", tokens, SamplingParams(max_tokens=1), prefill_only=True)
    while not engine.step():
        pass
    kv = engine.export_kv("profile")
    engine.release("profile")
    x = kv_matrix(kv)[:, :, SINK_TOKENS:]
    mean = x.mean(dim=2)
    scale = (x - mean.unsqueeze(2)).abs().mean(dim=2).clamp_min(1e-6)  # Laplace MLE
    rms = (x - mean.unsqueeze(2)).pow(2).mean(dim=(2, 3)).sqrt()
    context = len(tokens) - scored_tokens
    exact = _log_probs(engine, kv, tokens, context)
    weight = torch.zeros(kv.spec.num_layers, 2)
    for layer in range(kv.spec.num_layers):
        for part in range(2):
            probe = PROBE_STEP * rms[layer, part].item()
            damaged = _quantize_part(kv, layer, part, mean[layer, part], probe)
            q = _log_probs(engine, damaged, tokens, context)
            kl = (exact.exp() * (exact - q)).sum(-1).mean().item()
            weight[layer, part] = max(kl, 1e-8) / probe ** 2
            logger.info("layer %d %s: KL %.5f at step %.3g", layer, "KV"[part], kl, probe)
    step = weight.rsqrt()
    # Normalize: the geometric mean step equals the geometric mean RMS at level scale 1.
    step *= (rms.log().mean() - step.log().mean()).exp()
    step = step.unsqueeze(2).expand(-1, -1, x.shape[-1]).contiguous()  # per channel
    return CacheGenProfile(engine.fingerprint, kv.spec.num_layers, x.shape[-1],
                           mean.numpy(), scale.numpy(), step.numpy())


def _quantize_part(kv: KVBlocks, layer: int, part: int, mean: torch.Tensor,
                   step: float) -> KVBlocks:
    """A copy of `kv` with one layer's keys or values quantized at `step`."""
    data = kv.data.clone()
    view = data[layer, part]
    x = view.float().reshape(-1, mean.shape[0])
    y = torch.round((x - mean) / step) * step + mean
    y[:SINK_TOKENS] = x[:SINK_TOKENS]
    view.copy_(y.reshape(view.shape).to(view.dtype))
    return KVBlocks(kv.spec, kv.num_tokens, data)


def _log_probs(engine, kv: KVBlocks, tokens: list[int], context: int) -> torch.Tensor:
    prefix = KVBlocks(kv.spec, context - 1, kv.data[:, :, :kv.spec.num_blocks_for(context - 1)])
    logits = engine.score(tokens, prefix_kv=prefix)[:len(tokens) - context]
    return torch.log_softmax(logits.float(), dim=-1)
