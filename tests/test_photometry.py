"""Aperture photometry on simulated frames whose stars' fluxes are known."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from lcowatch import flags
from lcowatch.config import Aperture, parse
from lcowatch.science.frame import Frame, read_content, read_frame
from lcowatch.science.photometry import Photometry, annulus_background, measure
from lcowatch.science.preprocess import preprocess
from lcowatch.science.quality import detect_sources
from lcowatch.simulation.simulate import FrameSpec, FrameTruth, make_field, write_frame

FIELD = make_field("PTEST", 45.0, 5.0, nstars=600, radius_arcmin=3.0, seed=8)
CONFIG = parse(
    {"watch": {"paths": ["in"]}, "state_dir": "s", "targets": {"PTEST": {"ra": 45.0, "dec": 5.0}}}, Path("/")
)


def _frame(tmp_path: Path, name: str, **spec: object) -> tuple[Frame, FrameTruth]:
    path = tmp_path / name
    truth = write_frame(path, FIELD, FrameSpec(shape=(512, 512), n_cosmics=0, **spec))  # type: ignore[arg-type]
    content, sha = read_content(path)
    return read_frame(path, content, sha, CONFIG), truth


def _measure(
    frame: Frame, truth: FrameTruth, stars: np.ndarray, annulus: tuple[Aperture, Aperture] | None = None,
    offset: float = 0.0,
) -> Photometry:  # fmt: skip
    pre = preprocess(frame)
    sources = detect_sources(pre, CONFIG.quality)
    settings = CONFIG.photometry
    x, y = truth.x[stars] + offset, truth.y[stars] + offset
    return measure(
        frame, pre, sources, x, y, settings.apertures, annulus or settings.annulus,
        truth.fwhm_pix,
        recentre_snr=settings.recentre_snr, min_snr=settings.min_snr, max_shift=0.5 * truth.fwhm_pix,
    )  # fmt: skip


def _bright_isolated(truth: FrameTruth, count: int) -> np.ndarray:
    """Unsaturated stars with no star brighter than 5 mag fainter within 5 FWHM, well inside the frame."""
    inside = (truth.x > 60) & (truth.x < 450) & (truth.y > 60) & (truth.y < 450) & ~truth.saturated
    chosen: list[int] = []
    for star in np.argsort(truth.mag):
        if not inside[star]:
            continue
        near = np.hypot(truth.x - truth.x[star], truth.y - truth.y[star]) < 5 * truth.fwhm_pix
        if (near & (truth.mag < truth.mag[star] + 5)).sum() == 1:
            chosen.append(int(star))
        if len(chosen) == count:
            break
    return np.array(chosen)


class TestRepairedApertures:
    """Cosmic-ray hits the file's mask missed, and masked pixels, in an aperture neither add nor lose light:
    they are replaced by their mirror image through the star, and the point says so (``repaired``)."""

    def test_cosmic_ray_hits_on_stars_are_taken_out(self, tmp_path: Path) -> None:
        clean, truth = _frame(tmp_path, "clean.fits", seed=3)
        hit, _ = _frame(tmp_path, "hit.fits", seed=3)
        stars = _bright_isolated(truth, 8)
        for step, star in enumerate(stars):
            # a 3-pixel track of 4000 e- per pixel, 1-3 pixels from the star's centre
            col, row = round(float(truth.x[star])) + 1 + step % 2, round(float(truth.y[star]))
            hit.data[row : row + 3, col] += 4000.0
        reference, repaired = _measure(clean, truth, stars), _measure(hit, truth, stars)
        for k in range(len(CONFIG.photometry.apertures)):
            difference = repaired.flux[:, k] - reference.flux[:, k]
            assert np.all(np.abs(difference) < 2.0 * reference.flux_err[:, k]), difference / reference.flux_err[:, k]
            assert np.all(5.0 * reference.flux_err[:, k] < 12000.0)  # unrepaired, every hit would show
        assert np.all(repaired.flags[:, 0] & flags.value("repaired"))
        assert not np.any(reference.flags & flags.value("repaired"))

    def test_a_bad_column_through_a_star_loses_no_light(self, tmp_path: Path) -> None:
        clean, truth = _frame(tmp_path, "clean.fits", seed=4)
        stars = _bright_isolated(truth, 4)
        # Columns 2 pixels off each star's centre and right through it (its own mirror image).
        columns = tuple(round(float(truth.x[s])) + (2 if i % 2 else 0) for i, s in enumerate(stars))
        spoiled, _ = _frame(tmp_path, "spoiled.fits", seed=4, bad_columns=columns)
        reference, repaired = _measure(clean, truth, stars), _measure(spoiled, truth, stars)
        # A column is 1/(2 r) of the aperture: ~10 % of the light through its middle if left out.
        loss = 1.0 - repaired.flux[:, 0] / reference.flux[:, 0]
        assert np.all(np.abs(loss) < 0.01), loss
        assert np.all(repaired.flags[:, 0] & flags.value("repaired"))
        assert not np.any(repaired.flags[:, 0] & flags.value("bad_pixel"))

    @pytest.mark.parametrize(("fwhm", "seed"), [(1.0, 5), (2.0, 6), (3.5, 7)])
    def test_star_cores_are_not_taken_for_hits(self, tmp_path: Path, fwhm: float, seed: int) -> None:
        frame, truth = _frame(tmp_path, "frame.fits", seed=seed, fwhm_arcsec=fwhm)
        before = frame.data.copy()
        phot = _measure(frame, truth, _bright_isolated(truth, 15))
        assert not np.any(phot.flags & flags.value("repaired"))
        assert np.array_equal(before, frame.data)

    @pytest.mark.parametrize(("fwhm", "seed"), [(1.5, 8), (2.0, 9)])
    def test_nor_when_the_position_is_off_by_half_a_pixel(self, tmp_path: Path, fwhm: float, seed: int) -> None:
        """Positions come from the registration, which through another telescope's frame can be half a
        pixel out: a sharp core's pixels then differ from their mirror images by up to half, like a hit's."""
        frame, truth = _frame(tmp_path, "frame.fits", seed=seed, fwhm_arcsec=fwhm)
        before = frame.data.copy()
        phot = _measure(frame, truth, _bright_isolated(truth, 15), offset=0.35)
        assert not np.any(phot.flags & flags.value("repaired"))
        assert np.array_equal(before, frame.data)


class TestCrowding:
    """At the 5-6" seeing of a 0.4 m telescope (and 4x the sky) on a field of 20 stars per square arcminute,
    a star whose neighbours' wings reach into its aperture is ``crowded`` (and left out of ensembles and
    zero points); an isolated one is not."""

    SBIG: ClassVar[dict[str, float]] = {
        "pixscale": 0.571, "fwhm_arcsec": 5.5, "sky": 1200.0, "zeropoint": 22.0, "exptime": 120.0
    }  # fmt: skip

    def test_neighbours_make_a_star_crowded(self, tmp_path: Path) -> None:
        frame, truth = _frame(tmp_path, "sbig.fits", seed=14, **self.SBIG)  # type: ignore[arg-type]
        inside = (truth.x > 20) & (truth.x < 492) & (truth.y > 20) & (truth.y < 492)
        stars = np.flatnonzero(inside & (truth.mag < 17))
        phot = _measure(frame, truth, stars)
        crowded = (phot.flags[:, 0] & flags.value("crowded")) != 0
        blended = (phot.flags[:, 0] & flags.value("blended")) != 0
        # A star with a neighbour at least as bright 1.5-2.5 FWHM away (its wings put 0.5 % of the star's
        # light into a 1 FWHM aperture there; closer, the two are one detection) is crowded; one with no star
        # brighter than 5 mag fainter within 6 FWHM is not.
        separation = np.hypot(truth.x[stars][:, None] - truth.x, truth.y[stars][:, None] - truth.y)
        brighter = truth.mag[None, :] <= truth.mag[stars][:, None]
        near = (separation > 1.5 * truth.fwhm_pix) & (separation < 2.5 * truth.fwhm_pix)
        close = (near & brighter).any(axis=1) & ~blended
        within = (separation > 0) & (separation < 6 * truth.fwhm_pix)
        alone = ~(within & (truth.mag[None, :] < truth.mag[stars][:, None] + 5)).any(axis=1)
        assert close.sum() >= 3 and alone.sum() >= 3
        assert np.all(crowded[close]) and not np.any(crowded[alone])


class TestAnnulus:
    """The stars a target's field list knows but this frame did not detect (a 0.4 m frame, 5.5" seeing, 4x
    the sky) are kept out of their neighbours' background annuli, as detections are: the annulus medians of
    the bright stars come closer to the true sky."""

    def test_known_undetected_stars_are_masked(self, tmp_path: Path) -> None:
        frame, truth = _frame(tmp_path, "sbig.fits", seed=14, **TestCrowding.SBIG)  # type: ignore[arg-type]
        inside = (truth.x > 80) & (truth.x < 432) & (truth.y > 80) & (truth.y < 432)
        bright = np.flatnonzero(inside & (truth.mag < 16.0) & ~truth.saturated)
        undetected = np.flatnonzero((truth.mag > 18.0) & (truth.mag < 20.5))
        sources = detect_sources(preprocess(frame), CONFIG.quality)
        nearest = np.hypot(truth.x[undetected, None] - sources["x"], truth.y[undetected, None] - sources["y"])
        assert np.mean(nearest.min(axis=1) > 0.5 * truth.fwhm_pix) > 0.9  # the frame really misses them
        alone = _measure(frame, truth, bright)
        known = _measure(frame, truth, np.concatenate([bright, undetected]))
        before = np.median(alone.background - truth.sky)
        after = np.median(known.background[: len(bright)] - truth.sky)
        assert len(bright) >= 10 and 0.0 < after < 0.8 * before, (before, after)

    def test_a_bright_star_keeps_its_own_annulus(self, tmp_path: Path) -> None:
        """However bright a star, its own mask leaves its annulus alone, even a narrow one (2.5-4 FWHM)."""
        frame, truth = _frame(tmp_path, "sbig.fits", seed=14, **TestCrowding.SBIG)  # type: ignore[arg-type]
        inside = (truth.x > 80) & (truth.x < 432) & (truth.y > 80) & (truth.y < 432) & ~truth.saturated
        brightest = np.flatnonzero(inside)[np.argsort(truth.mag[inside])[:3]]
        phot = _measure(frame, truth, brightest, annulus=(Aperture(2.5, "fwhm"), Aperture(4.0, "fwhm")))
        assert not np.any(phot.flags[:, 0] & flags.value("bad_background")) and np.all(np.isfinite(phot.flux))


class TestClippedAnnulusMedian:
    """The annulus statistics are the 3-pass, 3-sigma clipped median and RMS that ``np.nanmedian`` gives, with
    masked and off-frame pixels left out, whatever the number of pixels left (odd, even, too few, none)."""

    @staticmethod
    def _by_nanmedian(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        values = values.copy()
        for _ in range(3):
            median = np.nanmedian(values, axis=1, keepdims=True)
            spread = 1.4826 * np.nanmedian(np.abs(values - median), axis=1, keepdims=True)
            values[np.abs(values - median) > 3 * np.maximum(spread, 1e-9)] = np.nan
        return np.nanmedian(values, axis=1), np.nanstd(values, axis=1), np.isfinite(values).sum(axis=1)

    def test_equals_the_nan_median_clipping(self) -> None:
        rng = np.random.default_rng(5)
        image = rng.normal(400.0, 20.0, (200, 200)).astype(np.float32)
        image[rng.integers(0, 200, 300), rng.integers(0, 200, 300)] += rng.uniform(100, 5000, 300).astype(np.float32)
        bad = np.zeros(image.shape, dtype=bool)
        bad[:, 60:63] = True
        bad[150:, 150:] = True  # a star there has no annulus at all
        x = np.append(rng.uniform(-5.0, 205.0, 60), 180.0)
        y = np.append(rng.uniform(-5.0, 205.0, 60), 180.0)
        median, rms, used = annulus_background(image, bad, x, y, 4.0, 9.0)
        # The same pixels, gathered independently: every pixel whose centre lies in the ring.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the star without an annulus: an all-NaN row
            rows = []
            for cx, cy in zip(np.rint(x), np.rint(y), strict=True):
                yy, xx = np.mgrid[0:200, 0:200]
                distance = np.hypot(xx - cx, yy - cy)
                ring = (distance >= 4.0) & (distance <= 9.0) & ~bad
                rows.append(np.pad(image[ring], (0, 300 - ring.sum()), constant_values=np.nan))
            expected = self._by_nanmedian(np.array(rows))
        assert used[-1] == 0 and np.isnan(median[-1])
        assert len(set((used % 2).tolist())) == 2  # odd and even counts both met
        np.testing.assert_array_equal(used, expected[2])
        few = used < 20
        np.testing.assert_array_equal(median[~few], expected[0][~few])
        np.testing.assert_allclose(rms[~few], expected[1][~few], rtol=1e-5)
        assert np.all(np.isnan(median[few]))
