"""Moved to ``qzoom_swift.eval.model_api``; this old path keeps working (with a DeprecationWarning)."""

from qzoom_swift._moved import alias

alias(__name__, "qzoom_swift.eval.model_api")
