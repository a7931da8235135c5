"""Stop strings over streamed text: deltas in, deltas out, ending just before the first stop string.

A stop string may arrive split across deltas, so a tail that could begin one is held back until
decided; text past a stop string is never emitted.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStrings:
    """push(delta) -> text safe to show; `stopped` once a stop string appeared; flush() -> the rest."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def push(self, delta: str) -> str:
        if self.stopped:
            return ""
        text = self.pending + delta
        # The emitted text held no whole stop string, so the earliest match starts in `text`.
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.pending = True, ""
            return text[: min(hits)]
        hold = max((self._partial(text, s) for s in self.stops), default=0)
        self.pending = text[len(text) - hold :]
        return text[: len(text) - hold]

    def flush(self) -> str:
        rest, self.pending = self.pending, ""
        return "" if self.stopped else rest

    @staticmethod
    def _partial(text: str, stop: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                return n
        return 0
