"""End-to-end harness: Kamailio with the stock lrkproxy module (or its rtpengine module), and
SIPp parties, in the lab's namespaces.

    kamailio(lab, workdir, nodes=[...])   Kamailio in the `sip` namespace running
                                          examples/kamailio.cfg, started and ready on entry,
                                          killed (with all its children) on exit; Debian's
                                          5.6 by default, any other build with `build=`
                                          (see KamailioBuild; conftest's `kamailio_build`);
                                          `site=COLOCATED`: in the node's own namespace,
                                          on the relay IPs, as on a host running both
    ng_kamailio(lab, workdir, relays=[...])
                                          the same with examples/kamailio-rtpengine.cfg:
                                          Kamailio's `rtpengine` module, speaking
                                          rtpengine's ng protocol (to rtpengine, or to the
                                          node's `--ng` socket)
    call(lab, workdir, caller=..., ...)   a SIPp UAS in one party namespace and a SIPp UAC in
                                          another, with the scenarios in scenarios/; exposes the
                                          SDP each side received and always kills both

SIPp sends no media: a test binds its own sockets on the SDP media ports (`rtp_port`) and
sends RTP to the relay address it learns from `Call.caller_sdp` / `Call.callee_sdp`.
Every wait is bounded; every process is killed on the way out, even when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from ipaddress import IPv4Address
from pathlib import Path

from lrkp_lab.lab import Lab, address

ROOT = Path(__file__).resolve().parents[1]
KAMAILIO_CFG = ROOT / "examples" / "kamailio.cfg"
KAMAILIO_NG_CFG = ROOT / "examples" / "kamailio-rtpengine.cfg"  # the rtpengine module (ng)
SCENARIOS = Path(__file__).resolve().parent / "scenarios"

SIP_PORT = 5060
KAMAILIO_HOST = "sip"
KAMAILIO_INT = address(KAMAILIO_HOST, "int")  # 10.201.1.5
KAMAILIO_EXT = address(KAMAILIO_HOST, "ext")  # 10.201.2.5
INTERNAL_NET = "10.201.1.0/24"
EXTERNAL_NET = "10.201.2.0/24"

DEBIAN_MPATH = "/usr/lib/x86_64-linux-gnu/kamailio/modules/"

START_TIMEOUT = 20.0  # Kamailio start: includes P/G to every node in every process
CALL_TIMEOUT = 30.0  # a whole SIPp call, pause included, must end within this


def _kill_group(proc: subprocess.Popen[bytes], grace: float = 3.0) -> None:
    """SIGTERM the process group of `proc` (started with start_new_session), then SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    # Children of a dead leader can survive it: always sweep the group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------- Kamailio


@dataclass(frozen=True)
class KamailioBuild:
    """One Kamailio to run the e2e tests against: its binary and module directory.

    `sends_delete`: its lrkproxy sends `D` (5.7 and later); 5.6 never does, so there a
    call ends by expiry only. `ranged`: it knows the start_port/end_port modparams (5.7+).
    """

    name: str  # the test id: "5.6", "6.2"
    binary: str
    mpath: str
    sends_delete: bool

    @property
    def ranged(self) -> bool:
        return self.sends_delete


DEBIAN_KAMAILIO = KamailioBuild("5.6", "kamailio", DEBIAN_MPATH, sends_delete=False)


@dataclass(frozen=True)
class Site:
    """Where Kamailio runs: a lab host and its SIP addresses on the internal and the
    external network (the parties send their requests there)."""

    host: str
    internal: IPv4Address
    external: IPv4Address


OWN_HOST = Site(KAMAILIO_HOST, KAMAILIO_INT, KAMAILIO_EXT)  # `sip`, 10.201.1.5/10.201.2.5
# On the node's host: the relay namespace, listening on the relay IPs (port 5060 is not a
# relay port), its lrkproxy sockets on the relay's internal IP.
COLOCATED = Site("relay", address("relay", "int"), address("relay", "ext"))


def define(name: str, value: str | int) -> list[str]:
    """`-A NAME=value`, passed as is. A string define must carry its own double quotes (use
    `quoted()`); numbers and listen sockets (proto:ip:port) must be bare tokens."""
    return ["-A", f"{name}={value}"]


def quoted(value: str) -> str:
    """A Kamailio string literal for -A (spaces allowed inside)."""
    return '"' + value.replace('"', "") + '"'


