"""The node's control protocols, each an adapter over the one engine (operations.py):
`lrkproxy` (Kamailio's lrkproxy module) and `ng` (rtpengine's, for Kamailio's and
OpenSIPS's rtpengine modules)."""
