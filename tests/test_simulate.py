"""Tests of lcowatch.simulation.simulate: the synthetic frames are the ground truth of every accuracy test, so the
pixels must carry exactly the fluxes, positions, PSF and flags the truth claims."""

from __future__ import annotations

import gzip
import math
import re
from dataclasses import replace
from datetime import datetime
from typing import ClassVar

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time
from astropy.wcs import WCS

from lcowatch.simulation import simulate as sim

RA0, DEC0 = 150.0, -20.0

REQUIRED_SCI_KEYS = [
    "OBJECT",
    "FILTER",
    "EXPTIME",
    "DATE-OBS",
    "MJD-OBS",
    "AIRMASS",
    "SITEID",
    "TELESCOP",
    "INSTRUME",
    "GAIN",
    "RDNOISE",
    "SATURATE",
    "MAXLIN",
    "PIXSCALE",
    "CCDSUM",
    "LATITUDE",
    "LONGITUD",
    "HEIGHT",
    "L1FWHM",
    "L1MEDIAN",
    "L1SIGMA",
    "L1ELLIP",
    "WCSERR",
    "PIPEVER",
    "RLEVEL",
    "REQNUM",
    "BLKUID",
    "RA",
    "DEC",
    "CTYPE1",
    "CTYPE2",
    "CRPIX1",
    "CRPIX2",
    "CRVAL1",
    "CRVAL2",
    "CD1_1",
    "CD1_2",
    "CD2_1",
    "CD2_2",
]


def custom_field(offsets_arcsec, r_mags, *, amplitude: float = 0.0, gr=None) -> sim.Field:
    """A field with stars at given (east, north) offsets in arcsec from the target (index 0 first)."""
    off = np.asarray(offsets_arcsec, dtype=float) / 3600.0
    ra = RA0 + off[:, 0] / math.cos(math.radians(DEC0))
    dec = DEC0 + off[:, 1]
    r = np.asarray(r_mags, dtype=float)
    gr = np.full(len(r), 0.5) if gr is None else np.asarray(gr, dtype=float)
    mags = {band: r.copy() for band in sim.ALL_BANDS}
    mags["g"] = r + gr
    return sim.Field("T1", RA0, DEC0, ra, dec, mags, amplitude=amplitude, period=0.4, epoch=61000.0)


def box_flux(image: np.ndarray, x: float, y: float, half: int, sky: float) -> tuple[float, int]:
    """Sum of a (2 half + 1)^2 box around (x, y) minus sky; also the number of pixels."""
    ix, iy = round(x), round(y)
    box = image[iy - half : iy + half + 1, ix - half : ix + half + 1].astype(np.float64)
    return float(box.sum() - sky * box.size), box.size


class TestFileLayout:
    """write_frame writes an LCO-like file for each compress mode: PRIMARY empty, SCI float32 electrons
    with the BANZAI keywords and a clean TAN WCS, BPM uint8 and ERR float32; fz uses RICE tiles like
    fpack, gz is a gzip stream of the plain file, and each reads back through astropy without warnings."""

    @pytest.mark.parametrize("compress", [None, "fz", "gz"])
    def test_reads_back(self, tmp_path, compress):
        field = custom_field([(0, 0), (30, 20)], [14.0, 13.0])
        spec = sim.FrameSpec(shape=(256, 320), seed=3)
        path = tmp_path / sim.lco_filename(spec, compress)
        truth = sim.write_frame(path, field, spec, compress=compress)
        plain, _ = sim.render_frame(field, spec)
        if compress == "gz":
            assert path.read_bytes()[:2] == b"\x1f\x8b"
        with fits.open(path) as hdul:
            assert [h.name for h in hdul] == ["PRIMARY", "SCI", "BPM", "ERR"]
            assert hdul[0].data is None
            sci = hdul["SCI"]
            assert isinstance(sci, fits.CompImageHDU) == (compress == "fz")
            assert sci.data.shape == (256, 320)
            assert sci.data.dtype.type is np.float32
            assert hdul["BPM"].data.dtype.type is np.uint8
            assert hdul["ERR"].data.dtype.type is np.float32
            header = sci.header
            missing = [k for k in REQUIRED_SCI_KEYS if k not in header]
            assert not missing
            assert header["CTYPE1"] == "RA---TAN" and header["CTYPE2"] == "DEC--TAN"
            assert header["GAIN"] == 1.0 and header["CCDSUM"] == "1 1"
            assert header["SATURATE"] == header["MAXLIN"] == spec.saturate
            assert header["OBJECT"] == "T1" and header["FILTER"] == "rp" and header["RLEVEL"] == 91
            wcs = WCS(header)
            assert wcs.has_celestial
            x, y = wcs.world_to_pixel_values(RA0, DEC0)
            assert (x, y) == pytest.approx((truth.x[0], truth.y[0]), abs=1e-6)
            data = sci.data
            expected = plain["SCI"].data
            if compress == "fz":
                # lossy quantisation at 1/64 of the background noise
                step = header["L1SIGMA"] / 64.0
                assert np.abs(data - expected).max() <= step
                assert np.array_equal(hdul["BPM"].data, plain["BPM"].data)
            else:
                assert np.array_equal(data, expected)
            sky_err = np.median(hdul["ERR"].data)
            assert sky_err == pytest.approx(math.sqrt(spec.sky + spec.read_noise**2), rel=1e-3)

    def test_optional_extensions_can_be_left_out(self, tmp_path):
        field = custom_field([(0, 0)], [14.0])
        spec = sim.FrameSpec(shape=(64, 64), with_bpm=False, with_err=False)
        path = tmp_path / "a.fits.fz"
        sim.write_frame(path, field, spec, compress="fz")
        with fits.open(path) as hdul:
            assert [h.name for h in hdul] == ["PRIMARY", "SCI"]

    def test_times_and_site_keywords_are_consistent(self):
        field = custom_field([(0, 0)], [14.0])
        spec = sim.FrameSpec(shape=(64, 64), site="lsc", mjd_start=61053.13385, exptime=120.0)
        hdul, truth = sim.render_frame(field, spec)
        header = hdul["SCI"].header
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}", header["DATE-OBS"])
        mjd_from_date = Time(header["DATE-OBS"], scale="utc").mjd
        assert header["MJD-OBS"] == pytest.approx(mjd_from_date, abs=1e-9)
        assert header["MJD-OBS"] == pytest.approx(spec.mjd_start, abs=1e-8)
        assert truth.mjd_mid == pytest.approx(header["MJD-OBS"] + 60.0 / 86400.0, abs=1e-10)
        assert (header["LATITUDE"], header["LONGITUD"], header["HEIGHT"]) == (-30.1673, -70.8047, 2198.0)

    def test_unknown_compress_mode_is_refused(self, tmp_path):
        with pytest.raises(ValueError, match="compress"):
            sim.write_frame(tmp_path / "x", custom_field([(0, 0)], [14.0]), sim.FrameSpec(), compress="bz2")


