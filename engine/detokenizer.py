"""Incremental detokenisation with stop-sequence matching.

Invariant: the concatenation of everything `push` and `flush` return equals
`tokenizer.decode(all_ids, skip_special_tokens=True)`, cut just before the first stop sequence
(just after it with `include_stop`; `matched` names it).
Text is only released once it cannot change: never half a UTF-8 character (a trailing U+FFFD
means more bytes are coming), and never the beginning of what may yet become a stop sequence.

Decoding re-reads only a short window of ids: `decode(ids[prefix:])` minus `decode(ids[prefix:read])`,
which keeps word-initial spaces right for SentencePiece tokenizers as well as byte-level BPE.
"""
from __future__ import annotations


def fast_decoder(tokenizer):
    """`ids -> text` equal to `tokenizer.decode(ids, skip_special_tokens=True)`, calling the Rust
    `tokenizers` backend directly when that is what the wrapper would do (no clean-up pass):
    the Python wrapper costs ~8 us per call, twice per token per row, on the engine thread."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = (), decode=None, include_stop: bool = False) -> None:
        self._decode = decode or fast_decoder(tokenizer)
        self._stop = tuple(s for s in stop if s)
        self._include_stop = include_stop   # release the matched stop sequence too
        self._max_stop = max((len(s) for s in self._stop), default=0)
        self._ids: list[int] = []
        self._prefix = 0          # start of the decode window
        self._read = 0            # ids before this are already turned into text
        self._pending = ""        # decoded, not yet released (possible stop-sequence start)
        self.stopped = False      # a stop sequence was matched; nothing more will be released
        self.matched = ""         # the stop sequence that matched (the first in the text; the
                                  # first listed among those starting at the same place)

    def push(self, token_ids: list[int]) -> str:
        """Add new ids; return the text that became final."""
        if self.stopped:
            return ""
        self._ids.extend(token_ids)
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        full_text = self._decode(self._ids[self._prefix:])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            self._pending += full_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self._ids)
        return self._release(final=False)

    def flush(self) -> str:
        """The request ended: release whatever is held (an incomplete character decodes as U+FFFD)."""
        if self.stopped:
            return ""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        full_text = self._decode(self._ids[self._prefix:])
        self._pending += full_text[len(prefix_text):]
        self._prefix = self._read = len(self._ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if not self._stop:
            out, self._pending = self._pending, ""
            return out
        found = [(i, k) for k, i in enumerate(self._pending.find(s) for s in self._stop) if i >= 0]
        if found:
            cut, k = min(found)
            self.matched = self._stop[k]
            end = cut + len(self.matched) if self._include_stop else cut
            out, self._pending = self._pending[:end], ""
            self.stopped = True
            return out
        hold = 0 if final else self._held_suffix()
        out = self._pending[:len(self._pending) - hold]
        self._pending = self._pending[len(self._pending) - hold:]
        return out

    def _held_suffix(self) -> int:
        """Length of the longest tail of pending text that begins some stop sequence."""
        text = self._pending
        for k in range(min(self._max_stop - 1, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0
