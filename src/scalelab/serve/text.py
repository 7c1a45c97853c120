"""Stop strings and incremental text: where a generation's text ends, and how much of it a stream may send
before the rest is known.

A stream never sends text it might have to take back: it holds back a trailing partial UTF-8 character
(decoded as U+FFFD until its last byte arrives) and any suffix that could be the start of a stop string.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


class StopText:
    """The text of generated token ids, cut before the first occurrence of any of `stops`."""

    def __init__(self, decode: Callable[[Sequence[int]], str], stops: Sequence[str] = ()) -> None:
        self.decode = decode
        self.stops = tuple(s for s in stops if s)

    def hit(self, ids: Sequence[int]) -> bool:
        """True when the text of `ids` contains a stop string (the generation should end)."""
        if not self.stops:
            return False
        text = self.decode(ids)
        return any(s in text for s in self.stops)

    def text(self, ids: Sequence[int]) -> tuple[str, bool]:
        """(text cut before the first stop string, whether one was found)."""
        text = self.decode(ids)
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return (text[: min(cuts)], True) if cuts else (text, False)

    def emittable(self, ids: Sequence[int], done: bool) -> str:
        """The part of the text that is final: all of it once `done` or stopped, else all but a held-back tail."""
        text, stopped = self.text(ids)
        if stopped or done:
            return text
        end = len(text)
        while end and text[end - 1] == REPLACEMENT and len(text) - end < 3:
            end -= 1
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, end), 0, -1):
                if text[:end].endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return text[: end - hold]
