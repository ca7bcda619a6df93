"""Errors raised by the engine. Bad request parameters raise plain `ValueError`."""


class EngineError(Exception):
    """Base class of engine errors."""


class ModelLoadError(EngineError):
    """The model could not be found or read (bad path, missing files, corrupt weights)."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint is readable but uses an architecture or feature the engine lacks."""


class OutOfBlocksError(EngineError):
    """Too few free KV blocks right now; retry later or on another engine."""


class RequestFailedError(EngineError):
    """One request failed while it was computed (e.g. its logits were not finite); the other
    requests of the batch go on."""


class KVHolderLost(EngineError):
    """A holder of offloaded KV (an attention worker) stopped answering or failed: the
    sequences whose KV it holds cannot go on here (they resume elsewhere)."""

    def __init__(self, holder: str, message: str) -> None:
        super().__init__(f"attention worker {holder}: {message}")
        self.holder = holder