class TestInputValidation:
    """Unknown filters, sites and impossible PSFs are refused with a message naming the bad value."""

    @pytest.mark.parametrize(
        ("change", "word"),
        [
            ({"filter": "Y"}, "filter"),
            ({"site": "xyz"}, "site"),
            ({"ellipticity": 1.0}, "ellipticity"),
            ({"moffat_beta": 1.0}, "beta"),
        ],
    )
    def test_refused(self, change, word):
        with pytest.raises(ValueError, match=word):
            sim.render_frame(custom_field([(0, 0)], [14.0]), replace(sim.FrameSpec(shape=(32, 32)), **change))


class TestLcoFilename:
    """lco_filename builds SITE+TELESCOPE(without '-')-INSTRUMENT-YYYYMMDD-FRAME-e91 with the extension of
    the compress mode, the date being that of DATE-OBS."""

    def test_sinistro_name(self):
        start = (datetime(2026, 1, 13, 3, 12, 45) - datetime(1858, 11, 17)).total_seconds() / 86400.0
        spec = sim.FrameSpec(mjd_start=start, frame_number=102)
        assert sim.lco_filename(spec) == "cpt1m012-fa06-20260113-0102-e91.fits.fz"
        assert sim.lco_filename(spec, None).endswith("-0102-e91.fits")
        assert sim.lco_filename(spec, "gz").endswith("-0102-e91.fits.gz")

    def test_other_telescope(self):
        spec = sim.FrameSpec(site="tfn", telescope="0m4-14", instrument="kb29", frame_number=7, mjd_start=57564.8861535)
        assert sim.lco_filename(spec, None) == "tfn0m414-kb29-20160625-0007-e91.fits"


class TestStarFlux:
    """Each star's light in the image sums to its truth flux (within noise), and the truth flux follows the
    documented zero point, exposure time, transparency and colour-term formula."""

    @pytest.mark.parametrize("ellipticity", [0.0, 0.5])
    def test_box_sum_matches_truth(self, ellipticity):
        field = custom_field([(0, 0), (-60, 40), (50, -45)], [13.0, 14.5, 12.5])
        spec = sim.FrameSpec(
            shape=(384, 384), ellipticity=ellipticity, psf_angle_deg=25.0, seed=11, offset_pix=(0.31, -0.22)
        )
        hdul, truth = sim.render_frame(field, spec)
        assert not truth.saturated.any()
        image = hdul["SCI"].data
        half = 45  # beyond the stamp, so the box holds all of each star's light
        for i in range(3):
            measured, npix = box_flux(image, truth.x[i], truth.y[i], half, spec.sky)
            sigma = math.sqrt(truth.flux[i] + npix * (spec.sky + spec.read_noise**2))
            assert abs(measured - truth.flux[i]) < 4 * sigma, i
            assert sigma < 0.03 * truth.flux[i]  # the test can see a 10 % error

    def test_flux_formula(self):
        field = custom_field([(0, 0), (30, 0)], [15.0, 15.0], gr=[0.2, 1.2])
        base = sim.FrameSpec(shape=(64, 64), exptime=100.0, zeropoint=23.0)
        _, truth = sim.render_frame(field, base)
        assert truth.flux[0] == pytest.approx(100.0 * 10 ** (-0.4 * (15.0 - 23.0)))
        _, cloudy = sim.render_frame(field, replace(base, transparency=0.2))
        assert cloudy.flux == pytest.approx(0.2 * truth.flux)
        _, coloured = sim.render_frame(field, replace(base, color_term=0.1))
        # a redder star (larger g - r) is fainter by color_term * colour
        assert coloured.flux / truth.flux == pytest.approx(10 ** (-0.4 * 0.1 * np.array([0.2, 1.2])))

    def test_stars_off_the_frame_have_truth_but_no_light(self):
        field = custom_field([(0, 0), (400, 0)], [14.0, 12.0])
        spec = sim.FrameSpec(shape=(128, 128), seed=2)
        hdul, truth = sim.render_frame(field, spec)
        assert not truth.on_frame(spec.shape)[1]
        assert truth.flux[1] > 0
        image = hdul["SCI"].data
        # no light beyond the target's: everything except the target box is sky
        mask = np.ones(image.shape, bool)
        ix, iy = round(truth.x[0]), round(truth.y[0])
        mask[iy - 35 : iy + 36, ix - 35 : ix + 36] = False
        assert np.mean(image[mask]) == pytest.approx(spec.sky, abs=0.5)


class TestPsfWidth:
    """The rendered PSF has the requested FWHM: the half-maximum area A of a bright unsaturated star gives
    2 sqrt(A / pi) within 10 % of the truth, for round and elliptical PSFs."""

    @pytest.mark.parametrize(("fwhm", "ellipticity"), [(2.5, 0.0), (3.0, 0.0), (3.0, 0.5)])
    def test_half_max_area(self, fwhm, ellipticity):
        field = custom_field([(0, 0)], [12.0])
        spec = sim.FrameSpec(
            shape=(128, 128),
            fwhm_arcsec=fwhm,
            ellipticity=ellipticity,
            psf_angle_deg=40,
            offset_pix=(0.27, 0.41),
            seed=5,
        )
        hdul, truth = sim.render_frame(field, spec)
        assert not truth.saturated[0]
        image = hdul["SCI"].data - spec.sky
        area = np.count_nonzero(image > image.max() / 2.0)
        assert 2.0 * math.sqrt(area / math.pi) == pytest.approx(truth.fwhm_pix, rel=0.10)
        assert truth.fwhm_pix == pytest.approx(fwhm / 0.389)

    def test_elongation_follows_the_angle(self):
        field = custom_field([(0, 0)], [12.0])
        spec = sim.FrameSpec(shape=(128, 128), ellipticity=0.6, psf_angle_deg=90.0, seed=5)
        hdul, _ = sim.render_frame(field, spec)
        image = hdul["SCI"].data - spec.sky
        bright = image > image.max() / 2.0
        rows = np.flatnonzero(bright.any(axis=1))
        cols = np.flatnonzero(bright.any(axis=0))
        # major axis at 90 degrees from +x: the half-max region is taller than wide
        assert len(rows) > 1.5 * len(cols)


class TestSaturationAndDefects:
    """Pixels at or above SATURATE are clipped to it and flagged BPM bit 2; bad columns are junk and
    flagged bit 1; cosmic rays add thousands of electrons and are not in the BPM."""

    def test_saturated_star(self):
        field = custom_field([(0, 0), (25, 25)], [9.5, 14.0])
        spec = sim.FrameSpec(shape=(128, 128), seed=8)
        hdul, truth = sim.render_frame(field, spec)
        image, bpm = hdul["SCI"].data, hdul["BPM"].data
        assert truth.saturated.tolist() == [True, False]
        assert image.max() == np.float32(spec.saturate)
        clipped = image >= np.float32(spec.saturate)
        assert clipped.sum() > 5
        assert np.array_equal(clipped, (bpm & 2) > 0)
        ix, iy = round(truth.x[0]), round(truth.y[0])
        assert clipped[iy, ix]

    def test_bad_columns_and_cosmics(self):
        field = custom_field([(0, 0)], [16.0])
        spec = sim.FrameSpec(shape=(128, 128), bad_columns=(10, 77), n_cosmics=6, seed=9)
        hdul, truth = sim.render_frame(field, spec)
        image, bpm = hdul["SCI"].data, hdul["BPM"].data
        assert np.all(bpm[:, [10, 77]] & 1)
        assert not np.any(np.delete(bpm, [10, 77], axis=1) & 1)
        assert np.median(image[:, 10]) > 20 * spec.sky
        assert len(truth.cosmic_x) == 6
        hits = image[truth.cosmic_y, truth.cosmic_x]
        assert np.all(hits > spec.sky + 1000)
        assert not np.any(bpm[truth.cosmic_y, truth.cosmic_x])


