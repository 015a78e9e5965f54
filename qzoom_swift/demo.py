"""Moved to ``qzoom_swift.bench.demo``; this old path keeps working (with a DeprecationWarning)."""

from qzoom_swift._moved import alias

alias(__name__, "qzoom_swift.bench.demo")
