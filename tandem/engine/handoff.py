"""`PhaseHandoff`: how a request's KV enters and leaves an engine, for disaggregation.

- prefill side: a prefill-only request ends PREFILLED, holding its blocks, until the KV has
  left (`export_kv`, or a transport reading `block_table` in place) and it is `release`d;
- decode side: `reserve` holds blocks for a prompt whose KV arrives from elsewhere, `adopt`
  takes the KV (or finds it already written there) and the first tokens, and joins the batch;
- live migration: while a request decodes, the KV of its full blocks (`request_kv`) can be
  copied to another engine's reservation; `suspend` then takes it out of the batch with its
  blocks and KV intact, the other engine `extend_reserved`s to the final tokens, receives the
  rest of the KV and `adopt`s it; the source `release`s it.

A mixin of `LLMEngine`, which owns the state it uses.
"""

from __future__ import annotations

from dataclasses import dataclass

from tandem.engine.errors import EngineError, OutOfBlocksError
from tandem.engine.kv_cache import KVBlocks
from tandem.engine.offload import OffloadedSequence
from tandem.engine.outputs import RequestOutput
from tandem.engine.sampling_params import SamplingParams
from tandem.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class RequestKV:
    """Where a request's KV is: its tokens, how many of them the KV in its blocks covers, and
    the blocks."""

    token_ids: list[int]
    num_kv_tokens: int
    block_ids: list[int]
    block_table_epoch: int  # changes when the blocks were freed meanwhile (a preemption)
    exact_tokens: int | None = None  # leading tokens whose KV is exact (None: all)