class TestTargetLightCurve:
    """The target's brightness in each frame is Field.target_mag at mid-exposure: its measured magnitude
    tracks the sinusoid, while comparison stars stay constant."""

    def test_target_mag_function(self):
        field = custom_field([(0, 0), (30, 0)], [15.0, 13.0], amplitude=0.3)
        assert field.target_mag("r", 61000.0) == pytest.approx(15.0)
        assert field.target_mag("r", 61000.1) == pytest.approx(15.3)
        assert field.target_mag("r", 61000.3) == pytest.approx(14.7)
        assert np.allclose(field.target_mag("r", np.array([61000.0, 61000.1])), [15.0, 15.3])
        mags = field.star_mags("r", 61000.1)
        assert mags.tolist() == pytest.approx([15.3, 13.0])
        assert field.mags["r"][0] == 15.0  # the stored mean is untouched

    def test_measured_target_follows_the_curve(self):
        field = custom_field([(0, 0), (-30, 20)], [13.5, 13.0], amplitude=0.3)
        measured, expected = [], []
        for k, phase in enumerate([0.0, 0.25, 0.5, 0.75]):
            spec = sim.FrameSpec(shape=(256, 256), mjd_start=61000.0 + phase * 0.4 + 1e-4, seed=k)
            hdul, truth = sim.render_frame(field, spec)
            image = hdul["SCI"].data
            target, _ = box_flux(image, truth.x[0], truth.y[0], 40, spec.sky)
            comp, _ = box_flux(image, truth.x[1], truth.y[1], 40, spec.sky)
            measured.append(-2.5 * math.log10(target / comp) + 13.0)
            expected.append(field.target_mag("r", truth.mjd_mid))
            assert truth.mag[0] == pytest.approx(expected[-1])
        assert measured == pytest.approx(expected, abs=0.01)
        assert max(measured) - min(measured) == pytest.approx(0.6, abs=0.02)


class TestWcs:
    """The header WCS is exact (WCSERR=0) unless wcs_error, in which case it is only the pointing: off by
    more than 100 pixels at the target and WCSERR=4, while the stars stay at their true positions. The
    orientation is north up, east left, rotated by rotation_deg."""

    def test_exact_wcs(self):
        field = custom_field([(0, 0)], [14.0])
        spec = sim.FrameSpec(shape=(300, 200), offset_pix=(12.5, -20.25), rotation_deg=0.7)
        hdul, truth = sim.render_frame(field, spec)
        header = hdul["SCI"].header
        assert header["WCSERR"] == 0
        x, y = WCS(header).world_to_pixel_values(RA0, DEC0)
        assert x == pytest.approx(truth.x[0], abs=1e-6)
        assert y == pytest.approx(truth.y[0], abs=1e-6)
        assert (truth.x[0], truth.y[0]) == pytest.approx((99.5 + 12.5, 149.5 - 20.25), abs=1e-3)

    def test_wrong_wcs(self):
        field = custom_field([(0, 0)], [12.5])
        spec = sim.FrameSpec(shape=(256, 256), wcs_error=True, seed=4)
        hdul, truth = sim.render_frame(field, spec)
        header = hdul["SCI"].header
        assert header["WCSERR"] == 4
        x, y = WCS(header).world_to_pixel_values(RA0, DEC0)
        assert math.hypot(x - truth.x[0], y - truth.y[0]) > 100
        image = hdul["SCI"].data
        iy, ix = np.unravel_index(np.argmax(image), image.shape)
        assert math.hypot(ix - truth.x[0], iy - truth.y[0]) < 1.0

    @pytest.mark.parametrize(("rotation", "east", "north"), [(0.0, (-1, 0), (0, 1)), (90.0, (0, 1), (1, 0))])
    def test_orientation(self, rotation, east, north):
        field = custom_field([(0, 0), (20, 0), (0, 20)], [14.0, 14.0, 14.0])
        _, truth = sim.render_frame(field, sim.FrameSpec(shape=(200, 200), rotation_deg=rotation))
        step = 20.0 / 0.389
        assert (truth.x[1] - truth.x[0], truth.y[1] - truth.y[0]) == pytest.approx(
            (east[0] * step, east[1] * step), abs=0.01
        )
        assert (truth.x[2] - truth.x[0], truth.y[2] - truth.y[0]) == pytest.approx(
            (north[0] * step, north[1] * step), abs=0.01
        )


class TestNoiseAndDeterminism:
    """Sky pixels have mean sky and variance sky + read_noise^2 (fast and exact Poisson modes alike), and
    the same seed gives identical pixels and identical fpack files."""

    @pytest.mark.parametrize(("sky", "exact"), [(300.0, False), (300.0, True), (20.0, False)])
    def test_sky_statistics(self, sky, exact):
        field = custom_field([(0, 0)], [30.0])
        spec = sim.FrameSpec(shape=(256, 256), sky=sky, exact_poisson=exact, seed=1)
        image = sim.render_frame(field, spec)[0]["SCI"].data.astype(np.float64)
        assert image.mean() == pytest.approx(sky, abs=0.2)
        assert image.var() == pytest.approx(sky + 49.0, rel=0.03)

    def test_same_seed_same_pixels(self, tmp_path):
        field = sim.make_field("X", RA0, DEC0, nstars=200, radius_arcmin=3, seed=2)
        spec = sim.FrameSpec(shape=(200, 200), n_cosmics=3, seed=5)
        a = sim.render_frame(field, spec)[0]
        b = sim.render_frame(field, spec)[0]
        c = sim.render_frame(field, sim.FrameSpec(shape=(200, 200), n_cosmics=3, seed=6))[0]
        for name in ("SCI", "BPM", "ERR"):
            assert np.array_equal(a[name].data, b[name].data)
        assert not np.array_equal(a["SCI"].data, c["SCI"].data)
        sim.write_frame(tmp_path / "1.fits.fz", field, spec, compress="fz")
        sim.write_frame(tmp_path / "2.fits.fz", field, spec, compress="fz")
        assert (tmp_path / "1.fits.fz").read_bytes() == (tmp_path / "2.fits.fz").read_bytes()
        sim.write_frame(tmp_path / "1.fits.gz", field, spec, compress="gz")
        sim.write_frame(tmp_path / "2.fits.gz", field, spec, compress="gz")
        assert (tmp_path / "1.fits.gz").read_bytes() == (tmp_path / "2.fits.gz").read_bytes()
        with gzip.open(tmp_path / "1.fits.gz") as raw, fits.open(raw) as hdul:
            assert np.array_equal(hdul["SCI"].data, a["SCI"].data)


