"""Readiness: the structure check on whole, cut and hostile files, and the quiet-period tracker."""

from __future__ import annotations

import gzip
import io
import os
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.time import Time

from conftest import ROME_FRAME, SBIG_FRAME
from lcowatch.intake.readiness import FITS_BLOCK, Tracker, check_complete, is_wanted
from lcowatch.simulation.simulate import FrameSpec, make_field, write_frame

MAX_PIXELS = 50_000_000
MJD = 61000.25


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> dict[str | None, bytes]:
    """The same small simulated frame as plain FITS, fpack and gzip bytes."""
    folder = tmp_path_factory.mktemp("readiness")
    field = make_field("READY", 150.0, 2.0, nstars=20, seed=3, box_arcmin=1.5, n_bright=0, min_sep_arcsec=2.0)
    spec = FrameSpec(filter="rp", mjd_start=MJD, shape=(64, 64), seed=3)
    out: dict[str | None, bytes] = {}
    for compress in (None, "fz", "gz"):
        path = folder / f"frame-{compress}.fits"
        write_frame(path, field, spec, compress=compress)
        out[compress] = path.read_bytes()
    return out


def _check(tmp_path: Path, content: bytes, name: str = "f.fits"):
    path = tmp_path / name
    path.write_bytes(content)
    return check_complete(path, max_pixels=MAX_PIXELS)


@pytest.mark.parametrize("compress", [None, "fz", "gz"])
def test_a_whole_frame_is_ready_with_its_observation_time(
    tmp_path: Path, frames: dict[str | None, bytes], compress: str | None
) -> None:
    verdict = _check(tmp_path, frames[compress])
    assert verdict.kind == "ready"
    assert verdict.mjd == pytest.approx(MJD, abs=1e-7)


def _hdu_ends(content: bytes) -> set[int]:
    """Byte offsets where an HDU (with its padding) ends."""
    with fits.open(io.BytesIO(content)) as hdul:
        infos = [hdu.fileinfo() for hdu in hdul]
    return {info["datLoc"] + -(-info["datSpan"] // FITS_BLOCK) * FITS_BLOCK for info in infos}


@pytest.mark.parametrize("compress", [None, "fz", "gz"])
def test_every_cut_of_a_frame_is_waiting(tmp_path: Path, frames: dict[str | None, bytes], compress: str | None) -> None:
    """A file being written is never poison, and never ready except where the cut is itself a whole FITS
    file (between two HDUs of a plain file; the quiet period is what guards that case)."""
    content = frames[compress]
    cuts = {1, 2, 9, 80, 2879, FITS_BLOCK, FITS_BLOCK + 1, 2 * FITS_BLOCK, len(content) - 1}
    cuts |= set(range(FITS_BLOCK, len(content), FITS_BLOCK))  # every block boundary: the worst case
    cuts |= {int(f * len(content)) for f in np.linspace(0.05, 0.95, 19)}
    whole = set() if compress == "gz" else _hdu_ends(content) - {FITS_BLOCK}
    for cut in sorted(c for c in cuts if 0 < c < len(content)):
        verdict = _check(tmp_path, content[:cut])
        expected = "ready" if cut in whole else "waiting"
        assert verdict.kind == expected, (cut, verdict)


def test_empty_and_preallocated_files_are_waiting(tmp_path: Path, frames: dict[str | None, bytes]) -> None:
    assert _check(tmp_path, b"").kind == "waiting"
    assert _check(tmp_path, b"\0" * (3 * FITS_BLOCK)).kind == "waiting"
    # preallocated to its full size and filled up to the end of the first image
    plain = frames[None]
    first_image_end = sorted(_hdu_ends(plain))[1]
    filled = plain[:first_image_end] + b"\0" * (len(plain) - first_image_end)
    verdict = _check(tmp_path, filled)
    assert verdict.kind == "waiting" and "zero bytes" in (verdict.reason or "")


def test_not_fits_is_poison(tmp_path: Path) -> None:
    verdict = _check(tmp_path, b"this is a log file, not an image\n" * 200)
    assert verdict.kind == "poison" and "not a FITS file" in (verdict.reason or "")
    inside_gzip = gzip.compress(b"plain text " * 1000)
    assert _check(tmp_path, inside_gzip, "f.fits.gz").kind == "poison"


def test_corrupt_gzip_is_poison(tmp_path: Path) -> None:
    verdict = _check(tmp_path, b"\x1f\x8b\x08\x00" + os.urandom(4000), "f.fits.gz")
    assert verdict.kind == "poison" and "gzip" in (verdict.reason or "")


def test_header_bomb_is_poison_at_once(tmp_path: Path) -> None:
    header = fits.Header()
    header["SIMPLE"], header["BITPIX"], header["NAXIS"] = True, -32, 2
    header["NAXIS1"], header["NAXIS2"] = 1_000_000, 1_000_000
    verdict = _check(tmp_path, header.tostring().encode())
    assert verdict.kind == "poison" and "1000000x1000000" in (verdict.reason or "")


def test_compressed_header_bomb_is_poison(tmp_path: Path, frames: dict[str | None, bytes]) -> None:
    content = bytearray(frames["fz"])
    start = content.index(b"ZNAXIS1 =")
    content[start : start + 80] = f"{'ZNAXIS1':8}= {9_000_000_000:>20}".ljust(80).encode()
    verdict = _check(tmp_path, bytes(content), "f.fits.fz")
    assert verdict.kind == "poison" and "max_pixels" in (verdict.reason or "")


def test_hdus_that_together_claim_more_than_a_frame_are_poison(tmp_path: Path) -> None:
    """Each table is within the bound, their sum is not: a gzip stream of them would otherwise be inflated
    without end, one allowed HDU after another."""
    tables = [fits.BinTableHDU.from_columns([fits.Column("x", "100A", array=np.array([b""] * 1500))]) for _ in range(3)]
    buffer = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), *tables]).writeto(buffer)
    path = tmp_path / "tables.fits.gz"
    path.write_bytes(gzip.compress(buffer.getvalue()))
    max_pixels = 20_000  # a frame may hold 160 kB + 64 blocks = 344 kB; each table is 150 kB
    assert check_complete(path, max_pixels=max_pixels).kind == "poison"
    assert check_complete(path, max_pixels=max_pixels * 2).kind == "ready"