@dataclass
class Kamailio:
    """A running Kamailio in the lab's `sip` namespace (see `kamailio()`)."""

    lab: Lab
    workdir: Path
    argv: list[str]
    site: Site = OWN_HOST
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "kamailio.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = START_TIMEOUT) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.lab.ns(self.site.host), *self.argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        """Wait until both SIP sockets answer an OPTIONS (so the workers are initialised)."""
        deadline = time.monotonic() + timeout
        pending = [self.site.internal, self.site.external]
        with self.lab.inside(self.site.host):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((str(self.site.internal), 0))
            local_port = sock.getsockname()[1]
            attempt = 0
            while pending:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"kamailio exited with {self.proc.returncode}:\n{_tail(self.log_path)}"
                    )
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"kamailio not ready on {pending} after {timeout}s:\n{_tail(self.log_path)}"
                    )
                attempt += 1
                target = pending[0]
                sock.sendto(
                    _options(target, self.site.internal, local_port, attempt),
                    (str(target), SIP_PORT),
                )
                ready, _, _ = select.select([sock], [], [], 0.3)
                if ready:
                    data = sock.recv(65535)
                    if data.startswith(b"SIP/2.0 200") and f"ready-{attempt}".encode() in data:
                        pending.pop(0)
        finally:
            sock.close()

    def stop(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc)

    def __enter__(self) -> Kamailio:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _options(target: object, local: object, port: int, attempt: int) -> bytes:
    return (
        f"OPTIONS sip:{target}:{SIP_PORT} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {local}:{port};branch=z9hG4bK-ready-{attempt}-{time.time_ns()}\r\n"
        f"From: <sip:harness@{local}>;tag=ready-{attempt}\r\n"
        f"To: <sip:{target}>\r\n"
        f"Call-ID: ready-{attempt}-{os.getpid()}@{local}\r\n"
        f"CSeq: {attempt} OPTIONS\r\n"
        "Max-Forwards: 70\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def base_argv(
    workdir: Path,
    *,
    binary: str,
    config: Path,
    children: int,
    debug: int,
    site: Site,
    mpath: str | None,
) -> list[str]:
    """What every config of ours takes: foreground, log to stderr, own runtime dir and pid
    file, the two SIP sockets of `site`, the networks, the workers and the log level."""
    optional = define("MPATH", quoted(mpath)) if mpath is not None else []
    return [
        binary,
        "-DD",
        "-E",
        "-f",
        str(config),
        "-Y",
        str(workdir),
        "-P",
        str(workdir / "kamailio.pid"),
        "-w",
        str(workdir),
        "-m",
        "64",
        "-M",
        "8",
        *define("CHILDREN", children),
        *define("DEBUG_LEVEL", debug),
        *define("LISTEN_INT", f"udp:{site.internal}:{SIP_PORT}"),
        *define("LISTEN_EXT", f"udp:{site.external}:{SIP_PORT}"),
        *define("INT_NET", quoted(INTERNAL_NET)),
        *define("EXT_NET", quoted(EXTERNAL_NET)),
        *optional,
    ]


def lrkproxy_defines(
    nodes: Sequence[str],
    *,
    alg: int,
    gt: int,
    tout: int,
    retr: int,
    start_port: int | None,
    end_port: int | None,
) -> list[str]:
    """The defines of examples/kamailio.cfg's lrkproxy module: its nodes, LRKP_ALG,
    LRKP_GT, LRKP_TOUT, LRKP_RETR, and the port range of 5.7+ (the cfg sets it only when
    defined)."""
    optional = []
    if start_port is not None:
        optional += define("LRKP_START_PORT", start_port)
    if end_port is not None:
        optional += define("LRKP_END_PORT", end_port)
    return [
        *define("LRKP_SOCK", quoted(" ".join(nodes))),
        *define("LRKP_ALG", alg),
        *define("LRKP_GT", gt),
        *define("LRKP_TOUT", tout),
        *define("LRKP_RETR", retr),
        *optional,
    ]


def rtpengine_defines(relays: Sequence[str], *, tout_ms: int, retr: int) -> list[str]:
    """The defines of examples/kamailio-rtpengine.cfg's rtpengine module (the ng protocol)."""
    return [
        *define("RTPE_SOCK", quoted(" ".join(relays))),
        *define("RTPE_TOUT_MS", tout_ms),
        *define("RTPE_RETR", retr),
    ]


