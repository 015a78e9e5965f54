"""The other Python environments the zoom bench runs parts in (LLaMA-Factory's, vLLM's): checked once, before any
stage, that they import this checkout's qzoom_swift and the framework, with their versions for the report."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path


def source_root() -> Path | None:
    """The checkout the running qzoom_swift comes from (None for an installed package)."""
    import qzoom_swift

    root = Path(qzoom_swift.__file__).resolve().parents[1]
    return root if (root / "setup.cfg").is_file() else None


def probe_environment(python: Path, env: dict[str, str], *, imports: str, distributions: tuple[str, ...],
                      subject: str, install_hint: str) -> dict[str, str]:
    """Run ``python`` once: it must import ``imports`` and this checkout's qzoom_swift (``env`` gets the checkout
    first on ``PYTHONPATH``, as that environment's editable install may point at another one); returns the
    installed versions of ``distributions``. ``subject`` names the setting in errors, ``install_hint`` the fix."""
    root = source_root()
    if root is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])
    code = (f"import json, importlib.metadata as m, qzoom_swift, {imports}; v = {{}}\n"
            f"for d in {distributions!r}:\n"
            "    try: v[d] = m.version(d)\n    except m.PackageNotFoundError: pass\n"
            "print(json.dumps({**v, 'qzoom_swift': qzoom_swift.__file__}))")
    probe = subprocess.run([str(python), "-c", code], env=env, capture_output=True, text=True)
    if probe.returncode != 0:
        raise RuntimeError(f"{subject}: {python} cannot import {imports} and qzoom_swift ({install_hint}):\n"
                           f"{probe.stderr[-2000:]}")
    versions = json.loads(probe.stdout.strip().splitlines()[-1])
    imported = Path(versions.pop("qzoom_swift")).resolve().parents[1]
    if root is not None and imported != root:
        raise RuntimeError(f"{subject}: {python} imports qzoom_swift from {imported}, this demo runs {root}; unset "
                           "PYTHONPATH entries that shadow it")
    return versions
