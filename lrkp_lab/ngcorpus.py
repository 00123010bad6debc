"""The corpus of ng exchanges (tests/ng_corpus/*.json) and how one is played to a relay.

A case is a JSON file: `about`, `steps` (each an ng message without `call-id`, with its
SDP as a list of lines, joined with CRLF), and `differences`: the differences of meaning
from rtpengine that are expected, each text (lrkp_lab/sdpdiff.py's `Difference.text`)
mapped to why. Offers and answers get the keys Kamailio's default config sends
(`rtpengine_manage("replace-origin replace-session-connection ICE=remove ...")`:
`replace`, `ICE`, `supports`, `sip-message-type`, `received-from` from the step's
`received-from` address); a step sets `"ICE": null` to leave a key out.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lrkp_lab.ngpeer import NgPeer
from lrkp_lab.sdpdiff import Difference, PortNames, compare

CORPUS = Path(__file__).resolve().parents[1] / "tests" / "ng_corpus"

KAMAILIO_DEFAULTS: Mapping[str, Any] = {
    "supports": ["load limit"],
    "replace": ["origin", "session-connection"],
    "ICE": "remove",
}


@dataclass(frozen=True)
class Case:
    name: str
    about: str
    steps: list[dict[str, Any]]
    differences: dict[str, str]


def load(path: Path) -> Case:
    data = json.loads(path.read_text())
    return Case(path.stem, data["about"], data["steps"], data.get("differences", {}))


def cases() -> list[Case]:
    return [load(path) for path in sorted(CORPUS.glob("*.json"))]


def message(step: Mapping[str, Any], call_id: str) -> dict[str, Any]:
    """The ng message a step stands for, as Kamailio would send it."""
    out: dict[str, Any] = {"call-id": call_id}
    if step["command"] in ("offer", "answer"):
        out.update(KAMAILIO_DEFAULTS)
        out["sip-message-type"] = "sip_request" if step["command"] == "offer" else "sip_reply"
    for key, value in step.items():
        if key == "sdp":
            out["sdp"] = "".join(line + "\r\n" for line in value)
        elif key == "received-from":
            out["received-from"] = ["IP4", value]
        elif value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def play(case: Case, peer: NgPeer) -> list[dict[str, Any]]:
    """Every reply of `peer` to the case's steps, in order (a fresh Call-ID per play)."""
    call_id = f"{case.name}-{secrets.token_hex(4)}@corpus"
    return [peer.request(message(step, call_id)) for step in case.steps]


def differences(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> list[Difference]:
    """Differences of meaning between two plays of one case (ours, then rtpengine's)."""
    found: list[Difference] = []
    our_ports, their_ports = PortNames(), PortNames()
    for number, (mine, other) in enumerate(zip(ours, theirs, strict=True), 1):
        if mine.get("result") != other.get("result"):
            found.append(
                Difference(
                    number,
                    "result",
                    f"ours {mine.get('result')!r} ({mine.get('error-reason', '')}), rtpengine's "
                    f"{other.get('result')!r} ({other.get('error-reason', '')})",
                )
            )
            continue
        if ("warning" in mine) != ("warning" in other):
            found.append(
                Difference(
                    number,
                    "warning",
                    f"ours {mine.get('warning')!r}, rtpengine's {other.get('warning')!r}",
                )
            )
        if "sdp" in mine or "sdp" in other:
            found += compare(
                number, mine.get("sdp", ""), other.get("sdp", ""), our_ports, their_ports
            )
    return found
