"""rtpengine's "ng" control protocol, as a second front-end of the node. Pure.

`bencode` (the dictionary encoding), `codec` (datagrams <-> typed requests and replies),
`flags` (every key and flag and what the node does with it), `sdp` (parse and rewrite),
`ports` (node-allocated relay ports, shared with lrkproxy calls), `callmodel` (calls, sides
per tag, streams per m= line) and `adapter` (all of it composed: request in, reply and the
call's media out). No sockets, no clock: docs/ng-integration.md says how the engine drives it.
"""
