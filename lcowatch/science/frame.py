"""Reading one LCO reduced frame: pixels, masks and the header facts the pipeline needs.

Files are ``.fits.fz`` (fpack), ``.fits.gz`` or ``.fits``. The science image is the HDU named ``SCI``,
or the primary HDU when it holds the image; ``BPM`` is optional. ``ERR`` is not read: photometric errors come
from the measured background RMS and the sources' own shot noise (which is what BANZAI's ERR holds, and
decompressing it cost 0.13 s of a 4k frame). Pixel arrays are indexed ``[y, x]`` and every pixel
coordinate in lcowatch is 0-based.
"""

from __future__ import annotations

import hashlib
import io
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import astropy.units as u
import numpy as np
from astropy.coordinates import EarthLocation, SkyCoord
from astropy.io import fits
from astropy.time import Time
from astropy.utils import iers
from astropy.utils.exceptions import AstropyWarning
from astropy.wcs import WCS, FITSFixedWarning

from lcowatch.config import Config
from lcowatch.errors import Quarantine
from lcowatch.log import display_name

# The data host may be offline: never fetch IERS tables. Polar motion beyond the bundled tables only
# matters at the arcsecond level, far below what a barycentric time correction needs.
iers.conf.auto_download = False
iers.conf.auto_max_age = None

REQUIRED_KEYWORDS = ("OBJECT", "FILTER", "EXPTIME")
GZIP_MAGIC = b"\x1f\x8b"
FITS_BLOCK = 2880


@dataclass(frozen=True)
class FrameMeta:
    """Header facts of one frame, in the units the pipeline uses.

    Times are MJD (UTC) and BJD_TDB in days; ``pixscale`` in arcsec per pixel; ``gain`` in e-/ADU;
    ``read_noise``, ``saturation`` (pixels at or above it are masked) and ``linearity_limit`` (a pixel above
    it is no longer proportional to the light: MAXLIN, else 0.8 SATURATE, as real headers may carry
    MAXLIN = 0) in electrons. ``wcs_usable`` is true only when BANZAI solved the
    astrometry (WCSERR == 0).
    """

    object: str
    target: str | None
    filter: str
    exptime: float
    date_obs: str
    mjd_start: float
    mjd_mid: float
    bjd_tdb: float | None
    airmass: float | None
    site: str | None
    telescope: str | None
    instrument: str | None
    pixscale: float
    gain: float
    read_noise: float
    saturation: float | None
    linearity_limit: float | None
    wcs_usable: bool
    shape: tuple[int, int]


@dataclass
class Frame:
    """One frame in memory: ``data`` is float32 electrons, native byte order; ``bpm`` uint8 bits."""

    path: Path
    sha256: str
    meta: FrameMeta
    data: np.ndarray
    header: fits.Header
    bpm: np.ndarray | None
    wcs: WCS | None
    warnings: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The file's name as text (see :func:`lcowatch.log.display_name`)."""
        return display_name(self.path.name)


def read_content(path: Path) -> tuple[bytes, str]:
    """The file's bytes and their sha256 (the ledger key)."""
    content = path.read_bytes()
    return content, hashlib.sha256(content).hexdigest()


