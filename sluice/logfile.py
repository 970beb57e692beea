"""Log handlers that write a batch of records with one write, for the recorder thread.

The stdlib handlers write, flush and (RotatingFileHandler) stat and seek the file for every record: four
or five syscalls per line, each one handing the GIL to another thread and waiting to get it back. At a
thousand requests a second that is what request latency pays. Here a record is formatted into a buffer;
outside a `batch()` it is written at once, inside one it waits for the end of the block, and every
handler then writes its buffer in one call. Rotation counts the bytes it wrote instead of asking the file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref
from pathlib import Path
from typing import IO, Iterator

_batching = threading.local()
_handlers: "weakref.WeakSet[BatchHandler]" = weakref.WeakSet()


@contextlib.contextmanager
def batch() -> Iterator[None]:
    """Records this thread logs inside the block are written when it ends, one write per handler."""
    _batching.on = True
    try:
        yield
    finally:
        _batching.on = False
        for h in list(_handlers):
            h.flush()


class RotatingFile:
    """An append-only text file that rolls over to .1, .2 ... .backups once it passes max_bytes."""

    def __init__(self, path: Path, max_bytes: int, backups: int):
        self.path, self.max_bytes, self.backups = Path(path), max_bytes, backups
        self._f = open(self.path, "a", encoding="utf-8")
        self._size = self._f.tell()

    def write(self, text: str) -> None:
        data = text.encode("utf-8")
        if self._size and self._size + len(data) > self.max_bytes:
            self._rotate()
        self._f.buffer.write(data)
        self._f.buffer.flush()
        self._size += len(data)

    def _rotate(self) -> None:
        self._f.close()
        for i in range(self.backups - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{i}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
        if self.backups > 0:
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink(missing_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")
        self._size = 0

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self._f.close()


class BatchHandler(logging.Handler):
    """A handler writing to a stream (sys.stderr) or a RotatingFile, batched inside `batch()`."""

    def __init__(self, sink: IO[str] | RotatingFile, level: int = logging.NOTSET):
        super().__init__(level)
        self.sink = sink
        self._buffer: list[str] = []
        _handlers.add(self)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.write_line(line)

    def write_line(self, line: str) -> None:
        """A line that is not a log record (requests.jsonl): no LogRecord, no formatter."""
        with self.lock:
            self._buffer.append(line)
        if not getattr(_batching, "on", False):
            self.flush()

    def flush(self) -> None:
        with self.lock:
            if not self._buffer:
                return
            text = "\n".join(self._buffer) + "\n"
            self._buffer.clear()
            try:
                self.sink.write(text)
                self.sink.flush()
            except (OSError, ValueError):
                pass            # a full disk or a closed stderr must not take a request thread down

    def close(self) -> None:
        self.flush()
        if isinstance(self.sink, RotatingFile):
            self.sink.close()
        super().close()


class OnceFormatter(logging.Formatter):
    """A formatter shared by several handlers (stderr and sluice.log) that formats each record once."""

    _last: tuple = (lambda: None, "")     # a weak reference: a record (and its traceback) is not kept alive

    def format(self, record: logging.LogRecord) -> str:
        ref, text = self._last             # one read: another thread may replace it meanwhile
        if ref() is record:
            return text
        text = super().format(record)
        self._last = (weakref.ref(record), text)
        return text


def file_handler(path: Path, max_bytes: int, backups: int) -> BatchHandler:
    """A rotating log file handler; raises OSError when the file cannot be opened."""
    return BatchHandler(RotatingFile(path, max_bytes, backups))
