"""docs/ng.md's flag table is flags.py's table: every key and flag, its disposition, why."""

from __future__ import annotations

from pathlib import Path

from lrkp_tsl.ng import flags

DOC = Path(__file__).resolve().parents[2] / "docs" / "ng.md"


def table_in_doc() -> list[str]:
    lines = DOC.read_text().splitlines()
    start = lines.index("<!-- ng-flags:begin -->")
    end = lines.index("<!-- ng-flags:end -->")
    return lines[start + 1 : end]


def test_doc_table_is_generated_from_the_code() -> None:
    assert table_in_doc() == list(flags.markdown()), (
        "docs/ng.md's flag table is stale: regenerate it with python -m lrkp_tsl.ng.flags"
    )


def test_every_refusal_says_why() -> None:
    for entry in flags.TABLE:
        assert len(entry.why) > 15, entry.name
        if entry.disposition is flags.Disposition.REFUSED:
            assert entry.refusal().endswith(entry.why)


def test_the_refusals_the_issue_names_are_refused() -> None:
    """A kernel NAT relay cannot: ICE force/lite, SRTP/DTLS/SDES changes, transcoding and
    codec changes, T.38 gateway, recording, playing media, DTMF injection, IPv6."""
    refused = [
        (flags.Kind.VALUE, "ICE=force"),
        (flags.Kind.KEY, "ICE-lite"),
        (flags.Kind.KEY, "OSRTP"),
        (flags.Kind.VALUE, "DTLS=passive"),
        (flags.Kind.FLAG, "SDES-pad"),
        (flags.Kind.KEY, "codec"),
        (flags.Kind.FLAG, "codec-transcode-G722"),
        (flags.Kind.FLAG, "always-transcode"),
        (flags.Kind.KEY, "T.38"),
        (flags.Kind.FLAG, "record-call"),
        (flags.Kind.KEY, "file"),
        (flags.Kind.FLAG, "inject-DTMF"),
        (flags.Kind.VALUE, "address-family=IP6"),
    ]
    for kind, name in refused:
        entry = flags.lookup(kind, name)
        assert entry is not None and entry.disposition is flags.Disposition.REFUSED, name


def test_names_match_as_rtpengine_matches_them() -> None:
    assert flags.lookup(flags.Kind.FLAG, "SIP source address") is flags.lookup(
        flags.Kind.FLAG, "sip-source-address"
    )
    assert flags.lookup(flags.Kind.KEY, "received from") is flags.lookup(
        flags.Kind.KEY, "received-from"
    )
    assert flags.lookup(flags.Kind.FLAG, "no-such-flag") is None


def test_no_alias_is_only_a_spelling_of_its_name() -> None:
    for entry in flags.TABLE:
        names = [flags.normal(name) for name in (entry.name, *entry.aliases)]
        assert len(names) == len(set(names)), entry.name