def file_sha256(path: Path) -> str:
    """The sha256 of a file read in chunks: for files too large to hold."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _decompressed(content: bytes, max_bytes: int) -> bytes:
    if not content:
        raise Quarantine("empty file", step="read")
    if content[:2] != GZIP_MAGIC:
        return content
    # Bounded, so that a small gzip bomb cannot exhaust memory.
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        raw = inflater.decompress(content, max_bytes)
    except zlib.error as exc:
        raise Quarantine(f"corrupt gzip stream: {exc}", step="read") from None
    if inflater.unconsumed_tail:
        raise Quarantine(f"gzip content larger than {max_bytes} bytes", step="read")
    if not inflater.eof:
        raise Quarantine("truncated gzip stream", step="read")
    return raw


def open_hdul(content: bytes, max_bytes: int) -> fits.HDUList:
    """Open FITS bytes (gzip allowed); raise :class:`Quarantine` when they are not a FITS file."""
    raw = _decompressed(content, max_bytes)
    if not raw.startswith(b"SIMPLE  ="):
        raise Quarantine("not a FITS file (no SIMPLE card)", step="read")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", AstropyWarning)
            return fits.open(io.BytesIO(raw), memmap=False, lazy_load_hdus=False)
    except (OSError, ValueError, IndexError, AstropyWarning) as exc:
        raise Quarantine(f"unreadable FITS: {exc}", step="read") from None


def _image_hdu(hdul: fits.HDUList) -> fits.hdu.base.ExtensionHDU | fits.PrimaryHDU:
    if "SCI" in hdul:
        return hdul["SCI"]
    for hdu in hdul:
        if hdu.is_image and hdu.header.get("NAXIS", 0) == 2:
            return hdu
    raise Quarantine("no 2-D image HDU", step="read")


def _image_shape(header: fits.Header) -> tuple[int, int]:
    # Compressed HDUs present the image's NAXISn already; ZNAXISn is the fallback for raw headers.
    nx = header.get("ZNAXIS1", header.get("NAXIS1"))
    ny = header.get("ZNAXIS2", header.get("NAXIS2"))
    if not isinstance(nx, int) or not isinstance(ny, int) or nx <= 0 or ny <= 0:
        raise Quarantine("image has no valid NAXIS1/NAXIS2", step="read")
    return ny, nx


def _float(header: fits.Header, key: str) -> float | None:
    value = header.get(key)
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


#: Observation dates accepted (MJD): 1968 to 2100. Outside, a header is wrong, not a frame old or new.
MJD_RANGE = (40000.0, 88000.0)


def observation_start(header: fits.Header) -> Time:
    """Start of the exposure (DATE-OBS, else MJD-OBS), UTC."""
    date_obs = header.get("DATE-OBS")
    try:
        if isinstance(date_obs, str) and date_obs.strip():
            start = Time(date_obs.strip(), format="isot", scale="utc")
        elif (mjd := _float(header, "MJD-OBS")) is not None:
            start = Time(mjd, format="mjd", scale="utc")
        else:
            raise Quarantine("missing required keyword DATE-OBS (and MJD-OBS)", step="read")
    except ValueError as exc:  # erfa's errors too
        raise Quarantine(f"DATE-OBS {date_obs!r} is not a time: {exc}", step="read") from None
    if not MJD_RANGE[0] <= float(start.mjd) <= MJD_RANGE[1]:
        raise Quarantine(f"observation date MJD {float(start.mjd):.6g} is not between 1968 and 2100", step="read")
    return start


def site_location(header: fits.Header) -> EarthLocation | None:
    """The site from LATITUDE/LONGITUD (deg) and HEIGHT (m), or None when not given."""
    lat, lon, height = (_float(header, k) for k in ("LATITUDE", "LONGITUD", "HEIGHT"))
    if lat is None or lon is None or abs(lat) > 90 or abs(lon) > 360 or not -500 <= (height or 0.0) <= 9000:
        return None  # the geocentre instead: BJD off by at most 21 ms
    return EarthLocation.from_geodetic(lon * u.deg, lat * u.deg, (height or 0.0) * u.m)


def bjd_tdb(mjd_utc: float, ra: float, dec: float, location: EarthLocation | None) -> float:
    """Barycentric Julian Date (TDB) of an MJD (UTC) instant, for a target at (ra, dec) degrees.

    Offline: uses astropy's built-in ephemeris and bundled IERS tables only. Without a site the
    geocentre is used, which is off by at most 21 ms.
    """
    if location is None:
        location = EarthLocation.from_geocentric(0.0, 0.0, 0.0, unit=u.m)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*IERS data is valid.*", category=AstropyWarning)
        time = Time(mjd_utc, format="mjd", scale="utc", location=location)
        light_time = time.light_travel_time(SkyCoord(ra * u.deg, dec * u.deg), "barycentric")
        return float((time.tdb + light_time).jd)


def warm_up() -> None:
    """Load what the first frame would otherwise wait for: astropy parses its Earth-orientation tables at
    the first barycentric time (~0.8 s)."""
    bjd_tdb(60000.0, 0.0, 0.0, None)


def celestial_wcs(header: fits.Header) -> WCS | None:
    """The header's celestial WCS, or None when there is none."""
    with warnings.catch_warnings():
        # Real LCO headers trip astropy's harmless 'datfix'/'obsfix' notices.
        warnings.simplefilter("ignore", FITSFixedWarning)
        try:
            wcs = WCS(header, naxis=2, fix=True)
        except (ValueError, KeyError, MemoryError):
            return None
    return wcs if wcs.has_celestial else None


MAX_EXPTIME = 86400.0  # s
MAX_PIXSCALE = 60.0  # arcsec per pixel


