"""Incremental detokenization with stop strings: the text a request may send so far, and when it stops.

A byte-level tokenizer can end a step in the middle of a UTF-8 character (decoded as U+FFFD), and a stop
string can straddle steps; the text held back covers both, so the streamed deltas always add up to the
final text.
"""

from __future__ import annotations

import contextlib
import threading

from transformers import PreTrainedTokenizerBase

REPLACEMENT = "\ufffd"


class TextStream:
    """The decoded text of a request's tokens, released in deltas, cut at the first stop string."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, stop: list[str], lock: threading.Lock | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.lock = lock if lock is not None else contextlib.nullcontext()  # tokenizers are not re-entrant
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.sent = ""  # text released so far
        self.stopped = False  # a stop string was found; the text ends before it

    def text(self) -> str:
        with self.lock:
            return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """Add a token; the new text that is safe to send (may be empty). Sets ``stopped`` on a stop string."""
        self.ids.append(token)
        full = self.text()
        cut = self._stop_index(full)
        if cut is not None:
            self.stopped = True
            return self._release(full[:cut])
        safe = full.rstrip(REPLACEMENT)
        if self.hold:
            safe = safe[: max(len(self.sent), len(safe) - self.hold)]
        return self._release(safe)

    def finish(self) -> str:
        """The rest of the text once generation ended (nothing held back any more)."""
        if self.stopped:
            return ""
        return self._release(self.text())

    def final_text(self) -> str:
        return self.sent

    def _stop_index(self, full: str) -> int | None:
        if not self.stop:
            return None
        start = max(0, len(self.sent) - self.hold)
        found = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _release(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        delta = text[len(self.sent) :]
        self.sent = text
        return delta
