"""The value parsers of the settings (config.py): each takes a value as the TOML file or the environment gives
it and returns it checked and normalised, or raises ValueError saying what it must be; config.py adds where
the value came from (`backends.fast.slots: must be >= 1, got 0`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable


def integer(lo: int | None = None, hi: int | None = None) -> Callable[[Any], int]:
    """A parser of integers within lo..hi (either may be None: no bound); digits in a string count."""
    def parse(v: Any) -> int:
        if isinstance(v, bool):
            raise ValueError("must be an integer")
        if isinstance(v, str):
            v = v.strip()
            if not v.lstrip("-").isdigit():
                raise ValueError("must be an integer")
            v = int(v)
        if not isinstance(v, int):
            raise ValueError("must be an integer")
        if lo is not None and v < lo:
            raise ValueError(f"must be >= {lo}")
        if hi is not None and v > hi:
            raise ValueError(f"must be <= {hi}")
        return v
    return parse


def number(lo: float = 0.0, *, positive: bool = False) -> Callable[[Any], float]:
    """A parser of finite numbers >= lo (> lo when `positive`)."""
    def parse(v: Any) -> float:
        if isinstance(v, bool):
            raise ValueError("must be a number")
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError("must be a number") from None
        if not math.isfinite(f) or f < lo or (positive and f <= lo):
            raise ValueError(f"must be {'>' if positive else '>='} {lo:g}")
        return f
    return parse


def boolean(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false (1/0)")


def text(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ValueError("must be a non-empty string")
    return v.strip()


def one_of(options: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(v: Any) -> str:
        if v not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return v
    return parse


def http_url(v: Any) -> str:
    s = text(v).rstrip("/")
    if not (s.startswith("http://") or s.startswith("https://")) or "://" == s[-3:]:
        raise ValueError("must be an http:// or https:// URL")
    return s


def file_path(v: Any) -> Path:
    return Path(text(v)).expanduser()


def str_list(v: Any) -> tuple[str, ...]:
    """A comma-separated string or a list of strings, blanks left out."""
    items = v.split(",") if isinstance(v, str) else v
    if not isinstance(items, (list, tuple)):
        raise ValueError("must be a comma-separated string or a list of strings")
    return tuple(k.strip() for k in items if isinstance(k, str) and k.strip())


def list_of(v: Any, each: Callable[[str], str]) -> tuple[str, ...]:
    return tuple(each(x) for x in str_list(v))


def host_name(v: str) -> str:
    if v != "*" and not all(c.isalnum() or c in ".-_:[]" for c in v):
        raise ValueError(f"{v!r} is not a host name (give names like my-box.lan, or * for any)")
    return v.lower()


def origin(v: str) -> str:
    scheme, sep, rest = v.rstrip("/").partition("://")
    if v != "*" and (not sep or scheme not in ("http", "https") or not rest or "/" in rest):
        raise ValueError(f"{v!r} is not an origin (give scheme://host[:port], e.g. http://localhost:3000, or *)")
    return v.rstrip("/")


def name_list(v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise ValueError("must be a list of names")
    return tuple(v)


def argv(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v):
        raise ValueError("must be a non-empty list of strings (argv; no shell)")
    return tuple(v)


def command(v: Any) -> str | tuple[str, ...]:
    """A shell command line (a string) or an argv list."""
    return text(v) if isinstance(v, str) else argv(v)


def env_table(v: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        raise ValueError("must be a table of strings")
    return tuple(sorted(v.items()))
