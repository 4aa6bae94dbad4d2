"""Processing on a Dask cluster: a real ``LocalCluster`` and a real ``dask scheduler`` with ``dask worker``
processes on 127.0.0.1, against serial processing of the same files."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import write_config
from lcowatch.cli import main
from lcowatch.simulation.simulate import make_field, simulate_series, write_refcat

FIELD = make_field("SCALE", 150.0, 2.0, nstars=600, radius_arcmin=4.0, seed=3)
#: Every table a frame writes, with the order that makes two runs comparable row by row.
TABLES = {
    "frames": "sha256",
    "points": "sha256, aperture",
    "photometry": "sha256, star_id, aperture",
    "star_refs": "star_id, filter",
    "comparison_stars": "star_id",
    "target_centroids": "sha256",
    "sources": "sha256, x, y",
    "templates": "filter, sha256",
    "reference_frames": "target",
}
#: Columns that say when a row was written or number it in the database, not what was measured.
NOT_MEASURED = {"created", "templates.id"}


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two nights of a target in two filters: 16 small frames and a reference catalog."""
    folder = tmp_path_factory.mktemp("scaleout")
    simulate_series(FIELD, folder / "frames", nights=2, frames_per_night=4, filters=("rp", "gp"), shape=(384, 384),
                    seed=5)  # fmt: skip
    write_refcat(FIELD, folder / "stars.csv")
    return folder


def _config(folder: Path, frames: Path) -> Path:
    target = {"ra": FIELD.ra, "dec": FIELD.dec, "refcat": str(frames / "stars.csv")}
    return write_config(folder, {"SCALE": target})


def _rows(folder: Path) -> dict[str, list[tuple[object, ...]]]:
    rows = {}
    with sqlite3.connect(folder / "state" / "lcowatch.sqlite") as conn:
        for table, order in TABLES.items():
            columns = [
                c[1]
                for c in conn.execute(f"PRAGMA table_info({table})")
                if {c[1], f"{table}.{c[1]}"}.isdisjoint(NOT_MEASURED)
            ]
            rows[table] = conn.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {order}").fetchall()
    return rows


@pytest.fixture(scope="module")
def serial_rows(frames: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[tuple[object, ...]]]:
    folder = tmp_path_factory.mktemp("serial")
    assert main(["process", "--config", str(_config(folder, frames)), str(frames / "frames")]) == 0
    rows = _rows(folder)
    assert len(rows["frames"]) == 16 and len(rows["points"]) == 16 * 3
    return rows


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[str, list[subprocess.Popen[bytes]]]]:
    """A ``dask scheduler`` and two ``dask worker`` processes (one thread each) on 127.0.0.1."""
    address = f"tcp://127.0.0.1:{_free_port()}"
    dask = [sys.executable, "-m", "dask"]
    logs = open(tmp_path / "cluster.log", "wb")  # noqa: SIM115 -- closed below, after the processes
    scheduler = subprocess.Popen([*dask, "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
                                  "--no-dashboard"], stdout=logs, stderr=logs)  # fmt: skip
    worker = [*dask, "worker", address, "--nthreads", "1", "--no-dashboard"]
    workers = [
        subprocess.Popen([*worker, "--local-directory", str(tmp_path / f"w{k}")], stdout=logs, stderr=logs)
        for k in range(2)
    ]
    processes = [scheduler, *workers]
    try:
        _wait_for_workers(address, 2)
        yield address, workers
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        logs.close()


def _wait_for_workers(address: str, count: int) -> None:
    from distributed import Client

    with Client(address, timeout=30) as client:
        client.wait_for_workers(count, timeout=60)


class TestLocalCluster:
    """``process --workers 2`` starts a LocalCluster and writes exactly the rows serial processing writes."""

    def test_same_rows_as_serial(
        self, frames: Path, serial_rows: dict[str, list[tuple[object, ...]]], tmp_path: Path
    ) -> None:
        config = _config(tmp_path, frames)
        assert main(["process", "--config", str(config), "--workers", "2", str(frames / "frames")]) == 0
        assert _rows(tmp_path) == serial_rows