class TestMakeField:
    """make_field gives a reproducible field: target at index 0 and isolated, many faint and few bright
    stars in r 9-20 with a few that saturate, and main-sequence colours."""

    def test_field(self):
        field = sim.make_field("F", 10.0, 5.0, nstars=500, radius_arcmin=8.0, seed=3, target_mag=15.5)
        again = sim.make_field("F", 10.0, 5.0, nstars=500, radius_arcmin=8.0, seed=3, target_mag=15.5)
        assert np.array_equal(field.star_ra, again.star_ra)
        assert field.nstars == 501 and len(field.star_dec) == 501
        assert (field.star_ra[0], field.star_dec[0]) == (10.0, 5.0)
        assert field.mags["r"][0] == 15.5
        dra = (field.star_ra[1:] - 10.0) * math.cos(math.radians(5.0))
        sep = 3600 * np.hypot(dra, field.star_dec[1:] - 5.0)
        assert sep.min() >= 6.0 and sep.max() <= 8.0 * 60 + 1
        r = field.mags["r"][1:]
        assert r.min() >= 9.0 and r.max() <= 20.0
        assert np.sum(r < 10.5) == 5
        assert np.sum(r > 18) > 5 * np.sum((r > 13) & (r < 15))
        gr = field.mags["g"] - field.mags["r"]
        assert gr.min() >= 0.15 - 1e-9 and gr.max() <= 1.4 + 1e-9
        ri = field.mags["r"] - field.mags["i"]
        assert np.corrcoef(gr, ri)[0, 1] > 0.9
        bv = field.mags["B"] - field.mags["V"]
        assert np.all((bv > 0.2) & (bv < 1.6))
        assert set(field.mags) >= {"u", "g", "r", "i", "z", "B", "V", "R", "I"}

    def test_box_fills_a_square(self):
        field = sim.make_field("F", 10.0, 5.0, nstars=400, box_arcmin=4.0, seed=1)
        _, truth = sim.render_frame(field, sim.FrameSpec(shape=(617, 617)))
        assert truth.on_frame((617, 617)).mean() > 0.97


class TestWriteRefcat:
    """write_refcat writes ra, dec, <band>, <band>_err for the non-target stars brighter than the r limit,
    with catalog noise of size mag_err, as CSV or ECSV."""

    @pytest.mark.parametrize("suffix", ["csv", "ecsv"])
    def test_catalog(self, tmp_path, suffix):
        field = sim.make_field("F", 10.0, 5.0, nstars=400, seed=3)
        path = tmp_path / f"cat.{suffix}"
        sim.write_refcat(field, path, mag_err=0.02, faint_limit=18.5)
        table = Table.read(path, format="ascii.ecsv" if suffix == "ecsv" else "ascii.csv")
        assert table.colnames == [
            "ra",
            "dec",
            "g",
            "g_err",
            "r",
            "r_err",
            "i",
            "i_err",
            "z",
            "z_err",
            "B",
            "B_err",
            "V",
            "V_err",
        ]
        wanted = np.flatnonzero(field.mags["r"] < 18.5)
        wanted = wanted[wanted != 0]
        assert len(table) == len(wanted)
        assert np.allclose(table["ra"], field.star_ra[wanted], atol=1e-7)
        dist = np.hypot(table["ra"] - 10.0, table["dec"] - 5.0)
        assert dist.min() > 1e-3  # the target is not in it
        noise = np.asarray(table["r"]) - field.mags["r"][wanted]
        assert np.std(noise) == pytest.approx(0.02, rel=0.3)
        assert np.all(table["r_err"] == 0.02)


class TestSimulateSeries:
    """simulate_series writes a time-ordered night-by-night series with LCO names, varying pointing,
    rotation, seeing, sky and airmass, one frame per filter per visit."""

    def test_series(self, tmp_path):
        field = sim.make_field("SN1", 150.0, -20.0, nstars=150, radius_arcmin=3.0, seed=1)
        out = sim.simulate_series(
            field,
            tmp_path / "in",
            nights=2,
            frames_per_night=3,
            filters=("gp", "rp"),
            shape=(128, 128),
            seed=4,
            exptime=30.0,
        )
        assert len(out) == 12
        names = [p.name for p, _, _ in out]
        assert len(set(names)) == 12
        assert all(re.fullmatch(r"cpt1m012-fa06-\d{8}-\d{4}-e91\.fits\.fz", n) for n in names)
        assert all(p.exists() for p, _, _ in out)
        mjds = [t.mjd_mid for _, _, t in out]
        assert mjds == sorted(mjds)
        assert mjds[-1] - mjds[0] > 0.5  # two nights
        specs = [s for _, s, _ in out]
        assert [s.filter for s in specs[:4]] == ["gp", "rp", "gp", "rp"]
        assert all(s.exptime == 30.0 for s in specs)
        assert all(1.5 <= s.fwhm_arcsec <= 3.0 for s in specs)
        assert all(1.0 <= s.airmass <= 3.0 for s in specs)
        assert all(abs(s.rotation_deg) < 1.0 for s in specs)
        assert len({s.offset_pix for s in specs}) == 12
        assert len({s.seed for s in specs}) == 12
        with fits.open(out[5][0]) as hdul:
            header = hdul["SCI"].header
            assert header["OBJECT"] == "SN1"
            assert header["FILTER"] == specs[5].filter
            assert header["MJD-OBS"] == pytest.approx(out[5][2].mjd_mid - 15.0 / 86400.0, abs=1e-9)


def small_field(**kwargs) -> sim.Field:
    """A small make_field field around (150, 2) for the hazard tests."""
    return sim.make_field("HZ", 150.0, 2.0, **{"nstars": 20, "radius_arcmin": 2.0, "seed": 3, **kwargs})


