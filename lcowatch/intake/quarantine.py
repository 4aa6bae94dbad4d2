"""Quarantine: poison files are moved aside under ``state_dir/quarantine/`` with a reason beside them."""

from __future__ import annotations

import glob
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
        destination = folder / f"{(sha256 or '')[:16]}-{time.time_ns()}-{path.name}"
    shutil.move(str(path), destination)
    note = {
        "file": path.name,
        "original_path": str(path.absolute()),
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


def find_quarantined(name_or_path: str, state_dir: Path) -> Path | None:
    """The quarantined file meant by a path or a bare file name, if it is in the quarantine folder."""
    folder = state_dir / QUARANTINE_DIR
    candidate = Path(name_or_path)
    for path in (candidate, folder / candidate.name):
        if path.is_file() and path.parent.resolve() == folder.resolve() and not path.name.endswith(".reason.json"):
            return path
    matches = sorted(folder.glob(f"*-{candidate.name}")) if folder.is_dir() else []
    return matches[-1] if matches else None


def quarantined_names(name: str, sha256: str, state_dir: Path) -> list[Path]:
    """Where :func:`quarantine_file` may have put a file called ``name`` with content ``sha256``: its own
    name, or the hash-prefixed name it gets when that is taken."""
    folder = state_dir / QUARANTINE_DIR
    if not folder.is_dir():
        return []
    return [folder / name, *sorted(folder.glob(f"{glob.escape(sha256[:16])}-*-{glob.escape(name)}"))]


def release(quarantined: Path, fallback_folder: Path) -> tuple[Path, str | None]:
    """Move a quarantined file back where it came from (or into ``fallback_folder``); drop its reason.

    Returns the new path and the content hash recorded when it was quarantined.
    """
    reason_path = quarantined.with_name(quarantined.name + ".reason.json")
    note = json.loads(reason_path.read_text()) if reason_path.exists() else {}
    original = Path(note.get("original_path") or fallback_folder / quarantined.name)
    destination = original if original.parent.is_dir() else fallback_folder / original.name
    if destination.exists():
        raise FileExistsError(f"{destination} exists; move it aside first")
    shutil.move(str(quarantined), destination)
    reason_path.unlink(missing_ok=True)
    return destination, note.get("sha256")
