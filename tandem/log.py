"""The one logging setup: records to stderr, level from the CLI or TANDEM_LOG_LEVEL.

The level applies to Tandem's own loggers (default INFO: what the cluster is doing, as vLLM
reports it); other libraries log at WARNING unless DEBUG is asked for.
"""

from __future__ import annotations

import logging
import os


def setup_logging(level: str | None = None) -> None:
    level = (level or os.environ.get("TANDEM_LOG_LEVEL") or "INFO").upper()
    logging.basicConfig(
        level=level if level == "DEBUG" else "WARNING",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("tandem").setLevel(level)
