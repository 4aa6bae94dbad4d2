"""The state layer's schema: versioned, and brought forward from older releases with nothing lost."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from conftest import write_config
from lcowatch.cli import main
from lcowatch.config import load
from lcowatch.science.frame import read_content, read_frame
from lcowatch.science.preprocess import preprocess
from lcowatch.science.quality import detect_sources, measure_quality
from lcowatch.simulation.simulate import FrameSpec, make_field
from lcowatch.simulation.simulate import write_frame as write_image
from lcowatch.state.ledger import LEDGER_NAME, connect
from lcowatch.state.schema import SCHEMA_VERSION, SchemaTooNew
from lcowatch.state.store import Store

#: A state folder written by release 0.1 (before schema versions): 4 frames of target V9 processed.
RELEASE_0_1 = Path(__file__).parent / "data" / "release-0.1" / LEDGER_NAME


def columns(path: Path, table: str) -> list[str]:
    with sqlite3.connect(path) as conn:
        return [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]


def rows(path: Path, table: str, names: list[str] | None = None) -> list[tuple[object, ...]]:
    """The table's rows (only the columns ``names``, when given), in key order."""
    with sqlite3.connect(path) as conn:
        selected = ", ".join(names or columns(path, table))
        return [tuple(r) for r in conn.execute(f"SELECT {selected} FROM {table} ORDER BY 1, 2")]


#: Per schema version, how to turn a current database back into one of that version, and the columns
#: (table, column) its migration must bring back.
OLDER_VERSIONS = {
    1: (("ALTER TABLE points DROP COLUMN diff_color_term",), (("points", "diff_color_term"),)),
    2: (
        ("ALTER TABLE points DROP COLUMN reference", "DROP TABLE reference_images"),
        (("points", "reference"), ("reference_images", "image")),
    ),
    3: (("DROP TABLE reference_pins",), (("reference_pins", "position"),)),
    4: (
        (
            "ALTER TABLE reference_images DROP COLUMN transient_total",
            "ALTER TABLE reference_images DROP COLUMN transient_total_err",
        ),
        (("reference_images", "transient_total"), ("reference_images", "transient_total_err")),
    ),
}


class TestSchemaVersion:
    """A database of an earlier release opens under this code with every row kept; a newer one is refused."""

    def test_release_0_1_database_is_brought_forward(self, tmp_path: Path) -> None:
        state = tmp_path / "state"
        state.mkdir()
        shutil.copyfile(RELEASE_0_1, state / LEDGER_NAME)
        tables = ("files", "frames", "points", "templates")
        names = {table: columns(state / LEDGER_NAME, table) for table in tables}
        before = {table: rows(state / LEDGER_NAME, table) for table in tables}
        with sqlite3.connect(state / LEDGER_NAME) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
        connect(state).close()
        with sqlite3.connect(state / LEDGER_NAME) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        for table, old in before.items():
            assert rows(state / LEDGER_NAME, table, names[table]) == old, table
        assert len(before["points"]) == 12 and sum(1 for r in before["files"] if r[3] == "done") == 4

    def test_the_old_points_export_under_this_code(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        config = write_config(tmp_path, {"V9": {"ra": 120.0, "dec": 5.0}})
        (tmp_path / "state").mkdir()
        shutil.copyfile(RELEASE_0_1, tmp_path / "state" / LEDGER_NAME)
        assert main(["export", "--config", str(config), "V9", "--format", "csv"]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert len(lines) == 1 + len(rows(RELEASE_0_1, "points"))  # a header and every stored point

    @pytest.mark.parametrize("version", sorted(OLDER_VERSIONS))
    def test_an_older_version_gains_what_it_lacks(self, tmp_path: Path, version: int) -> None:
        assert max(OLDER_VERSIONS) == SCHEMA_VERSION - 1  # a new version needs its case here
        undo, wanted = OLDER_VERSIONS[version]
        connect(tmp_path).close()
        with sqlite3.connect(tmp_path / LEDGER_NAME) as conn:
            for statement in undo:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version}")
        connect(tmp_path).close()
        for table, column in wanted:
            assert column in columns(tmp_path / LEDGER_NAME, table)
        with sqlite3.connect(tmp_path / LEDGER_NAME) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION

    def test_a_new_database_starts_at_the_current_version(self, tmp_path: Path) -> None:
        connect(tmp_path).close()
        with sqlite3.connect(tmp_path / LEDGER_NAME) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION

    def test_a_newer_database_is_refused(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        state = tmp_path / "state"
        connect(state).close()
        with sqlite3.connect(state / LEDGER_NAME) as conn:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        with pytest.raises(SchemaTooNew, match="upgrade lcowatch"):
            connect(state)
        config = write_config(tmp_path, {"V9": {"ra": 120.0, "dec": 5.0}})
        assert main(["status", "--config", str(config)]) == 1
        assert "newer than this lcowatch" in capsys.readouterr().err


class TestVanishedFiles:
    """A file gone before it was finished is recorded as vanished only while its row is pending: a row that
    another process finished (quarantined, done) meanwhile is left as it is; a vanished file is not finished,
    so its content is worked on should it come back."""

    def test_only_pending_rows_are_marked(self, tmp_path: Path) -> None:
        from lcowatch.state.ledger import Ledger

        ledger = Ledger(connect(tmp_path))
        ledger.record("a" * 64, tmp_path / "a.fits", 10, "pending")
        ledger.record("b" * 64, tmp_path / "b.fits", 10, "quarantined", error="not a FITS file")
        for sha in ("a" * 64, "b" * 64):
            ledger.mark_vanished(sha, tmp_path / f"{sha[0]}.fits", "read")
        vanished, quarantined = ledger.get("a" * 64), ledger.get("b" * 64)
        assert vanished is not None and vanished.state == "ignored" and not vanished.finished
        assert vanished.error is not None and vanished.error.startswith("vanished before it was finished")
        assert quarantined is not None and quarantined.state == "quarantined" and quarantined.finished
        assert quarantined.error == "not a FITS file"


class TestSourceList:
    """A frame's source list reads back as the pipeline measured it: every column, no FWHM (NaN) as NaN."""

    def test_round_trip(self, tmp_path: Path) -> None:
        field = make_field("SRC", 30.0, -10.0, nstars=300, radius_arcmin=3.0, seed=4)
        config_path = write_config(tmp_path, {"SRC": {"ra": 30.0, "dec": -10.0}})
        path = tmp_path / "in" / "frame.fits"
        write_image(path, field, FrameSpec(shape=(256, 256), seed=2))
        assert main(["process", "--config", str(config_path), str(path)]) == 0
        config = load(config_path)
        content, sha = read_content(path)
        frame = read_frame(path, content, sha, config)
        pre = preprocess(frame)
        sources = detect_sources(pre, config.quality)
        measure_quality(frame, pre, sources, config.quality)  # refines the centroids, sets the FWHM column
        assert np.isnan(sources["fwhm"]).any() and np.isfinite(sources["fwhm"]).any()
        conn = connect(tmp_path / "state")
        back = Store(conn).sources(sha)
        conn.close()
        assert back.dtype == sources.dtype
        for name in sources.dtype.names or ():
            np.testing.assert_array_equal(back[name], sources[name], err_msg=name)
