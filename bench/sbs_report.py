"""The side-by-side summary: figures per contender, ratios, and the Markdown table."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import statistics
import subprocess
import time
from typing import Any

from sbs_lab import GEN_CPU, RELAY_CPU, sh
from sbs_names import BY_NAME, CONTENDERS

LABELS = {name: names.label for name, names in BY_NAME.items()}


NG_SERVERS = {
    "rtpengine": "rtpengine",
    "rtpengine_redis": "rtpengine + Redis",
    "lrkp_ng": "lrkp-tsl (ng)",
}
"""The ng call-rate rows, in the report's order. rtpengine + Redis keeps its calls over a
restart (each offer and answer written to Redis), as lrkp-tsl does with SQLite."""


def rtpengine_version() -> str:
    if not shutil.which("rtpengine"):
        return ""
    r = subprocess.run(["rtpengine", "--version"], capture_output=True, text=True, check=False)
    return (r.stdout + r.stderr).strip().splitlines()[0] if (r.stdout + r.stderr).strip() else ""


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    mem = 0
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) // 1024
    os_name = ""
    with contextlib.suppress(OSError), open("/etc/os-release") as f:
        os_name = next(
            (ln.split("=", 1)[1].strip().strip('"') for ln in f if ln.startswith("PRETTY_NAME=")),
            "",
        )
    rtpengine = rtpengine_version()
    return {
        "cpu": model,
        "nproc": os.cpu_count(),
        "mem_mib": mem,
        "kernel": platform.release(),
        "os": os_name,
        "python": platform.python_version(),
        "nft": sh(["nft", "--version"], check=False).strip(),
        "rtpengine": rtpengine,
        "gen_cpu": GEN_CPU,
        "relay_cpu": RELAY_CPU,
        "loadavg": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or not base:
        return None
    return round(value / base, 2)


def summarize(records: list[dict[str, Any]], profile: str) -> dict[str, Any]:
    """Every figure per contender, with its ratio to route and to rtpengine of the same run."""
    by: dict[str, dict[str, Any]] = {}
    meta: dict[str, Any] = {}
    gen: dict[str, Any] = {}
    control: list[dict[str, Any]] = []
    ngcps: list[dict[str, Any]] = []
    ng_skipped: list[dict[str, Any]] = []
    foreign: list[float] = []
    errors: list[dict[str, Any]] = []
    for r in records:
        ph, who = r["phase"], r.get("who", "")
        if "foreign_cpu" in r:
            foreign.append(r["foreign_cpu"])
        if ph == "meta":
            meta = r
        elif ph == "gen":
            gen = r
        elif ph == "max":
            by.setdefault(who, {})["max_pps"] = r["max_pps"]
            by[who]["max_gen_bound"] = r["gen_bound"]
        elif ph == "cpu":
            by.setdefault(who, {}).update(
                cpu_cost=r.get("cost"),
                us_per_packet=r.get("us_per_packet"),
                cpu_direct=r.get("direct"),
                us_per_packet_direct=r.get("us_per_packet_direct"),
                cpu_rate=r["rate"],
                cpu_loss=r["loss"],
            )
        elif ph == "cpu_hi":
            by.setdefault(who, {}).update(
                us_per_packet_hi=r.get("us_per_packet"),
                us_per_packet_hi_direct=r.get("us_per_packet_direct"),
                cpu_hi_rate=r["rate"],
            )
        elif ph == "rtt":
            by.setdefault(who, {}).update(rtt_p50=r["rtt_us"]["p50"], rtt_p99=r["rtt_us"]["p99"])
        elif ph == "overload":
            by.setdefault(who, {}).update(
                over_rate=r["gen_pps"],
                over_loss=r["loss"],
                over_excess=r["excess"],
                over_saturated=r["saturated"],
                recovered=r["streams_recovered"],
                recovery_loss=r["recovery_loss"],
            )
        elif ph == "error":
            errors.append(r)
        elif ph == "control":
            control.append(r)
        elif ph == "ngcps":
            ngcps.append(r)
        elif ph == "ngcps_skipped":
            ng_skipped.append(r)
    route, rtp = by.get("route", {}), by.get("rtpengine", {})
    for row in by.values():
        if "rtt_p50" in row and "rtt_p50" in route:
            row["added_p50"] = row["rtt_p50"] - route["rtt_p50"]
            row["added_p99"] = row["rtt_p99"] - route["rtt_p99"]
        for key in (
            "max_pps",
            "us_per_packet",
            "us_per_packet_direct",
            "us_per_packet_hi",
            "us_per_packet_hi_direct",
            "rtt_p50",
            "rtt_p99",
        ):
            row[f"{key}_vs_route"] = ratio(row.get(key), route.get(key))
            row[f"{key}_vs_rtpengine"] = ratio(row.get(key), rtp.get(key))
        if row.get("over_saturated") and row.get("over_excess"):
            row["over_proportion"] = round((row["over_loss"] or 0) / row["over_excess"], 2)
    ng_by_clients = {r["clients"]: r for r in ngcps if r["who"] == "rtpengine"}
    for r in control:
        ng = ng_by_clients.get(r["clients"])  # rtpengine with as many clients
        r["vs_rtpengine"] = ratio(r["pairs_per_s"], ng["calls_per_s"]) if ng else None
    redis_by_clients = {r["clients"]: r for r in ngcps if r["who"] == "rtpengine_redis"}
    for r in ngcps:
        ng = ng_by_clients.get(r["clients"])
        r["vs_rtpengine"] = ratio(r["calls_per_s"], ng["calls_per_s"]) if ng else None
        kept = redis_by_clients.get(r["clients"])  # rtpengine keeping calls over a restart
        r["vs_rtpengine_redis"] = ratio(r["calls_per_s"], kept["calls_per_s"]) if kept else None
    return {
        "profile": profile,
        "machine": meta,
        "gen": gen,
        "contenders": by,
        "control": control,
        "errors": errors,
        "ngcps": ngcps,
        "ngcps_skipped": ng_skipped,
        "foreign_cpu": {
            "median": statistics.median(foreign) if foreign else None,
            "max": max(foreign) if foreign else None,
        },
    }


def fmt(v: Any, unit: str = "", digits: int = 0) -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and digits:
        return f"{v:,.{digits}f}{unit}"
    if isinstance(v, int | float):
        return f"{round(v):,}{unit}"
    return str(v)


def markdown(s: dict[str, Any]) -> str:
    m, by = s["machine"], s["contenders"]
    names = [n for n in CONTENDERS if n in by]
    out = [
        f"# Side by side ({s['profile']} profile, {m.get('date', '')})",
        "",
        f"Machine: {m.get('cpu')}, {m.get('nproc')} CPUs, {m.get('mem_mib')} MiB; "
        f"{m.get('os')}, kernel {m.get('kernel')}; {m.get('nft')}; {m.get('rtpengine')}; "
        f"Python {m.get('python')}. Relay pinned to CPU {m.get('relay_cpu')}, generator and "
        f"sink on CPU {m.get('gen_cpu')}. Load average at start {m.get('loadavg', 0):.2f}; "
        f"other processes used {fmt(s['foreign_cpu']['median'], ' %', 1)} of a core "
        f"(median of windows, max {fmt(s['foreign_cpu']['max'], ' %', 1)}).",
        "",
        f"Generator (rtpgen, AF_PACKET, {fmt(s['gen'].get('n'))} streams) into a drop rule at "
        f"the relay: **{fmt(s['gen'].get('gen_pps'))} pps**. `≥`: the generator, not the "
        "relay, was the limit.",
        "",
        "| figure | " + " | ".join(LABELS[n] for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]

    def row(title: str, cell: Any) -> None:
        out.append(f"| {title} | " + " | ".join(cell(by[n]) for n in names) + " |")

    def maxcell(r: dict[str, Any]) -> str:
        return ("≥ " if r.get("max_gen_bound") else "") + fmt(r.get("max_pps"))

    row("highest load with < 0.1 % loss, pps", maxcell)
    row(
        "… ratio to routing / to rtpengine",
        lambda r: (
            f"{fmt(r.get('max_pps_vs_route'), '', 2)} / {fmt(r.get('max_pps_vs_rtpengine'), '', 2)}"
        ),
    )
    cpu_rate = next((r.get("cpu_rate") for r in by.values() if r.get("cpu_rate")), None)
    hi_rate = next((r.get("cpu_hi_rate") for r in by.values() if r.get("cpu_hi_rate")), None)
    # Busy time from /proc/stat (no soaker) is the CPU figure: the soaker's loop rate, which
    # would leave out wake-up costs, varies by up to 40 % between seconds on this VM even on
    # an idle core (docs/benchmarks.md), so it is shown last, for reference only.
    row(
        f"relay-core busy at {fmt(cpu_rate)} pps (/proc/stat)",
        lambda r: fmt(r.get("cpu_direct"), " %", 1),
    )
    row(
        "CPU per million packets, core-s (= µs/packet)",
        lambda r: fmt(r.get("us_per_packet_direct"), "", 2),
    )
    row(
        "… ratio to routing / to rtpengine",
        lambda r: (
            f"{fmt(r.get('us_per_packet_direct_vs_route'), '', 2)} / "
            f"{fmt(r.get('us_per_packet_direct_vs_rtpengine'), '', 2)}"
        ),
    )
    row(
        f"CPU per packet at {fmt(hi_rate)} pps, µs",
        lambda r: (
            fmt(r.get("us_per_packet_hi_direct"), "", 2)
            if r.get("us_per_packet_hi_direct") is not None
            else "— (limit too low)"
        ),
    )
    row(
        "… ratio to routing",
        lambda r: fmt(r.get("us_per_packet_hi_direct_vs_route"), "", 2),
    )
    row(
        f"soaker's loop rate (unreliable here), µs/packet at {fmt(cpu_rate)} / {fmt(hi_rate)} pps",
        lambda r: f"{fmt(r.get('us_per_packet'), '', 2)} / {fmt(r.get('us_per_packet_hi'), '', 2)}",
    )
    row("round trip p50 / p99, µs", lambda r: f"{fmt(r.get('rtt_p50'))} / {fmt(r.get('rtt_p99'))}")
    row(
        "added over routing p50 / p99, µs",
        lambda r: f"{fmt(r.get('added_p50'))} / {fmt(r.get('added_p99'))}",
    )
    row(
        "… p50 ratio to routing / to rtpengine",
        lambda r: (
            f"{fmt(r.get('rtt_p50_vs_route'), '', 2)} / {fmt(r.get('rtt_p50_vs_rtpengine'), '', 2)}"
        ),
    )

    def over(r: dict[str, Any]) -> str:
        if r.get("over_rate") is None:
            return "—"
        loss = fmt((r.get("over_loss") or 0) * 100, " %", 1)
        if not r.get("over_saturated"):
            return f"not saturated: flat out {fmt(r['over_rate'])} pps, loss {loss}"
        return (
            f"{fmt(r['over_rate'])} pps: loss {loss} for an excess of "
            f"{fmt(r['over_excess'] * 100, ' %', 1)} (x {fmt(r.get('over_proportion'), '', 2)})"
        )

    row("past saturation (2x the limit)", over)
    flows = s["gen"].get("n")

    def recovery(r: dict[str, Any]) -> str:
        if r.get("recovered") is None:
            return "—"
        loss = r.get("recovery_loss") or 0
        if loss < 0:  # more arrived than was sent: the overload's backlog, delivered late
            return f"{fmt(r['recovered'])}, {fmt(-loss * 100, ' %', 0)} more than sent (backlog)"
        return f"{fmt(r['recovered'])}, {fmt(loss * 100, ' %', 2)}"

    row("streams delivering after it (of " + fmt(flows) + "), loss", recovery)
    if not names:  # no packet phase ran (`--phases ngcps`): title and machine only
        out = out[:3]
    out += [
        "",
        "Call setup (closed loop, one command in flight per client; lrkp-tsl: `S`+`D` "
        "pairs, `OK` after the kernel commit; rtpengine and lrkp-tsl (ng): "
        "`offer`+`answer`+`delete` calls from the same client, bench/ngclient.py):",
        "",
        "| server | live calls | clients | calls/s | ratio to rtpengine / to rtpengine + "
        "Redis | `S`→`OK` / `offer` p50 / p99 ms | daemon RSS per live call |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(s["ngcps"], key=lambda r: list(NG_SERVERS).index(r["who"])):
        out.append(
            f"| {NG_SERVERS[r['who']]} | {fmt(r['live'])} | {r['clients']} | "
            f"{fmt(r['calls_per_s'])} | {fmt(r.get('vs_rtpengine'), '', 2)} / "
            f"{fmt(r.get('vs_rtpengine_redis'), '', 2)} "
            f"| {r['offer_ms']['p50']} / {r['offer_ms']['p99']} | "
            f"{fmt(r['kib_per_call'], ' KiB', 1)} |"
        )
    for r in s["control"]:
        out.append(
            f"| lrkp-tsl | {fmt(r['live'])} | {r['clients']} | {fmt(r['pairs_per_s'])} | "
            f"{fmt(r.get('vs_rtpengine'), '', 2)} / — | {r['s_ms']['p50']} / {r['s_ms']['p99']} "
            f"| {fmt(r['kib_per_call'], ' KiB', 1)} |"
        )
    for skipped in s.get("ngcps_skipped", []):
        who = NG_SERVERS.get(skipped["who"], skipped["who"])
        out += ["", f"**Not run:** {who}: {skipped['reason']}."]
    for e in s.get("errors", []):
        out += ["", f"**Failed:** {e['who']} in {e['in']}: `{e['error'][-300:]}`"]
    out += [
        "",
        "Method and how to read it: docs/benchmarks.md. Raw windows: raw/ (not committed).",
        "",
    ]
    return "\n".join(out)
