"""Tandem: disaggregated LLM inference.

`from tandem import LLM, SamplingParams` loads the engine lazily, so the client SDK
(`tandem.client`) stays importable without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "RequestOutput", "SamplingParams"]

_LAZY = {
    "LLM": "tandem.engine.llm",
    "SamplingParams": "tandem.engine.sampling_params",
    "RequestOutput": "tandem.engine.outputs",
}

if TYPE_CHECKING:
    from tandem.engine.llm import LLM
    from tandem.engine.outputs import RequestOutput
    from tandem.engine.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tandem' has no attribute {name!r}")