class TestWcsJitter:
    """With wcs_jitter_arcsec, the solved header WCS (WCSERR=0) is off like a BANZAI solution: shifted
    reference point, small rotation and scale error, its worst position error over the frame between 0.5 and
    1 times the requested arcsec; the stars and the truth (positions and WCS) are those of the exact frame."""

    def test_error_lies_in_the_requested_range(self):
        field = small_field()
        errors = []
        for seed in range(12):
            spec = sim.FrameSpec(shape=(128, 192), seed=seed, wcs_jitter_arcsec=4.0, rotation_deg=20.0 * seed)
            hdul, truth = sim.render_frame(field, spec)
            assert hdul["SCI"].header["WCSERR"] == 0
            errors.append(sim.header_wcs_error_arcsec(hdul, truth))
        assert all(2.0 <= e <= 4.0 for e in errors)
        assert min(errors) < 2.8 and max(errors) > 3.2  # spread over the range, not stuck at one end

    def test_truth_and_pixels_stay_and_only_the_header_moves(self):
        field = small_field()
        exact_hdul, exact = sim.render_frame(field, sim.FrameSpec(shape=(128, 128), seed=5))
        hdul, truth = sim.render_frame(field, sim.FrameSpec(shape=(128, 128), seed=5, wcs_jitter_arcsec=3.0))
        assert np.array_equal(truth.x, exact.x) and np.array_equal(truth.y, exact.y)
        assert truth.wcs is not None and exact.wcs is not None
        assert truth.wcs.to_header() == exact.wcs.to_header()
        assert np.array_equal(hdul["SCI"].data, exact_hdul["SCI"].data)
        header, exact_header = hdul["SCI"].header, exact_hdul["SCI"].header
        assert (header["CRPIX1"], header["CRPIX2"]) == (exact_header["CRPIX1"], exact_header["CRPIX2"])
        assert (header["CRVAL1"], header["CRVAL2"]) != (exact_header["CRVAL1"], exact_header["CRVAL2"])
        cd = np.array([[header["CD1_1"], header["CD1_2"]], [header["CD2_1"], header["CD2_2"]]])
        exact_cd = np.array(
            [[exact_header["CD1_1"], exact_header["CD1_2"]], [exact_header["CD2_1"], exact_header["CD2_2"]]]
        )
        assert np.linalg.det(cd) != pytest.approx(np.linalg.det(exact_cd), rel=1e-9)  # scale error
        assert cd[0, 1] != pytest.approx(exact_cd[0, 1], abs=1e-12)  # rotation error
        assert sim.header_wcs_error_arcsec(exact_hdul, exact) == 0.0
        # the target's header position is off by at most the error, in pixels
        x, y = WCS(header).world_to_pixel_values(field.ra, field.dec)
        assert 0 < math.hypot(x - truth.x[0], y - truth.y[0]) * 0.389 <= 3.0

    def test_same_seed_same_error_and_a_failed_wcs_wins(self):
        field = small_field()
        spec = sim.FrameSpec(shape=(64, 64), seed=8, wcs_jitter_arcsec=2.0)
        first, again = sim.render_frame(field, spec)[0], sim.render_frame(field, spec)[0]
        assert first["SCI"].header["CRVAL1"] == again["SCI"].header["CRVAL1"]
        failed, truth = sim.render_frame(field, replace(spec, wcs_error=True))
        assert failed["SCI"].header["WCSERR"] == 4
        assert sim.header_wcs_error_arcsec(failed["SCI"].header, truth) > 60.0


class TestDistortion:
    """distortion_pix moves every star radially from the frame centre by distortion_pix * (r / r_corner)^3
    pixels in the truth and in the pixels, while the header WCS stays linear TAN without SIP (so it is off by
    up to distortion_pix in the corners)."""

    def test_truth_positions(self):
        field = small_field(nstars=300, box_arcmin=256 * 0.389 / 60)
        _, straight = sim.render_frame(field, sim.FrameSpec(shape=(256, 192), seed=1))
        _, bent = sim.render_frame(field, sim.FrameSpec(shape=(256, 192), seed=1, distortion_pix=2.0))
        cx, cy = 95.5, 127.5
        radius = np.hypot(straight.x - cx, straight.y - cy)
        moved = np.hypot(bent.x - straight.x, bent.y - straight.y)
        assert np.allclose(moved, 2.0 * (radius / math.hypot(cx, cy)) ** 3)
        # radially outwards: same direction from the centre, further out
        outward = (bent.x - straight.x) * (straight.x - cx) + (bent.y - straight.y) * (straight.y - cy)
        assert np.all(outward >= 0)
        on = straight.on_frame((256, 192))
        corner = on & (radius > 0.9 * math.hypot(cx, cy))
        centre = radius < 20
        assert corner.any() and centre.any()
        assert np.all(moved[corner] > 1.4) and np.all(moved[centre] < 0.005)

    def test_stars_are_drawn_where_the_truth_says_and_the_header_is_linear(self):
        # a bright star near the corner pixel (0, 0) of a 256 x 256 frame, the target at the centre
        field = custom_field([(0, 0), (115.5 * 0.389, -115.5 * 0.389)], [16.0, 13.0])
        spec = sim.FrameSpec(shape=(256, 256), seed=2, distortion_pix=3.0)
        hdul, truth = sim.render_frame(field, spec)
        header = hdul["SCI"].header
        assert header["CTYPE1"] == "RA---TAN" and "A_ORDER" not in header
        linear = np.array(WCS(header).world_to_pixel_values(field.star_ra[1], field.star_dec[1]))
        assert linear == pytest.approx((12.0, 12.0), abs=0.01)
        radial = linear - 127.5
        expected = linear + radial / np.hypot(*radial) * 3.0 * (np.hypot(*radial) / math.hypot(127.5, 127.5)) ** 3
        assert (truth.x[1], truth.y[1]) == pytest.approx(tuple(expected), abs=1e-6)
        assert np.hypot(*(expected - linear)) == pytest.approx(2.2, abs=0.05)
        image = hdul["SCI"].data.astype(np.float64) - spec.sky
        ix, iy = round(truth.x[1]), round(truth.y[1])
        ys, xs = np.mgrid[iy - 8 : iy + 9, ix - 8 : ix + 9]
        box = image[iy - 8 : iy + 9, ix - 8 : ix + 9]
        centroid = np.array([(box * xs).sum(), (box * ys).sum()]) / box.sum()
        assert centroid == pytest.approx((truth.x[1], truth.y[1]), abs=0.2)
        assert (truth.x[0], truth.y[0]) == pytest.approx((127.5, 127.5), abs=1e-9)


class TestFadingTarget:
    """With fade_rate, the target is constant before epoch and then fades linearly by fade_rate mag per day
    in every band (the sine's amplitude is ignored); the frames' truth follows it."""

    def test_target_mag(self):
        field = small_field(target_mag=16.0, fade_rate=0.5, amplitude=0.3, epoch=61000.0)
        assert field.fade_rate == 0.5
        assert field.target_mag("r", 60990.0) == pytest.approx(16.0)
        assert field.target_mag("r", 61000.0) == pytest.approx(16.0)
        days = np.array([0.5, 1.0, 4.0, 10.0])
        assert np.allclose(field.target_mag("r", 61000.0 + days), 16.0 + 0.5 * days)
        g0 = float(field.mags["g"][0])
        assert field.target_mag("g", 61004.0) == pytest.approx(g0 + 2.0)

    def test_frames_follow_the_fade(self):
        field = small_field(target_mag=16.0, fade_rate=0.5, epoch=61000.0)
        mags = []
        for day in (0.0, 2.0, 6.0):
            _, truth = sim.render_frame(field, sim.FrameSpec(shape=(64, 64), mjd_start=61000.2 + day))
            mags.append(truth.mag[0])
        assert np.diff(mags) == pytest.approx([1.0, 2.0], abs=1e-6)


