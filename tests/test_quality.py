"""Quality measurements on simulated frames of known seeing, depth and shape."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from lcowatch import flags
from lcowatch.config import parse
from lcowatch.science.frame import read_content, read_frame
from lcowatch.science.preprocess import preprocess
from lcowatch.science.quality import MIN_STAR_SNR, InstrumentHistory, Quality, detect_sources, measure_quality
from lcowatch.simulation.simulate import FrameSpec, make_field, write_frame

FIELD = make_field("QTEST", 30.0, -10.0, nstars=1000, radius_arcmin=3.0, seed=4)
CONFIG = parse(
    {"watch": {"paths": ["in"]}, "state_dir": "s", "targets": {"QTEST": {"ra": 30.0, "dec": -10.0}}}, Path("/")
)


def _quality(tmp_path: Path, history: InstrumentHistory | None = None, **spec: object) -> tuple[Quality, np.ndarray]:
    path = tmp_path / "frame.fits.fz"
    write_frame(path, FIELD, FrameSpec(shape=(512, 512), **spec), compress="fz")  # type: ignore[arg-type]
    content, sha = read_content(path)
    frame = read_frame(path, content, sha, CONFIG)
    pre = preprocess(frame)
    sources = detect_sources(pre, CONFIG.quality)
    return measure_quality(frame, pre, sources, CONFIG.quality, history), sources


class TestSeeing:
    """The FWHM of good frames is within 10% of the simulated seeing, whatever the PSF's profile."""

    @pytest.mark.parametrize(("fwhm", "beta", "seed"), [(1.4, 3.0, 1), (2.0, 2.5, 2), (3.0, 4.0, 3), (2.2, 10.0, 4)])
    def test_fwhm_within_ten_percent(self, tmp_path: Path, fwhm: float, beta: float, seed: int) -> None:
        quality, _ = _quality(tmp_path, fwhm_arcsec=fwhm, moffat_beta=beta, seed=seed, n_cosmics=30)
        assert quality.verdict == "good", quality.reasons
        assert quality.fwhm_arcsec == pytest.approx(fwhm, rel=0.10)
        assert quality.fwhm_pix == pytest.approx(fwhm / 0.389, rel=0.10)

    @pytest.mark.parametrize("fwhm", [0.8, 2.0, 4.0])
    def test_cosmic_rays_are_marked_sharp_not_stars(self, tmp_path: Path, fwhm: float) -> None:
        """Judged by the ring around the peak against the peak: by peak over isophotal flux, half the hits
        were missed at 0.8" and all at 4" (where they outnumber bright stars)."""
        path = tmp_path / "cr.fits"
        truth = write_frame(path, FIELD, FrameSpec(shape=(512, 512), n_cosmics=300, seed=5, fwhm_arcsec=fwhm))
        content, sha = read_content(path)
        frame = read_frame(path, content, sha, CONFIG)
        pre = preprocess(frame)
        sources = detect_sources(pre, CONFIG.quality)
        quality = measure_quality(frame, pre, sources, CONFIG.quality)
        xy = np.column_stack([sources["x"], sources["y"]])
        to_cosmic = np.min(
            np.hypot(*(xy[:, None, :] - np.column_stack([truth.cosmic_x, truth.cosmic_y])[None]).T), axis=0
        )
        to_star = np.min(np.hypot(*(xy[:, None, :] - np.column_stack([truth.x, truth.y])[None]).T), axis=0)
        cosmic = (to_cosmic < 2.5) & (to_star > 10)
        star = (to_star < 1.5) & (to_cosmic > 5) & (sources["snr"] >= MIN_STAR_SNR)
        assert cosmic.sum() >= 100 and star.sum() >= 30
        assert sources["sharp"][cosmic].mean() >= 0.9
        assert sources["sharp"][star].mean() < 0.03
        assert quality.fwhm_arcsec == pytest.approx(fwhm, rel=0.10)


class TestSharpness:
    """What cannot be judged sharp is not called sharp: a hit on the frame's border row (whose ring lies
    off the frame) did set the cut for a sparse field and made every star sharp, and stars beside a bad
    column (zeros in the ring) were called sharp."""

    def test_border_hits_and_bad_columns_spoil_nothing(self, tmp_path: Path) -> None:
        path = tmp_path / "edges.fits"
        spec = FrameSpec(shape=(512, 512), n_cosmics=0, seed=5, fwhm_arcsec=0.8, bad_columns=(100, 250, 400))
        truth = write_frame(path, FIELD, spec)
        with fits.open(path, mode="update") as hdus:
            hdus["SCI"].data[0, 200] += 4000.0
            hdus["SCI"].data[300, 511] += 4000.0
        content, sha = read_content(path)
        frame = read_frame(path, content, sha, CONFIG)
        pre = preprocess(frame)
        sources = detect_sources(pre, CONFIG.quality)
        quality = measure_quality(frame, pre, sources, CONFIG.quality)
        to_star = np.hypot(sources["x"][:, None] - truth.x, sources["y"][:, None] - truth.y).min(axis=1)
        star = (to_star < 1.5) & (sources["snr"] >= MIN_STAR_SNR)
        by_column = star & (np.abs(sources["x"][:, None] - np.array([100, 250, 400])).min(axis=1) < 2.5)
        assert by_column.sum() >= 3 and not sources["sharp"][by_column].any()
        assert sources["sharp"][star].mean() < 0.03
        assert quality.fwhm_arcsec == pytest.approx(0.8, rel=0.15)


