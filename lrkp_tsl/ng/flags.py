"""Every ng key and flag rtpengine 10.5 and Kamailio know, and what this node does with it.

One table (`TABLE`): the codec looks every key, flag and value of a request up here, and
docs/ng.md's flag table is generated from it (`python -m lrkp_tsl.ng.flags`; a unit test
checks the doc against it). Each entry is

- **honoured**: the node does what rtpengine does for a plain RTP call (the why says how,
  where it differs);
- **ignored**: accepted with no effect, because the effect is already the node's behaviour
  or does not apply to a kernel relay (the why says which);
- **refused**: the whole request gets `result: error` with an `error-reason` naming it: a
  kernel NAT relay cannot do it (ICE agent, SRTP/DTLS termination, transcoding and codec
  changes, T.38 gateway, recording, playing media, DTMF injection, IPv6), and an operator
  must never believe a feature is on when it is not.

A key, flag or value that is in no row is refused too ("unknown"), for the same reason.

Names are matched as rtpengine matches them: a space and a hyphen are the same, and case
does not matter ("SIP source address" = "sip-source-address"). Kinds:

- `key`: a key of the request dictionary; `value`: one value of a key (`ICE=remove`), or
  one item of a list-valued key (`SDES=off`);
- `flag`: an item of the `flags` list (what Kamailio's `rtpengine_manage("...")` turns
  bare words into); a `prefix` flag matches every flag that starts with it
  (`codec-strip-PCMA`);
- `replace`, `rtcp-mux`: items of those lists.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Final


class Kind(Enum):
    KEY = "key"
    VALUE = "value"
    FLAG = "flag"
    REPLACE = "replace"
    RTCP_MUX = "rtcp-mux"


class Disposition(Enum):
    HONOURED = "honoured"
    IGNORED = "ignored"
    REFUSED = "refused"


HON, IGN, REF = Disposition.HONOURED, Disposition.IGNORED, Disposition.REFUSED


@dataclass(frozen=True, slots=True)
class Entry:
    kind: Kind
    name: str  # rtpengine's spelling; for values "KEY=VALUE"
    disposition: Disposition
    why: str
    aliases: tuple[str, ...] = ()
    prefix: bool = False

    @property
    def label(self) -> str:
        """How an error-reason names it."""
        if self.kind is Kind.VALUE:
            return f"{self.name}..." if self.prefix else self.name
        if self.kind is Kind.KEY:
            return f"key '{self.name}'"
        if self.kind is Kind.FLAG:
            return f"flag '{self.name}{'...' if self.prefix else ''}'"
        return f"{self.kind.value} '{self.name}'"

    def refusal(self, given: str | None = None) -> str:
        """The error-reason of a request that uses it."""
        shown = self.label if given is None or given == self.name else f"{self.label} ({given})"
        return f"{shown} refused: {self.why}"


def normal(name: str) -> str:
    """rtpengine's matching: spaces as hyphens (str_hyphenate), and case-insensitive."""
    return name.replace(" ", "-").replace("_", "-").lower()


# Reasons shared by several rows.
_ICE_AGENT = "this relay is not an ICE agent (use ICE=remove)"
CRYPTO = (
    "this relay neither encrypts nor decrypts: an SDP's own SRTP/DTLS attributes pass "
    "through end to end, unchanged"
)
_CODECS = "this relay forwards packets as they are: no transcoding or codec changes"
_T38 = "no T.38 gateway: this relay passes an m=image udptl stream through as it is"
_RECORDING = "this relay records nothing"
_MEDIA = "this relay plays or generates no media"
_DTMF = "this relay neither detects, blocks nor injects DTMF"
_SUBSCRIPTIONS = "multi-party subscriptions (publish/subscribe) are not served"
_NO_ENCRYPTION_ADDED = (
    "this relay never adds encryption; an SDP's own crypto attributes pass through unchanged"
)

