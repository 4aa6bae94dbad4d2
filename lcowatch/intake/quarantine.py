"""Quarantine: poison files are moved aside under ``state_dir/quarantine/`` with a reason beside them."""

from __future__ import annotations

import glob
import json
import os
import platform
import shutil
import tempfile
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

    Returns the new location. The name is claimed atomically (a hard link, which fails on a taken name),
    so two writers racing for one name never overwrite each other; a taken name gets the content hash and
    a time as a prefix. Names are shortened (keeping their end) so that the reason file's name fits the
    file system's 255 bytes.
    """
    folder = state_dir / QUARANTINE_DIR
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    destination = _claim(path, folder, path.name, sha256)
    write_reason(destination, path, sha256=sha256, reason=reason, step=step)
    return destination


def reason_file(quarantined: Path) -> Path:
    """The ``<name>.reason.json`` beside a quarantined file."""
    return quarantined.with_name(quarantined.name + REASON_SUFFIX)


def write_reason(quarantined: Path, original: Path, *, sha256: str | None, reason: str, step: str | None) -> None:
    """Write (atomically) why ``quarantined``, moved from ``original``, was quarantined."""
    note = {
        "file": original.name,
        "original_path": str(original.absolute()),
        "sha256": sha256,
        "reason": reason,
        "step": step,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": versions(),
    }
    reason_path = reason_file(quarantined)
    tmp = reason_path.with_name(reason_path.name + ".tmp")
    tmp.write_text(json.dumps(note, indent=2) + "\n")
    os.replace(tmp, reason_path)


def find_quarantined(name_or_path: str, state_dir: Path) -> Path | None:
    """The quarantined file meant by a path or a bare file name, if it is in the quarantine folder."""
    folder = state_dir / QUARANTINE_DIR
    candidate = Path(name_or_path)
    for path in (candidate, folder / candidate.name):
        if path.is_file() and path.parent.resolve() == folder.resolve() and not path.name.endswith(REASON_SUFFIX):
            return path
    matches = sorted(folder.glob(f"*-{candidate.name}")) if folder.is_dir() else []
    return matches[-1] if matches else None


NAME_MAX = 255  # bytes in a file name (ext4, xfs, btrfs)
REASON_SUFFIX = ".reason.json"
_ROOM = NAME_MAX - len(REASON_SUFFIX) - len(".tmp")


def _fit(name: str, room: int) -> str:
    """``name`` shortened to ``room`` bytes, keeping its end (where ``.fits.fz`` is)."""
    encoded = os.fsencode(name)
    if len(encoded) <= room:
        return name
    return "~" + os.fsdecode(encoded[-(room - 1) :])


def _unique_prefix(sha256: str | None) -> str:
    return f"{(sha256 or '')[:16]}-{time.time_ns()}-"


def _claim(source: Path, folder: Path, name: str, sha256: str | None) -> Path:
    """Give ``source`` a name of its own in ``folder`` and remove it from where it was."""
    staged = None
    try:
        if os.stat(source).st_dev != os.stat(folder).st_dev:  # another file system: copy over first
            fd, staged_name = tempfile.mkstemp(dir=folder, prefix=".incoming-")
            os.close(fd)
            staged = Path(staged_name)
            shutil.copy2(source, staged)  # a full disk fails here: the staged copy goes, the source stays
        candidate = _fit(name, _ROOM)
        while True:
            destination = folder / candidate
            try:
                os.link(staged or source, destination)
                break
            except FileExistsError:
                prefix = _unique_prefix(sha256)
                candidate = prefix + _fit(name, _ROOM - len(os.fsencode(prefix)))
    finally:
        if staged is not None:
            staged.unlink(missing_ok=True)
    source.unlink()
    return destination


def quarantined_names(name: str, sha256: str, state_dir: Path) -> list[Path]:
    """Where :func:`quarantine_file` may have put a file called ``name`` with content ``sha256``: its own
    name, or the hash-prefixed name it gets when that is taken."""
    folder = state_dir / QUARANTINE_DIR
    if not folder.is_dir():
        return []
    fitted = _fit(name, _ROOM)
    unique = folder.glob(f"{glob.escape(sha256[:16])}-*-*")
    return [folder / fitted, *sorted(p for p in unique if name.endswith(p.name.split("-", 2)[2].lstrip("~")))]


def release(quarantined: Path, fallback_folder: Path) -> tuple[Path, str | None]:
    """Move a quarantined file back where it came from (or into ``fallback_folder``); drop its reason.

    Returns the new path and the content hash recorded when it was quarantined.
    """
    reason_path = reason_file(quarantined)
    note = json.loads(reason_path.read_text()) if reason_path.exists() else {}
    original = Path(note.get("original_path") or fallback_folder / quarantined.name)
    destination = original if original.parent.is_dir() else fallback_folder / original.name
    if destination.exists():
        raise FileExistsError(f"{destination} exists; move it aside first")
    shutil.move(str(quarantined), destination)
    reason_path.unlink(missing_ok=True)
    return destination, note.get("sha256")
