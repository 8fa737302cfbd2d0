"""Incremental detokenization with stop strings.

Text that could still be the start of a stop string is held back, so a stop
string split across tokens never leaks into the output, even in a stream.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, detokenizer, stops: list[str]):
        self._detok = detokenizer
        self._stops = stops
        self._pending = ""  # decoded but not yet released
        self.text = ""  # released so far
        self.stopped = False

    def add(self, token: int) -> str:
        """Feed one token; returns newly releasable text. Sets `stopped` on a stop string."""
        self._detok.add_token(token)
        return self._release(self._detok.last_segment)

    def finish(self) -> str:
        """End of generation: release what is left (nothing after a stop string)."""
        if self.stopped:
            return ""
        self._detok.finalize()
        out = self._release(self._detok.last_segment, final=True)
        return out

    def _release(self, segment: str, final: bool = False) -> str:
        if self.stopped:
            return ""
        self._pending += segment
        if self._stops:
            hit = min((i for i in (self._pending.find(s) for s in self._stops) if i >= 0),
                      default=-1)
            if hit >= 0:
                self.stopped = True
                out, self._pending = self._pending[:hit], ""
                self.text += out
                return out
        keep = 0 if final else self._held_back()
        cut = len(self._pending) - keep
        out, self._pending = self._pending[:cut], self._pending[cut:]
        self.text += out
        return out

    def _held_back(self) -> int:
        """Length of the longest suffix of pending text that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(stop[:n]):
                    best = n
                    break
        return best