@contextlib.contextmanager
def _running(
    lab: Lab,
    workdir: Path,
    module_defines: Sequence[str],
    *,
    config: Path,
    children: int,
    debug: int,
    build: KamailioBuild | None,
    binary: str | None,
    mpath: str | None,
    extra: Sequence[str],
    site: Site,
) -> Iterator[Kamailio]:
    """Kamailio with `config`, the defines every config of ours takes, then its module's
    and `extra`: ready for the duration of the block, always killed. `build` picks the
    Kamailio (default: Debian's 5.6, with the cfg's own module directory); `binary` and
    `mpath` override its parts."""
    chosen = build or DEBIAN_KAMAILIO
    argv = [
        *base_argv(
            workdir,
            binary=binary or chosen.binary,
            config=config,
            children=children,
            debug=debug,
            site=site,
            mpath=mpath or (None if build is None else chosen.mpath),
        ),
        *module_defines,
        *extra,
    ]
    with Kamailio(lab, workdir, argv, site) as running:
        yield running


@contextlib.contextmanager
def kamailio(
    lab: Lab,
    workdir: Path,
    nodes: Sequence[str],
    *,
    alg: int = 0,
    gt: int = 0,
    tout: int = 1,
    retr: int = 2,
    children: int = 2,
    debug: int = 2,
    build: KamailioBuild | None = None,
    binary: str | None = None,
    mpath: str | None = None,
    config: Path = KAMAILIO_CFG,
    start_port: int | None = None,
    end_port: int | None = None,
    extra: Sequence[str] = (),
    site: Site = OWN_HOST,
) -> Iterator[Kamailio]:
    """Kamailio, ready (both sockets answer), for the duration of the block; always killed.

    `nodes` are lrkproxy_sock URLs, e.g. ["udp:10.201.1.1:22333"]; the other arguments are
    the defines LRKP_ALG, LRKP_GT, LRKP_TOUT, LRKP_RETR, CHILDREN and DEBUG_LEVEL.
    `build` picks the Kamailio (default: Debian's 5.6); `binary`/`mpath` override its parts;
    `start_port`/`end_port` set lrkproxy's port range (5.7+ only); `site` where it runs.
    """
    defines = lrkproxy_defines(
        nodes, alg=alg, gt=gt, tout=tout, retr=retr, start_port=start_port, end_port=end_port
    )
    with _running(
        lab,
        workdir,
        defines,
        config=config,
        children=children,
        debug=debug,
        build=build,
        binary=binary,
        mpath=mpath,
        extra=extra,
        site=site,
    ) as running:
        yield running


@contextlib.contextmanager
def ng_kamailio(
    lab: Lab,
    workdir: Path,
    relays: Sequence[str],
    *,
    tout_ms: int = 1000,
    retr: int = 2,
    children: int = 2,
    debug: int = 2,
    build: KamailioBuild | None = None,
    config: Path = KAMAILIO_NG_CFG,
    extra: Sequence[str] = (),
    site: Site = OWN_HOST,
) -> Iterator[Kamailio]:
    """Kamailio with its `rtpengine` module (examples/kamailio-rtpengine.cfg), ready, for
    the duration of the block; always killed.

    `relays` are rtpengine_sock URLs, e.g. ["udp:10.201.1.1:2223"]; `tout_ms` and `retr`
    the module's rtpengine_tout_ms and rtpengine_retr; `build` picks the Kamailio (default:
    Debian's 5.6)."""
    defines = rtpengine_defines(relays, tout_ms=tout_ms, retr=retr)
    with _running(
        lab,
        workdir,
        defines,
        config=config,
        children=children,
        debug=debug,
        build=build,
        binary=None,
        mpath=None,
        extra=extra,
        site=site,
    ) as running:
        yield running


# --------------------------------------------------------------------------- SIP / SDP


@dataclass(frozen=True)
class SipMessage:
    direction: str  # "sent" or "received"
    text: str
    at: float | None = None  # when SIPp sent or received it (time.time()), from the trace

    @property
    def first_line(self) -> str:
        return self.text.split("\n", 1)[0].strip()

    @property
    def status(self) -> int | None:
        match = re.match(r"SIP/2\.0 (\d{3})", self.first_line)
        return int(match.group(1)) if match else None

    @property
    def method(self) -> str | None:
        """The request method, or the CSeq method of a response."""
        if self.status is None:
            return self.first_line.split(" ", 1)[0]
        match = re.search(r"^CSeq:\s*\d+\s+(\S+)", self.text, re.MULTILINE | re.IGNORECASE)
        return match.group(1) if match else None

    def header(self, name: str) -> str | None:
        match = re.search(
            rf"^{re.escape(name)}:\s*(.*?)\s*$", self.head, re.MULTILINE | re.IGNORECASE
        )
        return match.group(1) if match else None

    @property
    def head(self) -> str:
        return re.split(r"\r?\n\r?\n", self.text, maxsplit=1)[0]

    @property
    def body(self) -> str:
        parts = re.split(r"\r?\n\r?\n", self.text, maxsplit=1)
        return parts[1] if len(parts) == 2 else ""

    @property
    def sdp(self) -> Sdp | None:
        return Sdp.parse(self.body) if "m=audio" in self.body else None


