"""Next-token choice, one implementation for CPU and CUDA: greedy, or a counter-based race,
on the logits after any penalties (`penalties.py`) and min_tokens bans.

Each request's draw for its i-th output token is a pure function of (seed, i): a 32-bit key is
hashed from the pair on the host, every vocabulary entry j gets the uniform
u = hash(key, j) in integer arithmetic on the device, and the token is
argmax_j(logits_j / T + Gumbel(u_j)) over the entries that survive top-k and top-p: the Gumbel-max
race, which draws exactly from softmax(logits / T). No generator state exists, so a request's
tokens do not depend on its batch mates, the device, a handoff or a recomputation; and nothing
here reads a device value on the host, so a step has a single device-to-host copy: the packed
result (token ids, a finite flag and the requested logprobs) that `Sampler.collect` unpacks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from tandem.engine.penalties import PenaltyInputs, apply_penalties, prepare_penalties
from tandem.engine.sequence import Sequence

NO_TOP_P = 2.0  # a nucleus no cumulative probability reaches: rows without top-p keep everything
_M1 = 0x7FEB352D  # lowbias32 (Wellons) multipliers, applied to int32 with wrap-around
_M2 = 0x846CA68B - (1 << 32)  # as a signed int32
_COLUMNS = 2  # token id, finite flag; then logprob, N ids, N logprobs when asked


@dataclass(frozen=True)
class TokenLogprobs:
    """The raw log-probabilities (log-softmax of the logits, before temperature) of one step."""

    logprob: float  # of the sampled token
    top: list[tuple[int, float]]  # the N most likely (token id, logprob), most likely first


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]
    errors: list[str | None]  # why a row could not be sampled (it fails alone)


@dataclass
class SamplingInputs:
    """One step's sampling settings, built on the host in O(batch) and moved once."""

    num_rows: int
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool
    max_top_k: int
    num_logprobs: int | None  # the most top alternatives any row asked for; None: no logprobs
    ints: torch.Tensor | None  # [B, 3] int64: key, greedy flag, top_k (vocab = none)
    floats: torch.Tensor | None  # [B, 2] float32: temperature, top_p
    banned: tuple[torch.Tensor, torch.Tensor] | None  # (rows, token ids) that may not be drawn
    wants_logprobs: list[int | None]  # per row
    penalties: PenaltyInputs | None = None  # None: no row's logits change


def draw_key(seed: int, counter: int) -> int:
    """The signed 32-bit key of a request's `counter`-th draw (blake2b of the pair)."""
    digest = hashlib.blake2b(f"{seed}:{counter}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little", signed=True)


def lowbias32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash of int32 `x` (multiplications wrap around; right shifts are
    logical, done as arithmetic shifts masked to the bits a logical shift keeps)."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _M1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _M2
    return x ^ ((x >> 16) & 0xFFFF)