@pytest.mark.slow
class TestExistingCluster:
    """``--scheduler ADDR`` uses a running cluster; a worker killed mid-run still leaves every frame once."""

    def test_same_rows_as_serial(
        self, frames: Path, serial_rows: dict[str, list[tuple[object, ...]]], tmp_path: Path,
        cluster: tuple[str, list[subprocess.Popen[bytes]]],
    ) -> None:  # fmt: skip
        config = _config(tmp_path, frames)
        assert main(["process", "--config", str(config), "--scheduler", cluster[0], str(frames / "frames")]) == 0
        assert _rows(tmp_path) == serial_rows

    def test_worker_killed_mid_run(
        self, frames: Path, serial_rows: dict[str, list[tuple[object, ...]]], tmp_path: Path,
        cluster: tuple[str, list[subprocess.Popen[bytes]]],
    ) -> None:  # fmt: skip
        address, workers = cluster
        config = _config(tmp_path, frames)
        run = subprocess.Popen(
            [sys.executable, "-m", "lcowatch", "process", "--config", str(config), "--scheduler", address,
             str(frames / "frames")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        ledger = tmp_path / "state" / "lcowatch.sqlite"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and _done(ledger) < 3:
            time.sleep(0.05)
        done_when_killed = _done(ledger)
        workers[0].kill()
        assert run.wait(timeout=300) == 0
        assert 3 <= done_when_killed < 16, "the worker must die mid-run"
        assert _rows(tmp_path) == serial_rows


def _done(ledger: Path) -> int:
    try:
        with sqlite3.connect(ledger, timeout=1) as conn:
            return int(conn.execute("SELECT count(*) FROM files WHERE state = 'done'").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


class TestUnreachableScheduler:
    """A scheduler that does not answer is a clear error (exit 1), not a hang or a traceback."""

    def test_exit_1_naming_the_address(self, frames: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        config = _config(tmp_path, frames)
        address = f"tcp://127.0.0.1:{_free_port()}"
        code = main(["process", "--config", str(config), "--scheduler", address, str(frames / "frames")])
        assert code == 1
        captured = capsys.readouterr()
        assert address in captured.out + captured.err


def _with_apertures(config: Path, apertures: list[str]) -> None:
    document = yaml.safe_load(config.read_text())
    document["photometry"] = {"apertures": apertures}
    config.write_text(yaml.safe_dump(document))


NEW_APERTURES = ["3 arcsec", "5 arcsec"]


@pytest.fixture(scope="module")
def rows_with_new_apertures(frames: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[tuple]]:
    """What processing the frames afresh under the new apertures writes."""
    folder = tmp_path_factory.mktemp("fresh")
    config = _config(folder, frames)
    _with_apertures(config, NEW_APERTURES)
    assert main(["process", "--config", str(config), str(frames / "frames")]) == 0
    return _rows(folder)


class TestReprocess:
    """``reprocess TARGET`` measures a target's frames again under the current config and swaps the new light
    curve in at once: the rows equal a fresh run's; until the swap, the old curve stays."""

    def test_after_an_aperture_change_equals_a_fresh_run(
        self, frames: Path, rows_with_new_apertures: dict[str, list[tuple]], tmp_path: Path
    ) -> None:
        config = _config(tmp_path, frames)
        assert main(["process", "--config", str(config), str(frames / "frames")]) == 0
        _with_apertures(config, NEW_APERTURES)
        assert main(["reprocess", "--config", str(config), "SCALE", "--workers", "2"]) == 0
        assert _rows(tmp_path) == rows_with_new_apertures
        assert not (tmp_path / "state" / "reprocess" / "SCALE").exists()
        result = (tmp_path / "state" / "results" / "SCALE.ecsv").read_text()
        assert "3 arcsec" in result and "1 fwhm" not in result

    def test_a_missing_image_changes_nothing(self, frames: Path, tmp_path: Path) -> None:
        images = tmp_path / "images"
        shutil.copytree(frames / "frames", images)
        config = _config(tmp_path, frames)
        assert main(["process", "--config", str(config), str(images)]) == 0
        before = _rows(tmp_path)
        sorted(images.iterdir())[5].unlink()
        _with_apertures(config, NEW_APERTURES)
        assert main(["reprocess", "--config", str(config), "SCALE"]) == 1
        assert _rows(tmp_path) == before

    @pytest.mark.slow
    def test_kill_9_mid_rebuild_leaves_the_old_curve(
        self, frames: Path, rows_with_new_apertures: dict[str, list[tuple]], tmp_path: Path
    ) -> None:
        config = _config(tmp_path, frames)
        assert main(["process", "--config", str(config), str(frames / "frames")]) == 0
        before = _rows(tmp_path)
        _with_apertures(config, NEW_APERTURES)
        command = [sys.executable, "-m", "lcowatch", "reprocess", "--config", str(config), "SCALE"]
        run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        scratch = tmp_path / "state" / "reprocess" / "SCALE" / "lcowatch.sqlite"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and _done(scratch) < 4:
            time.sleep(0.02)
        run.send_signal(signal.SIGKILL)
        run.wait()
        assert 4 <= _done(scratch) < 16, "killed mid-rebuild"
        assert _rows(tmp_path) == before
        assert main(["reprocess", "--config", str(config), "SCALE"]) == 0
        assert _rows(tmp_path) == rows_with_new_apertures


def _points_of(folder: Path, filter: str) -> list[sqlite3.Row]:
    with sqlite3.connect(folder / "state" / "lcowatch.sqlite") as conn:
        conn.row_factory = sqlite3.Row
        return conn.execute("SELECT * FROM points WHERE filter = ? ORDER BY sha256, aperture", (filter,)).fetchall()


class TestReprocessTwoCameras:
    """A target seen by a 1 m and a 0.4 m: the 0.4 m's first frame is kept as the template its frames register
    to, and a reprocess keeps the templates' order, so the reference magnitudes keep their instrument."""

    def test_templates_keep_their_order(self, tmp_path: Path) -> None:
        sbig = {"site": "coj", "telescope": "0m4-14", "instrument": "kb29", "pixscale": 0.571,
                "zeropoint_offset": -1.0, "seeing": (2.5, 3.5)}  # fmt: skip
        common = {"nights": 2, "frames_per_night": 2, "filters": ("rp",), "shape": (384, 384)}
        simulate_series(FIELD, tmp_path / "frames", seed=7, **common)  # type: ignore[arg-type]
        simulate_series(FIELD, tmp_path / "frames", seed=8, first_frame_number=200, **sbig, **common)  # type: ignore[arg-type]
        write_refcat(FIELD, tmp_path / "stars.csv")
        config = _config(tmp_path, tmp_path)
        assert main(["process", "--config", str(config), str(tmp_path / "frames")]) == 0

        def templates() -> list[tuple[str, int, str]]:
            with sqlite3.connect(tmp_path / "state" / "lcowatch.sqlite") as conn:
                query = (
                    "SELECT f.instrument, t.active, t.reason FROM templates t JOIN frames f USING (sha256) "
                    "ORDER BY t.id"
                )
                return [tuple(row) for row in conn.execute(query)]

        before = templates()
        # The batch's best frame is the template; the other camera's first frame is kept, inactive, after it.
        assert [active for _, active, _ in before] == [1, 0] and {i for i, *_ in before} == {"fa06", "kb29"}
        with sqlite3.connect(tmp_path / "state" / "lcowatch.sqlite") as conn:
            assert conn.execute("SELECT state, COUNT(*) FROM files GROUP BY state").fetchall() == [("done", 8)]
        assert main(["reprocess", "--config", str(config), "SCALE"]) == 0
        assert templates() == before


class TestReprocessOneFilter:
    """``reprocess TARGET --filter F`` measures only that filter's frames again, in the same reference frame,
    whether or not F made it: the other filter's measurements stay exactly as they were, and F's come back
    within their errors (now against every comparison star the field has gained since)."""

    @pytest.mark.parametrize(("again", "kept"), [("gp", "rp"), ("rp", "gp")])
    def test_only_that_filter_is_measured_again(
        self, frames: Path, serial_rows: dict[str, list[tuple]], tmp_path: Path, again: str, kept: str
    ) -> None:
        config = _config(tmp_path, frames)
        assert main(["process", "--config", str(config), str(frames / "frames")]) == 0
        before = {f: _points_of(tmp_path, f) for f in (again, kept)}
        assert main(["reprocess", "--config", str(config), "SCALE", "--filter", again]) == 0
        measured = ("flux", "flux_err", "x", "y", "snr", "diff_mag", "template")
        assert [tuple(r[c] for c in measured) for r in _points_of(tmp_path, kept)] == [
            tuple(r[c] for c in measured) for r in before[kept]
        ]
        rebuilt = _points_of(tmp_path, again)
        assert [(r["sha256"], r["aperture"]) for r in rebuilt] == [(r["sha256"], r["aperture"]) for r in before[again]]
        for new, old in zip(rebuilt, before[again], strict=True):
            assert abs(new["diff_mag"] - old["diff_mag"]) < 3 * np.hypot(new["diff_mag_err"], old["diff_mag_err"])
        with sqlite3.connect(tmp_path / "state" / "lcowatch.sqlite") as conn:
            sha256, *target_xy = conn.execute("SELECT sha256, target_x, target_y FROM reference_frames").fetchone()
        original = serial_rows["reference_frames"][0]  # target, sha256, file, nx, ny, ..., target_x, target_y
        assert sha256 == original[1]
        # The same reference frame; the target's position may be refined by the reprocessed frames' centroids
        # (by 0.006-0.03 px): a frame the first pass flagged few_stars against the fixed min_nstars, before
        # the instrument had a history, is judged against its median now, and its centroid counts.
        assert target_xy == pytest.approx([original[8], original[9]], abs=0.05)