TABLE: Final[tuple[Entry, ...]] = (
    # --- request keys -----------------------------------------------------------------
    Entry(Kind.KEY, "command", HON, "ping, offer, answer, delete, query, list, statistics"),
    Entry(
        Kind.KEY,
        "call-id",
        HON,
        "the call: printable ASCII without spaces, at most 128 bytes (what a kernel map "
        "element's comment holds)",
    ),
    Entry(
        Kind.KEY,
        "from-tag",
        HON,
        "the tag of the side that sent the offer (in an answer too, as Kamailio sends it); "
        "a delete with only call-id and from-tag ends the whole call",
    ),
    Entry(
        Kind.KEY,
        "to-tag",
        HON,
        "answer: the answering side; an answer from a new to-tag (forking: a 183 then a 200 "
        "from another branch) takes the answering side over, on the same relay ports",
    ),
    Entry(
        Kind.KEY,
        "via-branch",
        IGN,
        "accepted and checked; a call has one answering side, so forked branches are not "
        "told apart by branch: the latest answer wins",
    ),
    Entry(Kind.KEY, "sdp", HON, "rewritten (docs/ng.md: What the SDP becomes)"),
    Entry(Kind.KEY, "flags", HON, "each item: see the flag rows"),
    Entry(Kind.KEY, "replace", HON, "each item: see the replace rows"),
    Entry(
        Kind.KEY,
        "direction",
        HON,
        "two interface names, the sender's then the receiver's: this node's are `internal` "
        "(internal_ip) and `external` (external_ip); kept for the call, changed by a later "
        "message that gives them",
    ),
    Entry(
        Kind.KEY,
        "received-from",
        HON,
        "[\"IP4\", address]: the SIP message's source; the party's media address with "
        "SIP-source-address",
    ),
    Entry(Kind.KEY, "ICE", HON, "see the ICE= rows; no key: as ICE=default"),
    Entry(
        Kind.KEY,
        "ICE-lite",
        REF,
        _ICE_AGENT,
    ),
    Entry(Kind.KEY, "rtcp-mux", HON, "each item: see the rtcp-mux rows"),
    Entry(
        Kind.KEY,
        "transport-protocol",
        HON,
        "only `accept`, or the protocol every active stream already has: any other would "
        "turn RTP/AVP into SRTP or back, and " + CRYPTO,
    ),
    Entry(
        Kind.KEY,
        "media-address",
        HON,
        "an IPv4 address: the party's media address instead of the SDP's",
    ),
    Entry(Kind.KEY, "address-family", HON, "see the address-family= rows"),
    Entry(
        Kind.KEY,
        "delete-delay",
        HON,
        "delete: seconds before the call ends (0: at once; without the key, the node's "
        "`ng_delete_delay`, 0 by default, as its lrkproxy `D` and rtpengine's "
        "--delete-delay=0)",
    ),
    Entry(Kind.KEY, "limit", HON, "list: how many Call-IDs at most (default 32)"),
    Entry(
        Kind.KEY,
        "supports",
        HON,
        "`load limit`: a draining node (`lrkp-ctl drain`) answers the offer of a call it "
        "does not have with `result: load limit` (without it: the error `Parallel session "
        "limit reached`), and Kamailio's module sends the offer to the next node of its set",
    ),
    Entry(
        Kind.KEY,
        "sip-message-type",
        IGN,
        "Kamailio 6.x says whether a request or a reply carried the SDP; the command says "
        "all the relay needs",
    ),
    Entry(
        Kind.KEY,
        "rtpp-flags",
        REF,
        "Kamailio 6.x's two-argument functions leave the flags to the relay to parse "
        "(rtpengine 12+); use the one-argument form, whose flags the module parses",
    ),
    Entry(
        Kind.KEY,
        "label",
        IGN,
        "a name for logs and statistics; not kept",
        ("from-label", "set-label", "to-label"),
    ),
    Entry(Kind.KEY, "SDES", HON, "see the SDES= rows"),
    Entry(Kind.KEY, "OSRTP", REF, CRYPTO),
    Entry(Kind.KEY, "DTLS", HON, "see the DTLS= rows"),
    Entry(Kind.KEY, "DTLS-reverse", REF, CRYPTO),
    Entry(Kind.KEY, "DTLS-fingerprint", REF, CRYPTO),
    Entry(
        Kind.KEY,
        "passthrough",
        IGN,
        "this relay only ever passes media through",
        ("passthru",),
    ),
    Entry(
        Kind.KEY,
        "endpoint-learning",
        REF,
        "the node learns a party's address as its latching policy says (README: Latching)",
    ),
    Entry(Kind.KEY, "record-call", HON, "see the record-call= rows"),
    Entry(Kind.KEY, "metadata", REF, _RECORDING),
    Entry(
        Kind.KEY,
        "TOS",
        REF,
        "the kernel relays packets as they are; no TOS/DSCP is set per call",
    ),
    Entry(Kind.KEY, "ptime", REF, _CODECS + " (repacketizing)"),
    Entry(
        Kind.KEY,
        "ptime-reverse",
        REF,
        _CODECS + " (repacketizing)",
        ("reverse ptime",),
    ),
    Entry(Kind.KEY, "codec", REF, _CODECS),
    Entry(Kind.KEY, "repacketize", REF, _CODECS + " (repacketizing)"),
    Entry(Kind.KEY, "T.38", REF, _T38, ("T38",)),
    Entry(Kind.KEY, "generate-RTCP", HON, "see the generate-RTCP= rows"),
    Entry(Kind.KEY, "media-echo", REF, _MEDIA),
    Entry(
        Kind.KEY,
        "drop-traffic",
        REF,
        "media is relayed by the kernel or not at all",
    ),
    Entry(
        Kind.KEY,
        "xmlrpc-callback",
        REF,
        "the node ends idle calls itself and calls no one back",
    ),
    Entry(
        Kind.KEY,
        "DTMF-security",
        REF,
        _DTMF,
        (
            "DTMF-security-trigger",
            "DTMF-security-trigger-end",
        ),
    ),
    Entry(
        Kind.KEY,
        "trigger",
        REF,
        _DTMF,
        (
            "trigger-end",
            "end trigger",
            "trigger-end-time",
            "end-trigger-time",
            "trigger-end-digits",
            "end-trigger-digits",
        ),
    ),
    Entry(Kind.KEY, "DTMF-delay", REF, _DTMF),
    Entry(Kind.KEY, "digit", REF, _DTMF, ("code", "frequency", "volume")),
    Entry(Kind.KEY, "delay-buffer", REF, _CODECS + " (delay buffer)"),
    Entry(
        Kind.KEY,
        "file",
        REF,
        _MEDIA,
        ("blob", "db-id", "repeat-times", "duration", "pause"),
    ),
    Entry(Kind.KEY, "interface", REF, _SUBSCRIPTIONS),
    Entry(Kind.KEY, "from-tags", REF, _SUBSCRIPTIONS),
    Entry(Kind.KEY, "address", REF, "used by commands this relay does not serve"),
    # --- values of keys -------------------------------------------------------------------
    Entry(Kind.VALUE, "ICE=remove", HON, "ICE attributes are removed from the SDP"),
    Entry(
        Kind.VALUE,
        "ICE=default",
        HON,
        "as rtpengine without an ICE key; since this relay is no ICE agent, ICE attributes "
        "are removed (the reply's `warning` says so when there were any)",
    ),
    Entry(Kind.VALUE, "ICE=force", REF, _ICE_AGENT),
    Entry(Kind.VALUE, "ICE=force-relay", REF, _ICE_AGENT),
    Entry(Kind.VALUE, "ICE=optional", REF, _ICE_AGENT),
    Entry(Kind.VALUE, "address-family=IP4", HON, "IPv4, the only family relayed"),
    Entry(Kind.VALUE, "address-family=IP6", REF, "this relay carries IPv4 only"),
    Entry(
        Kind.VALUE,
        "SDES=off",
        IGN,
        _NO_ENCRYPTION_ADDED,
        ("SDES=no", "SDES=disable"),
    ),
    Entry(
        Kind.VALUE,
        "DTLS=off",
        IGN,
        _NO_ENCRYPTION_ADDED,
        ("DTLS=no", "DTLS=disable", "DTLS=disabled"),
    ),
    Entry(Kind.VALUE, "DTLS=passive", REF, CRYPTO, ("DTLS=active",)),
    Entry(Kind.VALUE, "SDES=", REF, CRYPTO, prefix=True),
    Entry(Kind.VALUE, "record-call=no", IGN, _RECORDING, ("record-call=off",)),
    Entry(Kind.VALUE, "record-call=yes", REF, _RECORDING, ("record-call=on",)),
    Entry(Kind.VALUE, "generate-RTCP=off", IGN, "RTCP is passed through, never generated"),
    Entry(Kind.VALUE, "generate-RTCP=on", REF, "RTCP is passed through, never generated"),
    # --- items of `flags` -----------------------------------------------------------------
    Entry(Kind.FLAG, "trust-address", HON, "the party's media address is the SDP's (the default)"),
    Entry(
        Kind.FLAG,
        "SIP-source-address",
        HON,
        "the party's media address is received-from's, with the SDP's port",
    ),
    Entry(Kind.FLAG, "symmetric", HON, "each party hears from where it sends to (the default)"),
    Entry(
        Kind.FLAG,
        "asymmetric",
        REF,
        "a party that sends from another address than it receives on needs one-way flows; "
        "this relay's conntrack flows carry both directions of a stream",
    ),
    Entry(Kind.FLAG, "unidirectional", IGN, "one-way media is relayed in the kernel anyway"),
    Entry(
        Kind.FLAG,
        "strict-source",
        HON,
        "the node's default: once a party's address is learned, packets from other sources "
        "are dropped in the kernel; it moves only after 5 s of silence from it (NAT rebinding)",
    ),
    Entry(
        Kind.FLAG,
        "media-handover",
        HON,
        "a learned party moves to a new source once its old one has been silent for 5 s "
        "(rtpengine moves at once, which lets anyone take a stream)",
    ),
    Entry(Kind.FLAG, "port-latching", HON, "re-offers keep the call's relay ports (the default)"),
    Entry(Kind.FLAG, "no-port-latching", IGN, "in rtpengine it only changes ICE endpoints"),
    Entry(Kind.FLAG, "reset", IGN, "un-learns ICE and SRTP support: there is nothing to un-learn"),
    Entry(Kind.FLAG, "record-call", REF, _RECORDING, ("SIPREC",)),
    Entry(Kind.FLAG, "no-rtcp-attribute", HON, "no a=rtcp line is added"),
    Entry(
        Kind.FLAG,
        "full-rtcp-attribute",
        HON,
        "a=rtcp:PORT IN IP4 ADDRESS instead of a=rtcp:PORT",
    ),
    Entry(Kind.FLAG, "generate-RTCP", REF, "RTCP is passed through, never generated"),
    Entry(Kind.FLAG, "trickle-ICE", REF, _ICE_AGENT),
    Entry(Kind.FLAG, "fragment", REF, "trickle ICE SDP fragments: " + _ICE_AGENT),
    Entry(
        Kind.FLAG,
        "reject-ICE",
        HON,
        "ICE attributes are removed (as ICE=remove)",
        ("ICE-reject",),
    ),
    Entry(
        Kind.FLAG,
        "loop-protect",
        REF,
        "not supported: the relay does not mark the SDPs it rewrote",
    ),
    Entry(
        Kind.FLAG,
        "original-sendrecv",
        HON,
        "direction attributes are never rewritten (the default)",
    ),
    Entry(Kind.FLAG, "strip-extmap", HON, "a=extmap lines are removed"),
    Entry(Kind.FLAG, "generate-mid", REF, "the SDP is not changed beyond addresses and ports"),
    Entry(
        Kind.FLAG,
        "always-transcode",
        REF,
        _CODECS,
        ("allow-transcoding", "single-codec", "reuse-codecs", "no-codec-renegotiation"),
    ),
    Entry(
        Kind.FLAG,
        "symmetric-codecs",
        IGN,
        "obsolete: rtpengine 10.5 ignores it too",
        ("asymmetric-codecs", "reorder-codecs"),
    ),
    Entry(Kind.FLAG, "inject-DTMF", REF, _DTMF, ("detect-DTMF",)),
    Entry(Kind.FLAG, "pad-crypto", REF, CRYPTO),
    Entry(Kind.FLAG, "passthrough", IGN, "this relay only ever passes media through"),
    Entry(Kind.FLAG, "no-passthrough", REF, _CODECS),
    Entry(Kind.FLAG, "no-jitter-buffer", IGN, "media is never buffered"),
    Entry(
        Kind.FLAG,
        "pierce-NAT",
        REF,
        "the relay sends nothing of its own; a party behind NAT is learned from its first packet",
    ),
    Entry(
        Kind.FLAG,
        "NAT-wait",
        REF,
        "only a party behind NAT waits for its first packet (README: Latching); reachable "
        "parties are relayed to at once",
    ),
    Entry(Kind.FLAG, "RTCP-mirror", REF, _SUBSCRIPTIONS, ("mirror-RTCP",)),
    Entry(Kind.FLAG, "debug", IGN, "the node's log level is its own (log_level)", ("debugging",)),
    Entry(
        Kind.FLAG,
        "no-redis-update",
        IGN,
        "an active/standby pair replicates every call (README: An active/standby pair)",
    ),
    Entry(Kind.FLAG, "egress", REF, _SUBSCRIPTIONS, ("all", "directional")),
    Entry(
        Kind.FLAG,
        "fatal",
        HON,
        "delete: an unknown call or tag is an error, not a warning",
    ),
    Entry(
        Kind.FLAG,
        "SDES-off",
        IGN,
        _NO_ENCRYPTION_ADDED,
        ("SDES-no", "SDES-disable"),
    ),
    Entry(Kind.FLAG, "codec-", REF, _CODECS, ("transcode-",), prefix=True),
    Entry(
        Kind.FLAG,
        "SDES-",
        REF,
        CRYPTO + " (SDES-off: see SDES=off)",
        ("OSRTP-",),
        prefix=True,
    ),
    Entry(Kind.FLAG, "T38-", REF, _T38, ("T.38-",), prefix=True),
    Entry(Kind.FLAG, "endpoint-learning-", REF, "see the endpoint-learning key", prefix=True),
    Entry(Kind.FLAG, "from-tags-", REF, _SUBSCRIPTIONS, prefix=True),
    # --- items of `replace` ---------------------------------------------------------------
    Entry(Kind.REPLACE, "origin", HON, "the o= address becomes the relay's (its version is kept)"),
    Entry(
        Kind.REPLACE,
        "session-connection",
        HON,
        "the session-level c= address becomes the relay's (it does anyway when a stream "
        "relies on it)",
    ),
    Entry(
        Kind.REPLACE,
        "zero-address",
        HON,
        "a c=0.0.0.0 hold address becomes the relay's too (else it is kept)",
    ),
    Entry(
        Kind.REPLACE,
        "SDP-version",
        REF,
        "o= versions pass as the party wrote them",
    ),
    Entry(Kind.REPLACE, "username", REF, "the o= username passes as the party wrote it"),
    Entry(Kind.REPLACE, "session-name", REF, "the s= line passes as the party wrote it"),
    # --- items of `rtcp-mux` --------------------------------------------------------------
    Entry(
        Kind.RTCP_MUX,
        "accept",
        HON,
        "a=rtcp-mux passes through both ways (the default): RTCP rides the RTP ports when "
        "the answer accepts it",
    ),
    Entry(
        Kind.RTCP_MUX,
        "reject",
        HON,
        "offer: a=rtcp-mux is removed, so the answer cannot accept it; answer: refused if "
        "the answer accepts rtcp-mux (the offerer would not expect it)",
    ),
    Entry(
        Kind.RTCP_MUX,
        "offer",
        REF,
        "offering rtcp-mux for a party that did not means splitting RTCP from RTP: the "
        "kernel relays packets, it does not sort them",
        ("require", "demux"),
    ),
)


