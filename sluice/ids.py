"""Request ids: one counter for the whole process."""

from __future__ import annotations

import itertools
import os

_ids = itertools.count(int.from_bytes(os.urandom(6), "big"))


def new_id() -> str:
    """A request id: 12 hex digits, unique in this process (a counter from a random start; no syscall)."""
    return f"{next(_ids) & 0xFFFFFFFFFFFF:012x}"
