"""Large JSON bodies (images, long documents) parsed without copying their large strings.

A 16 MB chat request is almost all one base64 string. Parsed as usual, it is held three or four times over
while in flight: the bytes read, the text decoded from them, the parsed string, and the bytes re-joined to
go upstream. Here each long plain string (at least THRESHOLD bytes with no quote or backslash, which is what
base64 and data: URLs are) is left where it is in the request's bytes. The parser sees a short *mark*
instead. The mark is the string's first few safe characters, then NUL, a random nonce and an index, so
checks such as `url.startswith("data:")` still see the real start, and client text cannot forge it. On the
way out, `encode` puts the original bytes back where the marks are, as pieces to send: no copy of the large
strings is ever made.

A candidate run might not be a string: it might start at an escaped quote, or run between two strings.
Then its mark would not parse as a whole string of its own. Every mark must appear exactly once, as an
entire string value, or the body is parsed the ordinary way.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable

THRESHOLD = 64 * 1024
_RUN = re.compile(rb'"([^"\\]{%d,})"' % THRESHOLD)
_SAFE = re.compile(rb"[A-Za-z0-9+/=:;,._-]{0,48}")


class Bigs:
    """The long strings of one body: where they are in its bytes, and the marks standing for them."""

    __slots__ = ("raw", "spans", "marks", "_json_marks")

    def __init__(self, raw: bytes, spans: list[tuple[int, int]], nonce: str):
        self.raw, self.spans = memoryview(raw), spans
        self.marks: list[str] = []
        self._json_marks: list[bytes] = []
        for i, (a, _) in enumerate(spans):
            prefix = _SAFE.match(raw, a, a + 48).group()
            self.marks.append(prefix.decode() + f"\x00big:{nonce}:{i}")
            self._json_marks.append(prefix + f"\\u0000big:{nonce}:{i}".encode())

    def skeleton(self) -> bytes:
        out, last = [], 0
        for (a, b), mark in zip(self.spans, self._json_marks):
            out += [self.raw[last:a], mark]
            last = b
        out.append(self.raw[last:])
        return b"".join(out)

    def encode(self, small: bytes) -> list:
        """`small` (JSON made from the parsed skeleton) with the original strings put back: pieces to send.
        Wherever each mark now is, in any order (a translation may move fields) and as often as it occurs;
        a mark not found was dropped on the way (a field removed): nothing to put back."""
        found = []
        for k, mark in enumerate(self._json_marks):
            i = small.find(mark)
            while i >= 0:
                found.append((i, k))
                i = small.find(mark, i + len(mark))
        pieces: list = []
        last = 0
        for i, k in sorted(found):
            a, b = self.spans[k]
            pieces += [small[last:i], self.raw[a:b]]
            last = i + len(self._json_marks[k])
        pieces.append(small[last:])
        return pieces

    def expand(self, obj: Any) -> Any:
        """`obj` with every mark replaced by its string (for paths that need the real text)."""
        if isinstance(obj, str):
            if "\x00big:" not in obj:
                return obj
            for (a, b), mark in zip(self.spans, self.marks):
                if mark in obj:
                    obj = obj.replace(mark, bytes(self.raw[a:b]).decode("utf-8"))
            return obj
        if isinstance(obj, list):
            return [self.expand(x) for x in obj]
        if isinstance(obj, dict):
            return {k: self.expand(v) for k, v in obj.items()}
        return obj


def parse(raw: bytes, decode: Callable[[bytes], Any]) -> tuple[Any, Bigs | None]:
    """`decode(raw)`, with long strings left in `raw` when that is certain (see the module's docstring)."""
    if len(raw) < THRESHOLD:
        return decode(raw), None
    spans = [m.span(1) for m in _RUN.finditer(raw) if raw[m.start() - 1:m.start()] != b"\\"]
    if not spans:
        return decode(raw), None
    bigs = Bigs(raw, spans, os.urandom(6).hex())
    try:
        obj = decode(bigs.skeleton())
    except ValueError:
        return decode(raw), None
    found: list[str] = []
    _strings_with_marks(obj, found)
    if sorted(found) != sorted(bigs.marks):
        return decode(raw), None
    return obj, bigs


def _strings_with_marks(obj: Any, out: list[str]) -> None:
    if isinstance(obj, str):
        if "\x00big:" in obj:
            out.append(obj)
    elif isinstance(obj, list):
        for x in obj:
            _strings_with_marks(x, out)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _strings_with_marks(k, out)
            _strings_with_marks(v, out)
