"""Real redis-server processes in the lab's namespaces, always stopped.

Each server listens on its host's lab address (what its peer replicates over) and on a
Unix socket in its own temporary directory (what the node's Publisher/Follower use, like a
node talking to its local Redis; a path socket is reachable from any network namespace, so
tests need not enter one to use it). Persistence is off (`--save "" --appendonly no`), as
in pair mode: a restarted server is empty.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from lrkp_lab.lab import Lab
from lrkp_lab.processes import terminate

PORT = 26379  # not 6379: a distribution's own redis-server may run in the root namespace
START_WAIT = 5.0
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "redis-pair.conf"
EXAMPLE_ADDRESS = "192.0.2.11"  # the example's "per node" address
EXAMPLE_PORT = 6379

# Redis 7.0 defaults `repl-diskless-sync-delay` to 5 s: a master waits that long before
# streaming its data to a replica that asked for a full resynchronisation, hoping more
# replicas join. A pair has one replica: without this a returning node needs > 5 s.
PAIR_CONFIG = {"repl-diskless-sync-delay": "0"}


def example_substitutions(ip: str, directory: Path) -> dict[str, str]:
    """What the lab fills into examples/redis-pair.conf, and nothing else: the node's own
    address (the file's "per node" line) and the paths Debian's unit would provide
    (/run/redis, /var/log/redis, /var/lib/redis), moved into a directory of the test's."""
    return {
        EXAMPLE_ADDRESS: ip,
        "/run/redis/redis-server.sock": str(directory / "redis.sock"),
        "/run/redis/redis-server.pid": str(directory / "redis.pid"),
        "/var/log/redis/redis-server.log": str(directory / "redis.log"),
        "dir /var/lib/redis": f"dir {directory}",
    }


def example_config(ip: str, directory: Path) -> str:
    """examples/redis-pair.conf as shipped, with `example_substitutions` applied."""
    text = EXAMPLE.read_text()
    for old, new in example_substitutions(ip, directory).items():
        if old not in text:
            raise ValueError(f"{EXAMPLE} no longer contains {old!r}: update the substitutions")
        text = text.replace(old, new)
    return text


class RedisServer:
    def __init__(
        self,
        lab: Lab,
        host: str,
        ip: str,
        port: int = PORT,
        config: dict[str, str] | None = None,
        *,
        example: bool = False,
    ) -> None:
        """`example`: run examples/redis-pair.conf as shipped (`example_config`), on its
        port; else the lab's own settings on the command line (`port`, `config`)."""
        self.lab = lab
        self.host = host
        self.ip = ip
        self.example = example
        self.port = EXAMPLE_PORT if example else port
        self.config = dict(PAIR_CONFIG if config is None else config)
        self.dir = Path(tempfile.mkdtemp(prefix="lrkpr-"))  # short: Unix socket paths ≤ 107
        self.socket = self.dir / "redis.sock"
        self.log = self.dir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """What the node on this host uses: the local Unix socket."""
        return f"unix://{self.socket}"

    @property
    def tcp_url(self) -> str:
        """What the peer uses (REPLICAOF)."""
        return f"redis://{self.ip}:{self.port}"

    @property
    def loopback_url(self) -> str:
        """TCP over the host's loopback: only from inside its namespace (`lab.inside`)."""
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> RedisServer:
        if self.example:
            path = self.dir / "redis.conf"
            path.write_text(example_config(self.ip, self.dir))
            argv = ["ip", "netns", "exec", self.lab.ns(self.host), "redis-server", str(path)]
        else:
            argv = [
                "ip", "netns", "exec", self.lab.ns(self.host),
                "redis-server",
                "--port", str(self.port),
                "--bind", self.ip, "127.0.0.1",
                "--unixsocket", str(self.socket), "--unixsocketperm", "700",
                "--dir", str(self.dir),
                "--save", "",
                "--appendonly", "no",
                "--protected-mode", "no",
                "--daemonize", "no",
                "--logfile", str(self.log),
            ]  # fmt: skip
            for key, value in self.config.items():
                argv += [f"--{key}", value]
        # `ip netns exec` execs redis-server: the child's pid is the server's.
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + START_WAIT
        client = self.client()
        try:
            while True:
                with contextlib.suppress(redis.RedisError):
                    if client.ping():
                        return self
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server on {self.host} did not start: {self.tail()}")
                time.sleep(0.02)
        finally:
            client.close()

    def client(self, timeout: float = 1.0) -> redis.Redis:
        """A plain client (not the module under test) to look at or poke the server."""
        return redis.Redis(
            unix_socket_path=str(self.socket),
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            decode_responses=True,
            protocol=2,
            retry=Retry(NoBackoff(), 0),
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def freeze(self) -> None:
        """SIGSTOP: the kernel still accepts connections, nothing answers."""
        self.proc_signal(signal.SIGSTOP)

    def kill(self) -> None:
        """SIGKILL, as a crash: without persistence it comes back empty (`start` again)."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def thaw(self) -> None:
        self.proc_signal(signal.SIGCONT)

    def proc_signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None and self.proc.poll() is None
        self.proc.send_signal(sig)

    def tail(self, lines: int = 20) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        if self.proc is not None and self.proc.stderr is not None and self.proc.poll() is not None:
            text += self.proc.stderr.read().decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Stop the server (even a frozen one) and wait for it."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)  # a frozen server acts on no other signal
            terminate(self.proc, grace=5)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()
