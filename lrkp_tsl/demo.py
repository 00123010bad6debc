"""`make run` without a config: one call relayed by the kernel in a throwaway lab.

Brings up the namespace lab, starts the data plane in the relay namespace, commits one
call between a caller on the internal network and a callee on the external network, sends
RTP and RTCP both ways, prints what each party received and from where, the conntrack
entries and the `nft list table ip lrkp` lines of the call, then tears everything down.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import sys
import time

from lrkp_tsl.dataplane import DataPlane
from lrkp_tsl.lab import EXTERNAL_IP, INTERNAL_IP, Lab, address
from lrkp_tsl.media import CallMedia, Endpoint, PortRange

PACKETS = 50
PTIME = 0.02  # 20 ms, one G.711 frame
CALL_ID = "demo-call-1@lrkp-tsl"


def rtp_packet(seq: int, ssrc: int) -> bytes:
    """A G.711 RTP packet: 12-byte header, 160 bytes of silence."""
    return struct.pack("!BBHII", 0x80, 0, seq, seq * 160, ssrc) + b"\xff" * 160


def drain(sock: socket.socket, wait: float) -> tuple[int, set[str]]:
    count, sources = 0, set()
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([sock], [], [], left)
        if not ready:
            break
        _data, (ip, port) = sock.recvfrom(2048)
        count += 1
        sources.add(f"{ip}:{port}")
    return count, sources


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if os.geteuid() != 0:
        print("make run: the demo builds network namespaces and needs root", file=sys.stderr)
        return 1
    with Lab() as lab:
        print(f"lab {lab.tag}: relay internal {INTERNAL_IP}, external {EXTERNAL_IP}")
        with lab.inside("relay"):
            plane = DataPlane()
            plane.start([INTERNAL_IP, EXTERNAL_IP], PortRange(20000, 40000), 60)
        media = CallMedia(
            CALL_ID,
            caller=Endpoint(address("a"), 4000),
            caller_relay=Endpoint(INTERNAL_IP, 20002),
            callee=Endpoint(address("x"), 6000),
            callee_relay=Endpoint(EXTERNAL_IP, 20000),
        )
        plane.commit(media)
        print(f"\ncommitted call {CALL_ID}:")
        print(f"  caller {media.caller} (internal) sends to {media.caller_relay}")
        print(f"  callee {media.callee} (external) sends to {media.callee_relay}")
        sockets = {
            (who, offset): lab.udp_socket(host, address(host), endpoint.port + offset)
            for who, host, endpoint in (
                ("caller", "a", media.caller),
                ("callee", "x", media.callee),
            )
            for offset in (0, 1)
        }
        for seq in range(PACKETS):
            sockets["caller", 0].sendto(rtp_packet(seq, 0xA), _addr(media.caller_relay))
            sockets["callee", 0].sendto(rtp_packet(seq, 0xB), _addr(media.callee_relay))
            if seq % 25 == 0:  # an RTCP report now and then
                sockets["caller", 1].sendto(b"\x81\xc8rtcp", _addr(media.caller_relay, 1))
                sockets["callee", 1].sendto(b"\x81\xc8rtcp", _addr(media.callee_relay, 1))
            time.sleep(PTIME)
        print(f"\nsent {PACKETS} RTP packets and 2 RTCP packets each way")
        for (who, offset), sock in sorted(sockets.items()):
            count, sources = drain(sock, 0.5)
            kind = "RTCP" if offset else "RTP "
            print(f"  {who} received {count:3d} {kind} packets from {', '.join(sources) or '-'}")
        print("\nconntrack (relay namespace): one entry per stream, NATed both ways")
        for entry in plane.conntrack.entries():
            print(
                f"  {entry.orig_src} -> {entry.orig_dst}  [{entry.packets_orig} pkts]   "
                f"reply {entry.reply_src} -> {entry.reply_dst}  [{entry.packets_reply} pkts]"
            )
        print("\nnft list table ip lrkp (the call's elements):")
        current = ""
        for line in plane.nft.listing().splitlines():
            words = line.split()
            if words[:1] == ["map"]:
                current = words[1]
            elif CALL_ID in line:
                element = line.strip().removeprefix("elements = {").rstrip(",} ").strip()
                print(f"  {current}: {element}")
        plane.shutdown(flush=True)
        for sock in sockets.values():
            sock.close()
    print("\nlab torn down. Run the node for real: make run CONFIG=/path/to/lrkp-tsl.toml")
    return 0


def _addr(endpoint: Endpoint, offset: int = 0) -> tuple[str, int]:
    return (str(endpoint.ip), endpoint.port + offset)


if __name__ == "__main__":
    raise SystemExit(main())
