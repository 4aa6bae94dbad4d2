from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.time import Time

from conftest import REAL_TARGETS, ROME_FRAME, SBIG_FRAME
from lcowatch.config import parse
from lcowatch.errors import Quarantine
from lcowatch.science.frame import bjd_tdb, read_content, read_frame, site_location
from lcowatch.science.preprocess import preprocess
from lcowatch.science.quality import detect_sources, measure_quality

CONFIG = parse({"watch": {"paths": ["in"]}, "state_dir": "state", "targets": REAL_TARGETS}, Path("/tmp"))


def _read(path: Path):
    content, sha = read_content(path)
    return read_frame(path, content, sha, CONFIG)


class TestReadRealRomeFrame:
    """A gzipped Sinistro frame whose SCI is the primary HDU and whose BPM has another shape."""

    def test_reads_primary_sci_and_ignores_mismatched_bpm_with_a_warning(self, real_data: Path) -> None:
        frame = _read(real_data / ROME_FRAME)
        assert frame.data.shape == (400, 400)
        assert frame.data.dtype == np.float32 and frame.data.dtype.isnative
        assert frame.bpm is None
        assert frame.warnings == ["BPM shape (4096, 4096) does not match SCI (400, 400); ignored"]

    def test_metadata(self, real_data: Path) -> None:
        meta = _read(real_data / ROME_FRAME).meta
        header = fits.getheader(real_data / ROME_FRAME)
        assert meta.target == "ROME02"
        assert (meta.filter, meta.exptime, meta.pixscale) == ("ip", 300.0, 0.389)
        start = Time(header["DATE-OBS"], scale="utc").mjd
        assert meta.mjd_mid == pytest.approx(start + 150.0 / 86400.0, abs=1e-8)
        assert meta.saturation == pytest.approx(header["SATURATE"])
        assert meta.wcs_usable
        assert (meta.site, meta.telescope, meta.instrument) == ("lsc", "1m0-05", "fl15")

    def test_quality_is_good_with_fwhm_near_banzai(self, real_data: Path) -> None:
        frame = _read(real_data / ROME_FRAME)
        pre = preprocess(frame)
        sources = detect_sources(pre, CONFIG.quality)
        quality = measure_quality(frame, pre, sources, CONFIG.quality)
        assert quality.verdict == "good", quality.reasons
        # BANZAI's L1FWHM assumes a Gaussian; a profile-free measure of a real PSF comes out somewhat wider.
        assert frame.header["L1FWHM"] <= quality.fwhm_arcsec <= 1.35 * frame.header["L1FWHM"]
        assert quality.ellipticity < 0.2
        assert quality.background == pytest.approx(np.median(frame.data), rel=0.1)


class TestReadRealSbigFrame:
    """The fpacked 0.4 m frame with a failed astrometric solution and trailed stars."""

    def test_wcs_is_unusable_and_stars_are_elongated(self, real_data: Path) -> None:
        frame = _read(real_data / SBIG_FRAME)
        assert frame.meta.wcs_usable is False and frame.wcs is None
        assert frame.bpm is not None and frame.bpm.shape == frame.data.shape
        pre = preprocess(frame)
        quality = measure_quality(frame, pre, detect_sources(pre, CONFIG.quality), CONFIG.quality)
        assert quality.ellipticity > 0.6
        assert quality.verdict == "poor"
        assert any(reason.startswith("ellipticity") for reason in quality.reasons)

    def test_bpm_bits_enter_the_mask(self, real_data: Path) -> None:
        frame = _read(real_data / SBIG_FRAME)
        pre = preprocess(frame)
        assert frame.bpm is not None
        flagged = frame.bpm != 0
        assert np.array_equal(pre.mask & flagged, flagged)


class TestCentralSquare:
    """``read_frame(central=N)`` (a batch's survey) reads the central N x N pixels of SCI and BPM alone: the
    same values as the whole read there; the header side is the whole frame's."""

    @pytest.mark.parametrize("compress", ["fz", None])
    def test_same_pixels_as_the_whole_frame(self, tmp_path: Path, compress: str | None) -> None:
        from lcowatch.simulation.simulate import FrameSpec, make_field, write_frame

        field = make_field("SQ", 80.0, 5.0, nstars=300, radius_arcmin=3.0, seed=2)
        path = tmp_path / f"sq.fits{'.fz' if compress else ''}"
        write_frame(path, field, FrameSpec(shape=(300, 260), seed=3, bad_columns=(40, 150)), compress=compress)
        content, sha = read_content(path)
        whole = read_frame(path, content, sha, CONFIG)
        square = read_frame(path, content, sha, CONFIG, central=128)
        assert square.meta.shape == whole.meta.shape == (300, 260)
        window = (slice(86, 214), slice(66, 194))
        np.testing.assert_array_equal(square.data, whole.data[window])
        assert whole.bpm is not None and square.bpm is not None and whole.bpm[window].any()
        np.testing.assert_array_equal(square.bpm, whole.bpm[window])


