"""`MemoryTier`: objects in host memory (pinned when CUDA is present) or in device memory."""

from __future__ import annotations

import threading

import torch

from tandem.kv_store.tiers.base import Buffer, LocalTier


class MemoryTier(LocalTier):
    """The CPU tier (`device="cpu"`) or the GPU tier (`device="cuda"`)."""

    def __init__(self, name: str, capacity_bytes: int, device: str = "cpu") -> None:
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"the {name} tier needs CUDA, which this process does not have")
        super().__init__(name, capacity_bytes)
        self.device = torch.device(device)
        self.pin = self.device.type == "cpu" and torch.cuda.is_available()
        self.holds_tensors = self.device.type == "cuda"
        self._objects: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def get_tensor(self, key: str) -> torch.Tensor | None:
        # Objects are never written after `put`, so the stored tensor is safe to hand out.
        with self._lock:
            tensor = self._objects.get(key)
        if tensor is not None:
            self._index.touch(key)
        return tensor

    def get(self, key: str) -> Buffer | None:
        tensor = self.get_tensor(key)
        if tensor is None:
            return None
        host = tensor if tensor.device.type == "cpu" else tensor.cpu()
        return memoryview(host.numpy())

    def get_range(self, key: str, offset: int, length: int) -> Buffer | None:
        tensor = self.get_tensor(key)  # only the range crosses to the host
        if tensor is None:
            return None
        part = tensor[offset:offset + length]
        return memoryview((part if part.device.type == "cpu" else part.cpu()).numpy())

    def put(self, key: str, data: Buffer) -> None:
        source = torch.frombuffer(bytearray(data), dtype=torch.uint8) if len(data) else \
            torch.empty(0, dtype=torch.uint8)
        if self.device.type == "cuda":
            tensor = source.to(self.device)
        elif self.pin:
            tensor = torch.empty(len(source), dtype=torch.uint8, pin_memory=True)
            tensor.copy_(source)
        else:
            tensor = source
        with self._lock:
            self._objects[key] = tensor
        self._index.add(key, len(data))

    def remove(self, key: str) -> bool:
        with self._lock:
            self._objects.pop(key, None)
        return self._index.discard(key)
