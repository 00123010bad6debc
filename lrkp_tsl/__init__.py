"""lrkp-tsl: a media relay node for Kamailio's lrkproxy module whose fast path is the kernel.

Pure modules (`media`, and later `protocol`, `session`) do no I/O; everything that touches
the kernel lives in `lrkp_tsl.dataplane`, one adapter per facility.
"""

__version__ = "0.1.0"
