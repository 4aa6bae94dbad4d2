"""``method: difference``: the target measured on each frame minus its reference image, through the whole
pipeline (``lcowatch process``), against the simulator's truth."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from astropy.time import Time

from conftest import write_config
from lcowatch import flags
from lcowatch.cli import main
from lcowatch.simulation.simulate import FrameTruth, make_field, make_supernova_field, simulate_series, write_refcat
from lcowatch.state.store import Store

FIELD = make_field("DIFF1", 150.0, 2.0, nstars=1200, radius_arcmin=4.0, seed=3)


def _points(folder: Path) -> list[sqlite3.Row]:
    with sqlite3.connect(folder / "state" / "lcowatch.sqlite") as conn:
        conn.row_factory = sqlite3.Row
        query = (
            "SELECT f.file, f.exptime, f.mjd, p.* FROM points p JOIN frames f USING (sha256) WHERE p.aperture = 0 "
            "ORDER BY f.mjd"
        )
        return conn.execute(query).fetchall()


@pytest.fixture(scope="module")
def variable_star(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, FrameTruth]]:
    """Two nights of a variable star on blank sky (no host), and the truth of every frame."""
    folder = tmp_path_factory.mktemp("difference")
    series = simulate_series(FIELD, folder / "frames", nights=2, frames_per_night=4, filters=("rp",),
                             shape=(512, 512), seed=5)  # fmt: skip
    write_refcat(FIELD, folder / "stars.csv")
    return folder, {path.name: truth for path, _, truth in series}


def _process(
    folder: Path, frames: Path, *, subtraction: dict[str, object] | None = None, **target: object
) -> list[sqlite3.Row]:
    """Process the variable star's frames; its reference image is one frame (the star varies: averaging
    frames into it would average its flux too)."""
    settings = {"ra": FIELD.ra, "dec": FIELD.dec, "refcat": str(frames.parent / "stars.csv"), **target}
    sections: dict[str, object] = {"subtraction": {"reference_frames": 1, **(subtraction or {})}}
    if subtraction:
        sections["diagnostics"] = True
    config = write_config(folder, {"DIFF1": settings}, **sections)
    assert main(["process", "--config", str(config), str(frames)]) == 0
    return _points(folder)


class TestVariableStarOnBlankSky:
    """On blank sky, the difference flux of a variable star is its flux change since the reference frame,
    on each frame's own flux scale: within its errors of the truth."""

    def test_difference_flux_follows_the_truth(
        self, variable_star: tuple[Path, dict[str, FrameTruth]], tmp_path: Path
    ) -> None:
        folder, truth = variable_star
        aperture = _process(tmp_path / "aperture", folder / "frames")
        difference = _process(tmp_path / "difference", folder / "frames", method="difference")
        assert len(difference) == len(aperture) == 8
        reference = truth[difference[0]["file"]]
        assert difference[0]["flags"] & flags.value("is_reference") and difference[0]["flux"] == 0.0
        assert {row["reference"] for row in difference} == {difference[0]["file"]}
        pulls = []
        for plain, diff in zip(aperture[1:], difference[1:], strict=True):
            now = truth[diff["file"]]
            # The frame's throughput against the reference's, from the constant stars' true fluxes.
            lit = (now.flux[1:] > 0) & (reference.flux[1:] > 0)
            throughput = np.median(now.flux[1:][lit] / reference.flux[1:][lit])
            # The share of the star's light the first aperture holds, from the unsubtracted measurement.
            share = plain["flux"] * plain["exptime"] / now.flux[0]
            expected = share * (now.flux[0] - throughput * reference.flux[0]) / diff["exptime"]
            pulls.append((diff["flux"] - expected) / diff["flux_err"])
            assert diff["flags"] & flags.value("bad_subtraction") == 0
        assert np.all(np.abs(pulls) < 3.5), pulls
        assert 0.4 < np.std(pulls) < 1.6, pulls

    def test_frames_before_the_reference_window_wait_for_it(
        self, variable_star: tuple[Path, dict[str, FrameTruth]], tmp_path: Path
    ) -> None:
        """With ``reference_before``, the first night cannot be the reference: its frames wait, and are
        measured once the second night has given one."""
        folder, truth = variable_star
        second_night = sorted(t.mjd_mid for t in truth.values())[4]
        after = Time(second_night - 0.2, format="mjd").isot
        points = _process(tmp_path, folder / "frames", method="difference", reference_after=after)
        assert len(points) == 8
        reference = truth[points[0]["reference"]]
        assert reference.mjd_mid >= second_night - 0.2


