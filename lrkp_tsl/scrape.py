"""The /metrics endpoint: `GET /metrics` over HTTP, served on the node's event loop.

Why not prometheus_client's own server: it runs a thread per connection and never times a
client out, so a few hundred connections that send half a request hold as many threads and
descriptors for as long as they like. Here a connection costs a socket and a small task on
the loop, never a thread, and
- at most MAX_CONNECTIONS are open at once; a new one beyond that closes the oldest that has
  not finished its request yet (so clients that never finish cannot keep a real scrape
  out), or is answered 503 if every open one is being answered;
- the request head must arrive within READ_TIMEOUT and fit in HEAD_LIMIT bytes, the answer
  must be taken within WRITE_TIMEOUT;
- the page is rendered (prometheus_client's `generate_latest`, which asks the event loop for
  the engine's figures and reads the kernel's counters) in one worker thread, one scrape
  after another.

Only `GET` (and `HEAD`) of `/metrics` is served, with `Connection: close`; anything else gets
404 or 405. Nothing here runs per packet or per command.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from lrkp_tsl.ratelog import RateLimitedLog

log = logging.getLogger("lrkp_tsl.scrape")

PATH = "/metrics"
MAX_CONNECTIONS = 32
READ_TIMEOUT = 5.0
WRITE_TIMEOUT = 10.0
HEAD_LIMIT = 8192
ACCEPT_BATCH = 32
BACKLOG = 128
ACCEPT_PAUSE = 1.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def response(version: str, status: str, body: bytes, content_type: str, head_only: bool) -> bytes:
    """A whole HTTP response, `Connection: close`."""
    head = (
        f"{version} {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + (b"" if head_only else body)


def parse_request_line(head: bytes) -> tuple[str, str, str] | None:
    """(method, path without the query, HTTP version) of a request head, or None."""
    line = head.split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return None
    try:
        method, target, version = (part.decode("ascii") for part in parts)
    except UnicodeDecodeError:
        return None
    return method, target.split("?", 1)[0], version


class ScrapeServer:
    """Serves `render()` at /metrics on `loop`; `close()` stops it."""

    def __init__(
        self,
        listen: tuple[str, int],
        render: Callable[[], bytes],
        loop: asyncio.AbstractEventLoop,
        content_type: str = CONTENT_TYPE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Binds at once (an OSError says the address cannot be used) and serves from then."""
        host, port = listen
        family, kind, proto, _name, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.address = sock.getsockname()
        self.render = render
        self.loop = loop
        self.content_type = content_type
        self.clock = clock
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scrape")
        self._queued: set[Future[bytes]] = set()
        # Connections still sending their request, oldest first (a dict as an ordered set).
        self._reading: dict[asyncio.Task[None], None] = {}
        self._answering: set[asyncio.Task[None]] = set()
        self._log = RateLimitedLog(log)
        self._closed = False
        loop.add_reader(sock, self._accept)

    def close(self, then: Callable[[], object] | None = None) -> None:
        """Stop accepting and drop every connection. The render thread finishes the page it
        is rendering, if any, then runs `then` (closing what rendering uses) and ends."""
        self._closed = True
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.sock)
        self.sock.close()
        for task in [*self._reading, *self._answering]:
            task.cancel()
        for future in list(self._queued):
            future.cancel()
        if then is not None:
            self._pool.submit(then)
        self._pool.shutdown(wait=False)

    # -- connections -----------------------------------------------------------------------

    def _accept(self) -> None:
        self._log.flush(self.clock())
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._log.log(self.clock(), logging.ERROR, "metrics accept failures",
                              "metrics: accept failed (%s); accepting again in %g s",
                              exc.strerror or str(exc), ACCEPT_PAUSE)  # fmt: skip
                self.loop.remove_reader(self.sock)
                self.loop.call_later(ACCEPT_PAUSE, self._resume)
                return
            if len(self._reading) + len(self._answering) >= MAX_CONNECTIONS and not self._evict():
                with contextlib.suppress(OSError):
                    conn.send(response("HTTP/1.0", "503 Service Unavailable", b"busy\n",
                                       "text/plain", False), socket.MSG_DONTWAIT)  # fmt: skip
                conn.close()
                continue
            task = asyncio.ensure_future(self._serve(conn))
            self._reading[task] = None
            task.add_done_callback(self._gone)

    def _resume(self) -> None:
        if not self._closed:
            self.loop.add_reader(self.sock, self._accept)

    def _evict(self) -> bool:
        """Close the oldest connection still sending its request; False if there is none."""
        for task in self._reading:
            task.cancel()
            del self._reading[task]
            self._answering.discard(task)
            return True
        return False

    def _gone(self, task: asyncio.Task[None]) -> None:
        self._reading.pop(task, None)
        self._answering.discard(task)

    async def _serve(self, conn: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_connection(sock=conn, limit=HEAD_LIMIT)
        except OSError:
            conn.close()
            return
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            task = asyncio.current_task()
            if task is not None and task in self._reading:
                del self._reading[task]
                self._answering.add(task)
            writer.write(await self._answer(head))
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):  # fmt: skip
            pass  # a slow, broken or oversized request: dropped
        finally:
            writer.close()

    async def _answer(self, head: bytes) -> bytes:
        request = parse_request_line(head)
        if request is None:
            return response("HTTP/1.0", "400 Bad Request", b"bad request\n", "text/plain", False)
        method, path, version = request
        if method not in ("GET", "HEAD"):
            return response(version, "405 Method Not Allowed", b"GET only\n", "text/plain",
                            False)  # fmt: skip
        if path != PATH:
            return response(version, "404 Not Found", f"see {PATH}\n".encode(), "text/plain",
                            method == "HEAD")  # fmt: skip
        future = self._pool.submit(self.render)
        self._queued.add(future)
        future.add_done_callback(self._queued.discard)
        try:
            body = await asyncio.wrap_future(future)
        except Exception as exc:
            self._log.log(self.clock(), logging.ERROR, "metrics render failures",
                          "metrics: rendering /metrics failed: %s", exc)  # fmt: skip
            return response(version, "500 Internal Server Error", b"see the node's log\n",
                            "text/plain", method == "HEAD")  # fmt: skip
        return response(version, "200 OK", body, self.content_type, method == "HEAD")
