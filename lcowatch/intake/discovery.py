"""Which files the pipeline looks at: FITS names, found in files and folders."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

FITS_SUFFIXES = (".fits", ".fits.fz", ".fits.gz", ".fit", ".fts")


def is_candidate(path: Path) -> bool:
    """A file name the pipeline looks at: FITS suffixes, no hidden or temporary names."""
    name = path.name
    return not name.startswith(".") and name.lower().endswith(FITS_SUFFIXES)


def find_files(paths: Iterable[Path]) -> list[Path]:
    """Candidate files under ``paths`` (files or folders, recursively), without duplicates."""
    found: dict[Path, None] = {}
    for root in paths:
        if root.is_dir():
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    if is_candidate(Path(name)):
                        found[Path(dirpath) / name] = None
        elif root.is_file():
            found[root] = None
    return list(found)