def uniforms(keys: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Uniforms in (0, 1) [B, V] float32 from row keys [B] int32 and the per-entry basis
    lowbias32(arange(V)) [V] int32; 24 bits each, so every value is exact in float32."""
    bits = lowbias32(keys.unsqueeze(1) ^ basis.unsqueeze(0))
    return (((bits >> 8) & 0xFFFFFF).float() + 0.5) * (1.0 / (1 << 24))


class Sampler:
    def __init__(self, vocab_size: int, eos_token_id: int | None, device: torch.device) -> None:
        self.vocab_size, self.eos_token_id, self.device = vocab_size, eos_token_id, device
        self.basis = lowbias32(torch.arange(vocab_size, dtype=torch.int32)).to(device)

    def prepare(self, seqs: Seq[Sequence]) -> SamplingInputs:
        """Host side, O(batch): each row's key, flags and limits; plus O(tokens) of the rows
        that ask for penalties, if any do."""
        vocab = self.vocab_size
        keys, greedy, top_ks, temps, top_ps, wants = [], [], [], [], [], []
        ban_rows: list[int] = []
        ban_tokens: list[int] = []
        for row, seq in enumerate(seqs):
            p = seq.params
            is_greedy = p.is_greedy
            keys.append(0 if is_greedy else draw_key(seq.seed,
                                                     seq.num_output_tokens + p.draw_offset))
            greedy.append(int(is_greedy))
            top_ks.append(p.top_k if 0 < p.top_k < vocab else vocab)
            temps.append(1.0 if is_greedy else float(p.temperature))
            top_ps.append(float(p.top_p) if p.top_p < 1 else NO_TOP_P)
            wants.append(p.logprobs)
            if seq.num_output_tokens < p.min_tokens:
                stops = [*(p.stop_token_ids or ()),
                         *(() if self.eos_token_id is None else (self.eos_token_id,))]
                ban_rows.extend([row] * len(stops))
                ban_tokens.extend(stops)
        asked = [n for n in wants if n is not None]
        all_greedy = all(greedy)
        any_top_k = not all_greedy and any(k < vocab for k, g in zip(top_ks, greedy, strict=True)
                                           if not g)
        any_top_p = not all_greedy and any(p < 1 for p, g in zip(top_ps, greedy, strict=True)
                                           if not g)
        return SamplingInputs(
            num_rows=len(seqs), all_greedy=all_greedy, any_top_k=any_top_k, any_top_p=any_top_p,
            max_top_k=max((k for k in top_ks if k < vocab), default=1),
            num_logprobs=max(asked) if asked else None,
            ints=None if all_greedy else self._upload(
                torch.tensor([keys, greedy, top_ks], dtype=torch.int64).T.contiguous()),
            floats=None if all_greedy else self._upload(
                torch.tensor([temps, top_ps], dtype=torch.float32).T.contiguous()),
            banned=None if not ban_rows else (
                self._upload(torch.tensor(ban_rows, dtype=torch.int64)),
                self._upload(torch.tensor(ban_tokens, dtype=torch.int64).clamp_(0, vocab - 1))),
            wants_logprobs=wants,
            penalties=prepare_penalties(seqs, vocab, self._upload))

    def _upload(self, host: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, inputs: SamplingInputs) -> torch.Tensor:
        """Device side, no host synchronisation: float32 logits [B, V] -> the packed result
        [B, 2 (+ 1 + 2N)] float64 (token id, finite flag, then logprobs when asked)."""
        raw, best = logits, logits.argmax(dim=1)
        # argmax takes a NaN (and +inf) as the largest value, so one gather finds any row that
        # is not finite, instead of a pass over the whole [B, vocab] tensor. It looks at the raw
        # logits: a penalty must not make a healthy row fail (or hide a broken one).
        finite = torch.isfinite(raw.gather(1, best.unsqueeze(1))).squeeze(1)
        if inputs.penalties is not None:
            logits = apply_penalties(logits, inputs.penalties)
        if inputs.banned is not None:
            # A filled device scalar, not new_tensor(): that would be a synchronous upload.
            banned = torch.full((), float("-inf"), device=logits.device)
            logits = logits.index_put(inputs.banned, banned)
        changed = inputs.banned is not None or inputs.penalties is not None
        token_ids = logits.argmax(dim=1) if changed else best
        if not inputs.all_greedy:
            token_ids = torch.where(inputs.ints[:, 1].bool(), token_ids,
                                    self._race(logits, inputs))
        columns = [token_ids.double().unsqueeze(1), finite.double().unsqueeze(1)]
        if inputs.num_logprobs is not None:
            logprobs = raw.log_softmax(dim=1)
            columns.append(logprobs.gather(1, token_ids.unsqueeze(1)).double())
            if inputs.num_logprobs:
                top = logprobs.topk(inputs.num_logprobs, dim=1)
                columns += [top.indices.double(), top.values.double()]
        return torch.cat(columns, dim=1)

    def _race(self, logits: torch.Tensor, inputs: SamplingInputs) -> torch.Tensor:
        scaled = logits / inputs.floats[:, :1]
        if inputs.any_top_k:
            top_k = inputs.ints[:, 2:3]
            kth = scaled.topk(inputs.max_top_k, dim=1).values.gather(
                1, (top_k.clamp(max=inputs.max_top_k) - 1))
            scaled = scaled.masked_fill((top_k < self.vocab_size) & (scaled < kth), float("-inf"))
        if inputs.any_top_p:
            ordered, order = scaled.sort(dim=1, descending=True)
            probs = ordered.softmax(dim=1)
            # Drop a token once the mass before it reaches top_p (the top token always stays).
            drop = (probs.cumsum(dim=1) - probs) >= inputs.floats[:, 1:2]
            scaled = scaled.scatter(1, order, ordered.masked_fill(drop, float("-inf")))
        keys = inputs.ints[:, 0].to(torch.int32)
        gumbel = -torch.log(-torch.log(uniforms(keys, self.basis)))
        return (scaled + gumbel).argmax(dim=1)

    def collect(self, packed: torch.Tensor, inputs: SamplingInputs) -> SampleResult:
        """Host side: unpack the result copied off the device."""
        rows = packed.tolist()
        n = inputs.num_logprobs or 0
        token_ids, logprobs, errors = [], [], []
        for row, want in zip(rows, inputs.wants_logprobs, strict=True):
            token_ids.append(int(row[0]))
            errors.append(None if row[1] else "the model produced non-finite logits")
            if want is None:
                logprobs.append(None)
                continue
            ids, values = row[3:3 + n], row[3 + n:3 + 2 * n]
            top = [(int(i), v) for i, v in zip(ids[:want], values[:want], strict=True)]
            logprobs.append(TokenLogprobs(row[2], top))
        return SampleResult(token_ids, logprobs, errors)
