"""The /metrics endpoint on loopback, without root: what it answers, how it bounds slow and
numerous clients. The real node's is tests/netns/test_local_abuse.py."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from lrkp_tsl import scrape
from lrkp_tsl.scrape import ScrapeServer, parse_request_line, response


@asynccontextmanager
async def serving(render: Callable[[], bytes] = lambda: b"up 1\n") -> AsyncIterator[int]:
    server = ScrapeServer(("127.0.0.1", 0), render, asyncio.get_running_loop())
    try:
        yield server.address[1]
    finally:
        server.close()


async def ask(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), 0.5) == b""
    except ConnectionResetError:
        return True


def test_the_request_line_is_read_strictly() -> None:
    assert parse_request_line(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a") == ("GET", "/metrics",
                                                                            "HTTP/1.1")  # fmt: skip
    assert parse_request_line(b"GET /metrics\r\n") is None
    assert parse_request_line(b"GET  /metrics HTTP/1.1\r\n") is None
    assert parse_request_line(b"GET /m\xff HTTP/1.1\r\n") is None
    assert response("HTTP/1.0", "200 OK", b"abc", "text/plain", True).endswith(b"\r\n\r\n")


def test_metrics_404_405_head_and_the_clients_version() -> None:
    async def main() -> None:
        async with serving() as port:
            ok = await ask(port, b"GET /metrics HTTP/1.0\r\n\r\n")
            assert ok.startswith(b"HTTP/1.0 200 OK\r\n") and ok.endswith(b"\r\n\r\nup 1\n")
            assert b"Content-Length: 5\r\n" in ok and b"Connection: close\r\n" in ok
            head = await ask(port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK") and head.endswith(b"\r\n\r\n")
            assert (await ask(port, b"GET / HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404")
            assert (await ask(port, b"POST /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405")
            assert (await ask(port, b"nonsense\r\n\r\n")).startswith(b"HTTP/1.0 400")

    asyncio.run(main())


def test_a_failed_render_is_a_500_and_the_next_scrape_works() -> None:
    calls = []

    def render() -> bytes:
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            raise RuntimeError("the loop did not answer")
        return b"up 1\n"

    async def main() -> None:
        async with serving(render) as port:
            assert (await ask(port, b"GET /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 500")
            assert (await ask(port, b"GET /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 200")

    asyncio.run(main())
    assert all(name.startswith("scrape") for name in calls)  # never on the loop's thread


def test_unfinished_requests_are_closed_after_the_read_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(scrape, "READ_TIMEOUT", 0.3)

    async def main() -> None:
        async with serving() as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: lo")
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()

    asyncio.run(main())


def test_more_clients_than_the_cap_evict_the_oldest_unfinished_and_a_scrape_gets_in(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(scrape, "MAX_CONNECTIONS", 4)

    async def main() -> None:
        async with serving() as port:
            slow = [await asyncio.open_connection("127.0.0.1", port) for _ in range(10)]
            for _reader, writer in slow:
                writer.write(b"GET /metrics HTTP/1.1\r\nHost: lo")
            await asyncio.sleep(0.2)
            closed = [await closed_by_server(reader) for reader, _writer in slow[:6]]
            assert all(closed)  # the six oldest made room for the newest four
            reply = await ask(port, b"GET /metrics HTTP/1.1\r\n\r\n")
            assert reply.startswith(b"HTTP/1.1 200")
            for _reader, writer in slow:
                writer.close()

    asyncio.run(main())
