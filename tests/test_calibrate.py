"""Tests for lcowatch.science.calibrate: zero point and colour-term fit (synthetic and real BANZAI catalogs)."""

from __future__ import annotations

from dataclasses import FrozenInstanceError
from pathlib import Path

import numpy as np
import pytest

from lcowatch.science.calibrate import (
    MIN_STARS,
    TooFewStars,
    ZeroPoint,
    apply_zeropoint,
    calibrate_apertures,
    fit_zeropoint,
    instrumental_mag,
)

LCO_REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lco-real"

TRUE_ZP = 23.1
TRUE_C = 0.07


def synthetic(
    rng: np.random.Generator,
    n: int = 80,
    *,
    zp: float = TRUE_ZP,
    c: float = TRUE_C,
    sigma_int: float = 0.02,
    outlier_fraction: float = 0.0,
) -> tuple[np.ndarray, ...]:
    """Stars with known zp, colour term and noise; returns inst, inst_err, cat, cat_err, color, outlier."""
    color = rng.uniform(-0.2, 1.6, n)
    inst = rng.uniform(-12.0, -5.0, n)
    inst_err = 0.003 + 0.04 * rng.random(n)
    cat_err = 0.005 + 0.02 * rng.random(n)
    noise = rng.normal(0.0, 1.0, n) * np.sqrt(inst_err**2 + cat_err**2 + sigma_int**2)
    cat = zp + inst + c * color + noise
    outlier = rng.random(n) < outlier_fraction
    cat[outlier] += rng.choice([-1.0, 1.0], outlier.sum())  # 1 mag off: blends, variables, mismatches
    return inst, inst_err, cat, cat_err, color, outlier


class TestInstrumentalMag:
    """-2.5 log10(flux / exptime), error 1.0857 flux_err / flux, NaN for non-positive flux."""

    def test_values(self):
        mag, err = instrumental_mag([1000.0, 100.0], [10.0, 10.0], 10.0)
        np.testing.assert_allclose(mag, [-5.0, -2.5])
        np.testing.assert_allclose(err, [0.010857, 0.10857], rtol=1e-4)

    def test_non_positive_flux_is_nan(self):
        mag, err = instrumental_mag([0.0, -5.0, np.nan, 10.0], [1.0, 1.0, 1.0, 1.0], 1.0)
        assert np.isnan(mag[:3]).all() and np.isnan(err[:3]).all()
        assert np.isfinite(mag[3]) and np.isfinite(err[3])

    def test_bad_exptime(self):
        with pytest.raises(ValueError, match="exptime"):
            instrumental_mag([1.0], [1.0], 0.0)


class TestRecovery:
    """Known zp and colour term are recovered within their errors; the result is a frozen record."""

    def test_zp_and_color_term(self):
        rng = np.random.default_rng(42)
        inst, ie, cat, ce, col, _ = synthetic(rng, 200)
        zp = fit_zeropoint(inst, ie, cat, ce, col)
        assert zp.color_mode == "fitted"
        assert abs(zp.zp - TRUE_ZP) < 4 * zp.zp_err
        assert abs(zp.color_term - TRUE_C) < 4 * zp.color_term_err
        assert zp.zp_err < 0.01
        assert zp.n_input == 200 and zp.used.shape == (200,) and zp.n_used == int(zp.used.sum())
        assert zp.n_used >= 190  # 3-sigma clipping of clean data removes almost nothing
        assert 0.005 < zp.intrinsic_scatter < 0.04
        assert 0.01 < zp.scatter < 0.06

    def test_frozen(self):
        rng = np.random.default_rng(1)
        zp = fit_zeropoint(*synthetic(rng, 30)[:5])
        assert isinstance(zp, ZeroPoint)
        with pytest.raises(FrozenInstanceError):
            zp.zp = 0.0  # type: ignore[misc]

    def test_no_intrinsic_scatter_gives_zero(self):
        rng = np.random.default_rng(3)
        inst, ie, cat, ce, col, _ = synthetic(rng, 300, sigma_int=0.0)
        zp = fit_zeropoint(inst, ie, cat, ce, col)
        assert zp.intrinsic_scatter < 0.01

    def test_zp_err_is_honest(self):
        """Over many seeds the pull (zp_fit - true) / zp_err has a standard deviation of 1 within 20 %."""
        pulls, c_pulls = [], []
        for seed in range(300):
            rng = np.random.default_rng(1000 + seed)
            inst, ie, cat, ce, col, _ = synthetic(rng, 60, sigma_int=0.03)
            zp = fit_zeropoint(inst, ie, cat, ce, col)
            pulls.append((zp.zp - TRUE_ZP) / zp.zp_err)
            c_pulls.append((zp.color_term - TRUE_C) / zp.color_term_err)
        assert abs(np.mean(pulls)) < 0.2
        assert 0.8 < np.std(pulls) < 1.2
        assert 0.8 < np.std(c_pulls) < 1.2

    def test_zp_err_is_honest_without_color(self):
        pulls = []
        for seed in range(300):
            rng = np.random.default_rng(5000 + seed)
            inst, ie, cat, ce, _, _ = synthetic(rng, 40, c=0.0)
            zp = fit_zeropoint(inst, ie, cat, ce)
            pulls.append((zp.zp - TRUE_ZP) / zp.zp_err)
        assert 0.8 < np.std(pulls) < 1.2


