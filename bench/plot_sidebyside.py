"""The side-by-side summary (bench/sidebyside.py's JSON) as one PNG.

Run with Debian's interpreter (python3-matplotlib): /usr/bin/python3 plot_sidebyside.py IN OUT
"""

from __future__ import annotations

import json
import sys
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from sbs_names import BY_NAME, CONTENDERS

ORDER = CONTENDERS
LABELS = {name: names.short for name, names in BY_NAME.items()}
COLOURS = {name: names.colour for name, names in BY_NAME.items()}


def bars(ax: Any, s: dict[str, Any], key: str, title: str, unit: str) -> None:
    by = s["contenders"]
    names = [n for n in ORDER if n in by]
    values = [by[n].get(key) or 0 for n in names]
    ax.bar([LABELS[n] for n in names], values, color=[COLOURS[n] for n in names])
    for i, n in enumerate(names):
        mark = "≥" if key == "max_pps" and by[n].get("max_gen_bound") else ""
        text = f"{values[i]:,.0f}" if values[i] >= 10 else f"{values[i]:.2f}"
        ax.annotate(mark + text, (i, values[i]), ha="center", va="bottom", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(unit)
    ax.tick_params(axis="x", labelsize=8)


def main() -> int:
    with open(sys.argv[1]) as f:
        s = json.load(f)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    bars(axes[0][0], s, "max_pps", "Highest load relayed with < 0.1 % loss", "packets/s")
    ax = axes[0][1]
    by = s["contenders"]
    names = [n for n in ORDER if n in by]
    xs = range(len(names))
    lo = [by[n].get("us_per_packet_direct") or 0 for n in names]
    hi = [by[n].get("us_per_packet_hi_direct") or 0 for n in names]
    rate = next((by[n]["cpu_rate"] for n in names if by[n].get("cpu_rate")), 0)
    hi_rate = next((by[n]["cpu_hi_rate"] for n in names if by[n].get("cpu_hi_rate")), 0)
    colours = [COLOURS[n] for n in names]
    ax.bar([x - 0.2 for x in xs], lo, 0.4, color=colours, label=f"at {rate:,} pps")
    ax.bar([x + 0.2 for x in xs], hi, 0.4, color=colours, alpha=0.5, label=f"at {hi_rate:,} pps")
    for x, v in zip(xs, lo, strict=True):
        ax.annotate(f"{v:.2f}", (x - 0.2, v), ha="center", va="bottom", fontsize=7)
    for x, v in zip(xs, hi, strict=True):
        if v:
            ax.annotate(f"{v:.2f}", (x + 0.2, v), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs), [LABELS[n] for n in names], fontsize=8)
    ax.set_title("Relay-core CPU per packet (1 core, busy time; light: high load)", fontsize=10)
    ax.set_ylabel("µs")
    ax = axes[1][0]
    ax.bar(
        [x - 0.2 for x in xs],
        [by[n].get("rtt_p50") or 0 for n in names],
        0.4,
        label="p50",
        color=[COLOURS[n] for n in names],
    )
    ax.bar(
        [x + 0.2 for x in xs],
        [by[n].get("rtt_p99") or 0 for n in names],
        0.4,
        label="p99",
        color=[COLOURS[n] for n in names],
        alpha=0.5,
    )
    ax.set_xticks(list(xs), [LABELS[n] for n in names], fontsize=8)
    ax.set_title("Round trip through the relay (p50 solid, p99 light)", fontsize=10)
    ax.set_ylabel("µs")
    ax = axes[1][1]
    # One style per client count, shared by both servers: each line meets its rtpengine line.
    counts = sorted({r["clients"] for r in s["control"]} | {r["clients"] for r in s["ngcps"]})
    styles = dict(zip(counts, [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-.")], strict=False))
    for clients in sorted({r["clients"] for r in s["control"]}):
        rows = [r for r in s["control"] if r["clients"] == clients]
        marker, line = styles.get(clients, ("o", "-"))
        ax.plot(
            [r["live"] for r in rows],
            [r["pairs_per_s"] for r in rows],
            marker=marker,
            linestyle=line,
            color=COLOURS["lrkp"],
            label=f"lrkp-tsl S+D, {clients} client{'s' if clients > 1 else ''}",
        )
    # ng offer+answer+delete: rtpengine's, and lrkp-tsl's own ng (`--ng`) when it ran.
    ng_servers = {
        "rtpengine": ("rtpengine", 0.7, "rtpengine"),
        "rtpengine_redis": ("rtpengine+Redis", 0.35, "rtpengine"),
        "lrkp_ng": ("lrkp-tsl ng", 0.4, "lrkp"),
    }
    for r in s["ngcps"]:
        server, alpha, colour = ng_servers[r.get("who", "rtpengine")]
        ax.axhline(
            r["calls_per_s"],
            color=COLOURS[colour],
            linestyle=styles.get(r["clients"], ("o", "--"))[1],
            alpha=alpha,
            label=f"{server} o+a+d, {r['clients']} client(s), {r['live']:,} live",
        )
    ax.set_xscale("log")
    lives = sorted({r["live"] for r in s["control"]})
    ax.set_xticks(lives, [f"{v:,}" for v in lives])
    ax.minorticks_off()
    ax.set_xlabel("live calls")
    ax.set_ylabel("calls/s")
    ax.set_ylim(bottom=0)
    ax.set_title("Call setups per second", fontsize=10)
    ax.legend(fontsize=7)
    m = s["machine"]
    fig.suptitle(
        f"lrkp-tsl side by side ({s['profile']}, {m.get('date', '')}; {m.get('cpu', '')}, "
        f"{m.get('nproc')} CPUs; other load median {s['foreign_cpu']['median']} % of a core)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=100)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
