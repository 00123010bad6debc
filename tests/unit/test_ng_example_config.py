"""examples/kamailio-rtpengine.cfg (what the ng e2e tests run) and docs/ng.md agree, and the
flags the example sends are ones the node honours."""

from __future__ import annotations

import re
from pathlib import Path

from lrkp_tsl.ng import flags

ROOT = Path(__file__).resolve().parents[2]
CFG = ROOT / "examples" / "kamailio-rtpengine.cfg"
DOC = ROOT / "docs" / "ng.md"
BASE_FLAGS = "replace-origin replace-session-connection ICE=remove"


def section(title: str) -> str:
    text = DOC.read_text()
    start = text.index(f"## {title}\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def code_blocks(text: str) -> list[str]:
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def significant(line: str) -> str:
    """A config line without its comment and surrounding blanks ('' for none)."""
    return re.sub(r"\s+#.*$", "", line).strip()


def test_the_docs_kamailio_excerpt_is_in_the_example_in_order() -> None:
    (excerpt,) = [block for block in code_blocks(section("Kamailio")) if "route[NG]" in block]
    cfg = [significant(line) for line in CFG.read_text().splitlines()]
    at = 0
    for line in map(significant, excerpt.splitlines()):
        if line in ("", "..."):
            continue
        assert line in cfg[at:], f"docs/ng.md shows {line!r}, not in {CFG.name} (in order)"
        at = cfg.index(line, at) + 1


def test_the_example_composes_the_flags_the_doc_names() -> None:
    text = CFG.read_text()
    assert f'$var(ng) = "{BASE_FLAGS} direction="' in text
    assert '$var(ng) = "SIP-source-address " + $var(ng);' in text
    assert 'rtpengine_manage("$var(ng)")' in text
    assert text.count('rtpengine_manage("') == 1  # one place sends every command


def test_the_opensips_example_uses_the_same_flags() -> None:
    (block,) = code_blocks(section("OpenSIPS"))
    used = re.findall(r'rtpengine_(?:offer|answer)\("([^"]*)"\)', block)
    assert len(used) == 2
    for flag_string in used:
        assert flag_string.startswith(BASE_FLAGS + " direction="), flag_string


def test_every_flag_the_example_sends_is_honoured_by_the_node() -> None:
    sent = [
        (flags.Kind.REPLACE, "origin"),  # replace-origin
        (flags.Kind.REPLACE, "session-connection"),  # replace-session-connection
        (flags.Kind.VALUE, "ICE=remove"),
        (flags.Kind.KEY, "direction"),
        (flags.Kind.KEY, "received-from"),  # the module adds it to every command
        (flags.Kind.FLAG, "SIP-source-address"),
    ]
    for kind, name in sent:
        entry = flags.lookup(kind, name)
        assert entry is not None, name
        assert entry.disposition is flags.Disposition.HONOURED, (name, entry.disposition)
    for key in ("supports", "sip-message-type"):  # sent by the module, harmless
        entry = flags.lookup(flags.Kind.KEY, key)
        assert entry is not None and entry.disposition is not flags.Disposition.REFUSED, key