class TestOutliers:
    """Gross outliers (20 % of stars 1 mag off) are rejected and do not pull the fit."""

    def test_twenty_percent_one_mag_off(self):
        rng = np.random.default_rng(7)
        inst, ie, cat, ce, col, outlier = synthetic(rng, 150, outlier_fraction=0.2)
        assert outlier.sum() > 20
        zp = fit_zeropoint(inst, ie, cat, ce, col)
        assert not (zp.used & outlier).any()
        assert zp.used[~outlier].mean() > 0.95
        assert abs(zp.zp - TRUE_ZP) < 4 * zp.zp_err
        assert abs(zp.color_term - TRUE_C) < 4 * zp.color_term_err
        assert zp.scatter < 0.06

    def test_all_outliers_on_one_side(self):
        rng = np.random.default_rng(8)
        inst, ie, cat, ce, col, _ = synthetic(rng, 100)
        cat[:25] += 1.0
        zp = fit_zeropoint(inst, ie, cat, ce, col)
        assert not zp.used[:25].any()
        assert abs(zp.zp - TRUE_ZP) < 4 * zp.zp_err

    def test_blends_a_few_tenths_bright_do_not_pull(self):
        """Blended stars read bright by 0.05-0.3 mag, one-sidedly: too little for a clip whose width comes
        from a chi-square they inflate, enough to move the zero point by 0.02-0.03 mag."""
        offsets = []
        for seed in range(40):
            rng = np.random.default_rng(300 + seed)
            inst, ie, cat, ce, col, _ = synthetic(rng, 20, sigma_int=0.0)
            ie[:] = 0.01
            cat[:5] += rng.uniform(0.1, 0.3, 5)  # the catalog holds the star alone; the aperture has both
            zp = fit_zeropoint(inst, ie, cat, ce, col, color_term=TRUE_C)
            offsets.append(zp.zp - TRUE_ZP)
        # With the chi-square's width: 0.007.
        assert abs(np.median(offsets)) < 0.004

    def test_pull_stays_honest_with_outliers(self):
        pulls = []
        for seed in range(200):
            rng = np.random.default_rng(9000 + seed)
            inst, ie, cat, ce, col, _ = synthetic(rng, 60, outlier_fraction=0.2)
            zp = fit_zeropoint(inst, ie, cat, ce, col)
            pulls.append((zp.zp - TRUE_ZP) / zp.zp_err)
        assert 0.8 < np.std(pulls) < 1.2

    def test_non_finite_inputs_excluded(self):
        rng = np.random.default_rng(9)
        inst, ie, cat, ce, col, _ = synthetic(rng, 60)
        inst[0], ie[1], cat[2], ce[3], col[4] = np.nan, np.inf, np.nan, -1.0, np.nan
        zp = fit_zeropoint(inst, ie, cat, ce, col)
        assert not zp.used[:5].any()
        assert np.isfinite(zp.zp) and np.isfinite(zp.zp_err)


