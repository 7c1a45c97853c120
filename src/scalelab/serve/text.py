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


class TokenOffsets:
    """Which generated tokens a text covers, and where each starts in it — the rule behind `logprobs` of a
    plain and a streamed response alike. Call `covered` with growing `ids` and `text` (a stream's)."""

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self.decode = decode
        self.offsets: list[int] = []  # character offset of each covered token
        self._end = 0  # characters of text the covered tokens decode to

    def covered(self, ids: Sequence[int], text: str, final: bool) -> int:
        """How many of `ids` belong to `text` (a prefix of their text, or their text cut at a stop string):
        the longest run whose decoding is a prefix of `text` (the bytes of a multi-byte character join
        together, at the character's offset); once `final`, also the token a stop string cuts into."""
        n = len(self.offsets)
        for k in range(n + 1, len(ids) + 1):
            piece = self.decode(ids[:k])
            if text.startswith(piece):
                self.offsets += [self._end] * (k - len(self.offsets))
                self._end = len(piece)
        if final and len(self.offsets) < len(ids) and len(text) > self._end:
            self.offsets.append(self._end)
            self._end = len(text)
        return len(self.offsets)