class TestChangingTheReference:
    """``lcowatch reference TARGET --set FILE...`` makes the frames named the reference image, until
    ``--rebuild`` lets the rules choose again under the config of now (a window set since); either measures
    every point against the new reference, and one that cannot be made changes nothing."""

    def test_set_then_rebuild_under_a_window(
        self, variable_star: tuple[Path, dict[str, FrameTruth]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        import yaml

        folder, truth = variable_star
        frames = tmp_path / "frames"
        shutil.copytree(folder / "frames", frames)
        shutil.copy(folder / "stars.csv", tmp_path / "stars.csv")
        before = _process(tmp_path, frames, method="difference")
        assert {row["reference"] for row in before} == {before[0]["file"]}  # the first frame, without a window
        config = tmp_path / "config.yaml"
        chosen = before[5]["file"]
        assert main(["reference", "--config", str(config), "DIFF1", "--set", "no-such-frame.fits.fz"]) == 2
        assert main(["reference", "--config", str(config), "DIFF1", "--set", chosen, chosen]) == 0  # once
        pinned = _points(tmp_path)
        assert {row["reference"] for row in pinned} == {chosen}
        mine = next(row for row in pinned if row["file"] == chosen)
        assert mine["flags"] & flags.value("is_reference") and mine["flux"] == 0.0
        capsys.readouterr()
        assert main(["reference", "--config", str(config), "DIFF1"]) == 0
        assert "set by hand" in capsys.readouterr().out

        second_night = sorted(t.mjd_mid for t in truth.values())[4]
        document = yaml.safe_load(config.read_text())
        document["targets"]["DIFF1"]["reference_after"] = Time(second_night - 0.2, format="mjd").isot
        config.write_text(yaml.safe_dump(document))
        assert main(["reference", "--config", str(config), "DIFF1", "--rebuild"]) == 0
        rebuilt = _points(tmp_path)
        reference = {row["reference"] for row in rebuilt}
        assert len(rebuilt) == len(before) and len(reference) == 1
        assert truth[reference.pop()].mjd_mid >= second_night - 0.2
        assert rebuilt[0]["flux"] != before[0]["flux"]  # measured against the new reference

        # A reference that cannot be made (an image gone) changes nothing: neither the points nor the pins.
        (frames / before[6]["file"]).unlink()
        assert main(["reference", "--config", str(config), "DIFF1", "--set", before[3]["file"]]) == 1
        assert [row["reference"] for row in _points(tmp_path)] == [row["reference"] for row in rebuilt]
        capsys.readouterr()
        assert main(["reference", "--config", str(config), "DIFF1"]) == 0
        shown = capsys.readouterr().out
        assert rebuilt[0]["reference"] in shown and "set by hand" not in shown

    def test_an_aperture_target_has_no_reference_to_change(self, tmp_path: Path) -> None:
        config = str(write_config(tmp_path, {"DIFF1": {"ra": FIELD.ra, "dec": FIELD.dec}}))
        assert main(["reference", "--config", config, "DIFF1", "--rebuild"]) == 2
        assert main(["reference", "--config", config, "DIFF1", "--set", "any.fits.fz"]) == 2


class TestDiagnostics:
    """With ``diagnostics: true``, a new reference image and every frame whose subtraction leaves residuals
    above ``subtraction.max_residual`` (flag ``bad_subtraction``) get a PNG of their cutouts."""

    def test_pictures_of_the_reference_and_of_bad_subtractions(
        self, variable_star: tuple[Path, dict[str, FrameTruth]], tmp_path: Path
    ) -> None:
        folder, _ = variable_star
        # A threshold no subtraction meets: every frame but the reference is flagged and drawn.
        points = _process(tmp_path, folder / "frames", method="difference", subtraction={"max_residual": 0.01})
        bad = [row["file"] for row in points if row["flags"] & flags.value("bad_subtraction")]
        assert len(bad) == len(points) - 1
        drawn = {path.name for path in (tmp_path / "state" / "diagnostics").glob("subtraction-*.png")}
        assert drawn == {f"subtraction-{name}.png" for name in [points[0]["file"], *bad]}


SUPERNOVA = make_supernova_field("SN2026sim", 60.0, -20.0, seed=12, peak_mag_r=17.0, peak_mjd=61008.0,
                                 rise_days=5.0, fade_rate=0.9, host_mag_r=16.5, host_offset_arcsec=1.5)  # fmt: skip


@pytest.fixture(scope="module")
def supernova(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, FrameTruth]]:
    """A supernova 1.5" from the nucleus of a galaxy brighter than its peak: three nights before the explosion,
    a rise, a peak and a fade below detection; one frame a night, seeing 1.4-3"."""
    folder = tmp_path_factory.mktemp("supernova")
    series = simulate_series(SUPERNOVA, folder / "frames", nights=15, frames_per_night=1, filters=("rp",),
                             shape=(512, 512), seed=1, exptime=120.0, seeing=(1.4, 2.5), mjd_start=60999.2)  # fmt: skip
    write_refcat(SUPERNOVA, folder / "stars.csv")
    return folder, {path.name: truth for path, _, truth in series}


def _late_sbig(folder: Path) -> list[tuple[Path, object, FrameTruth]]:
    """A 0.4 m telescope joining a day before the supernova's peak (300 s, 2.5-3.5" seeing, 3x the sky)."""
    return simulate_series(
        SUPERNOVA, folder, nights=9, frames_per_night=1, filters=("rp",), shape=(512, 512), seed=102,
        exptime=300.0, seeing=(2.5, 3.5), mjd_start=61006.3, site="coj", telescope="0m4-14", instrument="kb29",
        pixscale=0.571, zeropoint_offset=-2.0, sky_scale=3.0, first_frame_number=600,
    )  # fmt: skip


def _supernova_config(folder: Path, scene: Path, method: str = "difference") -> Path:
    """A config for the supernova in ``folder``, with the reference catalog of ``scene``."""
    settings = {"ra": SUPERNOVA.ra, "dec": SUPERNOVA.dec, "refcat": str(scene / "stars.csv"), "method": method}
    return write_config(folder, {"SN2026sim": settings})


def _mags(points: list[sqlite3.Row], truth: dict[str, FrameTruth]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True magnitude, measured magnitude and its error (NaN where not measured) of each point."""
    true_mag = np.array([truth[row["file"]].mag[0] for row in points])
    mag = np.array([np.nan if row["mag"] is None else row["mag"] for row in points], dtype=float)
    err = np.array([np.nan if row["mag_err"] is None else row["mag_err"] for row in points], dtype=float)
    return true_mag, mag, err


def _transient_totals(folder: Path) -> dict[str, float]:
    with sqlite3.connect(folder / "state" / "lcowatch.sqlite") as conn:
        query = "SELECT filter || ':' || instrument_class, transient_total FROM reference_images"
        return dict(conn.execute(query).fetchall())


def _process_supernova(folder: Path, frames: Path, method: str) -> list[sqlite3.Row]:
    config = _supernova_config(folder, frames.parent, method)
    assert main(["process", "--config", str(config), str(frames)]) == 0
    return _points(folder)


class TestSupernovaOnHost:
    """A supernova on its host: aperture photometry stops fading at the host's light; the difference light
    curve follows the truth down to the detection limit, and below it gives limits the truth is beneath."""

    def test_difference_follows_the_truth_where_aperture_photometry_floors(
        self, supernova: tuple[Path, dict[str, FrameTruth]], tmp_path: Path
    ) -> None:
        folder, truth = supernova
        plain = _process_supernova(tmp_path / "aperture", folder / "frames", "aperture")
        points = _process_supernova(tmp_path / "difference", folder / "frames", "difference")
        assert len(points) == len(plain) == len(truth)  # every frame a point
        # The host beside the supernova, a detected source, is in the reference too: no blend or crowding left.
        assert not any(row["flags"] & flags.value("blended", "crowded") for row in points)
        true_mag, mag, err = _mags(points, truth)
        assert np.isinf(true_mag[0]) and points[0]["flags"] & flags.value("is_reference")
        faint = np.isfinite(true_mag) & (true_mag > 20.5)
        plain_mag = np.array([row["mag"] for row in plain], dtype=float)
        assert np.all(plain_mag[faint] < 17.5), "aperture photometry should see the host, not the fading SN"

        snr = np.array([row["snr"] for row in points], dtype=float)
        bright, measured = snr > 20, np.isfinite(mag) & (snr > 5)
        assert bright.sum() >= 5 and measured.sum() >= bright.sum()
        # Issue 12's bar. Measured 0.014 (0.015, 0.012 at seeds 2 and 3), 0.025 with sep's matched filter for
        # detection. Four or five points have S/N > 20: the figure moves by ~0.005 with small changes
        # upstream (0.021, 0.010, 0.008 with the background mesh on every pixel).
        assert np.median(np.abs(mag - true_mag)[bright]) <= 0.02
        chi2 = np.mean(((mag - true_mag) / err)[measured] ** 2)
        assert 0.4 <= chi2 <= 2.0, chi2

        limits = np.array([np.nan if row["limit_mag"] is None else row["limit_mag"] for row in points], dtype=float)
        undetected = np.array([bool(row["flags"] & flags.value("nondetection")) for row in points])
        assert undetected[np.isinf(true_mag)].all()  # before the explosion: nothing there
        late = undetected & np.isfinite(true_mag)
        assert late.sum() >= 2, "the fade must reach below detection"
        assert np.all(true_mag[late] > limits[late] - 0.3)  # a limit never claims more than the truth allows


class TestSupernovaFromTwoTelescopes:
    """The same supernova also from a 0.4 m telescope (0.571"/pix, 2.5-4" seeing, 3x the sky, 2 mag less light)
    whose frames come first each night, so one of them founds the target's reference pixel frame: the 1 m
    light curve keeps its accuracy, and the 0.4 m's, noisier, is not biased.

    Three faults this scene showed: star cores in the sharpest 1 m frame, placed half a pixel off through the
    0.4 m's frame, were cut down as cosmic-ray hits (which spoiled its kernel and gave detections before the
    explosion); a 0.4 m frame holding the supernova at S/N 2.6 was averaged into that telescope's reference
    (every later 0.4 m point 17 % faint); the target stayed where the 0.4 m's WCS put it (0.2 px out)."""

    def test_both_light_curves_follow_the_truth(
        self, supernova: tuple[Path, dict[str, FrameTruth]], tmp_path: Path
    ) -> None:
        folder, truth = supernova
        sbig = simulate_series(
            SUPERNOVA, tmp_path / "sbig", nights=15, frames_per_night=1, filters=("rp",), shape=(512, 512),
            seed=101, exptime=180.0, seeing=(2.5, 4.0), mjd_start=60999.3, site="coj", telescope="0m4-14",
            instrument="kb29", pixscale=0.571, zeropoint_offset=-2.0, sky_scale=3.0, first_frame_number=500,
        )  # fmt: skip
        truth = truth | {path.name: frame_truth for path, _, frame_truth in sbig}
        config = _supernova_config(tmp_path, folder)
        assert main(["process", "--config", str(config), str(folder / "frames"), str(tmp_path / "sbig")]) == 0
        points = _points(tmp_path)
        assert len(points) == len(truth)
        true_mag, mag, err = _mags(points, truth)
        snr = np.array([row["snr"] for row in points], dtype=float)
        assert np.all(np.abs(snr[np.isinf(true_mag)]) < 3.0), "nothing is there before the explosion"
        one_metre = np.array(["fa06" in row["file"] for row in points])
        bright = one_metre & (snr > 20)
        assert bright.sum() >= 4 and np.median(np.abs(mag - true_mag)[bright]) <= 0.035
        measured = np.isfinite(mag) & (snr > 5)
        chi2 = np.mean(((mag - true_mag) / err)[measured] ** 2)
        assert 0.4 <= chi2 <= 2.0, chi2
        small = ~one_metre & np.isfinite(mag) & (snr > 4)
        weights = 1.0 / err[small] ** 2
        bias = np.sum(weights * (mag - true_mag)[small]) / np.sum(weights)
        assert small.sum() >= 3 and abs(bias) < 0.12, bias
        # The first change (an unflagged point of 3 sigmas) is what closes the references to later frames.
        with sqlite3.connect(tmp_path / "state" / "lcowatch.sqlite") as conn:
            doubtful = flags.value("bad_subtraction", *flags.FRAME_FLAGS)
            first_change = min(row["mjd"] for row in points if abs(row["snr"]) >= 3.0 and not row["flags"] & doubtful)
            store = Store(conn)
            assert store.changed_before("SN2026sim", first_change + 1e-6, 3.0)
            assert not store.changed_before("SN2026sim", first_change, 3.0)


class TestTransientInTheReference:
    """A 0.4 m telescope that joins after the explosion founds its reference on a frame holding the supernova:
    that light is measured against the 1 m reference, free of it, and added back, so the 0.4 m light curve
    follows the truth; without the add-back every 0.4 m point would be short of the reference's flux (near
    the peak, no detection at all). A filter that starts after the explosion has no reference free of it to
    measure against: its points are flagged. Frames met out of time order never measure an earlier frame
    against a later reference."""

    def test_the_light_in_a_late_reference_is_added_back(
        self, supernova: tuple[Path, dict[str, FrameTruth]], tmp_path: Path
    ) -> None:
        folder, truth = supernova
        late = _late_sbig(tmp_path / "sbig")
        new_filter = simulate_series(
            SUPERNOVA, tmp_path / "gp", nights=2, frames_per_night=1, filters=("gp",), shape=(512, 512), seed=103,
            exptime=120.0, seeing=(1.4, 2.5), mjd_start=61006.2, first_frame_number=700,
        )  # fmt: skip
        truth = truth | {path.name: frame_truth for path, _, frame_truth in late + new_filter}
        config = _supernova_config(tmp_path, folder)
        folders = [str(folder / "frames"), str(tmp_path / "sbig"), str(tmp_path / "gp")]
        assert main(["process", "--config", str(config), *folders]) == 0
        points = _points(tmp_path)
        assert len(points) == len(truth)
        unmeasured = {row["file"] for row in points if row["flags"] & flags.value("reference_has_transient")}
        assert unmeasured == {path.name for path, _, _ in new_filter}
        totals = _transient_totals(tmp_path)
        assert totals["rp:fa"] == 0 and totals["rp:kb"] > 0 and totals["gp:fa"] == np.inf
        small = [row for row in points if "kb29" in row["file"]]
        assert small[0]["flags"] & flags.value("is_reference")
        true_mag, mag, err = _mags(small, truth)
        # The founding frame's own point is its light as the 1 m reference measures it, not 0.
        assert np.isfinite(mag[0]) and abs(mag[0] - true_mag[0]) < 3 * err[0] + 0.02
        # Measured 17.35 +- 0.12, 17.08 +- 0.16, 17.55 +- 0.27 against a truth of 17.30, 17.04, 17.37; then limits.
        measured = np.isfinite(mag)
        weights = 1.0 / err[measured] ** 2
        bias = np.sum(weights * (mag - true_mag)[measured]) / np.sum(weights)
        chi2 = np.mean(((mag - true_mag) / err)[measured] ** 2)
        assert measured.sum() >= 3 and abs(bias) < 0.1 and chi2 < 2.0, (bias, chi2)

    def test_a_later_reference_met_first_is_not_measured_against(
        self, supernova: tuple[Path, dict[str, FrameTruth]], tmp_path: Path
    ) -> None:
        folder, truth = supernova
        _late_sbig(tmp_path / "sbig")
        config = _supernova_config(tmp_path, folder)
        # A backlog met out of time order: the 0.4 m frames first, so its reference (with the supernova in it)
        # exists when the 1 m's, from before the explosion, is founded.
        assert main(["process", "--config", str(config), str(tmp_path / "sbig")]) == 0
        assert main(["process", "--config", str(config), str(folder / "frames")]) == 0
        assert _transient_totals(tmp_path)["rp:fa"] == 0
        one_metre = [row for row in _points(tmp_path) if "fa06" in row["file"]]
        true_mag, mag, _ = _mags(one_metre, truth)
        snr = np.array([row["snr"] for row in one_metre], dtype=float)
        assert np.all(np.abs(snr[np.isinf(true_mag)]) < 3.0), "nothing is there before the explosion"
        bright = snr > 20
        assert bright.sum() >= 4 and np.median(np.abs(mag - true_mag)[bright]) <= 0.03