class TestTargetColour:
    """make_field's target_gr sets the target's g - r (0.5 by default); its other bands follow the stellar
    locus, and the other stars are the same as with the default colour."""

    def test_red_target(self):
        red = small_field(target_gr=1.4)
        default = small_field()
        assert red.mags["g"][0] - red.mags["r"][0] == pytest.approx(1.4)
        assert default.mags["g"][0] - default.mags["r"][0] == pytest.approx(0.5)
        assert red.mags["r"][0] == default.mags["r"][0] == 15.0
        # the locus: r - i = 0.43 (g - r) - 0.08 with 0.02 mag of scatter
        assert red.mags["r"][0] - red.mags["i"][0] == pytest.approx(0.43 * 1.4 - 0.08, abs=0.08)
        assert red.mags["B"][0] - red.mags["V"][0] > default.mags["B"][0] - default.mags["V"][0] + 0.5
        for band in sim.ALL_BANDS:
            assert np.array_equal(red.mags[band][1:], default.mags[band][1:])


def series(tmp_path, name: str, **kwargs) -> list[tuple]:
    """A small fast series (64 x 64, 2 nights x 2 visits, plain FITS) of a small field."""
    options = {"nights": 2, "frames_per_night": 2, "shape": (64, 64), "seed": 4, "compress": None, **kwargs}
    return sim.simulate_series(small_field(), tmp_path / name, **options)


class TestSeriesDefaults:
    """A default simulate_series gives the same conditions as before the hazard options existed (values
    recorded from that version, commit c5791cc): no WCS jitter or distortion, frames numbered from 11, seeing
    clipped to 1.5-3"."""

    # (file name, mjd_start, fwhm_arcsec, sky, zeropoint, transparency, *offset_pix, rotation_deg, airmass)
    # of series(tmp_path, ...) with a make_field("SN1", 150.0, -20.0, nstars=20, radius_arcmin=2.0, seed=1)
    RECORDED: ClassVar[list[tuple]] = [
        ("cpt1m012-fa06-20251122-0011-e91.fits", 61001.00583247242, 3.0, 386.0920760713595, 23.40387306009972,
         0.9347167993769782, 9.471417775154471, -3.3471660320801306, -0.37794897001588357, 1.9613),
        ("cpt1m012-fa06-20251122-0012-e91.fits", 61001.105940475536, 2.4031801350994066, 416.72894900232313,
         23.48543062693329, 0.9615409617927106, -33.95656432673806, -16.237931286645548, -0.22824912188296498,
         1.1457),
        ("cpt1m012-fa06-20251123-0013-e91.fits", 61002.0028716632, 2.618787843771024, 271.3424143150176,
         23.403470287992537, 0.9776911328850311, -35.89446124747484, -12.103451448206206, 0.2495061288483138,
         1.9653),
        ("cpt1m012-fa06-20251123-0014-e91.fits", 61002.103110294534, 2.1634952132363066, 267.3226883121205,
         23.48539826633165, 0.9871071526591615, 37.124501769224224, 7.412474918442088, 0.49846199120861534,
         1.146),
    ]  # fmt: skip

    def test_conditions_are_unchanged(self, tmp_path):
        field = sim.make_field("SN1", 150.0, -20.0, nstars=20, radius_arcmin=2.0, seed=1)
        out = sim.simulate_series(field, tmp_path, nights=2, frames_per_night=2, shape=(64, 64), seed=4, compress=None)
        got = [
            (
                p.name,
                s.mjd_start,
                s.fwhm_arcsec,
                s.sky,
                s.zeropoint,
                s.transparency,
                *s.offset_pix,
                s.rotation_deg,
                s.airmass,
            )
            for p, s, _ in out
        ]
        assert len(got) == len(self.RECORDED)
        for row, recorded in zip(got, self.RECORDED, strict=True):
            assert row[0] == recorded[0]
            assert row[1:] == pytest.approx(recorded[1:], rel=1e-12, abs=1e-12)
        for path, spec, truth in out:
            assert spec.wcs_jitter_arcsec == 0.0 and spec.distortion_pix == 0.0
            with fits.open(path) as hdul:
                assert sim.header_wcs_error_arcsec(hdul, truth) == 0.0


class TestSeriesOptions:
    """simulate_series's options take effect: seeing sets the nightly seeing range (and the clip), wcs_jitter
    draws each frame's jitter without changing any other condition, sky_scale multiplies the sky,
    zeropoint_offset shifts the zero points, first_frame_number starts the numbering, and FrameSpec fields
    (another telescope, distortion, mjd_start) pass through."""

    def test_seeing(self, tmp_path):
        default = [s.fwhm_arcsec for _, s, _ in series(tmp_path, "a", nights=3)]
        bad = [s.fwhm_arcsec for _, s, _ in series(tmp_path, "b", nights=3, seeing=(3.5, 4.5))]
        assert all(1.5 <= f <= 3.0 for f in default)
        assert all(0.9 * 3.5 <= f <= 1.2 * 4.5 for f in bad)
        assert min(bad) > max(default)

    def test_wcs_jitter_changes_nothing_else(self, tmp_path):
        plain = series(tmp_path, "a")
        jittered = series(tmp_path, "b", wcs_jitter=(0.5, 5.0))
        jitters = [s.wcs_jitter_arcsec for _, s, _ in jittered]
        assert all(0.5 <= j <= 5.0 for j in jitters) and len(set(jitters)) == len(jitters)
        for (_, spec, truth), (path, jittered_spec, jittered_truth) in zip(plain, jittered, strict=True):
            assert replace(jittered_spec, wcs_jitter_arcsec=0.0) == spec
            assert np.array_equal(jittered_truth.x, truth.x)
            with fits.open(path) as hdul:
                error = sim.header_wcs_error_arcsec(hdul, jittered_truth)
            assert 0.5 * jittered_spec.wcs_jitter_arcsec <= error <= jittered_spec.wcs_jitter_arcsec

    def test_sky_zeropoint_and_frame_numbers(self, tmp_path):
        plain = series(tmp_path, "a")
        changed = series(tmp_path, "a", sky_scale=8.0, zeropoint_offset=-2.0, first_frame_number=500)
        assert len({p for p, _, _ in plain + changed}) == 8  # one folder, no name reused
        assert [s.frame_number for _, s, _ in changed] == [500, 501, 502, 503]
        assert all(p.name.endswith(f"-{s.frame_number:04d}-e91.fits") for p, s, _ in changed)
        for (_, spec, truth), (_, other, other_truth) in zip(plain, changed, strict=True):
            assert other.sky == pytest.approx(8.0 * spec.sky, rel=1e-12)
            assert other.zeropoint == pytest.approx(spec.zeropoint - 2.0, abs=1e-12)
            assert other_truth.flux == pytest.approx(truth.flux * 10 ** (-0.8), rel=1e-9)
            assert replace(other, sky=spec.sky, zeropoint=spec.zeropoint, frame_number=spec.frame_number) == spec

    def test_another_telescope_on_the_same_nights(self, tmp_path):
        one_metre = series(tmp_path, "in", distortion_pix=0.5)
        sbig = series(
            tmp_path, "in", site="coj", telescope="0m4-14", instrument="kb29", pixscale=0.571, color_term=0.08
        )
        later = series(tmp_path, "later", mjd_start=61005.2)
        for _, spec, _ in one_metre:
            assert spec.distortion_pix == 0.5
        for path, spec, truth in sbig:
            assert re.fullmatch(r"coj0m414-kb29-\d{8}-\d{4}-e91\.fits", path.name)
            assert (spec.pixscale, spec.color_term, spec.telescope) == (0.571, 0.08, "0m4-14")
            assert truth.fwhm_pix == pytest.approx(spec.fwhm_arcsec / 0.571)
            with fits.open(path) as hdul:
                header = hdul["SCI"].header
                assert (header["SITEID"], header["TELESCOP"], header["INSTRUME"]) == ("coj", "0m4-14", "kb29")
                assert header["PIXSCALE"] == 0.571
                assert math.hypot(header["CD1_1"], header["CD2_1"]) * 3600 == pytest.approx(0.571)
        # both telescopes observe the same two nights (different sites, so within a day of each other)
        for night in (0, 1):
            assert abs(sbig[2 * night][1].mjd_start - one_metre[2 * night][1].mjd_start) < 1.0
        assert later[0][1].mjd_start - one_metre[0][1].mjd_start == pytest.approx(5.0, abs=0.1)