def test_endless_header_is_poison(tmp_path: Path) -> None:
    card = f"{'COMMENT':8}  filler".ljust(80).encode()
    content = f"{'SIMPLE':8}= {'T':>20}".ljust(80).encode() + card * (36 * 1001 - 1)
    assert _check(tmp_path, content).kind == "poison"


def test_a_lone_empty_primary_is_waiting_but_a_table_file_is_ready(tmp_path: Path) -> None:
    lone = tmp_path / "lone.fits"
    fits.PrimaryHDU().writeto(lone)
    assert check_complete(lone, max_pixels=MAX_PIXELS).kind == "waiting"
    table = tmp_path / "table.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns([fits.Column("a", "E", array=[1.0])])]).writeto(
        table
    )
    assert check_complete(table, max_pixels=MAX_PIXELS).kind == "ready"  # not a frame: the pipeline says so


def test_temporary_and_foreign_names_are_not_wanted() -> None:
    for name in (".x.fits", "x.fits.part", "x.fits.tmp", "x.fits.fz.part", "notes.txt", "x.fits~"):
        assert not is_wanted(Path(name)), name
    for name in ("cpt1m012-fa06-20260113-0102-e91.fits.fz", "a.fits", "a.fits.gz", "A.FITS"):
        assert is_wanted(Path(name)), name


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _tracker(clock: FakeClock, wall: list[float], quiet: float = 2.0, incomplete_after: float = 60.0) -> Tracker:
    return Tracker(quiet, incomplete_after, MAX_PIXELS, clock=clock, wallclock=lambda: wall[0])


def test_a_fresh_file_waits_for_the_quiet_period(tmp_path: Path, frames: dict[str | None, bytes]) -> None:
    path = tmp_path / "a.fits"
    path.write_bytes(frames[None])
    clock, wall = FakeClock(), [path.stat().st_mtime]  # just written
    tracker = _tracker(clock, wall)
    tracker.add(path)
    assert tracker.poll() == [] and path in tracker
    clock.now += 1.0
    assert tracker.poll() == []
    clock.now += 1.1
    (result,) = tracker.poll()
    assert result.kind == "ready" and result.path == path and path not in tracker
    assert (result.size, result.mtime_ns) == (path.stat().st_size, path.stat().st_mtime_ns)