class TestColorTermChoice:
    """Fixed colour term honoured; fitted only with enough stars and colour span; else c = 0, err nan."""

    def test_fixed_color_term(self):
        rng = np.random.default_rng(11)
        inst, ie, cat, ce, col, _ = synthetic(rng, 100, c=0.15)
        zp = fit_zeropoint(inst, ie, cat, ce, col, color_term=0.15)
        assert zp.color_mode == "fixed"
        assert zp.color_term == 0.15 and zp.color_term_err == 0.0
        assert abs(zp.zp - TRUE_ZP) < 4 * zp.zp_err

    def test_fixed_wrong_color_term_is_not_refitted(self):
        rng = np.random.default_rng(12)
        inst, ie, cat, ce, col, _ = synthetic(rng, 100, c=0.15, sigma_int=0.0)
        zp = fit_zeropoint(inst, ie, cat, ce, col, color_term=0.0)
        assert zp.color_term == 0.0 and zp.color_mode == "fixed"

    def test_fixed_non_zero_without_colors_is_an_error(self):
        rng = np.random.default_rng(13)
        inst, ie, cat, ce, _, _ = synthetic(rng, 20)
        with pytest.raises(ValueError, match="colour"):
            fit_zeropoint(inst, ie, cat, ce, color_term=0.1)

    def test_too_few_stars_for_color(self):
        rng = np.random.default_rng(14)
        inst, ie, cat, ce, col, _ = synthetic(rng, 8, c=0.0)
        zp = fit_zeropoint(inst, ie, cat, ce, col, min_stars_color=10)
        assert zp.color_mode == "none" and zp.color_term == 0.0 and np.isnan(zp.color_term_err)
        assert zp.n_used >= 7

    def test_narrow_color_span(self):
        rng = np.random.default_rng(15)
        inst, ie, cat, ce, _, _ = synthetic(rng, 50, c=0.0)
        col = 0.5 + rng.uniform(-0.1, 0.1, 50)
        zp = fit_zeropoint(inst, ie, cat, ce, col, min_color_span=0.3)
        assert zp.color_mode == "none" and np.isnan(zp.color_term_err)

    def test_no_color_given(self):
        rng = np.random.default_rng(16)
        inst, ie, cat, ce, _, _ = synthetic(rng, 50, c=0.0)
        zp = fit_zeropoint(inst, ie, cat, ce)
        assert zp.color_mode == "none" and zp.color_term == 0.0


class TestTooFewStars:
    """Fewer than MIN_STARS (3) usable stars raise TooFewStars, a ValueError."""

    def test_two_stars(self):
        with pytest.raises(TooFewStars, match="only 2 usable"):
            fit_zeropoint([-10.0, -9.0], [0.01, 0.01], [13.0, 14.0], [0.01, 0.01])

    def test_empty(self):
        with pytest.raises(ValueError):
            fit_zeropoint([], [], [], [])

    def test_nan_leaves_too_few(self):
        with pytest.raises(TooFewStars):
            fit_zeropoint([-10.0, np.nan, -9.0, -8.0], [0.01] * 4, [13.0, 14.0, np.nan, 15.0], [0.01] * 4)

    def test_three_stars_fit(self):
        zp = fit_zeropoint([-10.0, -9.0, -8.0], [0.01] * 3, [13.1, 14.1, 15.1], [0.01] * 3)
        assert zp.n_used == MIN_STARS
        assert zp.zp == pytest.approx(23.1)

    def test_length_mismatch(self):
        with pytest.raises(ValueError, match="one length"):
            fit_zeropoint([1.0, 2.0, 3.0], [0.1] * 3, [1.0, 2.0], [0.1] * 2)


class TestCalibrateApertures:
    """A zero point per aperture from the matched stars, the target calibrated with it; None where it cannot
    be had, never an exception (a frame whose stars lack colours is a normal outcome)."""

    @staticmethod
    def _case(color: float) -> tuple[np.ndarray, ...]:
        from astropy.table import Table

        rng = np.random.default_rng(5)
        inst, inst_err, cat, cat_err, *_ = synthetic(rng, 12, sigma_int=0.0)
        catalog = Table({"mag": cat, "mag_err": cat_err, "color": np.full(12, color), "color_err": np.zeros(12)})
        inst_mag = np.concatenate([[-9.0], inst])[:, None]
        inst_errs = np.concatenate([[0.01], inst_err])[:, None]
        return inst_mag, inst_errs, np.ones((12, 1), bool), catalog, np.arange(12), np.arange(12)

    def test_a_fixed_colour_term_without_colours_gives_none(self):
        assert calibrate_apertures(*self._case(np.nan), color_term=0.1) == [None]

    def test_without_colours_and_no_colour_term_it_calibrates(self):
        (calibration,) = calibrate_apertures(*self._case(np.nan), color_term=0.0)
        assert calibration is not None and calibration.zeropoint.n_used >= 10


