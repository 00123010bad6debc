"""rtpengine's ng protocol (bencode over UDP) for the side-by-side benchmark.

Run inside the relay namespace by bench/sidebyside.py (adapted from the reference client in
research/bench-reference/ngclient.py):

    ngclient.py ping 0
        exit 0 once the server answers `ping` with `pong` (waits up to 20 s).
    ngclient.py calls N PORTFILE_A --a IP:PORT --b IP:PORT
        offer + answer N calls: call i is caller A:(PORT+2i) and callee B:(PORT+2i), as the
        generator sends them. Writes the relay port A must send to, one per line.
    ngclient.py cps COUNT --clients K
        control-plane rate: K processes, each COUNT x (offer, answer, delete) back to back with
        one request in flight, as Kamailio's workers would. Prints calls/s and latencies.

Every request has a 2 s timeout; a timeout or an error result aborts the run. One JSON line out.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import time
from typing import Any

from clientkit import closed_loop, endpoint, run

Bencodable = bytes | str | int | list[Any] | dict[str, Any]


def bencode(value: Bencodable) -> bytes:
    if isinstance(value, bytes):
        return b"%d:%s" % (len(value), value)
    if isinstance(value, str):
        return bencode(value.encode())
    if isinstance(value, int):
        return b"i%de" % value
    if isinstance(value, list):
        return b"l" + b"".join(bencode(v) for v in value) + b"e"
    return b"d" + b"".join(bencode(k) + bencode(v) for k, v in sorted(value.items())) + b"e"


def bdecode(data: bytes, i: int = 0) -> tuple[Any, int]:
    """(value, next index); strings come back as str."""
    c = data[i : i + 1]
    if c == b"i":
        j = data.index(b"e", i)
        return int(data[i + 1 : j]), j + 1
    if c == b"l":
        i, items = i + 1, []
        while data[i : i + 1] != b"e":
            v, i = bdecode(data, i)
            items.append(v)
        return items, i + 1
    if c == b"d":
        i, mapping = i + 1, {}
        while data[i : i + 1] != b"e":
            k, i = bdecode(data, i)
            v, i = bdecode(data, i)
            mapping[k] = v
        return mapping, i + 1
    j = data.index(b":", i)
    n = int(data[i:j])
    return data[j + 1 : j + 1 + n].decode("utf-8", "replace"), j + 1 + n


class Ng:
    """One ng client socket, one request in flight."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect((host, port))
        self.sock.settimeout(2.0)
        self.seq = 0
        self.prefix = f"{os.getpid():x}"

    def __call__(self, **message: Any) -> dict[str, Any]:
        self.seq += 1
        cookie = f"{self.prefix}_{self.seq}".encode()
        self.sock.send(cookie + b" " + bencode(message))
        while True:
            data = self.sock.recv(65535)
            got, _, body = data.partition(b" ")
            if got == cookie:
                break
        reply, _ = bdecode(body)
        if not isinstance(reply, dict) or reply.get("result") != "ok":
            raise RuntimeError(f"ng {message.get('command')}: {reply}")
        return reply


def sdp(ip: str, port: int) -> str:
    return (
        f"v=0\r\no=- 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\n"
        f"m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n"
    )


def media_port(text: str) -> int:
    found = re.search(r"^m=audio (\d+) ", text, re.M)
    if not found:
        raise RuntimeError(f"no m= line in {text!r}")
    return int(found.group(1))


def ping(host: str, port: int, wait: float) -> bool:
    """True once the server answers `ping` (it is up and serving ng)."""
    ng = Ng(host, port)
    ng.sock.settimeout(0.2)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            ng.seq += 1
            cookie = f"{ng.prefix}_{ng.seq}".encode()
            ng.sock.send(cookie + b" " + bencode({"command": "ping"}))
            got, _, body = ng.sock.recv(65535).partition(b" ")
            reply, _ = bdecode(body)
            if got == cookie and isinstance(reply, dict) and reply.get("result") == "pong":
                return True
        except OSError:  # timeout, or refused: not listening yet
            time.sleep(0.1)
    return False


def calls(ng: Ng, n: int, a: tuple[str, int], b: tuple[str, int], tag: str) -> list[int]:
    """Offer + answer n calls; the relay port each caller must send to."""
    ports = []
    for i in range(n):
        cid = f"{tag}-{i}"
        ng(command="offer", **{"call-id": cid, "from-tag": f"a{i}", "sdp": sdp(a[0], a[1] + 2 * i)})
        answer = ng(
            command="answer",
            **{
                "call-id": cid,
                "from-tag": f"a{i}",
                "to-tag": f"b{i}",
                "sdp": sdp(b[0], b[1] + 2 * i),
            },
        )
        ports.append(media_port(answer["sdp"]))
    return ports


def cps_worker(args: tuple[str, int, int, str]) -> dict[str, Any]:
    """One client: count x (offer, answer, delete), one request in flight."""
    host, port, count, tag = args
    ng = Ng(host, port)
    offer_ms, total_ms = [], []
    started = time.monotonic()
    for i in range(count):
        cid = f"{tag}-{os.getpid()}-{i}"
        t0 = time.perf_counter()
        ng(command="offer", **{"call-id": cid, "from-tag": "a", "sdp": sdp("10.98.1.2", 40000)})
        t1 = time.perf_counter()
        ng(
            command="answer",
            **{"call-id": cid, "from-tag": "a", "to-tag": "b", "sdp": sdp("10.98.2.2", 30000)},
        )
        ng(command="delete", **{"call-id": cid, "from-tag": "a"})
        offer_ms.append((t1 - t0) * 1e3)
        total_ms.append((time.perf_counter() - t0) * 1e3)
    return {
        "calls": count,
        "s": time.monotonic() - started,
        "offer_ms": offer_ms,
        "call_ms": total_ms,
    }


def cps(host: str, port: int, count: int, clients: int, tag: str) -> dict[str, Any]:
    jobs = [(host, port, count, f"{tag}-c{k}") for k in range(clients)]
    return closed_loop(cps_worker, jobs, "calls", ["offer_ms", "call_ms"])


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["ping", "calls", "cps"])
    parser.add_argument("n", type=int)
    parser.add_argument("portfile", nargs="?")
    parser.add_argument("--ng", default="127.0.0.1:2223")
    parser.add_argument("--a", default="10.98.1.2:40000")
    parser.add_argument("--b", default="10.98.2.2:30000")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--tag", default="bench")
    args = parser.parse_args()
    host, port = endpoint(args.ng)
    result: dict[str, Any]
    if args.command == "ping":
        if not ping(host, port, 20.0):
            raise RuntimeError(f"no pong from {host}:{port} within 20 s")
        result = {"ready": True}
    elif args.command == "calls":
        started = time.monotonic()
        ports = calls(Ng(host, port), args.n, endpoint(args.a), endpoint(args.b), args.tag)
        with open(args.portfile, "w") as out:
            out.write("\n".join(map(str, ports)) + "\n")
        result = {"calls": args.n, "setup_s": round(time.monotonic() - started, 3)}
    else:
        result = cps(host, port, args.n, args.clients, args.tag)
    return result


if __name__ == "__main__":
    run("ngclient", main)