class PhaseHandoff:
    def import_request(
        self, request_id: str, prompt_token_ids: list[int], output_token_ids: list[int],
        params: SamplingParams, kv: KVBlocks, exact_tokens: int | None = None,
    ) -> None:
        """Continue decoding a request prefilled elsewhere: `kv` covers its prompt, exactly
        for its first `exact_tokens` (None: all of it)."""
        self.reserve(request_id, prompt_token_ids, params)
        try:
            self.adopt(request_id, kv, output_token_ids, exact_tokens)
        except (ValueError, EngineError):
            self.release(request_id)
            raise

    def reserve(self, request_id: str, prompt_token_ids: list[int],
                params: SamplingParams, whole: bool = False) -> list[int]:
        """Hold KV blocks for a prompt whose KV will arrive from elsewhere; returns block ids.
        `whole`: only if the free blocks also cover its growth to max_tokens, after what the
        requests here may still grow to (else OutOfBlocksError: it goes elsewhere)."""
        seq = self._new_sequence(request_id, list(prompt_token_ids), params)
        if whole:
            self._check_room_to_finish(seq)
        if not self.blocks.grow(seq, seq.num_tokens):
            raise OutOfBlocksError(
                f"request {request_id}: {self.kv_spec.num_blocks_for(seq.num_tokens)} KV blocks "
                f"needed, {self.blocks.num_free_blocks} free")
        seq.status = SequenceStatus.RESERVED
        self.seqs[request_id] = seq
        return list(seq.block_table)

    def _check_room_to_finish(self, seq: Sequence) -> None:
        def growth(s: Sequence) -> int:
            longest = min(s.num_prompt_tokens + s.params.max_tokens, self.max_model_len)
            return self.kv_spec.num_blocks_for(longest) - len(s.block_table)

        promised = sum(growth(s) for s in self.seqs.values()
                       if s.offload is None and s.status != SequenceStatus.FINISHED)
        if growth(seq) + promised > self.blocks.num_free_blocks:
            raise OutOfBlocksError(
                f"request {seq.request_id}: {growth(seq)} KV blocks needed to finish, "
                f"{self.blocks.num_free_blocks - promised} free after what running requests "
                "may still take")

    def adopt(self, request_id: str, kv: KVBlocks | None, output_token_ids: list[int],
              exact_tokens: int | None = None) -> RequestOutput:
        """Write a reserved request's prompt KV into its blocks (`kv=None`: a transport already
        wrote it there) and join the running batch; returns its state (finished already if the
        handed-over tokens end it). Only the KV of the first `exact_tokens` (None: all) is
        exact: the blocks past them (blended, or decoded from a lossy code) never enter the
        prefix cache, so a preemption recomputes them instead of finding them there."""
        seq = self._get(request_id)
        if seq.status != SequenceStatus.RESERVED:
            raise EngineError(f"request {request_id} is {seq.status.name}, not reserved")
        if not output_token_ids or len(output_token_ids) > seq.params.max_tokens:
            raise ValueError(f"output_token_ids: need 1 to {seq.params.max_tokens} tokens, "
                             f"got {len(output_token_ids)}")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in output_token_ids):
            raise ValueError(f"output_token_ids: a token is outside the vocabulary [0, {vocab})")
        if exact_tokens is not None and not 0 <= exact_tokens <= seq.num_tokens:
            raise ValueError(f"exact_tokens: {exact_tokens} is not in [0, {seq.num_tokens}]")
        if kv is not None:
            if kv.spec != self.kv_spec:
                raise ValueError(f"KV spec mismatch: got {kv.spec}, this engine uses "
                                 f"{self.kv_spec}")
            if kv.num_tokens != seq.num_tokens:
                raise ValueError(f"kv covers {kv.num_tokens} tokens, the prompt has "
                                 f"{seq.num_tokens}")
            self.cache.load(seq.block_table, kv)
        seq.num_computed_tokens = seq.num_tokens
        if exact_tokens is not None and exact_tokens < seq.num_tokens:
            seq.cacheable_tokens = exact_tokens
        self.blocks.register_full_blocks(seq)
        return self._start_decoding(seq, output_token_ids)

    def _start_decoding(self, seq: Sequence, output_token_ids: list[int]) -> RequestOutput:
        """Its prompt's KV is in place: join the batch with the tokens handed over (or finish,
        if they end it)."""
        seq.token_ids.extend(output_token_ids)
        seq.status = SequenceStatus.WAITING
        self.outputs.check_stop(seq, len(output_token_ids))
        if seq.finish_reason is not None:
            self._retire(seq)
        else:
            self.scheduler.add(seq)
        return self.outputs.output(seq)

    def export_kv(self, request_id: str) -> KVBlocks:
        """The prompt KV of a prefilled prefill-only request (a copy; blocks stay held)."""
        seq = self._get(request_id)
        if seq.status != SequenceStatus.PREFILLED:
            raise EngineError(f"request {request_id} is {seq.status.name}, not prefilled")
        return self.cache.export(seq.block_table, seq.num_computed_tokens)

    def block_table(self, request_id: str) -> list[int]:
        """The KV blocks a request holds, in order (a copy)."""
        return list(self._get(request_id).block_table)

    def release(self, request_id: str) -> None:
        """Free a prefilled request's blocks once its KV has been handed off (an offloaded
        one's KV on its attention workers)."""
        seq = self._get(request_id)
        self.scheduler.remove(seq)
        self.blocks.free_blocks(seq)
        if seq.offload is not None:
            seq.offload.release()
        del self.seqs[request_id]

    def adopt_offloaded(self, request_id: str, prompt_token_ids: list[int],
                        output_token_ids: list[int], params: SamplingParams,
                        offload: OffloadedSequence) -> RequestOutput:
        """Decode a request whose prompt KV sits on attention workers (`offload.holders`),
        holding no block here; it joins the batch like an adopted one."""
        seq = self._new_sequence(request_id, list(prompt_token_ids), params, offloaded=True)
        if len(output_token_ids) != 1:  # the KV held covers the prompt: one token to compute
            raise ValueError(f"output_token_ids: an offloaded request starts from its first "
                             f"token alone, got {len(output_token_ids)}")
        seq.offload = offload
        seq.num_computed_tokens = seq.num_tokens
        self.seqs[request_id] = seq
        return self._start_decoding(seq, output_token_ids)

    def unpin_blocks(self, blocks: list[int]) -> None:
        """Give back blocks a preemption pinned for a transfer that read them (`on_preempt`)."""
        self.blocks.unpin(blocks)

    def extend_reserved(self, request_id: str, token_ids: list[int],
                        params: SamplingParams) -> list[int]:
        """Grow a reserved request's prompt by `token_ids` (a migrating request: its KV
        arrives in two stages) and replace its params; returns its block ids. Raises
        OutOfBlocksError when too few blocks are free (the reservation stays as it was)."""
        seq = self._get(request_id)
        if seq.status != SequenceStatus.RESERVED:
            raise EngineError(f"request {request_id} is {seq.status.name}, not reserved")
        n = seq.num_tokens + len(token_ids)
        if n >= self.max_model_len:
            raise ValueError(f"prompt: {n} tokens leave no room to generate within "
                             f"max_model_len={self.max_model_len}")
        if not self.blocks.grow(seq, n):
            raise OutOfBlocksError(
                f"request {request_id}: {self.kv_spec.num_blocks_for(n)} KV blocks needed, "
                f"{len(seq.block_table) + self.blocks.num_free_blocks} available")
        seq.token_ids.extend(token_ids)
        seq.num_prompt_tokens, seq.params = n, params
        return list(seq.block_table)

    def request_kv(self, request_id: str) -> RequestKV:
        """A snapshot of where a request's KV is (it may change at the next step; full blocks
        keep their KV until `block_table_epoch` changes)."""
        seq = self._get(request_id)
        return RequestKV(list(seq.token_ids), seq.num_computed_tokens, list(seq.block_table),
                         seq.block_table_epoch, seq.cacheable_tokens)

    def suspend(self, request_id: str) -> RequestKV:
        """Take a decoding request out of the batch, keeping its blocks (as if prefilled)
        until `release`. Only a request whose KV covers all but its last token can move so:
        one still prefilling, or preempted and waiting to recompute, raises EngineError."""
        seq = self._get(request_id)
        if seq.offload is not None:
            raise EngineError(f"request {request_id} decodes with offloaded attention: its KV "
                              "is on attention workers, not here to move")
        if seq.status not in (SequenceStatus.RUNNING, SequenceStatus.WAITING) \
                or seq.num_output_tokens == 0 or seq.num_uncomputed_tokens != 1:
            raise EngineError(f"request {request_id} is {seq.status.name} with "
                              f"{seq.num_uncomputed_tokens} tokens to compute: not a decoding "
                              "request that can move")
        self.scheduler.remove(seq)
        seq.status = SequenceStatus.PREFILLED
        return self.request_kv(request_id)
