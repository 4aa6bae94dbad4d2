"""Quarantine: poison files are moved aside under ``state_dir/quarantine/`` with a reason beside them."""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path

import astropy
import numpy as np
import sep

from lcowatch import __version__

QUARANTINE_DIR = "quarantine"


def versions() -> dict[str, str]:
    """Software versions recorded with every quarantined file, for the bug report."""
    return {
        "lcowatch": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "astropy": astropy.__version__,
        "sep": sep.__version__,
    }


def quarantine_file(path: Path, state_dir: Path, *, sha256: str | None, reason: str, step: str | None) -> Path:
    """Move ``path`` into the quarantine folder and write ``<name>.reason.json`` beside it.

    Returns the new location. A name already taken there gets the content hash as a prefix, so nothing
    is ever overwritten.
    """
    folder = state_dir / QUARANTINE_DIR
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    destination = folder / path.name
    if destination.exists():
        destination = folder / f"{(sha256 or str(time.time_ns()))[:16]}-{path.name}"
    shutil.move(str(path), destination)
    note = {
        "file": path.name,
        "original_path": str(path),
        "sha256": sha256,
        "reason": reason,
        "step": step,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": versions(),
    }
    reason_path = destination.with_name(destination.name + ".reason.json")
    tmp = reason_path.with_name(reason_path.name + ".tmp")
    tmp.write_text(json.dumps(note, indent=2) + "\n")
    os.replace(tmp, reason_path)
    return destination
