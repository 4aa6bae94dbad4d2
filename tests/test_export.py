"""Exports and plots of a processed campaign: ECSV with units, AAVSO extended format, PNG plots."""

from __future__ import annotations

import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.table import Table

from conftest import write_config
from lcowatch import flags
from lcowatch.cli import main
from lcowatch.outputs.export import AAVSO_ACCEPTED_FLAGS, AAVSO_FIELDS, lightcurve_table
from lcowatch.outputs.plot import lightcurve_figure
from lcowatch.state.ledger import connect
from lcowatch.state.store import Store
from simulated import Campaign


def _export(campaign: Campaign, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    capsys.readouterr()
    assert main(["export", "--config", str(campaign.config), *args]) == 0
    return capsys.readouterr().out


class TestEcsvExport:
    """The ECSV export reads back with astropy, with units and provenance, one row per frame and aperture."""

    def test_round_trip_with_units(self, campaign: Campaign, capsys: pytest.CaptureFixture[str]) -> None:
        text = _export(campaign, capsys, "SN2026A", "--filter", "rp", "--format", "ecsv")
        table = Table.read(text, format="ascii.ecsv")
        assert str(table["mag"].unit) == "mag" and str(table["fwhm"].unit) == "arcsec"
        assert table.meta["target"] == "SN2026A" and table.meta["software"].startswith("lcowatch ")
        assert "cloudy" in table.meta["flags"]
        points = campaign.points("SN2026A", "rp")
        assert len(table) == 3 * len(points)
        first = table[table["aperture"] == table["aperture"][0]]
        assert np.allclose(first["diff_mag"], [p["diff_mag"] for p in points])
        assert set(table.colnames) >= {"file", "mjd", "bjd_tdb", "filter", "mag", "mag_err", "zp", "zp_err", "fwhm",
                                       "airmass", "flags", "diff_mag", "diff_mag_err", "aperture", "x", "y",
                                       "registration_rms", "template"}  # fmt: skip

    def test_csv_leaves_uncalibrated_magnitudes_empty(
        self, campaign: Campaign, capsys: pytest.CaptureFixture[str]
    ) -> None:
        text = _export(campaign, capsys, "V1", "--format", "csv")
        table = Table.read(text, format="ascii.csv")
        first = table[table["aperture"] == table["aperture"][0]]
        stored = campaign.points("V1", "rp")
        assert len(first) == len(stored) > 0
        empty = np.ma.getmaskarray(first["mag"]) if hasattr(first["mag"], "mask") else np.zeros(len(first), bool)
        assert list(empty) == [p["mag"] is None for p in stored]
        assert np.isfinite(np.asarray(first["diff_mag"], float)).all()

    def test_a_newline_in_a_file_name_keeps_the_result_file_readable(self, campaign: Campaign, tmp_path: Path) -> None:
        incoming = tmp_path / "in"
        incoming.mkdir()
        sources = sorted(name for name in campaign.truth if name.startswith("lsc"))[:2]  # V1's first two
        for name in sources:
            (incoming / name.replace("-e91", "-e91\nretake")).write_bytes((campaign.folder / "in" / name).read_bytes())
        config = write_config(tmp_path, {"V1": {"ra": 210.0, "dec": -20.0}})
        assert main(["process", "--config", str(config), str(incoming)]) == 0
        table = Table.read(tmp_path / "state" / "results" / "V1.ecsv", format="ascii.ecsv")
        assert len(table) == 3 * len(sources) and all("e91\\x0aretake" in str(file) for file in table["file"])


class TestAavsoExport:
    """The AAVSO Extended File Format: its header lines, then 15 comma-separated fields in the published order."""

    def test_format(self, campaign: Campaign, capsys: pytest.CaptureFixture[str]) -> None:
        lines = _export(campaign, capsys, "SN2026A", "--filter", "rp", "--format", "aavso").splitlines()
        header = [line for line in lines if line.startswith("#")]
        assert header[:2] == ["#TYPE=EXTENDED", "#OBSCODE=TST01"]
        assert "#DELIM=," in header and "#DATE=JD" in header and "#OBSTYPE=CCD" in header
        assert any(line.startswith("#SOFTWARE=lcowatch") for line in header)
        assert header[-1] == "#" + ",".join(AAVSO_FIELDS)
        assert AAVSO_FIELDS == ("NAME", "DATE", "MAG", "MERR", "FILT", "TRANS", "MTYPE", "CNAME", "CMAG", "KNAME",
                                "KMAG", "AMASS", "GROUP", "CHART", "NOTES")  # fmt: skip
        rows = [line.split(",") for line in lines if not line.startswith("#")]
        points = [p for p in campaign.points("SN2026A", "rp") if p["mag"] is not None]
        calibrated = [p for p in points if not p["flags"] & ~AAVSO_ACCEPTED_FLAGS]
        assert len(rows) == len(calibrated) and calibrated
        for fields, point in zip(rows, calibrated, strict=True):
            assert len(fields) == 15
            assert fields[0] == "SN 2026A"  # the target's aavso_name
            assert fields[4] == "SR" and fields[6] == "STD" and fields[7] == "ENSEMBLE"
            assert float(fields[1]) == pytest.approx(point["mjd"] + 2400000.5, abs=1e-6)
            assert float(fields[2]) == pytest.approx(point["mag"], abs=1e-4)
            assert fields[10] == "na" or 8 < float(fields[10]) < 20
        with_flagged = _export(campaign, capsys, "SN2026A", "--filter", "rp", "--format", "aavso", "--include-flagged")
        assert len([line for line in with_flagged.splitlines() if not line.startswith("#")]) == len(points)

    def test_the_check_star_is_a_catalog_star_named_by_its_position(
        self, campaign: Campaign, capsys: pytest.CaptureFixture[str]
    ) -> None:
        lines = _export(campaign, capsys, "SN2026A", "--filter", "rp", "--format", "aavso").splitlines()
        # In the frames where it was not measured cleanly, the check star is left out (na).
        rows = [fields for line in lines if not line.startswith("#") and (fields := line.split(","))[9] != "na"]
        assert len(rows) >= 0.8 * len([line for line in lines if not line.startswith("#")])
        names = {fields[9] for fields in rows}
        assert len(names) == 1, names
        name = names.pop()
        assert re.fullmatch(r"J\d{6}\.\d{2}[+-]\d{6}\.\d", name), name
        position = SkyCoord(f"{name[1:3]}h{name[3:5]}m{name[5:10]}s {name[10:13]}d{name[13:15]}m{name[15:]}s")
        catalog = Table.read(campaign.folder / "sn2026a-stars.csv", format="ascii.csv")
        stars = SkyCoord(catalog["ra"], catalog["dec"], unit="deg")
        index, separation, _ = position.match_to_catalog_sky(stars)
        assert separation.arcsec < 0.3  # the name truncates: 0.01 s of right ascension, 0.1" of declination
        # Its magnitude in each frame is its catalog magnitude, within the frame's calibration.
        kmag = np.array([float(fields[10]) for fields in rows])
        assert np.all(np.abs(kmag - catalog["r"][int(index)]) < 0.05), (kmag, catalog["r"][int(index)])

    def test_nothing_calibrated_is_an_error_and_writes_no_file(
        self, campaign: Campaign, capsys: pytest.CaptureFixture[str], tmp_path: Path
    ) -> None:
        report = tmp_path / "v1.txt"
        args = ["export", "--config", str(campaign.config), "V1", "--format", "aavso", "-o", str(report)]
        capsys.readouterr()
        assert main(args) == 1  # V1 has no reference catalog: nothing calibrated
        assert "no calibrated observation" in capsys.readouterr().err
        assert not report.exists()

    def test_an_observer_code_is_required(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        config = write_config(tmp_path, {"V9": {"ra": 120.0, "dec": 5.0}})
        assert main(["export", "--config", str(config), "V9", "--format", "aavso"]) == 2
        assert "aavso_obscode" in capsys.readouterr().err


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


class TestPlot:
    """`lcowatch plot` writes a real PNG whose points are the stored ones."""

    def test_png_from_the_store(self, campaign: Campaign, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
        path = tmp_path / "sn.png"
        capsys.readouterr()
        assert main(["plot", "--config", str(campaign.config), "SN2026A", "-o", str(path)]) == 0
        reported = int(capsys.readouterr().out.split("(")[1].split()[0])
        stored = len(campaign.points("SN2026A", "rp")) + len(campaign.points("SN2026A", "gp"))
        assert reported == stored
        width, height = _png_size(path)
        assert width >= 600 and height >= 400

    def test_one_panel_shows_everything(self, campaign: Campaign) -> None:
        """Filters in colours with a legend on one inverted magnitude axis with units, calendar dates above
        the MJD axis, an uncalibrated point as a square on its filter's scale, a limit as an arrow, flagged
        points hollow."""
        table = lightcurve_table(Store(connect(campaign.folder / "state")), "SN2026A")
        first = table[table["aperture"] == table["aperture"][0]]
        rp, gp = (np.flatnonzero(first["filter"] == f) for f in ("rp", "gp"))
        first["mag"].mask[rp[1]] = True  # calibrated no more: drawn from its diff_mag
        first["mag"].mask[gp[0]] = first["diff_mag"].mask[gp[0]] = True  # a non-detection: its limit
        first["flags"][gp[1]] |= flags.value("forced_position")
        figure, drawn = lightcurve_figure(first, title="SN2026A")
        axis = next(a for a in figure.axes if a.get_ylabel())
        assert [a.get_ylabel() for a in figure.axes if a.get_ylabel()] == ["calibrated magnitude [mag]"]
        assert axis.yaxis_inverted() and "MJD" in axis.get_xlabel()
        assert len(axis.child_axes) == 1  # the calendar axis above
        legend = {text.get_text() for text in axis.get_legend().get_texts()}
        assert {"rp (r)", "gp (g)", "rp (r), uncalibrated", "gp (g): 5 sigma limit"} <= legend
        points = [line for line in axis.get_lines() if line.get_marker() in ("o", "s")]
        squares = sum(len(line.get_xdata()) for line in points if line.get_marker() == "s")
        hollow = sum(len(line.get_xdata()) for line in points if line.get_markerfacecolor() == "none")
        measured = ~np.ma.getmaskarray(first["mag"]) | ~np.ma.getmaskarray(first["diff_mag"])
        assert squares == 1 and hollow == int(np.sum((np.asarray(first["flags"]) != 0) & measured)) > 0
        assert len(axis.texts) == 1 and drawn == len(first)  # one arrow; every row drawn once


@pytest.mark.slow
class TestDemo:
    """`lcowatch demo` runs the daemon on simulated frames and ends with a summary naming a real plot."""

    def test_demo_runs_to_its_summary(self, tmp_path: Path) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "lcowatch", "demo", "--workdir", str(tmp_path / "demo")],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        plot = Path(next(line.split()[-1] for line in result.stdout.splitlines() if line.startswith("plot:")))
        assert _png_size(plot)[0] >= 600
        assert "32 done" in result.stdout
        medians = {
            line.split(":")[0]: float(line.split("median ")[1].split(",")[0])
            for line in result.stdout.splitlines()
            if "|mag - truth|" in line
        }
        assert medians["DEMO-VAR"] < 0.02
        assert medians["DEMO-SN"] < 0.05  # image subtraction on the host
        # Its "look further" commands run as printed, without the virtual environment activated.
        further = result.stdout.split("look further:")[1].split("\n")
        commands = [line.strip() for line in further if "--config" in line]
        assert len(commands) == 6 and all(Path(c.split()[0]).is_file() or c.startswith("lcowatch ") for c in commands)
        bare = None if commands[0].startswith("lcowatch ") else {"PATH": "/usr/bin:/bin"}  # no venv on the PATH
        status = subprocess.run(commands[0].split(), capture_output=True, text=True, timeout=60, env=bare)
        assert status.returncode == 0 and "done 32" in status.stdout, status.stdout + status.stderr


class TestStatus:
    """`lcowatch status --json` gives ledger counts and, per target and filter, the last point and template."""

    def test_status_json(self, campaign: Campaign, capsys: pytest.CaptureFixture[str]) -> None:
        import json

        capsys.readouterr()
        assert main(["status", "--config", str(campaign.config), "--json"]) == 0
        status = json.loads(capsys.readouterr().out)
        assert sum(status["files"].values()) == len(campaign.truth)
        rows = {(r["target"], r["filter"]): r for r in status["targets"]}
        assert set(rows) == {("SN2026A", "rp"), ("SN2026A", "gp"), ("V1", "rp")}
        last = campaign.points("SN2026A", "rp")[-1]
        assert rows[("SN2026A", "rp")]["last_mjd"] == pytest.approx(last["mjd"])
        assert rows[("SN2026A", "rp")]["last_mag"] == pytest.approx(last["mag"])
        assert rows[("SN2026A", "rp")]["template"].endswith(".fits.fz")
        assert 20 < rows[("SN2026A", "rp")]["zp_median"] < 26