def read_meta(header: fits.Header, config: Config) -> FrameMeta:
    """Frame metadata from the SCI header; raise :class:`Quarantine` when a required keyword is missing."""
    missing = [k for k in REQUIRED_KEYWORDS if header.get(k) in (None, "")]
    if missing:
        raise Quarantine(f"missing required keyword(s) {', '.join(missing)}", step="read")
    exptime = _float(header, "EXPTIME")
    if exptime is None or not 0 < exptime <= MAX_EXPTIME:
        raise Quarantine(f"EXPTIME {header.get('EXPTIME')!r} is not a number of seconds in (0, 1 day]", step="read")
    pixscale = _float(header, "PIXSCALE")
    if pixscale is None or not 0 < pixscale <= MAX_PIXSCALE:
        raise Quarantine(f"PIXSCALE {header.get('PIXSCALE')!r} is not in (0, {MAX_PIXSCALE}] arcsec/pixel", step="read")
    for key, highest in (("GAIN", 1000.0), ("SATURATE", 1e9), ("MAXLIN", 1e9), ("RDNOISE", 1e4)):
        value = _float(header, key)
        if value is not None and not 0 <= value <= highest:
            raise Quarantine(f"{key} = {value!r} is outside 0..{highest:g}", step="read")
    start = observation_start(header)
    mjd_mid = float(start.mjd) + exptime / 2.0 / 86400.0
    object_name = str(header["OBJECT"]).strip()
    target = config.target_for_object(object_name)
    bjd = None
    if target is not None:
        target_config = config.targets[target]
        if target_config.ra is not None and target_config.dec is not None:
            bjd = bjd_tdb(mjd_mid, target_config.ra, target_config.dec, site_location(header))
    maxlin = _float(header, "MAXLIN")
    saturate = _float(header, "SATURATE")
    saturation = config.preprocess.saturation or (maxlin if maxlin else saturate)
    linearity_limit = maxlin if maxlin else (0.8 * saturate if saturate else config.preprocess.saturation)
    wcserr = header.get("WCSERR")
    return FrameMeta(
        object=object_name,
        target=target,
        filter=str(header["FILTER"]).strip(),
        exptime=exptime,
        date_obs=start.isot,
        mjd_start=float(start.mjd),
        mjd_mid=mjd_mid,
        bjd_tdb=bjd,
        airmass=_float(header, "AIRMASS"),
        site=header.get("SITEID"),
        telescope=header.get("TELESCOP"),
        instrument=header.get("INSTRUME"),
        pixscale=pixscale,
        gain=_float(header, "GAIN") or 1.0,
        read_noise=_float(header, "RDNOISE") or 0.0,
        saturation=saturation,
        linearity_limit=linearity_limit,
        wcs_usable=isinstance(wcserr, int) and wcserr == 0,
        shape=_image_shape(header),
    )


def _native_float32(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32)


def _optional_plane(
    hdul: fits.HDUList, name: str, shape: tuple[int, int], dtype: type, notes: list[str],
    window: tuple[slice, slice] | None = None,
) -> np.ndarray | None:  # fmt: skip
    """A plane of the SCI image's ``shape`` (its ``window`` only, when given), else None with a note."""
    if name not in hdul:
        return None
    hdu = hdul[name]
    try:
        plane = hdu.data if window is None or tuple(hdu.shape) != shape else hdu.section[window]
    except Exception as exc:  # as for SCI; the frame is usable without this plane
        notes.append(f"{name} unreadable ({exc}); ignored")
        return None
    got = None if plane is None else plane.shape
    if got is None or (got != shape if window is None else tuple(hdu.shape) != shape):
        notes.append(f"{name} shape {got} does not match SCI {shape}; ignored")
        return None
    return np.ascontiguousarray(plane, dtype=dtype)


def read_frame(path: Path, content: bytes, sha256: str, config: Config, *, central: int | None = None) -> Frame:
    """Read a frame from its bytes; raise :class:`Quarantine` for anything that is not a usable image.

    ``Frame.warnings`` collects non-fatal problems (e.g. a BPM of another shape) for the log. With
    ``central``, only the central square of that side (pixels) is read into ``data`` and ``bpm`` (a
    compressed image decompresses only the tiles it needs); ``meta.shape`` stays the whole image's.
    """
    max_bytes = config.processing.max_pixels * 8 + 64 * FITS_BLOCK
    with open_hdul(content, max_bytes) as hdul:
        hdu = _image_hdu(hdul)
        try:
            header = hdu.header.copy()
            meta = read_meta(header, config)
        except fits.VerifyError as exc:  # e.g. a raw newline or NUL in a card
            raise Quarantine(f"header does not verify: {exc}", step="read") from None
        ny, nx = meta.shape
        if ny * nx > config.processing.max_pixels:
            raise Quarantine(
                f"image of {nx}x{ny} pixels exceeds the limit of {config.processing.max_pixels}",
                step="read",
            )
        window = None
        if central is not None:
            y0, x0 = max(0, (ny - central) // 2), max(0, (nx - central) // 2)
            window = (slice(y0, y0 + central), slice(x0, x0 + central))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", AstropyWarning)
                pixels = hdu.data if window is None else hdu.section[window]
        except Exception as exc:  # truncation, or a decompression error of any library: never readable
            raise Quarantine(f"image data unreadable: {type(exc).__name__}: {exc}", step="read") from None
        expected = (ny, nx) if window is None else (min(ny, central or ny), min(nx, central or nx))
        if pixels is None or pixels.shape != expected:
            raise Quarantine("image data missing or truncated", step="read")
        notes: list[str] = []
        data = _native_float32(pixels)
        bpm = _optional_plane(hdul, "BPM", (ny, nx), np.uint8, notes, window)
    wcs = celestial_wcs(header)
    return Frame(
        path=path,
        sha256=sha256,
        meta=meta,
        data=data,
        header=header,
        bpm=bpm,
        wcs=wcs if meta.wcs_usable else None,
        warnings=notes,
    )
