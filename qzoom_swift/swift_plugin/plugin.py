"""The file ms-swift's ``--external_plugins`` points at (``qzoom plugin-path`` prints its path)."""

from qzoom_swift.swift_plugin import register

register()