class TestBarycentricTime:
    """BJD_TDB is the mid-exposure instant moved to the barycentre, computed offline."""

    def test_light_time_is_within_the_earth_orbit_and_flips_across_the_sky(self, real_data: Path) -> None:
        header = fits.getheader(real_data / ROME_FRAME)
        location = site_location(header)
        mjd = 57919.147
        jd_utc = mjd + 2400000.5
        tdb_minus_utc = 69.184 / 86400  # 32 s TT-TAI + 37 leap seconds in 2017
        one_way = [bjd_tdb(mjd, ra, dec, location) - jd_utc - tdb_minus_utc for ra, dec in ((90, 20), (270, -20))]
        assert all(abs(d) * 86400 < 510.0 for d in one_way)  # 1.017 au light time in June
        assert one_way[0] == pytest.approx(-one_way[1], abs=2 / 86400)
        assert abs(one_way[0]) * 86400 > 100

    def test_without_a_site_the_geocentre_is_within_21_ms(self, real_data: Path) -> None:
        location = site_location(fits.getheader(real_data / ROME_FRAME))
        topocentric = bjd_tdb(57919.147, 269.6, -28.0, location)
        geocentric = bjd_tdb(57919.147, 269.6, -28.0, None)
        assert 0 < abs(topocentric - geocentric) * 86400 < 0.021


class TestUnreadableInput:
    """Anything that is not a usable image raises Quarantine with a reason naming the problem."""

    @pytest.mark.parametrize(
        ("content", "reason"),
        [
            (b"", "empty file"),
            (b"hello, not a FITS file\n" * 200, "not a FITS file"),
            (b"\x1f\x8b\x08\x00garbage", "gzip"),
        ],
    )
    def test_bad_bytes(self, tmp_path: Path, content: bytes, reason: str) -> None:
        path = tmp_path / "x.fits"
        path.write_bytes(content)
        with pytest.raises(Quarantine, match=reason):
            _read(path)

    def test_truncated_fpack(self, tmp_path: Path, real_data: Path) -> None:
        path = tmp_path / "t.fits.fz"
        path.write_bytes((real_data / SBIG_FRAME).read_bytes()[:40000])
        with pytest.raises(Quarantine):
            _read(path)

    def test_catalog_only_file_has_no_image(self, real_data: Path) -> None:
        with pytest.raises(Quarantine, match="no 2-D image"):
            _read(real_data / "cpt1m012-fa06-20200113-0102-matched-cat.fits")

    def test_missing_keyword(self, tmp_path: Path, real_data: Path) -> None:
        path = tmp_path / "nofilter.fits"
        shutil.copy(real_data / ROME_FRAME, tmp_path / "r.fits.gz")
        with fits.open(tmp_path / "r.fits.gz") as hdul:
            del hdul[0].header["FILTER"]
            hdul.writeto(path)
        with pytest.raises(Quarantine, match="FILTER"):
            _read(path)

    def test_header_bomb_is_refused_before_reading_pixels(self, tmp_path: Path) -> None:
        header = fits.Header({"SIMPLE": True, "BITPIX": -32, "NAXIS": 2, "NAXIS1": 200000, "NAXIS2": 200000})
        header.update({"OBJECT": "ROME-FIELD-02", "FILTER": "ip", "EXPTIME": 1.0, "PIXSCALE": 0.389,
                       "DATE-OBS": "2026-01-01T00:00:00"})  # fmt: skip
        path = tmp_path / "bomb.fits"
        path.write_bytes(header.tostring().encode() + b"\0" * 2880)
        # Plain FITS cannot claim more than it holds without being truncated; either refusal is right.
        with pytest.raises(Quarantine, match=r"exceeds the limit|truncated"):
            _read(path)
