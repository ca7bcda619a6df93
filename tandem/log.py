"""The one logging setup: records to stderr, level from the CLI or TANDEM_LOG_LEVEL."""

from __future__ import annotations

import logging
import os


def setup_logging(level: str | None = None) -> None:
    level = (level or os.environ.get("TANDEM_LOG_LEVEL") or "WARNING").upper()
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
