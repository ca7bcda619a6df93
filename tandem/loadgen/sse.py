"""An incremental decoder of Server-Sent Events (the wire format of OpenAI streaming).

The network hands over bytes in arbitrary pieces: a line, even a UTF-8 character, may be split
between two reads, and one read may hold several events. The decoder keeps the unfinished line
and returns the `data` of every event completed so far. Per the SSE format, an event ends at a
blank line, its `data:` lines are joined with "\\n", one space after the colon is dropped, and
lines starting with ":" are comments (keep-alives). Lines end in "\\n" or "\\r\\n"; a bare "\\r"
as a line end (allowed by the spec, sent by no OpenAI-compatible server we know) is not handled.
"""

from __future__ import annotations


class SSEDecoder:
    """Feed it byte chunks; it returns the data payloads of the events they complete."""

    def __init__(self) -> None:
        self._pending = b""  # an unfinished line
        self._data: list[str] = []  # data lines of the event being read

    def feed(self, chunk: bytes) -> list[str]:
        events: list[str] = []
        lines = (self._pending + chunk).split(b"\n")
        self._pending = lines.pop()  # b"" when the chunk ended a line
        for raw in lines:
            event = self._line(raw.removesuffix(b"\r").decode("utf-8"))
            if event is not None:
                events.append(event)
        return events

    def close(self) -> list[str]:
        """At the end of the stream: an event the server did not end with a blank line."""
        events = self.feed(b"\n") if self._pending else []
        if self._data:
            events.append("\n".join(self._data))
            self._data = []
        return events

    def _line(self, line: str) -> str | None:
        if not line:
            if not self._data:
                return None
            event, self._data = "\n".join(self._data), []
            return event
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        if field == "data":
            self._data.append(value.removeprefix(" "))
        return None  # event, id and retry fields carry nothing a benchmark needs
