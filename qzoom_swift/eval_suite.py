"""Moved to ``qzoom_swift.eval.suite``; this old path keeps working (with a DeprecationWarning)."""

from qzoom_swift._moved import alias

alias(__name__, "qzoom_swift.eval.suite")
