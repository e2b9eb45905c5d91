"""Token ids -> text deltas, with OpenAI `stop` sequences.

Two things make streaming text harder than decoding at the end:
- a BPE token can end in the middle of a UTF-8 character; the decoder shows
  the partial bytes as U+FFFD until the next token completes them, so
  trailing replacement characters are held back;
- a stop sequence can span tokens; text that could be the start of a stop
  sequence is held back until it either completes the sequence (the reply
  ends before it) or cannot anymore.
So the concatenated deltas always equal the final text, as OpenAI clients
expect when they join a stream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from platform.data.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"


class TextStream:
    """Accumulates generated token ids; `push` returns the text that became final."""

    def __init__(self, tokenizer: "Tokenizer", stop: Sequence[str] = ()):
        self._tok = tokenizer
        self._stop = [s for s in stop if s]
        self._ids: list[int] = []
        self._text = ""
        self._sent = 0          # characters of _text already returned
        self.stopped = False    # a stop sequence was found: the reply is over

    @property
    def text(self) -> str:
        """The reply so far (everything returned, plus what is held back)."""
        return self._text

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self._ids.append(int(token_id))
        self._text = self._tok.decode(self._ids)
        cut = self._find_stop()
        if cut is not None:
            self.stopped = True
            self._text = self._text[:cut]
            return self._take(cut)
        end = len(self._text.rstrip(REPLACEMENT))
        end -= self._partial_stop(end)
        return self._take(end)

    def finish(self) -> str:
        """Everything still held back, once no more tokens will come."""
        return self._take(len(self._text))

    def _take(self, end: int) -> str:
        if end <= self._sent:
            return ""
        delta, self._sent = self._text[self._sent:end], end
        return delta

    def _find_stop(self):
        if not self._stop:
            return None
        longest = max(len(s) for s in self._stop)
        start = max(0, self._sent - longest)       # a match may begin in held-back text only
        hits = [i for i in (self._text.find(s, start) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _partial_stop(self, end: int) -> int:
        """Length of the longest tail of text[:end] that begins some stop sequence."""
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, end - self._sent), best, -1):
                if self._text[end - k:end] == s[:k]:
                    best = k
                    break
        return best
