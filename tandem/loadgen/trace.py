"""Request traces: rows of (arrival, prompt length, output length), e.g. Azure's 2023 LLM traces.

The two Azure traces ship with the package (`traces/conv.csv.gz`, `traces/code.csv.gz`; see
`traces/README.md` for their source and CC-BY-4.0 licence) and load by name; any other CSV with
the same columns (`TIMESTAMP,ContextTokens,GeneratedTokens`), plain or gzipped, loads by path.
`TIMESTAMP` is either a date-time ("2023-11-16 18:15:46.6805900") or a number of seconds.

Loading only parses: arrivals become offsets in seconds from the trace's first row, nothing is
scaled or clipped (that is `workload.trace_workload`'s job), so a simulator sees the trace as is.
"""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import cast

TRACE_NAMES = ("conv", "code")  # shipped as tandem/loadgen/traces/{name}.csv.gz
COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


@dataclass(frozen=True)
class TraceRow:
    """One request of a trace."""

    arrival_s: float  # seconds after the trace's first request
    prompt_tokens: int
    output_tokens: int


def load_trace(name_or_path: str | Path) -> list[TraceRow]:
    """The rows of a shipped trace ("conv", "code") or of a CSV file, in arrival order."""
    if isinstance(name_or_path, str) and name_or_path in TRACE_NAMES:
        resource = resources.files("tandem.loadgen") / "traces" / f"{name_or_path}.csv.gz"
        with resource.open("rb") as raw:
            return _parse(_text_lines(raw.read(), gzipped=True), name_or_path)
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such trace file (shipped traces: {', '.join(TRACE_NAMES)})")
    data = path.read_bytes()
    return _parse(_text_lines(data, gzipped=data[:2] == b"\x1f\x8b"), str(path))


def _text_lines(data: bytes, *, gzipped: bool) -> io.StringIO:
    text = (gzip.decompress(data) if gzipped else data).decode("utf-8-sig")
    return io.StringIO(text, newline="")


def _parse(lines: Iterable[str], source: str) -> list[TraceRow]:
    reader = csv.DictReader(lines)
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
        raise ValueError(f"{source}: missing column(s) {', '.join(missing)}; a trace needs "
                         f"{','.join(COLUMNS)}")
    parsed: list[tuple[datetime | float, int, int]] = []
    for line, row in enumerate(reader, start=2):
        try:
            parsed.append((parse_timestamp(row["TIMESTAMP"]), int(row["ContextTokens"]),
                           int(row["GeneratedTokens"])))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}:{line}: unreadable row {row}: {e}") from None
    if not parsed:
        raise ValueError(f"{source}: the trace has no rows")
    # a stable sort keeps file order among equal timestamps; the shipped traces are sorted
    try:
        parsed.sort(key=lambda r: r[0])
    except TypeError:  # date-times and numbers (or zoned and naive date-times) do not compare
        raise ValueError(f"{source}: TIMESTAMP mixes kinds of time") from None
    start = parsed[0][0]
    return [TraceRow(_seconds_between(start, ts), prompt, output)
            for ts, prompt, output in parsed]


def parse_timestamp(text: str) -> datetime | float:
    """A TIMESTAMP cell: a number of seconds, or an ISO date-time (microsecond precision)."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        return datetime.fromisoformat(text)


def _seconds_between(start: datetime | float, end: datetime | float) -> float:
    # date-times subtract as timedeltas, exactly and whatever the time zone or daylight saving
    if isinstance(start, datetime) and isinstance(end, datetime):
        return (end - start).total_seconds()
    return cast(float, end) - cast(float, start)  # the sort has rejected a mix of kinds
