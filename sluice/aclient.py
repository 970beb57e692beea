"""The degrade-safe client for asyncio: `AsyncSluiceClient`, the same contract as `sluice.client`.

    from sluice.aclient import AsyncSluiceClient
    client = AsyncSluiceClient()
    text = await client.query("fast", "What is 2+2?")               # "" if anything goes wrong
    async with client.chat_stream("fast", [{"role": "user", "content": "Hi"}]) as stream:
        async for piece in stream:
            print(piece, end="")
    if stream.error: ...                                             # None after a complete answer

`query`, `chat`, `health` and `queue_status` are coroutines; `chat_stream` returns an async iterator. None
raises an `Exception`, and each returns what the sync client returns in the same situation (the
degradation table in `sluice.client`): both run the same `Call`s, so the request, the reading of the
answer and the safe defaults are written once, there. This module only moves the bytes, over asyncio
streams (stdlib only), one short-lived connection per call, every read held to the call's one deadline.
Cancelling a call (`asyncio.CancelledError`) propagates, as it must.
"""

from __future__ import annotations

import asyncio
import functools
import http.client
import inspect
import io
from typing import Callable

from sluice.client import (MAX_RESPONSE_BYTES, READ_CHUNK, Call, ClientCore, ChatEvents, Target, decode,
                           method)

_HEAD_LIMIT = 64 * 1024     # the status line and headers of an answer; sluice's are a few hundred bytes


def _amethod(builder: Callable) -> Callable:
    """`client.method` for coroutines: the builder's signature and docstring, the result awaited."""
    @functools.wraps(builder)
    async def run(self, *args, **kwargs):
        return await self.run(builder(self, *args, **kwargs))
    run.__name__ = run.__qualname__ = builder.__name__.removesuffix("_call")
    # The builder's parameters, not its `-> Call`: the method returns what the call's docstring says.
    run.__signature__ = inspect.signature(builder).replace(return_annotation=inspect.Signature.empty)
    return run


