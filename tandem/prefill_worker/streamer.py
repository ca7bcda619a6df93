"""`LayerStreamer`: which pieces of a request's KV to post, and when, on the engine thread.

Layer-wise, each layer's blocks are posted as soon as the engine has written them, while the
next layers compute. A block is posted once, when it is full (or the prompt ends in it), so no
two WRITEs ever touch the same destination bytes. One piece, everything goes after the prefill
as a single transfer: cheaper per byte, but none of it hidden behind compute.

If the engine preempts the prefill midway, the blocks the WRITEs read are pinned (`preempted`)
instead of freed, streaming stops, and the prompt is recomputed into new blocks; the worker
then ends that transfer, unpins them, and sends the whole KV again in a new one (`restarted`).
"""

from __future__ import annotations

import torch

from tandem.engine.engine import LLMEngine
from tandem.transfer.base import SendSession


class LayerStreamer:
    def __init__(self, engine: LLMEngine, request_id: str, num_tokens: int,
                 session: SendSession) -> None:
        self.engine, self.request_id, self.session = engine, request_id, session
        spec = engine.kv_spec
        self.num_tokens, self.block_size = num_tokens, spec.block_size
        self.num_blocks = spec.num_blocks_for(num_tokens)
        self.num_layers = spec.num_layers
        self.sent = [0] * spec.num_layers  # blocks posted, per layer
        self.computed = [0] * spec.num_layers  # tokens computed, per layer
        self.restarted = False  # preempted: the KV must go again, in a new transfer
        self.pinned: list[list[int]] = []  # blocks a preemption left for in-flight WRITEs

    def preempted(self, blocks: list[int]) -> None:
        """The engine's `on_preempt`: these blocks stay allocated (pinned) until the transfer
        that may read them is over."""
        self.restarted = True
        self.pinned.append(blocks)

    def __call__(self, layer: int, first_position: int, keys: torch.Tensor,
                 values: torch.Tensor) -> None:
        """The engine's per-layer KV callback: post what this chunk completed."""
        end = first_position + keys.shape[0]
        if first_position < self.computed[layer]:  # recomputed after a preemption
            self.restarted = True
        self.computed[layer] = end
        if self.restarted:
            return
        full = self.num_blocks if end >= self.num_tokens else end // self.block_size
        if full > self.sent[layer]:
            table = self.engine.block_table(self.request_id)
            self.session.post(range(layer, layer + 1), self.sent[layer],
                              table[self.sent[layer]:full])
            self.sent[layer] = full

    def post_rest(self) -> None:
        """After the prefill: post whatever is still unsent (everything, as one piece, when
        streaming was off). After a preemption the worker sends it all again instead."""
        if self.restarted:
            return
        table = self.engine.block_table(self.request_id)
        if not any(self.sent):
            self.session.post(range(self.num_layers), 0, table[:self.num_blocks])
            self.sent = [self.num_blocks] * self.num_layers
            return
        for layer, sent in enumerate(self.sent):
            if sent < self.num_blocks:
                self.session.post(range(layer, layer + 1), sent, table[sent:self.num_blocks])
                self.sent[layer] = self.num_blocks