@dataclass(frozen=True)
class Sdp:
    """The parts of an SDP body the relay cares about."""

    ip: str  # the first c=IN IP4 address
    port: int  # the port of the first m=audio line
    origin: str  # the o= line
    text: str

    @staticmethod
    def parse(text: str) -> Sdp:
        conn = re.search(r"^c=IN IP4 (\S+)", text, re.MULTILINE)
        media = re.search(r"^m=audio (\d+) ", text, re.MULTILINE)
        origin = re.search(r"^o=(.*?)\s*$", text, re.MULTILINE)
        if conn is None or media is None:
            raise ValueError(f"SDP without c=IN IP4 or m=audio:\n{text}")
        return Sdp(conn.group(1), int(media.group(1)), origin.group(1) if origin else "", text)

    @property
    def endpoint(self) -> tuple[str, int]:
        return self.ip, self.port


_TRACE_HEAD = re.compile(
    r"^-{10,} ([^\n]*)\n(UDP|TCP|SCTP|TLS) message (sent|received) "
    r"(?:\[\d+\] bytes ?|\(\d+ bytes\)):\n\n",
    re.MULTILINE,
)


def parse_message_trace(text: str) -> list[SipMessage]:
    """The SIP messages of a SIPp `-trace_msg` log, in order.

    SIPp 3.6 heads each message with a dashed line and a timestamp (local time, to the
    microsecond: "2024-05-01 12:00:00.123456"), then "UDP message sent (585 bytes):" or
    "UDP message received [277] bytes :", a blank line and the message (its lines end in LF
    in the trace).
    """
    heads = list(_TRACE_HEAD.finditer(text))
    messages = []
    for index, head in enumerate(heads):
        end = heads[index + 1].start() if index + 1 < len(heads) else len(text)
        body = text[head.end() : end].rstrip("\n") + "\n"
        messages.append(SipMessage(head.group(3), body, _trace_time(head.group(1))))
    return messages


def _trace_time(stamp: str) -> float | None:
    try:
        return datetime.strptime(stamp.strip(), "%Y-%m-%d %H:%M:%S.%f").timestamp()
    except ValueError:
        return None


# --------------------------------------------------------------------------- SIPp


@dataclass
class Sipp:
    """One SIPp process in a party namespace, tracing its messages to a file."""

    lab: Lab
    host: str
    name: str  # "uac"/"uas": names the files in workdir
    workdir: Path
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def trace_path(self) -> Path:
        return self.workdir / f"{self.name}-messages.log"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}-sipp.log"

    @property
    def error_path(self) -> Path:
        return self.workdir / f"{self.name}-errors.log"

    def start(self) -> Sipp:
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [
            *self.argv,
            "-nostdin",
            "-trace_msg",
            "-message_file",
            str(self.trace_path),
            "-trace_err",
            "-error_file",
            str(self.error_path),
        ]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.lab.ns(self.host), *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
        return self

    def messages(self) -> list[SipMessage]:
        try:
            return parse_message_trace(self.trace_path.read_text(errors="replace"))
        except OSError:
            return []

    def received(self) -> list[SipMessage]:
        return [m for m in self.messages() if m.direction == "received"]

    def wait(self, timeout: float = CALL_TIMEOUT) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise TimeoutError(
                f"sipp {self.name} in {self.host} still running after "
                f"{timeout}s:\n{self.diagnostics()}"
            ) from None

    def diagnostics(self) -> str:
        return (
            f"--- {self.log_path.name}\n{_tail(self.log_path, 30)}\n"
            f"--- {self.error_path.name}\n{_tail(self.error_path, 30)}"
        )

    def stop(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc, grace=1.0)


