"""A node's /metrics, read as Prometheus reads it, from inside the node's namespace (its
--metrics-listen address is usually loopback there)."""

from __future__ import annotations

import socket

from prometheus_client.parser import text_string_to_metric_families

from lrkp_lab.lab import Lab

# Every sample by (name, labels): a histogram's buckets are ("..._bucket", {("le", "0.05")}).
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def metrics_text(lab: Lab, host: str, port: int, ip: str = "127.0.0.1") -> str:
    """GET /metrics of the node on `host`: the body (the reply must be a 200)."""
    with lab.inside(host):
        sock = socket.create_connection((ip, port), timeout=10)
    with sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head
    return body.decode()


def metrics(lab: Lab, host: str, port: int, ip: str = "127.0.0.1") -> Samples:
    """GET /metrics of the node on `host`, parsed by prometheus_client."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(metrics_text(lab, host, port, ip))
        for sample in family.samples
    }