class _Exchange:
    """One request on its own connection, and the answer's framing (Content-Length, chunked, or to EOF)."""

    def __init__(self, target: Target, call: Call):
        self._target, self._call = target, call
        self._timeout = call.timeout
        self._deadline = asyncio.get_running_loop().time() + call.timeout
        self._writer = None
        self._left: int | None = None        # body bytes still to come (None: until EOF)
        self._chunked = False
        self._ended = False
        self.status = 0

    async def _step(self, aw):
        try:
            async with asyncio.timeout_at(self._deadline):
                return await aw
        except TimeoutError:
            raise TimeoutError(f"no complete answer within {self._timeout:g}s") from None

    async def __aenter__(self) -> "_Exchange":
        try:
            await self._open()
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def _open(self) -> None:
        t = self._target
        ssl = None
        if t.scheme == "https":
            import ssl as ssl_mod
            ssl = ssl_mod.create_default_context()
        port = t.port or (443 if ssl else 80)
        self._reader, self._writer = await self._step(asyncio.open_connection(
            t.host, port, ssl=ssl, limit=_HEAD_LIMIT))
        host = f"[{t.host}]" if ":" in t.host else t.host
        lines = [f"{self._call.method} {t.path} HTTP/1.1", f"Host: {host}" + (f":{t.port}" if t.port else ""),
                 *(f"{k}: {v}" for k, v in t.headers.items())]
        if t.data is not None:
            lines.append(f"Content-Length: {len(t.data)}")
        self._writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (t.data or b""))
        await self._step(self._writer.drain())
        await self._read_head()

    async def _read_head(self) -> None:
        while True:
            try:
                head = await self._step(self._reader.readuntil(b"\r\n\r\n"))
            except asyncio.IncompleteReadError as e:
                if not e.partial:       # what http.client says for a server that closed without a word
                    raise http.client.RemoteDisconnected("Remote end closed connection without response")
                raise
            line, _, rest = head.partition(b"\r\n")
            parts = line.split(None, 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not (
                    len(parts[1]) == 3 and parts[1].isdigit()):
                raise http.client.BadStatusLine(line[:100].decode("latin-1"))
            self.status = int(parts[1])
            if not 100 <= self.status < 200:    # an interim answer (100 Continue) is followed by the real one
                break
        headers = http.client.parse_headers(io.BytesIO(rest))
        if "chunked" in (headers.get("Transfer-Encoding") or "").lower():
            self._chunked, self._left = True, 0
        elif headers.get("Content-Length") is not None:
            length = headers["Content-Length"].strip()
            if not length.isdigit() or not length.isascii():
                raise http.client.HTTPException(f"bad Content-Length {length[:40]!r}")
            self._left = int(length)

    async def _chunk_size(self) -> int:
        line = await self._step(self._reader.readuntil(b"\n"))
        size = line.split(b";", 1)[0].strip()
        try:
            return int(size, 16)
        except ValueError:
            raise http.client.HTTPException(f"bad chunk size {size[:40]!r}") from None

    async def read1(self) -> bytes:
        """What the next read brings; b"" at the end. Raises IncompleteRead if the body was cut short."""
        if self._ended:
            return b""
        if self._chunked and self._left == 0:
            self._left = await self._chunk_size()
            if self._left == 0:
                while (await self._step(self._reader.readuntil(b"\n"))).strip():
                    pass                # trailers: read past, not kept
                self._ended = True
                return b""
        want = READ_CHUNK if self._left is None else min(READ_CHUNK, self._left)
        data = await self._step(self._reader.read(want)) if want else b""
        if self._left is None:
            self._ended = not data
            return data
        if not data and self._left:
            raise http.client.IncompleteRead(b"", self._left)
        self._left -= len(data)
        if self._chunked and self._left == 0:
            await self._step(self._reader.readexactly(2))     # the CRLF after each chunk's data
        elif self._left == 0:
            self._ended = True
        return data

    async def body(self) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while chunk := await self.read1():
            size += len(chunk)
            if size > MAX_RESPONSE_BYTES:
                raise ValueError(f"answer larger than {MAX_RESPONSE_BYTES} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def __aexit__(self, *exc) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except Exception:
                pass                    # a reset connection reports it here too; the answer is settled


class AsyncStream:
    """What `chat_stream` returns: an async iterator of text pieces that never raises; `error` once it
    ends (None after a complete answer). `aclose()` (or `async with`) lets go of the connection early."""

    def __init__(self, pieces):
        self._pieces = pieces
        self.error: str | None = None

    def __aiter__(self):
        return self

    async def __anext__(self) -> str:
        return await self._pieces.__anext__()

    async def aclose(self) -> None:
        await self._pieces.aclose()

    async def __aenter__(self) -> "AsyncStream":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


class AsyncSluiceClient(ClientCore):
    """The asyncio client; see the module docstring. One client may serve many tasks at once."""

    async def run(self, call: Call):
        """`call`'s return value: its answer to a 200's JSON, or its safe default on any failure."""
        try:
            async with _Exchange(self.target(call), call) as ex:
                return call.answer(decode(ex.status, await ex.body()))
        except Exception as e:
            return call.failed(e)

    def run_stream(self, call: Call) -> AsyncStream:
        async def pieces():
            try:
                async with _Exchange(self.target(call), call) as ex:
                    if ex.status != 200:
                        decode(ex.status, await ex.body())      # raises, with sluice's own words
                    events = ChatEvents()
                    while not events.done:
                        chunk = await ex.read1()
                        if not chunk:
                            raise ConnectionError("the stream ended before data: [DONE]")
                        for piece in events.feed(chunk):
                            yield piece
            except Exception as e:
                stream.error = call.failed(e)
        stream = AsyncStream(pieces())
        return stream

    query = _amethod(ClientCore.query_call)
    health = _amethod(ClientCore.health_call)
    queue_status = _amethod(ClientCore.queue_status_call)
    chat = _amethod(ClientCore.chat_call)
    chat_stream = method(ClientCore.chat_stream_call, "run_stream")