# --------------------------------------------------------------------------------------------------------
# Host galaxies and supernova-like transients
# --------------------------------------------------------------------------------------------------------


def sn_field(**kwargs) -> sim.Field:
    """A supernova on a host (make_supernova_field), a bit bigger and flatter than the default host."""
    options = {"seed": 5, "host_scale_arcsec": 1.5, "host_ellipticity": 0.4, "host_theta_deg": 30.0, **kwargs}
    return sim.make_supernova_field("SNHOST", RA0, DEC0, **options)


def host_only(field: sim.Field, spec: sim.FrameSpec) -> tuple[np.ndarray, sim.FrameTruth]:
    """The host's light on a frame: the frame minus the same frame (same seed, same noise draws) without
    the host, and the truth of the frame with it."""
    hdul, truth = sim.render_frame(field, spec)
    bare, _ = sim.render_frame(replace(field, host=None), spec)
    return hdul["SCI"].data.astype(np.float64) - bare["SCI"].data, truth


def expected_electrons(mags: dict, spec: sim.FrameSpec) -> float:
    """The documented flux formula for a source of standard magnitudes ``mags`` (dict band -> mag)."""
    first, second = sim.COLOUR_OF_BAND[spec.band]
    eff = mags[spec.band] + spec.color_term * (mags[first] - mags[second])
    return spec.transparency * spec.exptime * 10 ** (-0.4 * (eff - spec.zeropoint))


def nucleus_pixel(field: sim.Field, truth: sim.FrameTruth) -> tuple[float, float]:
    """Where the nucleus belongs, from the target, the host's (east, north) offset and the true WCS."""
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    xi, eta = field.host.offset_arcsec
    nucleus = SkyCoord(field.ra * u.deg, field.dec * u.deg).spherical_offsets_by(xi * u.arcsec, eta * u.arcsec)
    x, y = truth.wcs.world_to_pixel(nucleus)
    return float(x), float(y)


HOST_SPEC = sim.FrameSpec(
    shape=(256, 256), exptime=120.0, seed=21, color_term=0.06, transparency=0.9, rotation_deg=25.0, filter="gp"
)


class TestHostGalaxy:
    """A field's host galaxy is drawn through the true WCS at the nucleus offset, with the total flux of
    the star formula (exposure, zero point, transparency, colour term) and the frame's own PSF; it is no
    star of the truth and no row of the reference catalog."""

    def test_total_flux_and_centre(self):
        field = sn_field()
        light, truth = host_only(field, HOST_SPEC)
        expected = expected_electrons(field.host.mags, HOST_SPEC)
        assert truth.host_flux == pytest.approx(expected, rel=1e-9)
        x, y = nucleus_pixel(field, truth)
        assert (truth.host_x, truth.host_y) == pytest.approx((x, y), abs=1e-6)
        ys, xs = np.mgrid[: light.shape[0], : light.shape[1]]
        radius = 15 * 1.5 / HOST_SPEC.pixscale + 6 * truth.fwhm_pix  # all of the disk and the PSF wings
        inside = np.hypot(xs - x, ys - y) < radius
        ny, nx = light.shape
        assert radius < min(x, y, nx - 1 - x, ny - 1 - y)  # the aperture lies within the frame
        total = light[inside].sum()
        assert total == pytest.approx(expected, rel=0.01)
        centroid = np.array([(light * xs)[inside].sum(), (light * ys)[inside].sum()]) / total
        assert centroid == pytest.approx((x, y), abs=0.1)

    def test_not_a_star(self):
        field = sn_field()
        plain = sim.make_field(
            "SNHOST", RA0, DEC0, nstars=400, box_arcmin=3.5, seed=5, target_mag=17.0, target_gr=0.0, min_sep_arcsec=10.0
        )
        assert field.nstars == plain.nstars
        _, truth = sim.render_frame(field, HOST_SPEC)
        _, bare = sim.render_frame(replace(field, host=None), HOST_SPEC)
        assert len(truth.x) == len(truth.flux) == field.nstars
        assert np.array_equal(truth.flux, bare.flux)
        assert np.isnan(bare.host_x) and bare.host_flux == 0.0

    def test_worse_seeing_lowers_the_peak(self):
        field = sn_field()
        cores, peaks, totals = [], [], []
        for fwhm in (1.4, 3.0):
            light, truth = host_only(field, replace(HOST_SPEC, fwhm_arcsec=fwhm))
            ix, iy = round(truth.host_x), round(truth.host_y)
            cores.append(light[iy - 1 : iy + 2, ix - 1 : ix + 2].sum())  # 3 x 3 pixels at the nucleus
            peaks.append(truth.host_peak)
            totals.append(light.sum())
        # the same light, spread wider: the measured core and the noise-free peak both drop
        assert totals[1] == pytest.approx(totals[0], rel=0.01)
        assert cores[1] < 0.7 * cores[0]
        assert peaks[1] < 0.7 * peaks[0]
        for core, peak in zip(cores, peaks, strict=True):
            assert peak == pytest.approx(core / 9, rel=0.2)

    @pytest.mark.parametrize(("rotation", "pixscale"), [(0.0, 0.389), (70.0, 0.27)])
    def test_shape_is_fixed_on_the_sky(self, rotation, pixscale):
        # A flat host, sharp seeing: the major axis measured from the image's second moments points to the
        # same position angle on the sky whatever the frame's rotation and pixel scale.
        field = sn_field(host_scale_arcsec=2.0, host_ellipticity=0.6, host_theta_deg=30.0)
        spec = replace(HOST_SPEC, rotation_deg=rotation, pixscale=pixscale, fwhm_arcsec=1.2)
        light, truth = host_only(field, spec)
        ys, xs = np.mgrid[: light.shape[0], : light.shape[1]]
        dx, dy = xs - truth.host_x, ys - truth.host_y
        inside = np.hypot(dx, dy) < 12 * 2.0 / pixscale
        w = light[inside]
        cov = np.cov(np.stack([dx[inside], dy[inside]]), aweights=np.clip(w, 0, None))
        vals, vecs = np.linalg.eigh(cov)
        major = vecs[:, 1]
        sky0 = truth.wcs.pixel_to_world(truth.host_x, truth.host_y)
        sky1 = truth.wcs.pixel_to_world(truth.host_x + major[0], truth.host_y + major[1])
        pa = sky0.position_angle(sky1).deg % 180.0
        assert pa == pytest.approx(30.0, abs=2.0)
        assert math.sqrt(vals[0] / vals[1]) < 0.6  # still clearly elongated after the seeing

    def test_refcat_leaves_the_host_out(self, tmp_path):
        field = sn_field()
        path = tmp_path / "stars.csv"
        sim.write_refcat(field, path)
        table = Table.read(path, format="ascii.csv")
        # every row is a field star (not the target), and none lies at the host's nucleus
        stars = np.flatnonzero(field.mags["r"] < 19.0)
        assert len(table) == len(stars[stars != 0])
        nra, ndec = field.host.nucleus(field.ra, field.dec)
        sep = np.hypot((table["ra"] - nra) * math.cos(math.radians(ndec)), table["dec"] - ndec) * 3600
        assert sep.min() > 5.0

    def test_invalid_host_is_refused(self):
        mags = {band: 16.0 for band in sim.ALL_BANDS}
        with pytest.raises(ValueError, match="bands"):
            sim.Host(mags={"r": 16.0})
        with pytest.raises(ValueError, match="ellipticity"):
            sim.Host(mags=mags, ellipticity=1.0)
        with pytest.raises(ValueError, match="scale"):
            sim.Host(mags=mags, scale_arcsec=0.0)