def sipp_argv(
    scenario: str,
    local_ip: object,
    *,
    rtp_port: int,
    remote: str | None = None,
    callee_uri: str | None = None,
    pause_ms: int = 1000,
    sip_port: int = SIP_PORT,
    timeout: float = CALL_TIMEOUT,
    count: int = 1,
    rate: int = 10,
) -> list[str]:
    """A SIPp command line for `count` calls (at most `count` at once, `rate` new ones per
    second) with one of our scenarios (path or name in SCENARIOS).

    SIPp's own media port (-mp) is moved away from `rtp_port` so it never holds the port
    the test binds; the scenarios use no media keywords, so SIPp sends nothing there.
    """
    path = Path(scenario) if "/" in scenario else SCENARIOS / scenario
    argv = [
        "sipp",
        "-sf",
        str(path),
        "-i",
        str(local_ip),
        "-p",
        str(sip_port),
        "-mi",
        str(local_ip),
        "-mp",
        str(rtp_port + 1000 if rtp_port < 60000 else rtp_port - 1000),
        "-m",
        str(count),
        "-l",
        str(count),
        "-r",
        str(rate),
        "-d",
        str(pause_ms),
        "-key",
        "rtp_port",
        str(rtp_port),
        "-timeout",
        f"{int(timeout)}s",
        "-timeout_error",
        "-recv_timeout",
        f"{int(timeout * 1000)}",
        "-max_recv_loops",
        "1000",
    ]
    if callee_uri is not None:
        argv += ["-key", "callee_uri", callee_uri]
    if remote is not None:
        argv.append(remote)
    return argv


@dataclass
class Call:
    """A SIPp call: caller (UAC) -> Kamailio -> callee (UAS). See `call()`."""

    caller: Sipp
    callee: Sipp
    caller_host: str
    callee_host: str
    caller_rtp: tuple[str, int]
    callee_rtp: tuple[str, int]
    results: dict[str, int] = field(default_factory=dict)

    def _sdp_received(self, side: Sipp, want: str) -> Sdp | None:
        for message in side.received():
            if message.sdp is None:
                continue
            if want == "offer" and message.method == "INVITE" and message.status is None:
                return message.sdp
            if want == "answer" and message.status is not None and message.status == 200:
                return message.sdp
        return None

    def offers(self) -> list[Sdp]:
        """Every SDP offer the callee received (the INVITE, then each re-INVITE), once each
        (a retransmission has the same CSeq)."""
        return _once_per_cseq(
            m for m in self.callee.received() if m.method == "INVITE" and m.status is None
        )

    def answers(self) -> list[Sdp]:
        """Every SDP answer of a 200 to an INVITE the caller received, once each."""
        return _once_per_cseq(
            m for m in self.caller.received() if m.method == "INVITE" and m.status == 200
        )

    def wait_answers(self, count: int, timeout: float = 15.0) -> tuple[list[Sdp], list[Sdp]]:
        """Wait until the caller got `count` answers (the INVITE's, then re-INVITEs');
        return (answers the caller got, offers the callee got)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            answers, offers = self.answers(), self.offers()
            if len(answers) >= count and len(offers) >= count:
                return answers, offers
            for side in (self.caller, self.callee):
                if side.proc is not None and side.proc.poll() is not None:
                    raise RuntimeError(
                        f"sipp {side.name} exited early "
                        f"({side.proc.returncode}):\n{side.diagnostics()}"
                    )
            time.sleep(0.05)
        raise TimeoutError(
            f"{count} answers not received within {timeout}s:\n"
            f"{self.caller.diagnostics()}\n{self.callee.diagnostics()}"
        )

    @property
    def callee_sdp(self) -> Sdp | None:
        """The SDP offer the callee received (the relay address the callee must send to)."""
        return self._sdp_received(self.callee, "offer")

    @property
    def caller_sdp(self) -> Sdp | None:
        """The SDP answer (of the 200 OK) the caller received: where the caller sends media."""
        return self._sdp_received(self.caller, "answer")

    @property
    def early_sdp(self) -> Sdp | None:
        """The SDP of a 183 the caller received, if any."""
        for message in self.caller.received():
            if message.status == 183 and message.sdp is not None:
                return message.sdp
        return None

    @property
    def call_id(self) -> str | None:
        for message in self.caller.messages():
            if message.direction == "sent" and message.method == "INVITE":
                return message.header("Call-ID")
        return None

    def wait_answered(self, timeout: float = 10.0) -> tuple[Sdp, Sdp]:
        """Wait until the caller got the 200 OK; return (caller_sdp, callee_sdp)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            caller_sdp, callee_sdp = self.caller_sdp, self.callee_sdp
            if caller_sdp is not None and callee_sdp is not None:
                return caller_sdp, callee_sdp
            for side in (self.caller, self.callee):
                if side.proc is not None and side.proc.poll() is not None:
                    raise RuntimeError(
                        f"sipp {side.name} exited early "
                        f"({side.proc.returncode}):\n{side.diagnostics()}"
                    )
            time.sleep(0.05)
        raise TimeoutError(
            f"call not answered within {timeout}s:\n"
            f"{self.caller.diagnostics()}\n{self.callee.diagnostics()}"
        )

    def wait_done(self, timeout: float = CALL_TIMEOUT) -> None:
        """Wait for both SIPp processes to end; raise unless both succeeded."""
        deadline = time.monotonic() + timeout
        for side in (self.caller, self.callee):
            self.results[side.name] = side.wait(max(0.1, deadline - time.monotonic()))
        failed = {name: rc for name, rc in self.results.items() if rc != 0}
        if failed:
            raise RuntimeError(
                f"sipp failed {failed}:\n{self.caller.diagnostics()}\n{self.callee.diagnostics()}"
            )

    def stop(self) -> None:
        self.caller.stop()
        self.callee.stop()