def _index() -> dict[tuple[Kind, str], Entry]:
    found: dict[tuple[Kind, str], Entry] = {}
    for entry in TABLE:
        for name in (entry.name, *entry.aliases):
            key = (entry.kind, normal(name))
            if found.get(key, entry) is not entry:
                raise AssertionError(f"{entry.kind.value} {name!r} is in the table twice")
            found[key] = entry
    return found


_BY_NAME: Final = _index()
_PREFIXES: Final = tuple(
    (entry.kind, normal(name), entry)
    for entry in TABLE
    if entry.prefix
    for name in (entry.name, *entry.aliases)
)


@functools.lru_cache(maxsize=4096)
def lookup(kind: Kind, name: str) -> Entry | None:
    """The row for `name` (a key, a flag, `KEY=VALUE`, ...), or None if there is none.
    A `prefix` row matches what starts with it, when no row matches exactly.

    Memoised (bounded): every request names the same few keys and flags, and the table
    never changes while the node runs."""
    found = _BY_NAME.get((kind, normal(name)))
    if found is None:
        wanted = normal(name)
        found = next(
            (entry for of, start, entry in _PREFIXES if of is kind and wanted.startswith(start)),
            None,
        )
    return found


def value_entry(key: Entry, value: str) -> Entry | None:
    """The row for one value of `key` (`ICE` + `remove` -> `ICE=remove`)."""
    return lookup(Kind.VALUE, f"{key.name}={value}")


def markdown() -> Iterator[str]:
    """docs/ng.md's flag table, one line at a time."""
    yield "| kind | name | node | why |"
    yield "|---|---|---|---|"
    for entry in TABLE:
        names = ", ".join(
            f"`{name}{'…' if entry.prefix else ''}`" for name in (entry.name, *entry.aliases)
        )
        yield f"| {entry.kind.value} | {names} | {entry.disposition.value} | {entry.why} |"


if __name__ == "__main__":
    sys.stdout.write("\n".join(markdown()) + "\n")