def test_a_change_restarts_the_quiet_period(tmp_path: Path, frames: dict[str | None, bytes]) -> None:
    path = tmp_path / "a.fits"
    path.write_bytes(frames[None][: 2 * FITS_BLOCK])
    clock, wall = FakeClock(), [path.stat().st_mtime]
    tracker = _tracker(clock, wall)
    tracker.add(path)
    tracker.poll()
    clock.now += 1.5
    with open(path, "ab") as handle:
        handle.write(frames[None][2 * FITS_BLOCK :])
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    tracker.add(path)  # what the write's event does
    assert tracker.poll() == []  # changed: the clock starts again
    clock.now += 1.0
    assert tracker.poll() == []
    clock.now += 1.1
    assert [r.kind for r in tracker.poll()] == ["ready"]


def test_a_file_with_an_old_mtime_is_ready_at_first_sight(tmp_path: Path, frames: dict[str | None, bytes]) -> None:
    path = tmp_path / "moved-in.fits.fz"
    path.write_bytes(frames["fz"])
    clock, wall = FakeClock(), [path.stat().st_mtime + 3600.0]
    tracker = _tracker(clock, wall)
    tracker.add(path)
    assert [r.kind for r in tracker.poll()] == ["ready"]


def test_incomplete_only_after_the_limit_and_only_when_quiet(tmp_path: Path, frames: dict[str | None, bytes]) -> None:
    path = tmp_path / "cut.fits"
    path.write_bytes(frames[None][: 3 * FITS_BLOCK])
    clock, wall = FakeClock(), [path.stat().st_mtime + 100.0]
    tracker = _tracker(clock, wall, quiet=1.0, incomplete_after=10.0)
    tracker.add(path)
    assert tracker.poll() == []
    clock.now += 9.0
    assert tracker.poll() == []
    clock.now += 1.5
    (result,) = tracker.poll()
    assert result.kind == "incomplete" and "incomplete" in (result.reason or "")


def test_a_pass_with_a_budget_leaves_the_rest_due_for_the_next(tmp_path: Path, frames: dict[str | None, bytes]) -> None:
    """A spent budget ends the pass; the files not looked at are decided by the next passes."""
    clock, wall = FakeClock(), [1e9]
    tracker = _tracker(clock, wall, quiet=0.0)
    paths = [tmp_path / f"f{i}.fits.gz" for i in range(3)]
    for path in paths:
        path.write_bytes(frames["gz"])
        tracker.add(path)
    first = tracker.poll(budget=0.0)
    assert len(first) == 1 and tracker.due()
    rest = tracker.poll(budget=0.0) + tracker.poll(budget=0.0)
    assert {r.path for r in first + rest} == set(paths) and not tracker.due()


def test_a_file_tracked_again_after_a_delay_is_not_due_before_it(
    tmp_path: Path, frames: dict[str | None, bytes]
) -> None:
    """A file whose quarantine failed (a full disk) is looked at again after the back-off, not every tick."""
    clock, wall = FakeClock(), [1e9]
    tracker = _tracker(clock, wall, quiet=0.0)
    path = tmp_path / "f.fits"
    path.write_bytes(frames[None])
    tracker.add(path, after=5.0)
    assert not tracker.due() and tracker.poll() == []
    clock.now += 5.0
    assert tracker.due() and [r.kind for r in tracker.poll()] == ["ready"]


def test_poison_and_gone(tmp_path: Path) -> None:
    text = tmp_path / "notes.fits"
    text.write_text("not an image\n" * 100)
    gone = tmp_path / "gone.fits"
    gone.write_bytes(b"x")
    fifo = tmp_path / "pipe.fits"
    os.mkfifo(fifo)
    clock, wall = FakeClock(), [text.stat().st_mtime + 100.0]
    tracker = _tracker(clock, wall)
    for path in (text, gone, fifo):
        tracker.add(path)
    gone.unlink()
    results = {r.path.name: r for r in tracker.poll()}  # a FIFO is never opened: this does not hang
    assert results["notes.fits"].kind == "poison"
    assert results["gone.fits"].kind == "gone"
    assert results["pipe.fits"].kind == "gone"
    assert len(tracker) == 0


def test_real_lco_frames_are_ready(real_data: Path) -> None:
    for name in (ROME_FRAME, SBIG_FRAME):
        verdict = check_complete(real_data / name, max_pixels=MAX_PIXELS)
        header = fits.getheader(real_data / name, 1 if name.endswith(".fz") else 0)
        assert verdict.kind == "ready"
        assert verdict.mjd == pytest.approx(Time(header["DATE-OBS"], scale="utc").mjd, abs=1e-6)