def _once_per_cseq(messages: Iterable[SipMessage]) -> list[Sdp]:
    seen: dict[str | None, Sdp] = {}
    for message in messages:
        sdp = message.sdp
        if sdp is not None:
            seen.setdefault(message.header("CSeq"), sdp)
    return list(seen.values())


@contextlib.contextmanager
def call(
    lab: Lab,
    workdir: Path,
    *,
    caller: str = "a",
    callee: str = "x",
    caller_rtp_port: int = 30000,
    callee_rtp_port: int = 32000,
    pause_ms: int = 1000,
    uas_scenario: str = "uas.xml",
    uac_scenario: str = "uac.xml",
    timeout: float = CALL_TIMEOUT,
    site: Site = OWN_HOST,
    count: int = 1,
    rate: int = 10,
) -> Iterator[Call]:
    """Start the callee (UAS) and then the caller (UAC); kill both on exit. `count` calls
    between the same two parties (SDP addresses), `rate` new ones per second: the `Call`'s
    SDP and Call-ID properties are the first call's.

    The caller's INVITE goes to Kamailio's address on the caller's network (of `site`, where
    Kamailio runs), with the R-URI sip:callee@<callee ip>:5060. The block typically calls
    `wait_answered()`, sends media while the caller pauses `pause_ms`, and then `wait_done()`.
    """
    caller_ip, callee_ip = address(caller), address(callee)
    proxy = site.internal if str(caller_ip).startswith("10.201.1.") else site.external
    if caller == "c":  # behind the NAT box, which is on the internal network
        proxy = site.internal
    workdir.mkdir(parents=True, exist_ok=True)
    uas = Sipp(
        lab,
        callee,
        "uas",
        workdir,
        sipp_argv(uas_scenario, callee_ip, rtp_port=callee_rtp_port, timeout=timeout, count=count),
    )
    uac = Sipp(
        lab,
        caller,
        "uac",
        workdir,
        sipp_argv(
            uac_scenario,
            caller_ip,
            rtp_port=caller_rtp_port,
            pause_ms=pause_ms,
            remote=f"{proxy}:{SIP_PORT}",
            callee_uri=f"sip:callee@{callee_ip}:{SIP_PORT}",
            timeout=timeout,
            count=count,
            rate=rate,
        ),
    )
    running = Call(
        uac,
        uas,
        caller,
        callee,
        (str(caller_ip), caller_rtp_port),
        (str(callee_ip), callee_rtp_port),
    )
    try:
        uas.start()
        _wait_udp_listening(lab, callee, str(callee_ip), SIP_PORT, uas)
        uac.start()
        yield running
    finally:
        running.stop()


def _wait_udp_listening(
    lab: Lab, host: str, ip: str, port: int, sipp: Sipp, timeout: float = 5.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = lab.run(host, "ss", "-Hnlu", f"src {ip}:{port}", check=False).stdout
        if out.strip():
            return
        if sipp.proc is not None and sipp.proc.poll() is not None:
            raise RuntimeError(
                f"sipp {sipp.name} exited ({sipp.proc.returncode}):\n{sipp.diagnostics()}"
            )
        time.sleep(0.05)
    raise TimeoutError(f"sipp {sipp.name} not listening on {ip}:{port}:\n{sipp.diagnostics()}")
