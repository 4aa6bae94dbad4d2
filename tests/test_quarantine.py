"""Quarantine: files moved aside with their reason, never overwriting one another."""

from __future__ import annotations

import errno
import json
import multiprocessing
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from lcowatch.intake.quarantine import NAME_MAX, quarantine_file, quarantined_names


def _quarantine_rounds(folder: Path, state: Path, rounds: int, barrier: Any) -> None:
    folder.mkdir()
    for r in range(rounds):
        path = folder / "frame.fits"
        path.write_bytes(f"round {r} writer {folder.name}".encode())
        barrier.wait(timeout=20)
        quarantine_file(path, state, sha256=None, reason="test", step="read")


class TestQuarantineFile:
    """Every quarantined file keeps its own bytes and its own reason, however names collide or run long."""

    def test_two_writers_racing_for_one_name_lose_nothing(self, tmp_path: Path) -> None:
        """Two processes quarantine a file of the same name at the same moment, 20 times."""
        state, rounds = tmp_path / "state", 20
        context = multiprocessing.get_context("fork")
        barrier = context.Barrier(2)
        writers = [context.Process(target=_quarantine_rounds, args=(tmp_path / f"w{w}", state, rounds, barrier))
                   for w in range(2)]  # fmt: skip
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join(60)
        assert [writer.exitcode for writer in writers] == [0, 0]
        kept = [p for p in (state / "quarantine").iterdir() if not p.name.endswith(".reason.json")]
        assert sorted(p.read_bytes().decode() for p in kept) == sorted(
            f"round {r} writer w{w}" for r in range(rounds) for w in range(2)
        )
        assert all(p.with_name(p.name + ".reason.json").is_file() for p in kept)

    def test_a_name_at_the_file_system_limit_keeps_its_reason(self, tmp_path: Path) -> None:
        name = "x" * (NAME_MAX - len(".fits.fz")) + ".fits.fz"
        path = tmp_path / name
        path.write_bytes(b"content")
        moved = quarantine_file(path, tmp_path / "state", sha256="ab" * 32, reason="too long", step="read")
        assert moved.read_bytes() == b"content" and not path.exists()
        assert moved.name.endswith(".fits.fz")
        note = json.loads(moved.with_name(moved.name + ".reason.json").read_text())
        assert note["file"] == name and note["reason"] == "too long"
        assert moved in quarantined_names(name, "ab" * 32, tmp_path / "state")

    def test_a_full_disk_on_another_file_system_leaves_the_file_and_no_orphan(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Quarantine across file systems copies the file over first; when the disk fills during the copy,
        the file stays where it was and no partial copy is left in the quarantine folder."""
        shm = Path("/dev/shm")
        if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
            pytest.skip("needs /dev/shm on another file system than the state folder")
        with tempfile.TemporaryDirectory(dir=shm) as elsewhere:
            path = Path(elsewhere) / "bad.fits"
            path.write_bytes(b"not a frame" * 100)

            def full_disk(source: object, destination: str | Path) -> None:
                Path(destination).write_bytes(b"not a f")  # a first block, then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device", str(destination))

            monkeypatch.setattr(shutil, "copy2", full_disk)  # the disk, not our code
            with pytest.raises(OSError, match="No space left"):
                quarantine_file(path, tmp_path / "state", sha256="cd" * 32, reason="not FITS", step="readiness")
            assert path.read_bytes() == b"not a frame" * 100
            assert list((tmp_path / "state" / "quarantine").iterdir()) == []
