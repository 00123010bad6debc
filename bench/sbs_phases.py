"""The side-by-side benchmark's run: measured windows and the phases built from them."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sbs_accounting import (
    USER_HZ,
    busy,
    cpu_times,
    foreign_cpu,
    our_pids,
    proc_ticks,
    rss_kib,
    snapshot,
    softnet_drops,
)
from sbs_contenders import (
    KINDS,
    Contender,
    Daemon,
    Lrkp,
    LrkpNat,
    LrkpNg,
    Rtpengine,
    RtpengineRedis,
)
from sbs_gen import Gen, Soaker
from sbs_lab import B_IP, B_PORT, GEN_CPU, RDROP_NFT, RELAY_CPU, Topo
from sbs_profiles import Profile
from sbs_report import machine

LOSS_MAX = 0.001
NOISY = 25.0  # % of a core used by other processes: a window that failed is measured again
RATE_MIN_OK = 0.99


@dataclass
class Bench:
    topo: Topo
    profile: Profile
    work: Path
    out: Any
    gen: Gen | None = None
    records: list[dict[str, Any]] = field(default_factory=list)

    def emit(self, rec: dict[str, Any]) -> None:
        rec["t"] = round(time.time(), 1)
        self.records.append(rec)
        self.out.write(json.dumps(rec) + "\n")
        self.out.flush()
        brief = {
            k: rec[k]
            for k in (
                "phase",
                "who",
                "rate",
                "gen_pps",
                "loss",
                "ok",
                "cost",
                "rtt_us",
                "foreign_cpu",
                "backlog_drops",
            )
            if k in rec
        }
        print(json.dumps(brief), flush=True)

    def wait_quiet(self, limit: float = 25.0) -> None:
        """Wait (bounded) until other sessions' processes use < `limit` % of a core."""
        deadline = time.monotonic() + self.profile.quiet_wait
        while time.monotonic() < deadline:
            a = snapshot()
            time.sleep(1.0)
            if foreign_cpu(a, snapshot(), our_pids(), 1.0) < limit:
                return

    @property
    def g(self) -> Gen:
        assert self.gen is not None
        return self.gen

    @contextlib.contextmanager
    def contender(self, c: Contender) -> Iterator[tuple[str, dict[str, Any]]]:
        """Fresh contender, calls up, every stream warmed (latched, conntrack entries made)."""
        c.up()
        try:
            dst, target = c.target()
            warm_rate = max(2 * c.n, 2000)
            self.g.send(c.n, dst, warm_rate, self.profile.warm_s, target)
            if isinstance(c, LrkpNat):  # every stream latches through the queue: let it finish
                time.sleep(0.5)
                self.g.send(c.n, dst, warm_rate, self.profile.warm_s, target)
            time.sleep(0.2)
            yield dst, target
        finally:
            c.down()

    def window(
        self,
        c: Contender,
        dst: str,
        target: dict[str, Any],
        rate: int,
        secs: float,
        soak: bool = False,
    ) -> dict[str, Any]:
        """One measured window at `rate` (0: flat out); loss at B, CPU of both cores.

        `soak`: a soaker on the relay core, its loop rate compared with the idle core's,
        measured just before (the contender up, no traffic): the relay's share of the core."""
        soaker = None
        idle_rate = kept_rate = 0.0
        if soak:
            idle_rate = Soaker.idle_rate(self.g.bin, RELAY_CPU, 1.0)
            soaker = Soaker(self.g.bin, RELAY_CPU, secs + 5)
        try:
            self.topo.sink_read()
            ct0, ps0, sn0 = cpu_times(), snapshot(), softnet_drops()
            p0 = proc_ticks(c.pid) if c.pid else 0
            if soaker:
                soaker.mark()
            t0 = time.monotonic()
            g = self.g.send(c.n, dst, rate, secs, target)
            dt = time.monotonic() - t0
            ct1, ps1 = cpu_times(), snapshot()
            p1 = proc_ticks(c.pid) if c.pid else 0
            ours = our_pids()
        finally:
            if soaker:
                kept_rate = soaker.stop()
        time.sleep(0.3)  # in flight
        got = self.topo.sink_read()
        drops = [b - a for a, b in zip(sn0, softnet_drops(), strict=True)]
        sent = int(g["ok"])
        rec: dict[str, Any] = {
            "who": c.name,
            "n": c.n,
            "rate": rate,
            "secs": secs,
            "sent": sent,
            "gen_pps": round(g["pps"]),
            "delivered": got,
            "delivered_pps": round(got / g["dur_s"]) if g["dur_s"] else 0,
            "loss": round(1 - got / sent, 6) if sent else None,
            "busy_relay": busy(ct0, ct1, RELAY_CPU, dt),
            "busy_gen": busy(ct0, ct1, GEN_CPU, dt),
            "proc_cpu": round((p1 - p0) / USER_HZ / dt * 100, 1) if c.pid else None,
            "foreign_cpu": foreign_cpu(ps0, ps1, ours, dt),
            "backlog_drops": drops,
        }
        if soaker:
            # The soaker (SCHED_IDLE) only gets what the relay leaves: cost = its lost rate.
            cost = 100 * (1 - kept_rate / idle_rate) if idle_rate else 100.0
            rec["cost"] = round(cost, 1)
            rec["soak_idle_rate"] = round(idle_rate)
            rec["soak_kept_rate"] = round(kept_rate)
            rec["us_per_packet"] = round(cost / 100 / g["pps"] * 1e6, 2) if g["pps"] else None
        loss = rec["loss"]
        rec["gen_short"] = rate > 0 and g["pps"] < RATE_MIN_OK * rate
        rec["ok"] = loss is not None and loss < LOSS_MAX and not rec["gen_short"]
        return rec

    # -- phases --

    def phase_gen(self) -> None:
        """The generator flat out into a drop rule at R's ingress: what it can offer (the best
        of 1 + retries windows: other sessions' load only ever lowers it)."""
        self.topo.nft(self.topo.r, RDROP_NFT)
        try:
            best: dict[str, Any] = {}
            for _ in range(self.profile.retries + 1):
                self.wait_quiet()
                ct0, ps0 = cpu_times(), snapshot()
                t0 = time.monotonic()
                g = self.g.send(
                    self.profile.flows, B_IP, 0, self.profile.step_s, {"dport": B_PORT, "dstep": 2}
                )
                dt = time.monotonic() - t0
                rec = {
                    "phase": "gen",
                    "who": "rtpgen",
                    "n": self.profile.flows,
                    "gen_pps": round(g["pps"]),
                    "busy_gen": busy(ct0, cpu_times(), GEN_CPU, dt),
                    "foreign_cpu": foreign_cpu(ps0, snapshot(), our_pids(), dt),
                }
                if rec["gen_pps"] > best.get("gen_pps", -1):
                    best = rec
            self.emit(best)
        finally:
            self.topo.nft(self.topo.r, args=["delete", "table", "ip", "bench_rdrop"], check=False)

    def measure(self, c: Contender, rate: int, secs: float, soak: bool = False) -> dict[str, Any]:
        """A window from a fresh contender; measured again (up to `retries` times) when it
        failed while other processes used more than NOISY % of a core: the machine is shared."""
        for attempt in range(1, self.profile.retries + 2):
            self.wait_quiet()
            with self.contender(c) as (dst, target):
                rec = self.window(c, dst, target, rate, secs, soak)
            rec["attempt"] = attempt
            noisy = rec["foreign_cpu"] > NOISY
            if not noisy or (rec["ok"] and not soak) or attempt > self.profile.retries:
                return rec
            self.emit({"phase": "noisy", **rec})
        return rec

    def phase_steps(self, c: Contender) -> dict[str, Any]:
        """The ladder up to the first window that loses >= 0.1 %, then bisection. A window
        where the generator fell short without loss is no failure: the ladder goes on (flat
        out last), and if nothing ever lost, the limit is the generator's (a lower bound)."""
        p = self.profile
        last_ok: dict[str, Any] | None = None
        first_bad: dict[str, Any] | None = None
        short_best = 0
        for rate in [*p.ladder, 0]:
            rec = self.measure(c, rate, p.step_s)
            self.emit({"phase": "step", **rec})
            if rec["loss"] is None or rec["loss"] >= LOSS_MAX:
                first_bad = rec
                break
            if rec["ok"] and rate:
                last_ok = rec
            else:
                short_best = max(short_best, rec["delivered_pps"])
        if first_bad is not None:
            lo = last_ok["rate"] if last_ok else 0
            hi = first_bad["rate"] or first_bad["gen_pps"]
            for _ in range(p.bisect):
                mid = int((lo + hi) / 2 / 1000) * 1000 or (lo + hi) // 2
                if mid <= lo or mid >= hi:
                    break
                rec = self.measure(c, mid, p.step_s)
                self.emit({"phase": "step", **rec})
                if rec["ok"]:
                    lo, last_ok = mid, rec
                else:
                    hi = mid
        gen_bound = first_bad is None
        ok_rate = last_ok["rate"] if last_ok else 0
        best = max(ok_rate, short_best)  # a window short of its rate still relayed without loss
        rec = {
            "phase": "max",
            "who": c.name,
            "n": c.n,
            "max_pps": best,
            "gen_bound": gen_bound,
            "first_fail_rate": first_bad["rate"] if first_bad else None,
            "first_fail_loss": first_bad["loss"] if first_bad else None,
        }
        self.emit(rec)
        return rec

    def phase_cpu(self, c: Contender, limit: dict[str, Any] | None) -> None:
        """Soaker windows: at the common load, and at a high load for the contenders that
        relay it with room to spare (cost per packet falls as batches grow: compare at the
        same load only)."""
        p = self.profile
        rec = self.cpu_windows(c, p.cpu_pps, p.cpu_s)
        self.emit({"phase": "cpu", **rec})
        if limit and limit["max_pps"] >= 1.25 * p.cpu_hi_pps:
            rec = self.cpu_windows(c, p.cpu_hi_pps, p.cpu_s)
            self.emit({"phase": "cpu_hi", **rec})

    def cpu_windows(self, c: Contender, rate: int, secs: float) -> dict[str, Any]:
        """The soaker's window, and the same load without it: the relay core's busy time
        from /proc/stat ("direct", the idle method: it includes the halt and wake-up costs
        a never-idle core does not pay)."""
        rec = self.measure(c, rate, secs, soak=True)
        idle = self.measure(c, rate, secs)
        rec["direct"] = idle["busy_relay"]
        pps = idle["gen_pps"]
        rec["us_per_packet_direct"] = (
            round(idle["busy_relay"] / 100 / pps * 1e6, 2) if pps else None
        )
        return rec

    def phase_rtt(self, c: Contender) -> None:
        p = self.profile
        self.wait_quiet()
        self.topo.b_drop(False)  # the echo answers
        try:
            with self.contender(c) as (dst, target):
                echo = self.g.echo(c.n, p.rtt_s + 5)
                try:
                    time.sleep(0.3)
                    g = self.g.send(c.n, dst, p.rtt_pps, p.rtt_s, target, rtt=True)
                finally:
                    echo.send_signal(signal.SIGTERM)
                    echo.wait(10)
        finally:
            self.topo.b_drop(True)
        self.emit(
            {
                "phase": "rtt",
                "who": c.name,
                "n": c.n,
                "rate": p.rtt_pps,
                "sent": g["ok"],
                "rtt_n": g["rtt_n"],
                "rtt_us": g["rtt_us"],
            }
        )

    def phase_overload(self, c: Contender, limit: dict[str, Any]) -> None:
        """Past saturation: loss against the excess, then does every stream recover?"""
        p = self.profile
        knee = int(limit["max_pps"]) or p.ladder[0]
        offered = 0 if limit["gen_bound"] else 2 * knee
        low = max(knee // 4, 2 * c.n)
        self.wait_quiet()
        with self.contender(c) as (dst, target):
            over = self.window(c, dst, target, offered, p.step_s)
            self.drain()
            self.topo.sink(per_flow=True)
            after = self.window(c, dst, target, low, p.step_s)
            streams = self.topo.sink_flows()
            self.topo.sink()
        excess = max(0.0, 1 - knee / over["gen_pps"]) if over["gen_pps"] else 0.0
        self.emit(
            {
                "phase": "overload",
                "who": c.name,
                "n": c.n,
                "rate": offered,
                "gen_pps": over["gen_pps"],
                "loss": over["loss"],
                "excess": round(excess, 4),
                "saturated": not limit["gen_bound"],
                "recovery_rate": low,
                "recovery_loss": after["loss"],
                "streams_recovered": streams,
                "foreign_cpu": over["foreign_cpu"],
            }
        )

    def drain(self, most: float = 15.0) -> None:
        """Wait until nothing more arrives at B: a userspace relay's socket buffers can hold
        seconds of backlog after an overload, which must not count in the next window."""
        deadline = time.monotonic() + most
        self.topo.sink_read()
        while time.monotonic() < deadline:
            time.sleep(0.5)
            if self.topo.sink_read() == 0:
                return

    @contextlib.contextmanager
    def serving(self, c: Daemon) -> Iterator[int]:
        """A daemon started for the control phases, settled: its RSS before any call."""
        c.start()
        try:
            assert c.pid is not None
            time.sleep(1.0)
            yield rss_kib(c.pid)
        finally:
            c.down()

    def settled_rss(self, c: Daemon) -> int:
        """The daemon's RSS once the calls just set up have settled."""
        assert c.pid is not None
        time.sleep(1.0)
        return rss_kib(c.pid)

    def call_rate(self, c: Daemon, phase: str, live: int, rss: int, rss0: int, *args: str) -> None:
        """One closed-loop `cps` run of the client once the machine is quiet, recorded with
        the daemon's RSS per live call and other processes' CPU during it."""
        self.wait_quiet()
        ps0 = snapshot()
        t0 = time.monotonic()
        r = c.client("cps", *args)
        fc = foreign_cpu(ps0, snapshot(), our_pids(), time.monotonic() - t0)
        self.emit(
            {
                "phase": phase,
                "who": c.name,
                "live": live,
                **r,
                "rss_kib": rss,
                "kib_per_call": round((rss - rss0) / live, 2),
                "foreign_cpu": fc,
            }
        )

    def phase_control(self) -> None:
        """lrkp-tsl: `S`+`D` pairs/s and `S` -> `OK` at growing live calls; RSS per call."""
        p = self.profile
        c = Lrkp(self.topo, 0, self.work)
        c.ports = "1024-65535"
        with self.serving(c) as rss0:
            filled = 0
            for live in p.live:
                c.client("fill", str(filled), str(live), "--tag", "live")
                filled = live
                rss = self.settled_rss(c)
                for clients in p.clients:
                    pairs, tag = str(p.cps_pairs // clients), f"cps{live}-{clients}"
                    self.call_rate(
                        c, "control", live, rss, rss0,
                        pairs, "--clients", str(clients), "--base", str(live), "--tag", tag,
                    )  # fmt: skip

    def phase_ngcps(self) -> None:
        """rtpengine's ng: offer+answer+delete calls/s (1 and several clients) with live
        calls, offer -> reply latency, RSS per call; then lrkp-tsl serving ng (`--ng`), with
        the same client, calls and settings (or a note saying why it did not run)."""
        self.guarded(Rtpengine.name, self.ng_rate, Rtpengine(self.topo, 0, self.work))
        # rtpengine keeping its calls over a restart (Redis), as lrkp-tsl always does.
        if shutil.which("redis-server"):
            redis = RtpengineRedis(self.topo, 0, self.work)
            self.guarded(RtpengineRedis.name, self.ng_rate, redis)
        else:
            self.emit({"phase": "ngcps_skipped", "who": RtpengineRedis.name,
                       "reason": "redis-server is not installed"})  # fmt: skip
        missing = LrkpNg.missing()
        if missing is not None:
            self.emit({"phase": "ngcps_skipped", "who": LrkpNg.name, "reason": missing})
            return
        self.guarded(LrkpNg.name, self.ng_rate, LrkpNg(self.topo, 0, self.work))

    def ng_rate(self, c: Rtpengine | LrkpNg) -> None:
        p = self.profile
        if isinstance(c, Rtpengine):
            c.ports = (10000, 59999)
        else:
            c.ports = "10000-59999"
        with self.serving(c) as rss0:
            portfile = str(self.work / f"ng-live-ports-{c.name}.txt")
            c.client("calls", str(p.ng_live), portfile, "--tag", "live")
            rss = self.settled_rss(c)
            for clients in p.clients:
                calls, tag = str(p.ng_calls // clients), f"cps-{clients}"
                self.call_rate(
                    c, "ngcps", p.ng_live, rss, rss0,
                    calls, "--clients", str(clients), "--tag", tag,
                )  # fmt: skip

    def guarded(self, who: str, phase: Callable[..., Any], *args: Any) -> Any:
        """A phase that fails is recorded (and the run goes on): one broken contender must not
        lose the figures of the others."""
        try:
            return phase(*args)
        except (RuntimeError, OSError, subprocess.SubprocessError, ValueError, KeyError) as e:
            self.emit({"phase": "error", "who": who, "in": phase.__name__, "error": str(e)[-2000:]})
            return None

    def run(self, contenders: list[str], phases: list[str]) -> None:
        ladder = os.environ.get("BENCH_LADDER")  # e.g. 100000,200000: one ladder, by hand
        if ladder:
            self.profile.ladder = [int(x) for x in ladder.split(",")]
        self.topo.up()
        try:
            self.topo.sink()
            self.topo.b_drop(True)
            self.gen = Gen(self.topo, self.work)
            self.emit({"phase": "meta", **machine()})
            if "gen" in phases:
                self.guarded("rtpgen", self.phase_gen)
            for name in contenders:
                c = KINDS[name](self.topo, self.profile.flows, self.work)
                limit = self.guarded(name, self.phase_steps, c) if "steps" in phases else None
                if "cpu" in phases:
                    self.guarded(name, self.phase_cpu, c, limit)
                if "rtt" in phases:
                    self.guarded(name, self.phase_rtt, c)
                if "overload" in phases and limit:
                    self.guarded(name, self.phase_overload, c, limit)
            if "control" in phases:
                self.guarded("lrkp", self.phase_control)
            if "ngcps" in phases:
                self.phase_ngcps()  # each server guarded on its own
        finally:
            self.topo.down()
