"""Settings for every test."""

from __future__ import annotations

from hypothesis import settings

# No example database: it would be written as root by `make test` and then make runs as
# another user fail (warnings are errors). Every run explores afresh; CI is bounded anyway.
settings.register_profile("lrkp", database=None)
settings.load_profile("lrkp")