class TestVerdict:
    """Frames out of the thresholds are poor, with reasons naming the measurement and the limit, and a flag
    per failed gate (the frame still gives points)."""

    def test_seeing_is_judged_against_the_instruments_own_median(self, tmp_path: Path) -> None:
        quality, _ = _quality(tmp_path, fwhm_arcsec=6.0, seed=6)
        assert quality.measurable and "poor_seeing" not in flags.decode(quality.flags)  # may be a 0.4 m's normal
        sharp = InstrumentHistory(fwhm_arcsec=2.0, nstars=float(quality.nstars), frames=10)
        judged, _ = _quality(tmp_path, sharp, fwhm_arcsec=6.0, seed=6)
        assert judged.verdict == "poor" and judged.flags == flags.value("poor_seeing"), judged.reasons
        assert judged.reasons[0].startswith("fwhm ") and "2 x the instrument's median 2.00" in judged.reasons[0]
        broad = InstrumentHistory(fwhm_arcsec=5.0, nstars=float(quality.nstars), frames=10)
        assert _quality(tmp_path, broad, fwhm_arcsec=6.0, seed=6)[0].flags == 0

    def test_cloudy_frame_is_poor(self, tmp_path: Path) -> None:
        quality, _ = _quality(tmp_path, transparency=0.03, seed=7)
        assert quality.verdict == "poor"
        assert any(r.startswith("nstars ") and r.endswith("< 25") for r in quality.reasons), quality.reasons

    def test_elongated_frame_is_poor(self, tmp_path: Path) -> None:
        quality, _ = _quality(tmp_path, ellipticity=0.6, psf_angle_deg=30.0, seed=8)
        assert quality.ellipticity == pytest.approx(0.6, abs=0.1)
        assert any(r.startswith("ellipticity ") for r in quality.reasons)

    def test_saturated_stars_are_marked(self, tmp_path: Path) -> None:
        _, sources = _quality(tmp_path, exptime=300.0, seed=9)
        assert sources["saturated"].any()
        assert np.isnan(sources["fwhm"][sources["saturated"]]).all()


class TestCrowdedFields:
    """A field so crowded that sep's default buffer of pixels above the threshold overflows (a bulge) is
    detected with a larger one, rather than failing the frame."""

    def test_the_buffer_grows_when_it_overflows(self) -> None:
        import sep
        from scipy.ndimage import gaussian_filter

        from lcowatch.science.preprocess import Preprocessed
        from lcowatch.science.quality import EXTRACT_PIXSTACKS

        rng = np.random.default_rng(3)
        n = 1024
        yy, xx = np.mgrid[0:n, 0:n]
        bulge = 1000.0 * np.exp(-((xx - 512.0) ** 2 + (yy - 512.0) ** 2) / (2 * 300.0**2))  # 5 sigma everywhere
        stars = np.zeros((n, n), np.float32)
        at = rng.integers(0, n, (300, 2))
        np.add.at(stars, (at[:, 0], at[:, 1]), rng.uniform(2000.0, 20000.0, len(at)))
        image = (bulge + gaussian_filter(stars, 2.0) + rng.normal(0.0, 10.0, (n, n))).astype(np.float32)
        rms = np.full((n, n), 10.0, np.float32)
        nothing = np.zeros((n, n), bool)
        pre = Preprocessed(nothing, nothing, image, rms, 0.0, 10.0)
        sep.set_extract_pixstack(EXTRACT_PIXSTACKS[0])
        with pytest.raises(Exception, match="pixel buffer full"):
            sep.extract(image, CONFIG.quality.detect_sigma, err=rms)
        sources = detect_sources(pre, CONFIG.quality)
        assert len(sources) >= 1 and sources["npix"].max() > EXTRACT_PIXSTACKS[0]


class TestDetection:
    """Every star that stands out of the noise is detected, however broad: on a 1 m frame at 3" seeing
    (FWHM 7.7 px) sep's matched filter found 69 % of the stars of S/N over 25 clear of brighter neighbours."""

    def test_broad_stars_are_found(self, tmp_path: Path) -> None:
        path = tmp_path / "broad.fits.fz"
        truth = write_frame(path, FIELD, FrameSpec(shape=(512, 512), fwhm_arcsec=3.0, seed=1), compress="fz")
        content, sha = read_content(path)
        sources = detect_sources(preprocess(read_frame(path, content, sha, CONFIG)), CONFIG.quality)
        inside = (truth.x > 10) & (truth.x < 502) & (truth.y > 10) & (truth.y < 502) & ~truth.saturated
        separation = np.hypot(truth.x[:, None] - truth.x, truth.y[:, None] - truth.y)
        np.fill_diagonal(separation, np.inf)
        outshone = ((separation < 2 * truth.fwhm_pix) & (truth.flux[None, :] > 0.3 * truth.flux[:, None])).any(axis=1)
        snr = truth.flux / np.sqrt(truth.flux + np.pi * truth.fwhm_pix**2 * truth.sky)
        stars = inside & ~outshone & (snr > 25)
        nearest = np.hypot(truth.x[stars, None] - sources["x"], truth.y[stars, None] - sources["y"]).min(axis=1)
        assert stars.sum() >= 50 and np.mean(nearest < truth.fwhm_pix) >= 0.9