class TestSupernovaLightCurve:
    """A Transient target has no flux up to its explosion (magnitude +inf, flux exactly 0, no warnings),
    rises to its peak magnitude mags[band][0] at peak_mjd, then fades monotonically by fade_rate mag per
    day in every band, below any detection limit; frames carry that flux."""

    def test_shape(self):
        field = sn_field(peak_mag_r=17.0, peak_mjd=61010.0, rise_days=15.0, fade_rate=0.05)
        tr = field.transient
        assert tr.explosion_mjd == pytest.approx(60995.0)
        early = field.target_mag("r", np.array([60980.0, 60994.9, 60995.0]))
        assert np.isinf(early).all() and (early > 0).all()
        rise = np.linspace(60995.01, 61010.0, 300)
        fade = np.linspace(61010.0, 61400.0, 300)
        rising, fading = field.target_mag("r", rise), field.target_mag("r", fade)
        assert np.all(np.diff(rising) < 0) and np.all(np.diff(fading) > 0)
        assert field.target_mag("r", 61010.0) == pytest.approx(17.0)
        assert np.min(field.target_mag("r", np.linspace(60990.0, 61100.0, 2001))) == pytest.approx(17.0, abs=1e-3)
        assert field.target_mag("r", 61030.0) == pytest.approx(18.0)
        assert field.target_mag("r", 61400.0) > 30.0
        # the colour is the peak's at every time with light
        g_r = field.target_mag("g", rise) - rising
        assert g_r == pytest.approx(np.full(len(rise), field.mags["g"][0] - field.mags["r"][0]))

    def test_frames_before_the_explosion_have_no_target_light(self):
        field = sn_field()
        spec = replace(HOST_SPEC, mjd_start=field.transient.explosion_mjd - 3.0)
        hdul, truth = sim.render_frame(field, spec)
        assert truth.target_flux == 0.0 and truth.flux[0] == 0.0 and truth.peak[0] == 0.0
        assert np.isinf(truth.mag[0]) and truth.host_flux > 0
        # pixel for pixel, the frame is the one of a field whose target never shines
        dark = {band: np.where(np.arange(field.nstars) == 0, np.inf, mags) for band, mags in field.mags.items()}
        same, _ = sim.render_frame(replace(field, transient=None, mags=dark), spec)
        assert np.array_equal(hdul["SCI"].data, same["SCI"].data)
        assert np.array_equal(hdul["ERR"].data, same["ERR"].data)

    def test_frames_carry_the_light_curve(self):
        field = sn_field()
        base = replace(HOST_SPEC, mjd_start=field.transient.explosion_mjd - 3.0)
        before, _ = sim.render_frame(field, base)
        for days in (-8.0, 0.0, 20.0):
            spec = replace(base, mjd_start=field.transient.peak_mjd + days)
            hdul, truth = sim.render_frame(field, spec)
            mag = field.target_mag(spec.band, truth.mjd_mid)
            first, second = sim.COLOUR_OF_BAND[spec.band]
            mags = {b: field.target_mag(b, truth.mjd_mid) for b in (spec.band, first, second)}
            assert truth.mag[0] == pytest.approx(mag)
            assert truth.target_flux == pytest.approx(expected_electrons(mags, spec), rel=1e-9)
            # same seed, same host: the difference from the pre-explosion frame is the supernova alone
            light = hdul["SCI"].data.astype(np.float64) - before["SCI"].data
            measured, npix = box_flux(light, truth.x[0], truth.y[0], 30, 0.0)
            sigma = math.sqrt(truth.target_flux + 0.01 * npix * spec.sky)
            assert measured == pytest.approx(truth.target_flux, abs=4 * sigma)


class TestSupernovaCampaign:
    """make_supernova_field gives ~350 stars on a 512 x 512 1 m frame, a host of galaxy colour near the
    target, and the transient; two telescopes observe it on the same nights through simulate_series."""

    def test_field(self):
        field = sim.make_supernova_field("SN2026x", 150.0, 2.0, seed=3, host_mag_r=16.0, host_offset_arcsec=2.0)
        assert field.host is not None and field.transient is not None
        assert field.host.mags["r"] == 16.0
        assert field.host.mags["g"] - field.host.mags["r"] == pytest.approx(0.7)
        assert math.hypot(*field.host.offset_arcsec) == pytest.approx(2.0)
        assert field.mags["r"][0] == 17.0
        _, truth = sim.render_frame(field, sim.FrameSpec(shape=(512, 512), mjd_start=61010.0))
        assert truth.on_frame((512, 512)).sum() > 300
        assert truth.host_flux > truth.target_flux > 0

    def test_two_telescopes(self, tmp_path):
        # series start at 61000.2: night 0 is before MJD 61001.2 (the explosion), night 1 after it
        field = sn_field(peak_mjd=61002.3, rise_days=1.1)
        common = {"nights": 2, "frames_per_night": 1, "shape": (128, 128), "compress": None, "seed": 2}
        one_m = sim.simulate_series(field, tmp_path / "in", **common)
        two_m = sim.simulate_series(
            field, tmp_path / "in", site="ogg", telescope="2m0-02", instrument="ep05", pixscale=0.27,
            color_term=0.03, first_frame_number=500, **common,
        )  # fmt: skip
        for path, spec, truth in one_m + two_m:
            assert path.exists()
            expected = field.target_mag(spec.band, truth.mjd_mid)
            assert truth.mag[0] == pytest.approx(expected)
            assert (truth.target_flux == 0.0) == bool(np.isinf(expected))
            assert truth.host_flux > 0
        for series_ in (one_m, two_m):
            assert [truth.target_flux > 0 for _, _, truth in series_] == [False, True]
