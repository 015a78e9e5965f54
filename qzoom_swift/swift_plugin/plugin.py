"""The file ms-swift's ``--external_plugins`` points at (``qzoom plugin-path`` prints its path)."""

from qzoom_swift.procs import stop_with_swift_launcher
from qzoom_swift.swift_plugin import register

stop_with_swift_launcher()  # `swift deploy|infer|sft` runs this process as a child: go when the launcher goes
register()
