"""`lcowatch process`: the ledger, quarantine, ignored frames, retries and the JSON log, on real folders."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest
import yaml
from astropy.io import fits

from conftest import REAL_TARGETS, write_config
from lcowatch.cli import main
from lcowatch.config import load
from lcowatch.pipeline.runner import Outcome, Pipeline
from lcowatch.pipeline.stages import default_stages
from lcowatch.simulation.simulate import FrameSpec, make_field, write_frame
from lcowatch.state.ledger import Ledger, connect

FIELD = make_field("PTEST", 80.0, 5.0, nstars=800, radius_arcmin=3.0, seed=9)
TARGETS = {"PTEST": {"ra": 80.0, "dec": 5.0}}


def _frame(folder: Path, name: str, **spec: object) -> Path:
    path = folder / name
    write_frame(path, FIELD, FrameSpec(shape=(256, 256), **spec), compress="fz")  # type: ignore[arg-type]
    return path


def _states(folder: Path) -> dict[str, str]:
    with sqlite3.connect(folder / "state" / "lcowatch.sqlite") as conn:
        return {Path(path).name: state for path, state in conn.execute("SELECT path, state FROM files")}


def _process(config: Path, capsys: pytest.CaptureFixture[str], *paths: Path) -> tuple[int, list[dict]]:
    capsys.readouterr()
    code = main(["process", "--config", str(config), *map(str, paths)])
    return code, [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


class TestBadInput:
    """Unreadable files are quarantined with a reason beside them; the run goes on and exits 0."""

    def test_corrupt_files_are_quarantined_and_good_ones_processed(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        config = write_config(tmp_path, TARGETS)
        incoming = tmp_path / "in"
        good = _frame(incoming, "good.fits.fz", mjd_start=61000.1)
        (incoming / "empty.fits").write_bytes(b"")
        (incoming / "text.fits").write_text("SIMPLE? no, a note\n" * 300)
        (incoming / "truncated.fits.fz").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
        bomb = "SIMPLE  =                    T" + " " * 50 + "".join(
            f"{card:<80}" for card in ("BITPIX  =                  -32", "NAXIS   =                    2",
                                      "NAXIS1  =               500000", "NAXIS2  =               500000", "END")
        )  # fmt: skip
        (incoming / "bomb.fits").write_bytes(bomb.encode().ljust(2880, b" "))
        code, events = _process(config, capsys, incoming)
        assert code == 0
        states = _states(tmp_path)
        assert states.pop("good.fits.fz") == "done"
        assert set(states.values()) == {"quarantined"} and len(states) == 4
        quarantine = tmp_path / "state" / "quarantine"
        for name in states:
            assert not (incoming / name).exists() and (quarantine / name).exists()
            note = json.loads((quarantine / f"{name}.reason.json").read_text())
            assert note["reason"] and note["step"] == "read" and note["versions"]["lcowatch"]
        reasons = {e["file"]: e["reason"] for e in events if e["event"] == "frame_quarantined"}
        assert reasons["empty.fits"] == "empty file"
        assert "not a FITS file" in reasons["text.fits"]

    def test_retry_puts_a_quarantined_file_back(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        config = write_config(tmp_path, TARGETS, processing={"max_pixels": 1000})
        frame = _frame(tmp_path / "in", "big.fits.fz")
        _process(config, capsys, tmp_path / "in")
        assert _states(tmp_path) == {"big.fits.fz": "quarantined"}
        document = yaml.safe_load(config.read_text())
        document["processing"]["max_pixels"] = 10_000_000
        config.write_text(yaml.safe_dump(document))
        assert main(["retry", "--config", str(config), "big.fits.fz"]) == 0
        assert frame.exists()
        code, _ = _process(config, capsys, tmp_path / "in")
        assert code == 0 and _states(tmp_path) == {"big.fits.fz": "done"}

    def test_retry_by_sha256(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        config = write_config(tmp_path, TARGETS, processing={"max_pixels": 1000})
        frame = _frame(tmp_path / "in", "big.fits.fz")
        sha256 = hashlib.sha256(frame.read_bytes()).hexdigest()
        _process(config, capsys, tmp_path / "in")
        assert not frame.exists()
        assert main(["retry", "--config", str(config), sha256]) == 0
        assert frame.exists() and _states(tmp_path) == {"big.fits.fz": "pending"}
        assert "pending again" in capsys.readouterr().out
        assert main(["retry", "--config", str(config), "0" * 64]) == 2
        assert "no file with sha256" in capsys.readouterr().err


class TestLedger:
    """The ledger is keyed by content: the same content twice adds nothing, new content is a new frame."""

    def test_same_content_new_name_and_new_content_old_name(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        config = write_config(tmp_path, TARGETS)
        incoming = tmp_path / "in"
        first = _frame(incoming, "a.fits.fz", mjd_start=61000.10, seed=1)
        _frame(incoming, "b.fits.fz", mjd_start=61000.11, seed=2)
        _process(config, capsys, incoming)

        def count(table: str) -> int:
            with sqlite3.connect(tmp_path / "state" / "lcowatch.sqlite") as conn:
                return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])

        before = (count("files"), count("frames"), count("points"))
        shutil.copy(first, incoming / "copy-of-a.fits.fz")
        code, _ = _process(config, capsys, incoming)
        assert code == 0 and (count("files"), count("frames"), count("points")) == before
        _frame(incoming, "a.fits.fz", mjd_start=61000.12, seed=3)  # new pixels under the old name
        _process(config, capsys, incoming)
        assert (count("files"), count("frames")) == (before[0] + 1, before[1] + 1)

    def test_unknown_object_is_ignored_with_its_name(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        config = write_config(tmp_path, TARGETS)
        _frame(tmp_path / "in", "other.fits.fz", object_name="NGC 1234")
        code, _ = _process(config, capsys, tmp_path / "in")
        with sqlite3.connect(tmp_path / "state" / "lcowatch.sqlite") as conn:
            state, error = conn.execute("SELECT state, error FROM files").fetchone()
        assert code == 0 and state == "ignored" and "'NGC 1234'" in error


class TestLog:
    """Every event about a frame names it; one summary per frame gives the outcome and seconds per step."""

    def test_frame_events_are_bound_and_summarised(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        config = write_config(tmp_path, TARGETS)
        _frame(tmp_path / "in", "f1.fits.fz", mjd_start=61000.1, seed=4, fwhm_arcsec=2.2)
        _frame(tmp_path / "in", "f2.fits.fz", mjd_start=61000.2, seed=5, fwhm_arcsec=2.2)
        _frame(tmp_path / "in", "f3.fits.fz", mjd_start=61000.3, seed=6, fwhm_arcsec=1.3)
        _, events = _process(config, capsys, tmp_path / "in")
        summaries = [e for e in events if e["event"] == "frame_processed"]
        # The batch's template first, then observation-time order.
        assert [e["file"] for e in summaries] == ["f3.fits.fz", "f1.fits.fz", "f2.fits.fz"]
        for event in summaries:
            assert {"sha256", "target", "filter", "outcome", "seconds", "level", "timestamp"} <= event.keys()
            assert event["target"] == "PTEST" and event["filter"] == "rp" and len(event["sha256"]) == 64
            assert {"preprocess", "quality", "register", "photometry", "store"} <= event["seconds"].keys()
        # The point itself, so that jq can follow the light curve: the same numbers as the store's.
        with sqlite3.connect(tmp_path / "state" / "lcowatch.sqlite") as conn:
            stored = dict(conn.execute("SELECT f.file, p.diff_mag FROM points p JOIN frames f USING (sha256) "
                                       "WHERE p.aperture = 0").fetchall())  # fmt: skip
        for event in summaries:
            assert {"mag", "mag_err", "diff_mag", "diff_mag_err", "limit_mag", "flags"} <= event.keys()
            assert event["diff_mag"] == pytest.approx(stored[event["file"]], abs=1e-4)


class TestRealFiles:
    """All five real files are handled: images processed, catalogs quarantined, the 2MASS list left alone."""

    def test_every_real_file(self, tmp_path: Path, real_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
        config = write_config(tmp_path, REAL_TARGETS)
        for path in real_data.iterdir():
            shutil.copy(path, tmp_path / "in" / path.name)
        code, events = _process(config, capsys, tmp_path / "in")
        states = _states(tmp_path)
        assert code == 0
        assert states["lsc1m005-fl15-20170614-0130-e91_cropped.fits.gz"] == "done"
        assert states["banzai_test_frame.fits.fz"] == "rejected"  # trailed stars: a normal, recorded outcome
        assert states["cpt1m012-fa06-20200113-0102-matched-cat.fits"] == "quarantined"
        assert states["ogg2m001-ep04-20201006-0097-matched-cat.fits"] == "quarantined"
        assert (tmp_path / "in" / "lsc1m005-fl15-20170701-0144-e91_cropped_2mass.cat").exists()
        assert any(e["event"] == "frame_warning" and "BPM shape" in e["message"] for e in events)


class TestDiagnostics:
    """With `diagnostics: true`, poor frames and new templates get PNG previews with their apertures."""

    def test_previews(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        config = write_config(tmp_path, TARGETS, diagnostics=True)
        _frame(tmp_path / "in", "sharp.fits.fz", mjd_start=61000.1, seed=11)
        _frame(tmp_path / "in", "blurred.fits.fz", mjd_start=61000.2, seed=12, fwhm_arcsec=6.0)
        code, events = _process(config, capsys, tmp_path / "in")
        assert code == 0
        folder = tmp_path / "state" / "diagnostics"
        written = sorted(p.name for p in folder.iterdir())
        assert written == ["poor-blurred.fits.fz.png", "template-sharp.fits.fz.png"]
        assert all((folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in written)
        assert sum(e["event"] == "diagnostic_written" for e in events) == 2


class TestProgress:
    """The progress bar is drawn for a terminal only, one pass after the other, and counts files, outcomes,
    rate and time left."""

    def test_terminal_and_pipe(self) -> None:
        import io

        from lcowatch.cli import Progress

        shown, piped = io.StringIO(), io.StringIO()
        for stream, enabled in ((piped, False), (shown, True)):
            progress = Progress({"survey": 2, "measure": 3}, stream, enabled=enabled)
            for _ in range(2):
                progress.update("survey", None)
            for state in ("done", "rejected", "done"):
                progress.update("measure", Outcome(Path("f"), state))
            progress.close()
        assert piped.getvalue() == ""
        drawn = shown.getvalue().split("\r")
        assert any(line.startswith("survey") and "2/2" in line for line in drawn)
        last = drawn[-1]
        assert last.startswith("measure") and "3/3" in last and "file/s" in last
        assert "2 done, 1 rejected" in last and last.endswith("\n")

    def test_log_lines_at_the_same_terminal_go_above_it(self) -> None:
        from lcowatch.cli import Progress

        class Terminal(io.StringIO):
            def isatty(self) -> bool:
                return True

            def screen(self) -> list[str]:
                """The lines a terminal shows: a carriage return goes back to the line's start, ESC[K
                clears from there to its end."""
                lines = []
                for raw in self.getvalue().split("\n"):
                    line, column = "", 0
                    for token in re.split(r"(\r|\x1b\[K)", raw):
                        if token == "\r":
                            column = 0
                        elif token == "\x1b[K":
                            line = line[:column]
                        else:
                            line, column = line[:column] + token + line[column + len(token) :], column + len(token)
                    lines.append(line)
                return lines

        terminal = Terminal()
        progress = Progress({"measure": 2}, terminal, enabled=True)
        logs = progress.beneath(terminal)
        progress.update("measure", Outcome(Path("f"), "done"))
        print('{"event": "frame_processed"}', file=logs)
        progress.update("measure", Outcome(Path("g"), "done"))
        print('{"event": "process_finished"}', file=logs)
        progress.close()
        screen = [line.rstrip() for line in terminal.screen()]
        assert screen[0] == '{"event": "frame_processed"}' and screen[1] == '{"event": "process_finished"}'
        assert "2/2" in screen[2] and "2 done" in screen[2] and screen[3] == ""
        pipe = io.StringIO()
        assert progress.beneath(pipe) is pipe  # logs to a pipe or a file are left as they are


class TestAwkwardFrames:
    """Frames the pipeline cannot fully use still end well: waiting for a template, or no catalog band."""

    def test_frame_before_any_template_is_processed_once_one_exists(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        config = write_config(tmp_path, TARGETS)
        unsolved = _frame(tmp_path / "in", "unsolved.fits.fz", mjd_start=61000.10, seed=31, wcs_error=True)
        code, events = _process(config, capsys, unsolved)
        assert code == 0 and [(e["file"], e["outcome"]) for e in events if e["event"] == "frame_processed"] == [
            ("unsolved.fits.fz", "rejected")
        ]
        _frame(tmp_path / "in", "solved.fits.fz", mjd_start=61000.11, seed=32)
        code, events = _process(config, capsys, tmp_path / "in")
        assert code == 0
        assert _states(tmp_path) == {"unsolved.fits.fz": "done", "solved.fits.fz": "done"}
        outcomes = [(e["file"], e["outcome"]) for e in events if e["event"] == "frame_processed"]
        assert outcomes == [("solved.fits.fz", "done"), ("unsolved.fits.fz", "done")]

    def test_a_batch_measures_a_frame_with_a_solved_wcs_first(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The target's reference frame needs a solved WCS: a sharper unsolved frame does not lead."""
        config = write_config(tmp_path, TARGETS)
        _frame(tmp_path / "in", "unsolved.fits.fz", mjd_start=61000.10, seed=31, wcs_error=True, fwhm_arcsec=1.2)
        _frame(tmp_path / "in", "solved.fits.fz", mjd_start=61000.11, seed=32, fwhm_arcsec=2.4)
        code, events = _process(config, capsys, tmp_path / "in")
        assert code == 0
        outcomes = [(e["file"], e["outcome"]) for e in events if e["event"] == "frame_processed"]
        assert outcomes == [("solved.fits.fz", "done"), ("unsolved.fits.fz", "done")]

    def test_filter_without_a_standard_band_stays_uncalibrated(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        from astropy.io import fits

        from lcowatch import flags

        write_frame(tmp_path / "y.fits", FIELD, FrameSpec(shape=(256, 256), seed=33))
        with fits.open(tmp_path / "y.fits", mode="update") as hdul:
            hdul["SCI"].header["FILTER"] = "Y"
        (tmp_path / "in").mkdir()
        shutil.move(tmp_path / "y.fits", tmp_path / "in" / "y.fits")
        stars = tmp_path / "stars.csv"
        stars.write_text("ra,dec,r,r_err\n80.0,5.0,15.0,0.01\n")
        config = write_config(tmp_path, {"PTEST": {**TARGETS["PTEST"], "refcat": str(stars)}})
        code, _ = _process(config, capsys, tmp_path / "in")
        assert code == 0 and _states(tmp_path) == {"y.fits": "done"}
        with sqlite3.connect(tmp_path / "state" / "lcowatch.sqlite") as conn:
            band, mag, mask = conn.execute("SELECT band, mag, flags FROM points WHERE aperture = 0").fetchone()
        assert band is None and mag is None
        assert mask & flags.value("uncalibrated", "nonstandard_band") == flags.value("uncalibrated", "nonstandard_band")

    def test_cloudy_is_judged_against_the_same_instrument_only(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        from lcowatch import flags

        config = write_config(tmp_path, TARGETS, quality={"min_nstars": 5})
        _frame(tmp_path / "in", "a.fits.fz", mjd_start=61000.10, seed=41)
        # Another camera 1.2 mag less sensitive is not cloudy; the same camera losing 0.75 mag is.
        _frame(tmp_path / "in", "b.fits.fz", mjd_start=61000.11, seed=42, instrument="fa14", zeropoint=22.3)
        _frame(tmp_path / "in", "c.fits.fz", mjd_start=61000.12, seed=43, transparency=0.5)
        assert _process(config, capsys, tmp_path / "in")[0] == 0
        with sqlite3.connect(tmp_path / "state" / "lcowatch.sqlite") as conn:
            cloudy = dict(conn.execute(
                f"SELECT f.file, p.flags & {flags.value('cloudy')} FROM points p JOIN frames f USING (sha256) "
                "WHERE p.aperture = 0"
            ).fetchall())  # fmt: skip
        assert cloudy == {"a.fits.fz": 0, "b.fits.fz": 0, "c.fits.fz": flags.value("cloudy")}


class TestUnreadableFile:
    """A file that cannot be read (here: permission denied) is reported and left alone; the run goes on."""

    def test_permission_denied(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        config = write_config(tmp_path, TARGETS)
        locked = _frame(tmp_path / "in", "locked.fits.fz", seed=51)
        _frame(tmp_path / "in", "open.fits.fz", seed=52, mjd_start=61000.3)
        # CI runs as root, which reads any file whatever its mode: refuse at the system-call boundary.
        read_bytes = Path.read_bytes

        def refuse(path: Path) -> bytes:
            if path.name == locked.name:
                raise PermissionError(13, "Permission denied", str(path))
            return read_bytes(path)

        monkeypatch.setattr(Path, "read_bytes", refuse)
        code, events = _process(config, capsys, tmp_path / "in")
        assert code == 1 and locked.exists()
        assert _states(tmp_path) == {"open.fits.fz": "done"}
        assert [e["file"] for e in events if e["event"] == "file_unreadable"] == ["locked.fits.fz"]


class TestCalibrationFilledIn:
    """Points made while a target had no catalog are calibrated as soon as one answers, without a
    ``recalibrate`` by hand."""

    def test_a_catalog_added_later_calibrates_the_earlier_points(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        from lcowatch.simulation.simulate import write_refcat

        (tmp_path / "night1").mkdir()
        (tmp_path / "night2").mkdir()
        early = [_frame(tmp_path / "night1", f"early{i}.fits.fz", mjd_start=61000.1 + i / 100) for i in range(3)]
        assert _process(write_config(tmp_path, TARGETS), capsys, *early)[0] == 0
        write_refcat(FIELD, tmp_path / "ptest.csv")
        config = write_config(tmp_path, {"PTEST": {**TARGETS["PTEST"], "refcat": "ptest.csv"}})
        late = _frame(tmp_path / "night2", "late.fits.fz", mjd_start=61001.1)
        code, events = _process(config, capsys, late)
        assert code == 0
        assert [e["calibrated"] for e in events if e["event"] == "calibration_filled_in"] == [4]
        with sqlite3.connect(tmp_path / "state" / "lcowatch.sqlite") as conn:
            mags = conn.execute("SELECT mag FROM points WHERE aperture = 0").fetchall()
        assert len(mags) == 4 and all(mag is not None for (mag,) in mags)


def _edited(folder: Path, name: str, cards: dict[str, object], mjd_start: float) -> Path:
    """An uncompressed frame whose SCI header has ``cards`` set (None: removed)."""
    path = folder / name
    write_frame(path, FIELD, FrameSpec(shape=(256, 256), mjd_start=mjd_start), compress=None)
    with fits.open(path, mode="update") as hdul:
        for key, value in cards.items():
            if value is None:
                del hdul["SCI"].header[key]
            else:
                hdul["SCI"].header[key] = value
    return path


class TestHostileHeaders:
    """Header values outside physical ranges, and cards that do not parse, quarantine the frame at once
    with the keyword in the reason; the batch goes on. A wrong site only costs the BJD its site."""

    def test_each_is_quarantined_with_its_reason(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        config = write_config(tmp_path, TARGETS)
        incoming = tmp_path / "in"
        bad = {
            "exptime.fits": ({"EXPTIME": 1e300}, "EXPTIME"),
            "date.fits": ({"DATE-OBS": None, "MJD-OBS": 1e20}, "MJD"),
            "pixscale.fits": ({"PIXSCALE": 0.0}, "PIXSCALE"),
            "gain.fits": ({"GAIN": -5.0}, "GAIN"),
        }
        for k, (name, (cards, _)) in enumerate(bad.items()):
            _edited(incoming, name, cards, 61000.1 + k / 100)
        site = _edited(incoming, "site.fits", {"LATITUDE": 1000.0}, 61000.2)
        raw = _edited(incoming, "nul.fits", {}, 61000.3).read_bytes()
        at = raw.index(b"OBJECT  = 'PTEST") + 13
        (incoming / "nul.fits").write_bytes(raw[:at] + b"\x00" + raw[at + 1 :])
        code, events = _process(config, capsys, incoming)
        assert code == 0
        states = _states(tmp_path)
        assert states.pop(site.name) == "done"
        assert states == dict.fromkeys([*bad, "nul.fits"], "quarantined")
        reasons = {e["file"]: e["reason"] for e in events if e["event"] == "frame_quarantined"}
        for name, (_, keyword) in bad.items():
            assert keyword in reasons[name], reasons[name]
        assert "header does not verify" in reasons["nul.fits"]


class TestFirstCommands:
    """The commands a user reaches for first work on a fresh state folder, with options before or after
    the command, and a bad output path is a one-line error, not a traceback."""

    def test_status_on_a_fresh_state_folder(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        config = write_config(tmp_path, TARGETS)
        assert main(["status", "--config", str(config)]) == 0
        assert "pending 0, done 0" in capsys.readouterr().out

    def test_config_before_the_command(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        config = write_config(tmp_path, TARGETS)
        assert main(["--config", str(config), "status"]) == 0
        assert "pending 0" in capsys.readouterr().out

    def test_export_into_a_missing_folder(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        config = write_config(tmp_path, TARGETS)
        missing = tmp_path / "no" / "such" / "x.csv"
        assert main(["export", "--config", str(config), "PTEST", "-o", str(missing)]) == 1
        assert f"cannot write {missing}" in capsys.readouterr().err

    def test_a_filter_without_points_is_an_error_naming_those_with(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        config = write_config(tmp_path, TARGETS)
        _frame(tmp_path / "in", "good.fits.fz", mjd_start=61000.1)
        assert _process(config, capsys, tmp_path / "in")[0] == 0
        assert main(["export", "--config", str(config), "PTEST", "--filter", "gp"]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and "no points in filter 'gp' (it has points in: rp)" in captured.err
        assert main(["export", "--config", str(config), "PTEST", "--filter", "rp"]) == 0
        assert len(capsys.readouterr().out.splitlines()) == 1 + len(load(config).photometry.apertures)  # a row each

    def test_frames_ignored_before_their_target_was_configured_are_taken_up(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        config = write_config(tmp_path, TARGETS)
        _frame(tmp_path / "in", "later.fits.fz", mjd_start=61000.1, object_name="LATER")
        assert _process(config, capsys, tmp_path / "in")[0] == 0
        assert _states(tmp_path) == {"later.fits.fz": "ignored"}
        config = write_config(tmp_path, TARGETS | {"LATER": {"ra": 80.0, "dec": 5.0}})
        code, events = _process(config, capsys, tmp_path / "in")
        assert code == 0 and _states(tmp_path) == {"later.fits.fz": "done"}
        assert [e["file"] for e in events if e["event"] == "ignored_frame_requeued"] == ["later.fits.fz"]

    def test_a_target_far_from_its_frames_is_a_warning(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        # RA given in hours where degrees were meant: 80 deg is 5h20m; "5.333" as degrees is 75 deg away.
        config = write_config(tmp_path, {"PTEST": {"ra": 5.333, "dec": 5.0}})
        _frame(tmp_path / "in", "good.fits.fz", mjd_start=61000.1)
        _, events = _process(config, capsys, tmp_path / "in")
        (far,) = [e for e in events if e["event"] == "target_far_from_frame"]
        assert far["file"] == "good.fits.fz" and far["distance_arcmin"] > 4000
        config = write_config(tmp_path / "right", TARGETS)
        _frame(tmp_path / "right" / "in", "good.fits.fz", mjd_start=61000.1)
        _, events = _process(config, capsys, tmp_path / "right" / "in")
        assert not [e for e in events if e["event"] == "target_far_from_frame"]

    def test_every_command_says_what_it_does(self, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit):
            main(["--help"])
        top = capsys.readouterr().out
        assert "``" not in top and "lcowatch command line" in top  # prose, not docstring markup
        commands = re.findall(r"^    ([a-z][a-z-]*) ", top, flags=re.M)
        assert len(commands) >= 14, commands
        for command in commands:
            with pytest.raises(SystemExit):
                main([command, "--help"])
            usage, description = capsys.readouterr().out.split("\n\n")[:2]
            assert usage.startswith(f"usage: lcowatch {command}") and description.strip().endswith("."), description
            assert "``" not in description

    def test_status_names_the_files_that_want_a_look(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """Pending (a frame in hand, or one a crash left) and quarantined files are named with their reasons,
        by ``status`` and ``status --json``; ``frames`` lists the pending one too."""
        config = write_config(tmp_path, TARGETS)
        incoming = tmp_path / "in"
        (incoming / "empty.fits").write_bytes(b"")
        assert _process(config, capsys, incoming)[0] == 0
        (tmp_path / "elsewhere").mkdir()
        in_hand = _frame(tmp_path / "elsewhere", "in-hand.fits.fz", mjd_start=61000.1)
        content = in_hand.read_bytes()
        Ledger(connect(tmp_path / "state")).start_attempt(hashlib.sha256(content).hexdigest(), in_hand, len(content))
        capsys.readouterr()
        assert main(["status", "--config", str(config)]) == 0
        out = capsys.readouterr().out
        assert "pending in-hand.fits.fz (attempts 1)" in out
        assert "quarantined empty.fits: empty file" in out
        assert main(["status", "--config", str(config), "--json"]) == 0
        status = json.loads(capsys.readouterr().out)
        assert [f["file"] for f in status["pending"]] == ["in-hand.fits.fz"]
        assert [(f["file"], f["reason"]) for f in status["quarantined"]] == [("empty.fits", "empty file")]
        assert main(["frames", "--config", str(config), "--format", "csv", "--state", "pending"]) == 0
        assert [row["file"] for row in csv.DictReader(io.StringIO(capsys.readouterr().out))] == ["in-hand.fits.fz"]

    def test_frames_lists_every_file_with_its_state(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        config = write_config(tmp_path, TARGETS)
        incoming = tmp_path / "in"
        _frame(incoming, "good.fits.fz", mjd_start=61000.1)
        _frame(incoming, "other.fits.fz", mjd_start=61000.2, object_name="SOMEONE-ELSE")
        (incoming / "empty.fits").write_bytes(b"")
        assert _process(config, capsys, incoming)[0] == 0
        assert main(["frames", "--config", str(config), "--format", "csv"]) == 0
        rows = {row["file"]: row for row in csv.DictReader(io.StringIO(capsys.readouterr().out))}
        assert {name: row["state"] for name, row in rows.items()} == {
            "good.fits.fz": "done", "other.fits.fz": "ignored", "empty.fits": "quarantined"
        }  # fmt: skip
        assert rows["empty.fits"]["reasons"] == "empty file"
        assert "matches no configured target" in rows["other.fits.fz"]["reasons"]
        assert main(["frames", "--config", str(config), "--format", "csv", "--state", "quarantined"]) == 0
        assert [row["file"] for row in csv.DictReader(io.StringIO(capsys.readouterr().out))] == ["empty.fits"]


class TestOneExposureOnePoint:
    """The same exposure in two encodings (``.fits.fz`` and its funpacked ``.fits``) or under a second
    name gives one point; the copy is recorded as ignored, naming the first."""

    def test_a_second_encoding_is_not_measured_again(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        config = write_config(tmp_path, TARGETS)
        incoming = tmp_path / "in"
        packed = _frame(incoming, "cpt1m012-fa06-20251121-0011-e91.fits.fz", mjd_start=61000.1)
        with fits.open(packed) as hdul:
            fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(hdul["SCI"].data, hdul["SCI"].header, name="SCI")]).writeto(
                incoming / "cpt1m012-fa06-20251121-0011-e91.fits"
            )
        shutil.copyfile(packed, incoming / "redelivered.fits.fz")  # the same bytes: known by their hash
        other = _frame(incoming, "cpt1m012-fa06-20251121-0012-e91.fits.fz", mjd_start=61000.2)
        code, events = _process(config, capsys, incoming)
        assert code == 0
        states = _states(tmp_path)
        assert sorted(states.values()) == ["done", "done", "ignored"], states
        assert states[other.name] == "done"
        with sqlite3.connect(tmp_path / "state" / "lcowatch.sqlite") as conn:
            assert conn.execute("SELECT COUNT(*) FROM points WHERE aperture = 0").fetchone()[0] == 2
        duplicates = [e for e in events if e["event"] == "frame_duplicate"]
        assert len(duplicates) == 1 and duplicates[0]["first"].startswith("cpt1m012-fa06-20251121-0011-e91.fits")


class TestHostileFiles:
    """`process` holds named files to the daemon's rules: a FIFO or a device is not opened; a file larger
    than any frame, a gzip bomb or a truncated file is quarantined without being read whole; the good
    frames beside them are processed."""

    def test_hostile_files_cannot_hang_or_exhaust_it(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        # 256 x 256 frames fit; 4 MB of pixels do not.
        config = write_config(tmp_path, TARGETS, processing={"max_pixels": 500_000})
        incoming = tmp_path / "in"
        good = _frame(incoming, "good.fits.fz", mjd_start=61000.1)
        os.mkfifo(incoming / "fifo.fits")
        (incoming / "zero.fits").symlink_to("/dev/zero")
        header = fits.Header({"SIMPLE": True, "BITPIX": -32, "NAXIS": 2, "NAXIS1": 1024, "NAXIS2": 1024})
        (incoming / "large.fits").write_bytes(header.tostring().encode() + bytes(1024 * 1024 * 4))
        with gzip.open(incoming / "bomb.fits.gz", "wb") as bomb:
            bomb.write("".join(str(card) for card in fits.Header({"SIMPLE": True, "BITPIX": 8}).cards).encode())
            bomb.write(b" " * (64 << 20))  # no END card, ever: 64 MB of blanks in 64 kB
        truncated = incoming / "truncated.fits.fz"
        truncated.write_bytes(good.read_bytes()[: 3 * 2880 + 100])
        code, events = _process(config, capsys, incoming, incoming / "fifo.fits")
        states = _states(tmp_path)
        assert states["good.fits.fz"] == "done"
        assert states["large.fits"] == states["bomb.fits.gz"] == states["truncated.fits.fz"] == "quarantined"
        assert "fifo.fits" not in states and "zero.fits" not in states
        reasons = {e["file"]: e["reason"] for e in events if e["event"] == "frame_quarantined"}
        assert "larger than a frame" in reasons["large.fits"] and "no END card" in reasons["bomb.fits.gz"]
        assert "2880-byte FITS blocks" in reasons["truncated.fits.fz"]
        named = {e.get("file") or Path(e.get("path", "")).name for e in events if e["event"] == "not_a_regular_file"}
        assert named == {"fifo.fits", "zero.fits"}
        assert code == 1  # the FIFO was named


class _Hold:
    """A last stage that holds its frame, measured but not written, until released: the moment at which
    another process (the daemon beside a ``process`` run) can overtake it."""

    name = "hold"

    def __init__(self) -> None:
        self.reached, self.release = threading.Event(), threading.Event()

    def __call__(self, work: object) -> None:
        self.reached.set()
        assert self.release.wait(60)


class TestTwoWritersOnANewTarget:
    """Two processes measuring a new target's first frames at once set it up once: the one that commits
    second measures its frame again against what the first set up (one reference frame, no star twice)."""

    def test_the_second_writer_measures_again(self, tmp_path: Path) -> None:
        config = load(write_config(tmp_path, TARGETS))
        incoming = tmp_path / "in"
        first = _frame(incoming, "a.fits.fz", mjd_start=61000.1, seed=1)
        second = _frame(incoming, "b.fits.fz", mjd_start=61000.2, seed=2)
        hold = _Hold()
        slow = Pipeline(config, connect(config.state_dir), stages=[*default_stages(config), hold])
        fast = Pipeline(config, connect(config.state_dir))
        outcomes: dict[str, Outcome] = {}
        thread = threading.Thread(target=lambda: outcomes.setdefault("slow", slow.process_path(first)))
        thread.start()
        assert hold.reached.wait(60)  # the slow writer has made the target's first template of its own frame
        outcomes["fast"] = fast.process_path(second)
        hold.release.set()
        thread.join(60)
        assert outcomes["slow"].state == outcomes["fast"].state == "done"
        with sqlite3.connect(tmp_path / "state" / "lcowatch.sqlite") as conn:
            references = conn.execute("SELECT sha256 FROM reference_frames").fetchall()
            stars = [row[0] for row in conn.execute("SELECT star_id FROM comparison_stars")]
            points = conn.execute("SELECT COUNT(*) FROM points WHERE aperture = 0").fetchone()[0]
        assert references == [(outcomes["fast"].sha256,)]
        assert len(stars) == len(set(stars)) > 5
        assert points == 2