class TestApplyZeropoint:
    """Calibrated magnitude and an error that combines photometric, zp and colour-term errors."""

    def test_without_color_term(self):
        zp = ZeroPoint(zp=23.0, zp_err=0.01, color_term=0.0, color_term_err=float("nan"), n_used=10, scatter=0.02)
        mag, err = apply_zeropoint([-10.0], [0.02], zp)
        assert mag[0] == pytest.approx(13.0)
        assert err[0] == pytest.approx(np.hypot(0.02, 0.01))

    def test_with_color_term(self):
        zp = ZeroPoint(
            zp=23.0,
            zp_err=0.01,
            color_term=0.1,
            color_term_err=0.02,
            n_used=10,
            scatter=0.02,
            zp_color_cov=0.0,
        )
        mag, err = apply_zeropoint(np.array([-10.0]), np.array([0.02]), zp, color=np.array([0.5]))
        assert mag[0] == pytest.approx(13.05)
        assert err[0] == pytest.approx(np.sqrt(0.02**2 + 0.01**2 + (0.5 * 0.02) ** 2))

    def test_roundtrip_on_reference_stars(self):
        rng = np.random.default_rng(21)
        inst, ie, cat, ce, col, _ = synthetic(rng, 100, sigma_int=0.0)
        zp = fit_zeropoint(inst, ie, cat, ce, col)
        mag, err = apply_zeropoint(inst, ie, zp, color=col)
        resid = (mag - cat) / np.sqrt(err**2 + ce**2)
        assert abs(np.median(mag - cat)) < 0.01
        assert 0.7 < np.std(resid) < 1.3


# ------------------------------------------------------------------------------------------- real data


def _real_fit(name: str, exptime: float, band: str, blue: str, red: str) -> tuple[ZeroPoint, int]:
    from astropy.table import Table

    path = LCO_REAL / name
    if not path.exists():
        pytest.skip(f"real LCO data not available: {path} is missing (expects ../shared/data/lco-real)")
    tab = Table.read(path)

    # Zero and negative fluxes (19 rows in the cpt catalog) become NaN and are excluded by the fit;
    # masked or missing catalog magnitudes likewise.
    def col(name: str) -> np.ndarray:
        return np.ma.filled(np.ma.asarray(tab[name], dtype=float), np.nan)

    inst, inst_err = instrumental_mag(col("flux"), col("fluxerr"), exptime)
    color = col(blue) - col(red)
    return fit_zeropoint(inst, inst_err, col(band), col(band + "err"), color), len(tab)


@pytest.mark.skipif(not LCO_REAL.is_dir(), reason=f"real LCO data folder absent: {LCO_REAL}")
class TestRealBanzaiCatalogs:
    """Real BANZAI catalogs matched to ATLAS-RefCat2 give sane zero points, colour terms and scatter."""

    @pytest.mark.parametrize(
        ("name", "exptime", "band", "blue", "red", "low", "high"),
        [
            # 1 m Sinistro in i': about 23.1 mag for 1 e-/s
            ("cpt1m012-fa06-20200113-0102-matched-cat.fits", 250.032, "imag", "rmag", "imag", 22.5, 23.7),
            # 2 m MuSCAT3 in g': about 25.1 mag for 1 e-/s
            ("ogg2m001-ep04-20201006-0097-matched-cat.fits", 60.0, "gmag", "gmag", "rmag", 24.5, 25.7),
        ],
    )
    def test_real_catalog(self, name, exptime, band, blue, red, low, high):
        zp, n_rows = _real_fit(name, exptime, band, blue, red)
        assert low < zp.zp < high
        assert zp.color_mode == "fitted" and abs(zp.color_term) < 0.3
        assert zp.zp_err < 0.01
        assert zp.n_used > 0.8 * n_rows
        assert zp.scatter < 0.1


class TestTypicalColour:
    """A visit without its own colour takes the target's usual one, with the spread of its measured colours
    as the error once there are three of them (the field's spread before)."""

    def test_error_follows_what_is_known(self) -> None:
        from lcowatch.pipeline.runner import ASSUMED_COLOR_SPREAD, typical_colour

        assert typical_colour(np.array([])) is None
        assert typical_colour(np.array([0.9, 1.1])) == (pytest.approx(1.0), ASSUMED_COLOR_SPREAD)
        colours = np.random.default_rng(5).normal(1.0, 0.02, 40)
        median, spread = typical_colour(colours)  # type: ignore[misc]
        assert median == pytest.approx(1.0, abs=0.01) and spread == pytest.approx(0.02, rel=0.3)
