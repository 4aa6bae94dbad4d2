"""Synthetic LCO BANZAI-like reduced frames with known truth.

This module is the ground truth that the pipeline's accuracy is judged against: tests, the demo and the
benchmarks all use it. It depends on numpy, scipy and astropy only.

Conventions used throughout (the pipeline relies on them):

- Pixel coordinates are **0-based** and refer to pixel *centres*, exactly as astropy's
  ``WCS.world_to_pixel`` returns them (pixel ``i`` covers ``[i - 0.5, i + 0.5]``); ``x`` is the column
  (FITS axis 1) and ``y`` the row (FITS axis 2); images are indexed ``image[y, x]``.
- Pixel values are electrons (GAIN = 1.0), the sky is *not* subtracted (as in BANZAI e91 frames).
- Magnitudes are standard magnitudes; a star of magnitude ``m`` observed through a filter whose band is
  ``b`` gives ``exptime * transparency * 10**(-0.4 * (m + color_term * colour - zeropoint))`` electrons in
  total, where ``colour`` is the catalog colour named by :data:`COLOUR_OF_BAND` (``g - r`` for u g r,
  ``r - i`` for i z, ``B - V`` for B V, ``R - I`` for R I). A calibration fit of the form
  ``mag = ZP + m_inst + c * colour`` with ``m_inst = -2.5 log10(flux / exptime)`` therefore recovers
  ``ZP = zeropoint + 2.5 log10(transparency)`` and ``c = -color_term``.
- The PSF is an (optionally elliptical) Moffat profile; ``fwhm_arcsec`` is the geometric mean of the
  major- and minor-axis FWHM, so the area inside the half-maximum contour is ``pi * (FWHM / 2)**2`` for
  any ellipticity.
- A field may carry a host galaxy (:class:`Host`, an exponential disk under the target, seen through the
  frame's own PSF, its total flux following the same formula as a star's) and a supernova-like light
  curve for the target (:class:`Transient`); the target's flux is exactly 0 before the explosion (its
  magnitude +inf). The host is not a star: it is in no star array of the truth nor in the catalog.
"""

from __future__ import annotations

import gzip
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from scipy.signal import fftconvolve

from lcowatch.bands import BAND_OF_FILTER

__all__ = [
    "ALL_BANDS",
    "BAND_OF_FILTER",
    "COLOUR_OF_BAND",
    "DEFAULT_SEEING",
    "SITES",
    "Field",
    "FrameSpec",
    "FrameTruth",
    "Host",
    "Transient",
    "header_wcs_error_arcsec",
    "lco_filename",
    "make_field",
    "make_supernova_field",
    "render_frame",
    "render_galaxy",
    "simulate_series",
    "write_frame",
    "write_refcat",
]


#: band -> (first, second) band of the colour that multiplies ``FrameSpec.color_term``.
COLOUR_OF_BAND: dict[str, tuple[str, str]] = {
    "u": ("g", "r"),
    "g": ("g", "r"),
    "r": ("g", "r"),
    "i": ("r", "i"),
    "z": ("r", "i"),
    "B": ("B", "V"),
    "V": ("B", "V"),
    "R": ("R", "I"),
    "I": ("R", "I"),
}

#: site id -> (latitude deg N, longitude deg E, height m) of the LCO sites.
SITES: dict[str, tuple[float, float, float]] = {
    "cpt": (-32.38059, 20.8101, 1807.0),
    "lsc": (-30.1673, -70.8047, 2198.0),
    "ogg": (20.7075, -156.2561, 3055.0),
    "coj": (-31.2733, 149.0711, 1116.0),
    "elp": (30.6801, -104.015, 2027.0),
    "tfn": (28.3, -16.51, 2330.0),
}

#: every band a :class:`Field` carries magnitudes for.
ALL_BANDS = ("u", "g", "r", "i", "z", "B", "V", "R", "I")

# Typical 1 m zero points (mag giving 1 e-/s at airmass 1), extinction (mag/airmass) and dark-sky rate
# (e-/s/pixel at 0.389"/pix), per filter. Used by simulate_series only.
_ZP_OF_FILTER = {
    "up": 20.8,
    "gp": 23.3,
    "rp": 23.5,
    "ip": 23.1,
    "zs": 22.3,
    "B": 22.6,
    "V": 23.1,
    "R": 23.4,
    "I": 22.6,
    "w": 24.2,
}
_EXTINCTION_OF_FILTER = {
    "up": 0.50,
    "gp": 0.18,
    "rp": 0.10,
    "ip": 0.07,
    "zs": 0.05,
    "B": 0.25,
    "V": 0.15,
    "R": 0.10,
    "I": 0.07,
    "w": 0.12,
}
_SKY_RATE_OF_FILTER = {
    "up": 0.5,
    "gp": 3.0,
    "rp": 5.0,
    "ip": 8.0,
    "zs": 12.0,
    "B": 2.0,
    "V": 4.0,
    "R": 6.0,
    "I": 10.0,
    "w": 15.0,
}

_MJD_EPOCH = datetime(1858, 11, 17)
_BPM_BAD = 1
_BPM_SATURATED = 2


# --------------------------------------------------------------------------------------------------------
# Sky truth
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Host:
    """A host galaxy: an exponential disk whose nucleus lies near the target.

    Attributes
    ----------
    mags : dict of str to float
        Total standard magnitude per band; every band of :data:`ALL_BANDS` is required. The instrument's
        colour term applies to the host's colour exactly as to a star's.
    scale_arcsec : float
        Exponential scale length along the major axis, arcsec (half-light radius 1.678 times it).
    ellipticity : float
        ``1 - b/a``, in [0, 1).
    theta_deg : float
        Position angle of the major axis on the sky, degrees from north through east.
    offset_arcsec : tuple of float
        Nucleus minus target, ``(xi, eta)`` standard (gnomonic tangent-plane) coordinates around the target
        in arcsec: ``xi`` towards east, ``eta`` towards north.
    """

    mags: dict[str, float]
    scale_arcsec: float = 1.2
    ellipticity: float = 0.3
    theta_deg: float = 40.0
    offset_arcsec: tuple[float, float] = (1.5, 0.0)

    def __post_init__(self) -> None:
        missing = [band for band in ALL_BANDS if band not in self.mags]
        if missing:
            raise ValueError(f"host magnitudes lack the bands {missing}")
        if not self.scale_arcsec > 0.0:
            raise ValueError(f"host scale_arcsec must be > 0, got {self.scale_arcsec}")
        if not 0.0 <= self.ellipticity < 1.0:
            raise ValueError(f"host ellipticity must be in [0, 1), got {self.ellipticity}")

    def nucleus(self, ra: float, dec: float) -> tuple[float, float]:
        """Sky position of the nucleus for a target at ``(ra, dec)``, degrees."""
        xi, eta = (math.radians(v / 3600.0) for v in self.offset_arcsec)
        nra, ndec = _tangent_to_sky(ra, dec, np.array([xi]), np.array([eta]))
        return float(nra[0]), float(ndec[0])


@dataclass(frozen=True)
class Transient:
    """A supernova-like light curve: nothing before the explosion, a smooth rise to the peak, a linear fade.

    With ``tau = (mjd - explosion_mjd) / rise_days`` the flux relative to the peak is
    ``tau**2 * (3 - 2 tau)`` during the rise (0 < tau <= 1: growing as t**2 at first, flat at the peak),
    and the magnitude fades by ``fade_rate`` mag per day after ``peak_mjd``, in every band alike (the
    colour stays that of the peak).

    Attributes
    ----------
    peak_mjd : float
        MJD (UTC) of the peak.
    rise_days : float
        Days from the explosion (flux exactly 0 up to and at it) to the peak.
    fade_rate : float
        Decline after the peak, magnitudes per day (> 0, so the target eventually fades below detection).
    """

    peak_mjd: float
    rise_days: float = 15.0
    fade_rate: float = 0.05

    def __post_init__(self) -> None:
        if not self.rise_days > 0.0:
            raise ValueError(f"rise_days must be > 0, got {self.rise_days}")
        if not self.fade_rate > 0.0:
            raise ValueError(f"fade_rate must be > 0, got {self.fade_rate}")

    @property
    def explosion_mjd(self) -> float:
        """MJD of the explosion, ``peak_mjd - rise_days``."""
        return self.peak_mjd - self.rise_days

    def delta_mag(self, mjd: float | np.ndarray) -> np.ndarray:
        """Magnitude relative to the peak at ``mjd`` (days): +inf up to the explosion, 0 at the peak."""
        t = np.asarray(mjd, dtype=float)
        tau = (t - self.explosion_mjd) / self.rise_days
        out = np.full(t.shape, np.inf)
        rising = (tau > 0.0) & (tau <= 1.0)
        tr = tau[rising]
        out[rising] = -2.5 * np.log10(tr * tr * (3.0 - 2.0 * tr))
        fading = tau > 1.0
        out[fading] = self.fade_rate * (t[fading] - self.peak_mjd)
        return out


@dataclass
class Field:
    """Sky truth for one target's field.

    Attributes
    ----------
    name : str
        Target name (used as the OBJECT keyword by default).
    ra, dec : float
        Target position, degrees (ICRS).
    star_ra, star_dec : numpy.ndarray
        Star positions, degrees. Index 0 is the target itself.
    mags : dict of str to numpy.ndarray
        Standard magnitude of every star per band (keys ``u g r i z B V R I``). For index 0 (the target)
        this is the *mean* magnitude of its light curve.
    amplitude : float
        Semi-amplitude of the target's sinusoidal light curve, magnitudes.
    period : float
        Period of the target's light curve, days.
    epoch : float
        MJD at which the light curve's sine is zero and rising (the target is at its mean magnitude and
        getting fainter).
    fade_rate : float
        When non-zero, the target is a transient fading by this many magnitudes per day after ``epoch``
        (constant before it) instead of a sine.
    host : Host, optional
        A host galaxy near the target (not a star: in no star array).
    transient : Transient, optional
        When given, the target follows this light curve with ``mags[band][0]`` as its peak magnitude;
        ``amplitude``, ``period``, ``epoch`` and ``fade_rate`` are then ignored.
    """

    name: str
    ra: float
    dec: float
    star_ra: np.ndarray
    star_dec: np.ndarray
    mags: dict[str, np.ndarray]
    amplitude: float = 0.3
    period: float = 0.37
    epoch: float = 61000.0
    fade_rate: float = 0.0
    host: Host | None = None
    transient: Transient | None = None

    @property
    def nstars(self) -> int:
        """Number of stars including the target."""
        return len(self.star_ra)

    def target_mag(self, band: str, mjd: float | np.ndarray) -> float | np.ndarray:
        """Magnitude of the target in ``band`` at time ``mjd``.

        Parameters
        ----------
        band : str
            Standard band (a key of :attr:`mags`).
        mjd : float or numpy.ndarray
            Modified Julian Date(s), days (UTC).

        Returns
        -------
        float or numpy.ndarray
            ``mean + amplitude * sin(2 pi (mjd - epoch) / period)``, or ``mean + fade_rate * max(0, mjd -
            epoch)`` for a fading transient, or ``peak + transient.delta_mag(mjd)`` with a
            :attr:`transient` (+inf, i.e. no flux, up to its explosion), magnitudes.
        """
        mean = float(self.mags[band][0])
        elapsed = np.asarray(mjd, dtype=float) - self.epoch
        if self.transient is not None:
            value = mean + self.transient.delta_mag(mjd)
        elif self.fade_rate:
            value = mean + self.fade_rate * np.maximum(elapsed, 0.0)
        else:
            value = mean + self.amplitude * np.sin(2.0 * np.pi * elapsed / self.period)
        return float(value) if np.ndim(value) == 0 else value

    def star_mags(self, band: str, mjd: float) -> np.ndarray:
        """Magnitudes of every star in ``band`` at ``mjd``, the target (index 0) at its current value.

        Parameters
        ----------
        band : str
            Standard band.
        mjd : float
            Modified Julian Date, days (UTC).

        Returns
        -------
        numpy.ndarray
            A new array of magnitudes, one per star.
        """
        mags = np.array(self.mags[band], dtype=float, copy=True)
        mags[0] = self.target_mag(band, float(mjd))
        return mags


def _tangent_to_sky(ra0: float, dec0: float, xi: np.ndarray, eta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse gnomonic projection: standard coordinates (radians) around (ra0, dec0) -> ra, dec degrees."""
    a0, d0 = math.radians(ra0), math.radians(dec0)
    denom = math.cos(d0) - eta * math.sin(d0)
    ra = a0 + np.arctan2(xi, denom)
    dec = np.arctan2(math.sin(d0) + eta * math.cos(d0), np.hypot(xi, denom))
    return np.degrees(ra) % 360.0, np.degrees(dec)


def _colours_from_gr(gr: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Colour offsets relative to r for a main-sequence-like stellar locus parametrised by g - r."""
    n = len(gr)
    ri = 0.43 * gr - 0.08 + rng.normal(0.0, 0.02, n)
    iz = 0.53 * ri - 0.01 + rng.normal(0.0, 0.02, n)
    ug = 1.8 * gr + 0.45 + rng.normal(0.0, 0.05, n)
    # Lupton (2005) SDSS -> Johnson-Cousins transformations.
    g_minus_r = gr
    b_minus_r = g_minus_r + 0.3130 * gr + 0.2271
    v_minus_r = g_minus_r - 0.5784 * gr - 0.0038
    rc_minus_r = -0.2936 * ri - 0.1439
    ic_minus_r = -1.2444 * ri - 0.3820
    return {
        "u": ug + g_minus_r,
        "g": g_minus_r,
        "r": np.zeros(n),
        "i": -ri,
        "z": -ri - iz,
        "B": b_minus_r,
        "V": v_minus_r,
        "R": rc_minus_r,
        "I": ic_minus_r,
    }


def make_field(
    name: str,
    ra: float,
    dec: float,
    *,
    nstars: int = 300,
    radius_arcmin: float = 8.0,
    seed: int = 0,
    target_mag: float = 15.0,
    amplitude: float = 0.3,
    period: float = 0.37,
    epoch: float = 61000.0,
    n_bright: int | None = None,
    min_sep_arcsec: float = 6.0,
    box_arcmin: float | None = None,
    target_gr: float = 0.5,
    fade_rate: float = 0.0,
) -> Field:
    """Make a field of stars around a target with realistic magnitudes and colours.

    Stars are uniform in a disc of radius ``radius_arcmin`` on the tangent plane around the target (or in a
    square of side ``box_arcmin``, aligned with RA/Dec, when that is given). The r
    magnitudes of ``nstars - n_bright`` stars follow a power law ``dN/dm ~ 10**(0.3 m)`` between 11 and
    20 (many faint, few bright); ``n_bright`` stars have r between 9 and 10.3 and saturate a 60-120 s
    1 m frame at the default zero point. Colours follow a main-sequence locus with ``g - r`` between
    0.15 and 1.4; the other bands (u i z and Johnson-Cousins B V R I) follow from it.

    Parameters
    ----------
    name : str
        Target name.
    ra, dec : float
        Target position, degrees.
    nstars : int
        Number of field stars, *not* counting the target; the field holds ``nstars + 1`` stars.
    radius_arcmin : float
        Radius of the disc filled with stars, arcminutes.
    seed : int
        Seed for ``numpy.random.default_rng``; the same seed gives the same field.
    target_mag : float
        Mean r magnitude of the target.
    amplitude, period, epoch : float
        Target light curve: semi-amplitude (mag), period (days) and epoch (MJD).
    n_bright : int, optional
        Number of saturating stars; default ``max(2, nstars // 100)``.
    min_sep_arcsec : float
        No star lies closer than this to the target, and no star brighter than r = 12 closer than 5 times
        this, so the target is isolated.
    box_arcmin : float, optional
        Fill a square of this side instead of the disc (e.g. ``4096 * 0.389 / 60`` for a whole Sinistro
        frame).
    target_gr : float
        The target's g - r colour (1.4 for a red target); its other bands follow the same locus.
    fade_rate : float
        See :attr:`Field.fade_rate`.

    Returns
    -------
    Field
    """
    rng = np.random.default_rng(seed)
    nstars = int(nstars)
    if n_bright is None:
        n_bright = max(2, nstars // 100)
    n_bright = min(n_bright, nstars)
    radius = math.radians(radius_arcmin / 60.0)
    min_sep = math.radians(min_sep_arcsec / 3600.0)

    # r magnitudes: inverse CDF of dN/dm ~ 10**(0.3 m) on [11, 20], plus a few saturating stars.
    k = 0.3 * math.log(10.0)
    lo, hi = 11.0, 20.0
    u = rng.random(nstars - n_bright)
    r_faint = np.log(np.exp(k * lo) + u * (np.exp(k * hi) - np.exp(k * lo))) / k
    r_bright = rng.uniform(9.0, 10.3, n_bright)
    r = np.concatenate([r_bright, r_faint])
    r = r[rng.permutation(nstars)]

    # positions, uniform in the disc (or box), away from the target
    exclusion = np.where(r < 12.0, 5.0 * min_sep, min_sep)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        if box_arcmin is not None:
            half = math.radians(box_arcmin / 120.0)
            return rng.uniform(-half, half, n), rng.uniform(-half, half, n)
        rad = radius * np.sqrt(rng.random(n))
        theta = rng.uniform(0.0, 2.0 * np.pi, n)
        return rad * np.sin(theta), rad * np.cos(theta)

    sx, sy = draw(nstars)
    for _ in range(1000):
        close = np.flatnonzero(np.hypot(sx, sy) < exclusion)
        if len(close) == 0:
            break
        sx[close], sy[close] = draw(len(close))
    else:
        raise ValueError("field too small to keep stars away from the target")
    xi = np.concatenate([[0.0], sx])
    eta = np.concatenate([[0.0], sy])
    star_ra, star_dec = _tangent_to_sky(ra, dec, xi, eta)
    star_ra[0], star_dec[0] = float(ra) % 360.0, float(dec)

    gr = np.clip(rng.normal(0.65, 0.28, nstars + 1), 0.15, 1.4)
    gr[0] = target_gr
    r_all = np.concatenate([[float(target_mag)], r])
    offsets = _colours_from_gr(gr, rng)
    mags = {band: r_all + offsets[band] for band in ALL_BANDS}
    return Field(
        name=name,
        ra=float(ra),
        dec=float(dec),
        star_ra=star_ra,
        star_dec=star_dec,
        mags=mags,
        amplitude=float(amplitude),
        period=float(period),
        epoch=float(epoch),
        fade_rate=float(fade_rate),
    )


def make_supernova_field(
    name: str,
    ra: float,
    dec: float,
    *,
    seed: int = 0,
    nstars: int = 400,
    box_arcmin: float = 3.5,
    peak_mag_r: float = 17.0,
    peak_mjd: float = 61010.0,
    rise_days: float = 15.0,
    fade_rate: float = 0.05,
    sn_gr: float = 0.0,
    host_mag_r: float = 16.5,
    host_gr: float = 0.7,
    host_scale_arcsec: float = 1.2,
    host_ellipticity: float = 0.3,
    host_theta_deg: float = 40.0,
    host_offset_arcsec: float = 1.5,
    host_offset_pa_deg: float = 60.0,
    min_sep_arcsec: float = 10.0,
) -> Field:
    """A supernova on its host galaxy in a field of stars sized for 512 x 512 frames.

    The stars are those of :func:`make_field` in a square of side ``box_arcmin`` (3.5': about 350 of the
    default 400 stars fall on a 512 x 512 Sinistro frame, 0.389"/pix, and about 170 on a 2 m MuSCAT3 one,
    0.27"/pix); the target (index 0) follows a :class:`Transient` peaking at ``peak_mag_r``; an exponential
    :class:`Host` lies under it.

    Parameters
    ----------
    name : str
        Target name.
    ra, dec : float
        Position of the supernova, degrees.
    seed : int
        Seed of the stars and colours.
    nstars, box_arcmin, min_sep_arcsec
        Number of field stars, side of their square (arcmin), and their least distance from the target
        (arcsec; 5 times it for stars brighter than r = 12), see :func:`make_field`.
    peak_mag_r : float
        r magnitude at the peak; the other bands follow the stellar locus at ``g - r = sn_gr``.
    peak_mjd, rise_days, fade_rate : float
        The light curve, see :class:`Transient` (MJD, days, mag per day).
    sn_gr : float
        g - r of the supernova (about 0 near the peak of a type Ia).
    host_mag_r : float
        Total r magnitude of the host; its other bands follow the locus at ``g - r = host_gr`` (0.7: a
        typical galaxy's colour).
    host_scale_arcsec, host_ellipticity, host_theta_deg
        Exponential scale length (arcsec), ``1 - b/a`` and major-axis position angle (degrees east of
        north) of the host.
    host_offset_arcsec, host_offset_pa_deg : float
        Distance of the nucleus from the supernova (arcsec) and its position angle (degrees from north
        through east, seen from the supernova).

    Returns
    -------
    Field
        With :attr:`Field.host` and :attr:`Field.transient` set.
    """
    field_ = make_field(
        name,
        ra,
        dec,
        nstars=nstars,
        box_arcmin=box_arcmin,
        seed=seed,
        target_mag=peak_mag_r,
        target_gr=sn_gr,
        min_sep_arcsec=min_sep_arcsec,
    )
    # The host's colours: the same locus as the stars', drawn apart so that the stars stay make_field's.
    offsets = _colours_from_gr(np.array([float(host_gr)]), np.random.default_rng([seed, 11]))
    pa = math.radians(host_offset_pa_deg)
    host = Host(
        mags={band: float(host_mag_r + offsets[band][0]) for band in ALL_BANDS},
        scale_arcsec=float(host_scale_arcsec),
        ellipticity=float(host_ellipticity),
        theta_deg=float(host_theta_deg),
        offset_arcsec=(host_offset_arcsec * math.sin(pa), host_offset_arcsec * math.cos(pa)),
    )
    transient = Transient(peak_mjd=float(peak_mjd), rise_days=float(rise_days), fade_rate=float(fade_rate))
    return replace(field_, host=host, transient=transient)


def write_refcat(
    field: Field,
    path: str | Path,
    *,
    bands: tuple[str, ...] = ("g", "r", "i", "z", "B", "V"),
    mag_err: float = 0.01,
    seed: int = 0,
    faint_limit: float = 19.0,
) -> None:
    """Write a reference catalog of the field's stars (without the target).

    Parameters
    ----------
    field : Field
        The field.
    path : str or Path
        Output file; ECSV when it ends in ``.ecsv``, CSV otherwise. Overwritten if present.
    bands : tuple of str
        Bands to write; each gives columns ``<band>`` and ``<band>_err``.
    mag_err : float
        Catalog error, magnitudes: every magnitude gets gaussian noise of this standard deviation and
        ``<band>_err`` is this value.
    seed : int
        Seed of the catalog noise.
    faint_limit : float
        Only stars whose true r magnitude is brighter than this are written.

    Notes
    -----
    Columns: ``ra``, ``dec`` (degrees), then ``<band>``, ``<band>_err`` per band. Saturating stars are
    included, as they are in real catalogs.
    """
    rng = np.random.default_rng(seed)
    keep = np.flatnonzero(field.mags["r"] < faint_limit)
    keep = keep[keep != 0]
    table = Table()
    table["ra"] = field.star_ra[keep]
    table["dec"] = field.star_dec[keep]
    table["ra"].format = ".8f"
    table["dec"].format = ".8f"
    for band in bands:
        noisy = field.mags[band][keep] + rng.normal(0.0, mag_err, len(keep))
        table[band] = noisy
        table[f"{band}_err"] = np.full(len(keep), float(mag_err))
        table[band].format = ".5f"
        table[f"{band}_err"].format = ".5f"
    path = Path(path)
    fmt = "ascii.ecsv" if path.name.lower().endswith(".ecsv") else "ascii.csv"
    table.write(path, format=fmt, overwrite=True)


# --------------------------------------------------------------------------------------------------------
# Observing conditions and truth
# --------------------------------------------------------------------------------------------------------


@dataclass
class FrameSpec:
    """Observing conditions for one simulated frame.

    Attributes
    ----------
    filter : str
        LCO filter name (a key of :data:`BAND_OF_FILTER`).
    mjd_start : float
        MJD (UTC) at the start of the exposure; written as DATE-OBS / MJD-OBS after rounding to the
        millisecond.
    exptime : float
        Exposure time, seconds.
    shape : tuple of int
        Image shape ``(ny, nx)``, pixels.
    pixscale : float
        Pixel scale, arcsec per pixel.
    fwhm_arcsec : float
        PSF FWHM, arcsec (geometric mean of major and minor axis when elliptical).
    moffat_beta : float
        Moffat beta.
    ellipticity : float
        ``1 - b/a`` of the PSF (trailed stars: 0.8).
    psf_angle_deg : float
        Angle of the PSF major axis, degrees counter-clockwise from the +x pixel axis.
    sky : float
        Sky level, electrons per pixel (total in the exposure).
    sky_gradient : float
        Fractional change of the sky level across the frame width along +x (e.g. 0.03 for 3 %); the
        frame centre keeps ``sky``.
    read_noise : float
        Read noise, electrons.
    zeropoint : float
        Magnitude giving 1 e-/s.
    color_term : float
        Star fluxes use ``mag + color_term * colour`` (colour from :data:`COLOUR_OF_BAND`).
    transparency : float
        Multiplies all star fluxes (clouds: 0.2); the sky is unaffected.
    offset_pix : tuple of float
        Pointing offset ``(dx, dy)`` of the target from the frame centre, pixels.
    rotation_deg : float
        Position angle of the detector's +y axis on the sky, degrees from north through east (0: north up,
        east left).
    saturate : float
        Saturation level, electrons; pixels at or above it are clipped to it and flagged BPM bit 2.
    bad_columns : tuple of int
        0-based columns filled with junk and flagged BPM bit 1.
    n_cosmics : int
        Number of cosmic-ray hits (1-4 sharp pixels of thousands of e-), not flagged in the BPM.
    wcs_error : bool
        True: the header WCS is only the pointing, off by 4-8 arcmin and rotated 2-5 degrees, WCSERR=4;
        False: the header WCS is solved, WCSERR=0 (exact unless ``wcs_jitter_arcsec``).
    wcs_jitter_arcsec : float
        When > 0 (and not ``wcs_error``), the solved header WCS is off like a real BANZAI solution: its
        reference point is shifted in a random direction and it is slightly rotated and scaled, drawn per
        frame so that its largest position error over the frame (see :func:`header_wcs_error_arcsec`) is
        between 0.5 and 1 times this, arcsec. The stars stay at their true positions.
    distortion_pix : float
        Radial optical distortion of the camera: stars sit ``distortion_pix * (r / r_corner)**3`` pixels
        further from the frame centre than the (linear, TAN without SIP) WCS puts them, r being the distance
        from the frame centre and r_corner the half diagonal.
    with_bpm, with_err : bool
        Write the BPM / ERR extensions.
    site, telescope, instrument : str
        SITEID, TELESCOP, INSTRUME.
    frame_number : int
        Running frame number (file name and FRAMENUM).
    airmass : float
        AIRMASS keyword (the zero point already includes extinction).
    object_name : str, optional
        OBJECT keyword; defaults to the field's name.
    reqnum, blkuid : int
        REQNUM and BLKUID keywords.
    exact_poisson : bool
        False (default, fast): pixels whose expected count is at least 100 e- get gaussian noise of the
        exact Poisson variance; True: Poisson noise drawn for every pixel (about 1 s slower per 4k frame).
    seed : int
        Seed for all random draws of the frame.
    """

    filter: str = "rp"
    mjd_start: float = 61000.2
    exptime: float = 60.0
    shape: tuple[int, int] = (1024, 1024)
    pixscale: float = 0.389
    fwhm_arcsec: float = 2.0
    moffat_beta: float = 3.0
    ellipticity: float = 0.0
    psf_angle_deg: float = 0.0
    sky: float = 300.0
    sky_gradient: float = 0.0
    read_noise: float = 7.0
    zeropoint: float = 23.5
    color_term: float = 0.0
    transparency: float = 1.0
    offset_pix: tuple[float, float] = (0.0, 0.0)
    rotation_deg: float = 0.0
    saturate: float = 120000.0
    bad_columns: tuple[int, ...] = ()
    n_cosmics: int = 0
    wcs_error: bool = False
    wcs_jitter_arcsec: float = 0.0
    distortion_pix: float = 0.0
    with_bpm: bool = True
    with_err: bool = True
    site: str = "cpt"
    telescope: str = "1m0-12"
    instrument: str = "fa06"
    frame_number: int = 1
    airmass: float = 1.2
    object_name: str | None = None
    reqnum: int = 1234567
    blkuid: int = 456789012
    exact_poisson: bool = False
    seed: int = 0

    @property
    def band(self) -> str:
        """Standard band of :attr:`filter`."""
        try:
            return BAND_OF_FILTER[self.filter]
        except KeyError:
            raise ValueError(
                f"filter {self.filter!r} has no standard band; use one of {sorted(BAND_OF_FILTER)}"
            ) from None

    @property
    def fwhm_pix(self) -> float:
        """PSF FWHM in pixels."""
        return self.fwhm_arcsec / self.pixscale


@dataclass
class FrameTruth:
    """What was put into one simulated frame.

    Attributes
    ----------
    x, y : numpy.ndarray
        0-based pixel positions of every field star (index 0 = target), astropy ``world_to_pixel``
        convention; may fall off the frame.
    flux : numpy.ndarray
        Total electrons per star in the exposure before noise (including transparency and colour term);
        equal to the star's summed contribution to the image unless the frame edge cuts its stamp.
    mag : numpy.ndarray
        Standard magnitudes in this band at mid-exposure (target at its current brightness).
    fwhm_pix : float
        PSF FWHM, pixels.
    mjd_mid : float
        MJD (UTC) of mid-exposure, from the DATE-OBS written to the header.
    band : str
        Standard band.
    peak : numpy.ndarray
        Noise-free peak pixel of each star above the sky, electrons.
    saturated : numpy.ndarray
        Boolean per star: its noise-free peak plus sky reaches the saturation level.
    sky : float
        Sky level at the frame centre, electrons per pixel.
    cosmic_x, cosmic_y : numpy.ndarray
        0-based pixel positions of the cosmic-ray hits (first pixel of each hit).
    wcs : astropy.wcs.WCS, optional
        The true linear WCS used to place the stars before any ``distortion_pix`` (the header WCS too unless
        ``wcs_error`` or ``wcs_jitter_arcsec``).
    host_x, host_y : float
        0-based pixel position of the host galaxy's nucleus (through the true WCS and the distortion); NaN
        without a host.
    host_flux : float
        The host's total electrons in the exposure before noise (transparency and colour term included, as
        for a star); 0 without a host. The host is in none of the per-star arrays.
    host_peak : float
        Noise-free peak pixel of the host alone above the sky, electrons.
    """

    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray
    mag: np.ndarray
    fwhm_pix: float
    mjd_mid: float
    band: str
    peak: np.ndarray = field(default_factory=lambda: np.zeros(0))
    saturated: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    sky: float = 0.0
    cosmic_x: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    cosmic_y: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    wcs: WCS | None = None
    host_x: float = math.nan
    host_y: float = math.nan
    host_flux: float = 0.0
    host_peak: float = 0.0

    @property
    def target_flux(self) -> float:
        """The target's total electrons in the exposure before noise (0 before a transient's explosion)."""
        return float(self.flux[0])

    def on_frame(self, shape: tuple[int, int], margin: float = 0.0) -> np.ndarray:
        """Boolean mask of stars whose centre lies at least ``margin`` pixels inside a frame of ``shape``."""
        ny, nx = shape
        return (
            (self.x >= margin - 0.5)
            & (self.x <= nx - 0.5 - margin)
            & (self.y >= margin - 0.5)
            & (self.y <= ny - 0.5 - margin)
        )


# --------------------------------------------------------------------------------------------------------
# Time and WCS helpers
# --------------------------------------------------------------------------------------------------------


def _site(site: str) -> tuple[float, float, float]:
    try:
        return SITES[site]
    except KeyError:
        raise ValueError(f"unknown site {site!r}; use one of {sorted(SITES)}") from None


def _obs_times(mjd_start: float) -> tuple[datetime, str, float]:
    """DATE-OBS datetime, its ISO string (milliseconds) and the MJD of that rounded string."""
    micro = round(mjd_start * 86400.0 * 1000.0) * 1000  # round to the millisecond
    start = _MJD_EPOCH + timedelta(microseconds=micro)
    iso = start.isoformat(timespec="milliseconds")
    mjd = (start - _MJD_EPOCH) / timedelta(days=1)
    return start, iso, mjd


def _sexagesimal(value: float, *, hours: bool) -> str:
    """'HH:MM:SS.sss' for RA (degrees in, hours out) or '+DD:MM:SS.ss' for Dec."""
    if hours:
        total = round((value % 360.0) / 15.0 * 3600.0 * 1000.0) % (24 * 3600 * 1000)
        h, rem = divmod(total, 3600 * 1000)
        m, rem = divmod(rem, 60 * 1000)
        return f"{h:02d}:{m:02d}:{rem / 1000.0:06.3f}"
    sign = "-" if value < 0 else "+"
    total = round(abs(value) * 3600.0 * 100.0)
    d, rem = divmod(total, 3600 * 100)
    m, rem = divmod(rem, 60 * 100)
    return f"{sign}{d:02d}:{m:02d}:{rem / 100.0:05.2f}"


def _wcs_cards(
    crval: tuple[float, float], crpix1: float, crpix2: float, pixscale: float, rotation_deg: float
) -> list[tuple[str, object, str]]:
    """Header cards of a TAN WCS: east left / north up, rotated so +y points at PA ``rotation_deg``."""
    s = pixscale / 3600.0
    c, sn = math.cos(math.radians(rotation_deg)), math.sin(math.radians(rotation_deg))
    return [
        ("CTYPE1", "RA---TAN", "Type of WCS Projection"),
        ("CTYPE2", "DEC--TAN", "Type of WCS Projection"),
        ("CRPIX1", float(crpix1), "[pixel] Coordinate of reference point (axis 1)"),
        ("CRPIX2", float(crpix2), "[pixel] Coordinate of reference point (axis 2)"),
        ("CRVAL1", float(crval[0] % 360.0), "[deg] RA at the reference pixel"),
        ("CRVAL2", float(crval[1]), "[deg] Dec at the reference pixel"),
        ("CUNIT1", "deg", "Units of RA"),
        ("CUNIT2", "deg", "Units of Dec"),
        ("CD1_1", -s * c, "WCS CD transformation matrix"),
        ("CD1_2", s * sn, "WCS CD transformation matrix"),
        ("CD2_1", s * sn, "WCS CD transformation matrix"),
        ("CD2_2", s * c, "WCS CD transformation matrix"),
        ("RADESYS", "ICRS", "Fundamental coord. system of the object"),
    ]


def _fit_comment(key: str, value: object, comment: str) -> str:
    """Shorten a comment so that the card fits in 80 characters (astropy warns otherwise)."""
    used = len(fits.Card(key, value).image.rstrip())
    return comment[: max(0, 80 - used - 3)]


def _wcs_from_cards(cards: list[tuple[str, object, str]], shape: tuple[int, int]) -> WCS:
    header = fits.Header()
    header["NAXIS"] = 2
    header["NAXIS1"] = shape[1]
    header["NAXIS2"] = shape[0]
    for key, value, comment in cards:
        header[key] = (value, _fit_comment(key, value, comment))
    return WCS(header)


def _true_wcs_cards(field_: Field, spec: FrameSpec) -> list[tuple[str, object, str]]:
    """The exact WCS: reference pixel at the frame centre, target at centre + offset_pix."""
    ny, nx = spec.shape
    cx, cy = (nx - 1) / 2.0, (ny - 1) / 2.0
    dx, dy = spec.offset_pix
    # First a WCS with the target at its pixel, then re-centred on the frame centre as BANZAI writes it.
    first = _wcs_from_cards(
        _wcs_cards((field_.ra, field_.dec), cx + dx + 1.0, cy + dy + 1.0, spec.pixscale, spec.rotation_deg),
        spec.shape,
    )
    ra_c, dec_c = first.wcs_pix2world([[cx, cy]], 0)[0]
    return _wcs_cards((float(ra_c), float(dec_c)), cx + 1.0, cy + 1.0, spec.pixscale, spec.rotation_deg)


_Cards = list[tuple[str, object, str]]


def _wrong_wcs_cards(true_cards: _Cards, spec: FrameSpec) -> _Cards:
    """A pointing-only WCS: reference 4-8 arcmin away from the truth and rotated 2-5 degrees."""
    rng = np.random.default_rng([spec.seed, 7919])
    values = {key: value for key, value, _ in true_cards}
    ra0, dec0 = float(values["CRVAL1"]), float(values["CRVAL2"])  # type: ignore[arg-type]
    dist = math.radians(rng.uniform(4.0, 8.0) / 60.0)
    pa = rng.uniform(0.0, 2.0 * np.pi)
    ra1, dec1 = _tangent_to_sky(ra0, dec0, np.array([dist * math.sin(pa)]), np.array([dist * math.cos(pa)]))
    drot = rng.uniform(2.0, 5.0) * rng.choice([-1.0, 1.0])
    return _wcs_cards(
        (float(ra1[0]), float(dec1[0])),
        float(values["CRPIX1"]),  # type: ignore[arg-type]
        float(values["CRPIX2"]),  # type: ignore[arg-type]
        spec.pixscale,
        spec.rotation_deg + drot,
    )


def _sky_offset_arcsec(wcs_a: WCS, wcs_b: WCS, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Angles between the sky positions that two WCS give to the same 0-based pixels, arcsec."""

    def unit_vectors(wcs: WCS) -> np.ndarray:
        ra, dec = np.radians(wcs.wcs_pix2world(x, y, 0))
        return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)])

    a, b = unit_vectors(wcs_a), unit_vectors(wcs_b)
    # atan2(|a x b|, a . b) keeps its precision for the sub-arcsecond angles that matter here.
    angle = np.arctan2(np.linalg.norm(np.cross(a, b, axis=0), axis=0), np.sum(a * b, axis=0))
    return np.degrees(angle) * 3600.0


def _jittered_wcs_cards(true_cards: _Cards, spec: FrameSpec) -> _Cards:
    """A solved-looking WCS off like BANZAI's: reference point shifted, slightly rotated and scaled, so that
    its worst position error over the frame is 0.5-1 x ``wcs_jitter_arcsec``."""
    rng = np.random.default_rng([spec.seed, 104729])
    values = {
        key: float(value)  # type: ignore[arg-type]
        for key, value, _ in true_cards
        if key.startswith(("CRVAL", "CRPIX"))
    }
    worst = spec.wcs_jitter_arcsec * rng.uniform(0.5, 1.0)
    # Shape of the error: a shift at position angle pa, and a rotation and scale error whose quadrature sum
    # (at the corner) is split by phi; the shift takes `share` of the corner error before rescaling.
    share = rng.uniform(0.3, 0.7)
    pa, phi = rng.uniform(0.0, 2.0 * np.pi, 2)
    ny, nx = spec.shape
    twist = (1.0 - share) * worst / (0.5 * math.hypot(nx - 1.0, ny - 1.0) * spec.pixscale)

    def cards(k: float) -> _Cards:
        shift = math.radians(k * share * worst / 3600.0)
        ra1, dec1 = _tangent_to_sky(
            values["CRVAL1"], values["CRVAL2"], np.array([shift * math.sin(pa)]), np.array([shift * math.cos(pa)])
        )
        return _wcs_cards(
            (float(ra1[0]), float(dec1[0])),
            values["CRPIX1"],
            values["CRPIX2"],
            spec.pixscale * (1.0 + k * twist * math.sin(phi)),
            spec.rotation_deg + math.degrees(k * twist * math.cos(phi)),
        )

    # The error is (very nearly) affine in the pixel position, so largest at a corner, and linear in the
    # parameters: rescaling a trial once puts the worst corner off by `worst` to ~1e-5 of it.
    corners = (np.array([0.0, nx - 1.0, 0.0, nx - 1.0]), np.array([0.0, 0.0, ny - 1.0, ny - 1.0]))
    trial = _sky_offset_arcsec(
        _wcs_from_cards(cards(1.0), spec.shape), _wcs_from_cards(true_cards, spec.shape), *corners
    ).max()
    return cards(worst / trial)


def _distort(x: np.ndarray, y: np.ndarray, spec: FrameSpec) -> tuple[np.ndarray, np.ndarray]:
    """Move positions radially by ``distortion_pix * (r / r_corner)**3`` from the frame centre."""
    if not spec.distortion_pix:
        return x, y
    ny, nx = spec.shape
    cx, cy = (nx - 1) / 2.0, (ny - 1) / 2.0
    r_corner = math.hypot(cx, cy)
    stretch = 1.0 + spec.distortion_pix * np.hypot(x - cx, y - cy) ** 2 / r_corner**3
    return cx + (x - cx) * stretch, cy + (y - cy) * stretch


# --------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------


class _MoffatRenderer:
    """Pixel-integrated Moffat stamps, identical in shape for every star of one frame.

    Each stamp covers the bounding box of the PSF isophote of radius ``stamp_fwhm`` FWHM (the light outside
    it is below 0.1 % for beta = 3). Pixels in the central box (``core_fwhm`` FWHM) are integrated with an
    n x n Gauss-Legendre rule per pixel; the wings use the pixel-centre value. Every stamp is then scaled
    so that its sum is exactly the star's flux.
    """

    def __init__(
        self,
        fwhm_pix: float,
        beta: float,
        ellipticity: float,
        angle_deg: float,
        stamp_fwhm: float = 6.0,
        core_fwhm: float = 2.5,
    ) -> None:
        if not 0.0 <= ellipticity < 1.0:
            raise ValueError(f"ellipticity must be in [0, 1), got {ellipticity}")
        if beta <= 1.0:
            raise ValueError(f"moffat_beta must be > 1, got {beta}")
        alpha = fwhm_pix / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
        q = 1.0 - ellipticity
        alpha_a, alpha_b = alpha / math.sqrt(q), alpha * math.sqrt(q)
        th = math.radians(angle_deg)
        c, s = math.cos(th), math.sin(th)
        self.a = c * c / alpha_a**2 + s * s / alpha_b**2
        self.b = c * s * (1.0 / alpha_a**2 - 1.0 / alpha_b**2)
        self.c = s * s / alpha_a**2 + c * c / alpha_b**2
        self.round = ellipticity == 0.0
        self.beta = beta

        def half_box(k: float) -> tuple[int, int]:
            # bounding box of the ellipse u = (k * fwhm / alpha)**2
            root = k * fwhm_pix / alpha
            hx = root * math.sqrt(alpha_a**2 * c * c + alpha_b**2 * s * s)
            hy = root * math.sqrt(alpha_a**2 * s * s + alpha_b**2 * c * c)
            return max(2, math.ceil(hx)), max(2, math.ceil(hy))

        self.hx, self.hy = half_box(stamp_fwhm)
        cx, cy = half_box(core_fwhm)
        self.cx, self.cy = min(cx, self.hx), min(cy, self.hy)
        minor = fwhm_pix * math.sqrt(q)
        n = 3 if minor >= 3.0 else 4 if minor >= 2.0 else 6 if minor >= 1.2 else 10
        nodes, weights = np.polynomial.legendre.leggauss(n)
        self.nodes = (0.5 * nodes).astype(np.float64)
        w = (0.5 * weights).astype(np.float32)
        self.n = n
        # Block matrices summing the n sub-pixel samples of each core pixel with their weights.
        ncx, ncy = 2 * self.cx + 1, 2 * self.cy + 1
        self.wx = np.kron(np.eye(ncx, dtype=np.float32), w[:, None])  # (ncx*n, ncx)
        self.wy = np.kron(np.eye(ncy, dtype=np.float32), w[None, :])  # (ncy, ncy*n)
        self.offx = np.arange(-self.hx, self.hx + 1, dtype=np.float64)
        self.offy = np.arange(-self.hy, self.hy + 1, dtype=np.float64)

    def _profile(self, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
        """Unnormalised Moffat on the outer product grid of dx (nb, nx) and dy (nb, ny) -> (nb, ny, nx)."""
        if self.round:
            u = self.a * (dy * dy)[:, :, None] + self.a * (dx * dx)[:, None, :]
        else:
            u = (
                self.c * (dy * dy)[:, :, None]
                + self.a * (dx * dx)[:, None, :]
                + 2.0 * self.b * dy[:, :, None] * dx[:, None, :]
            )
        u = u.astype(np.float32)
        u += np.float32(1.0)
        return np.power(u, np.float32(-self.beta))

    def stamps(self, fx: np.ndarray, fy: np.ndarray) -> np.ndarray:
        """Unit-sum stamps (nb, 2hy+1, 2hx+1) for stars at fractional offsets fx, fy from their pixel."""
        dx = self.offx[None, :] - fx[:, None]
        dy = self.offy[None, :] - fy[:, None]
        out = self._profile(dx, dy)
        # core: n x n sub-pixel samples per pixel
        sx = slice(self.hx - self.cx, self.hx + self.cx + 1)
        sy = slice(self.hy - self.cy, self.hy + self.cy + 1)
        dxs = (dx[:, sx, None] + self.nodes[None, None, :]).reshape(len(fx), -1)
        dys = (dy[:, sy, None] + self.nodes[None, None, :]).reshape(len(fy), -1)
        fine = self._profile(dxs, dys)
        out[:, sy, sx] = self.wy[None] @ fine @ self.wx[None]
        out /= out.sum(axis=(1, 2), dtype=np.float64)[:, None, None].astype(np.float32)
        return out


def _electrons(mags: np.ndarray, first: np.ndarray, second: np.ndarray, spec: FrameSpec) -> np.ndarray:
    """Total electrons in the exposure of sources of standard magnitudes ``mags`` whose colour bands hold
    ``first`` and ``second``; exactly 0 where a magnitude is +inf (a transient before its explosion)."""
    mags, first, second = (np.asarray(a, dtype=float) for a in (mags, first, second))
    flux = np.zeros(mags.shape)
    # The colour of a source without light is inf - inf: only lit sources are computed, without warnings.
    lit = np.isfinite(mags) & np.isfinite(first) & np.isfinite(second)
    eff = mags[lit] + spec.color_term * (first[lit] - second[lit])
    flux[lit] = spec.transparency * spec.exptime * 10.0 ** (-0.4 * (eff - spec.zeropoint))
    return flux


def _star_fluxes(field_: Field, spec: FrameSpec, mjd_mid: float) -> tuple[np.ndarray, np.ndarray]:
    band = spec.band
    mags = field_.star_mags(band, mjd_mid)
    first, second = COLOUR_OF_BAND[band]
    flux = _electrons(mags, field_.star_mags(first, mjd_mid), field_.star_mags(second, mjd_mid), spec)
    return mags, flux


def _host_geometry(field_: Field, host: Host, wcs_true: WCS, spec: FrameSpec) -> tuple[float, float, float, float]:
    """Nucleus position (0-based pixels, through the true WCS and the distortion), scale length (pixels) and
    major-axis angle (radians from +x towards +y) of the host on this frame."""
    xi, eta = (math.radians(v / 3600.0) for v in host.offset_arcsec)
    step = math.radians(host.scale_arcsec / 3600.0)
    pa = math.radians(host.theta_deg)
    # The nucleus and a point one scale length along the major axis, mapped like stars: the local scale,
    # rotation and parity of the frame follow, so every frame and telescope sees the same galaxy on the sky.
    ra, dec = _tangent_to_sky(
        field_.ra, field_.dec, np.array([xi, xi + step * math.sin(pa)]), np.array([eta, eta + step * math.cos(pa)])
    )
    px, py = wcs_true.wcs_world2pix(ra, dec, 0)
    px, py = _distort(np.asarray(px, dtype=float), np.asarray(py, dtype=float), spec)
    dx, dy = float(px[1] - px[0]), float(py[1] - py[0])
    return float(px[0]), float(py[0]), math.hypot(dx, dy), math.atan2(dy, dx)


def _render_host(model: np.ndarray, field_: Field, wcs_true: WCS, spec: FrameSpec) -> tuple[float, float, float, float]:
    """Add the field's host galaxy, seen through the frame's PSF, to ``model`` (electrons, in place).

    Returns the nucleus ``x, y`` (0-based pixels), the host's total electrons and its noise-free peak pixel
    (electrons above the sky); NaN, NaN, 0, 0 without a host.
    """
    host = field_.host
    if host is None:
        return math.nan, math.nan, 0.0, 0.0
    band = spec.band
    first, second = COLOUR_OF_BAND[band]
    mags = np.array([[host.mags[band]], [host.mags[first]], [host.mags[second]]])
    flux = float(_electrons(mags[0], mags[1], mags[2], spec)[0])
    x, y, scale, theta = _host_geometry(field_, host, wcs_true, spec)
    renderer = _MoffatRenderer(spec.fwhm_pix, spec.moffat_beta, spec.ellipticity, spec.psf_angle_deg)
    # Point-sampled PSF kernel: the galaxy image is already integrated over pixels, so sampling the PSF at
    # pixel centres gives (galaxy * pixel * PSF) at pixel centres, as the stars are drawn.
    kernel = renderer._profile(renderer.offx[None, :], renderer.offy[None, :])[0].astype(np.float64)
    kernel /= kernel.sum()
    # The stamp holds 12 scale lengths (all but 1e-4 of the disk) plus the PSF's wings.
    half = math.ceil(12.0 * scale) + max(renderer.hx, renderer.hy)
    ix, iy = math.floor(x + 0.5), math.floor(y + 0.5)
    size = 2 * half + 1
    disk = render_galaxy(
        (size, size), x - (ix - half), y - (iy - half), 1.0, scale, ellipticity=host.ellipticity, theta=theta
    )
    stamp = np.maximum(fftconvolve(disk, kernel, mode="same"), 0.0)
    stamp *= flux / stamp.sum()  # like a star's stamp: exactly the host's flux
    ny, nx = model.shape
    x0, y0 = ix - half, iy - half
    xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + size, nx), min(y0 + size, ny)
    if xa < xb and ya < yb:
        model[ya:yb, xa:xb] += stamp[ya - y0 : yb - y0, xa - x0 : xb - x0].astype(np.float32)
    return x, y, flux, float(stamp.max())


def _sci_header(
    field_: Field,
    spec: FrameSpec,
    wcs_cards: list[tuple[str, object, str]],
    iso: str,
    mjd_obs: float,
    pointing: tuple[float, float],
) -> fits.Header:
    lat, lon, height = _site(spec.site)
    end = _MJD_EPOCH + timedelta(days=mjd_obs) + timedelta(seconds=spec.exptime)
    h = fits.Header()
    cards: list[tuple[str, object, str]] = [
        ("ORIGIN", "LCOGT", "Organization responsible for the data"),
        ("SITEID", spec.site, "ID code of the Observatory site"),
        ("TELESCOP", spec.telescope, "The Name of the Telescope"),
        ("INSTRUME", spec.instrument, "Instrument used"),
        ("LATITUDE", lat, "[deg North] Telescope Latitude"),
        ("LONGITUD", lon, "[deg East] Telescope Longitude"),
        ("HEIGHT", height, "[m] Altitude of Telescope above sea level"),
        ("OBSTYPE", "EXPOSE", "Observation type"),
        ("FRAMENUM", int(spec.frame_number), "Running frame number"),
        ("TIMESYS", "UTC", "Time system used"),
        ("DATE-OBS", iso, "[UTC] Start date and time of the observation"),
        ("DAY-OBS", iso[:10].replace("-", ""), "[UTC] Date at start of local observing night"),
        ("UTSTART", iso[11:], "[UTC] The start time of the observation"),
        ("UTSTOP", end.isoformat(timespec="milliseconds")[11:], "[UTC] The finish time of the observation"),
        ("MJD-OBS", mjd_obs, "[UTC days] Start date/time (Modified Julian Date)"),
        ("EXPTIME", float(spec.exptime), "[s] Exposure length"),
        ("FILTER", spec.filter, "Filter used"),
        ("GAIN", 1.0, "[electrons/count] Pixel gain"),
        ("RDNOISE", float(spec.read_noise), "[electrons/pixel] Read noise"),
        ("SATURATE", float(spec.saturate), "[ADU] Saturation level used"),
        ("MAXLIN", float(spec.saturate), "[ADU] Non-linearity level"),
        ("CCDSUM", "1 1", "CCD on-chip summing/binning"),
        ("PIXSCALE", float(spec.pixscale), "[arcsec/pixel] Nominal pixel scale on sky"),
        ("REQNUM", f"{int(spec.reqnum):010d}", "Request DB request number"),
        ("BLKUID", str(int(spec.blkuid)), "Group unique ID"),
        ("RA", _sexagesimal(pointing[0], hours=True), "[HH:MM:SS.sss] RA where telescope is pointing"),
        ("DEC", _sexagesimal(pointing[1], hours=False), "[sDD:MM:SS.ss] Dec where telescope is pointing"),
        ("CAT-RA", _sexagesimal(field_.ra, hours=True), "[HH:MM:SS.sss] Catalog RA of the object"),
        ("CAT-DEC", _sexagesimal(field_.dec, hours=False), "[sDD:MM:SS.ss] Catalog Dec of the object"),
        ("OBJECT", spec.object_name if spec.object_name is not None else field_.name, "Object name"),
        ("AIRMASS", float(spec.airmass), "Effective mean airmass"),
        *wcs_cards,
        ("L1MEDIAN", float(spec.sky), "[counts] Median of frame background"),
        ("L1SIGMA", math.sqrt(max(spec.sky, 0.0) + spec.read_noise**2), "[counts] Robust std dev of frame background"),
        ("L1FWHM", float(spec.fwhm_arcsec), "[arcsec] Frame FWHM in arcsec"),
        ("L1ELLIP", float(spec.ellipticity), "Mean image ellipticity (1-B/A)"),
        ("L1ELLIPA", float(spec.psf_angle_deg), "[deg] PA of mean image ellipticity"),
        ("WCSERR", 4 if spec.wcs_error else 0, "Error status of WCS fit. 0 for no error"),
        ("RLEVEL", 91, "Reduction level"),
        ("PIPEVER", "1.0.0", "Pipeline version"),
    ]
    for key, value, comment in cards:
        h[key] = (value, _fit_comment(key, value, comment))
    return h


def _render_stars(
    x: np.ndarray, y: np.ndarray, flux: np.ndarray, spec: FrameSpec, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """The noise-free star image (electrons, float32) and each star's peak pixel (stars off the frame: from a
    centred stamp)."""
    ny, nx = shape
    model = np.zeros((ny, nx), dtype=np.float32)
    renderer = _MoffatRenderer(spec.fwhm_pix, spec.moffat_beta, spec.ellipticity, spec.psf_angle_deg)
    hx, hy = renderer.hx, renderer.hy
    ix = np.floor(x + 0.5).astype(np.int64)
    iy = np.floor(y + 0.5).astype(np.int64)
    visible = np.flatnonzero((ix + hx >= 0) & (ix - hx < nx) & (iy + hy >= 0) & (iy - hy < ny) & (flux > 0))
    peak = np.zeros(len(x))
    batch = 64
    for lo in range(0, len(visible), batch):
        idx = visible[lo : lo + batch]
        stamps = renderer.stamps(x[idx] - ix[idx], y[idx] - iy[idx])
        peak[idx] = stamps.max(axis=(1, 2)) * flux[idx]
        for k, i in enumerate(idx):
            x0, y0 = ix[i] - hx, iy[i] - hy
            xa, ya = max(x0, 0), max(y0, 0)
            xb, yb = min(x0 + 2 * hx + 1, nx), min(y0 + 2 * hy + 1, ny)
            model[ya:yb, xa:xb] += np.float32(flux[i]) * stamps[k, ya - y0 : yb - y0, xa - x0 : xb - x0]
    # stars off the frame: peak from a centred stamp
    hidden = np.setdiff1d(np.arange(len(x)), visible)
    if len(hidden):
        peak[hidden] = renderer.stamps(np.zeros(1), np.zeros(1)).max() * flux[hidden]
    return model, peak


def _add_noise(model: np.ndarray, spec: FrameSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The science image and its expected error: Poisson (gaussian of the same variance where the count is
    >= 100) plus read noise."""
    ny, nx = model.shape
    # Large arrays are reused in place: fresh 64 MB allocations cost more than the arithmetic.
    rn = np.float32(spec.read_noise)
    sci = rng.standard_normal((ny, nx), dtype=np.float32)  # becomes the science image
    err = np.add(model, rn * rn)  # expected variance, then its square root
    np.sqrt(err, out=err)
    if spec.exact_poisson:
        sci *= rn
        sci += rng.poisson(model)
    else:
        low = model < 100.0
        normal_low = sci[low] if low.any() else None
        np.multiply(sci, err, out=sci)
        sci += model
        if normal_low is not None:
            sci[low] = rng.poisson(model[low]) + rn * normal_low
    return sci, err


def _add_cosmic_rays(sci: np.ndarray, spec: FrameSpec, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """Add ``spec.n_cosmics`` hits of 1-4 pixels (after the noise, before saturation); their first pixels."""
    ny, nx = sci.shape
    cx_list: list[int] = []
    cy_list: list[int] = []
    steps = np.array([(1, 0), (0, 1), (1, 1), (1, -1)])
    for _ in range(int(spec.n_cosmics)):
        px, py = int(rng.integers(0, nx)), int(rng.integers(0, ny))
        cx_list.append(px)
        cy_list.append(py)
        length = int(rng.integers(1, 5))
        step = steps[rng.integers(0, len(steps))]
        for j in range(length):
            qx, qy = px + j * step[0], py + j * step[1]
            if 0 <= qx < nx and 0 <= qy < ny:
                sci[qy, qx] += np.float32(rng.uniform(1500.0, 8000.0))
    return cx_list, cy_list


def _saturate_and_spoil_columns(sci: np.ndarray, spec: FrameSpec, rng: np.random.Generator) -> np.ndarray:
    """Clip at SATURATE and fill the bad columns; the bad pixel mask of both."""
    ny, nx = (int(n) for n in sci.shape)
    bpm = np.zeros((ny, nx), dtype=np.uint8)
    sat = sci >= np.float32(spec.saturate)
    sci[sat] = np.float32(spec.saturate)
    bpm[sat] |= _BPM_SATURATED
    for col in spec.bad_columns:
        if 0 <= col < nx:
            sci[:, col] = rng.uniform(0.3, 0.6, ny).astype(np.float32) * np.float32(spec.saturate)
            bpm[:, col] |= _BPM_BAD
    return bpm


def render_frame(field: Field, spec: FrameSpec) -> tuple[fits.HDUList, FrameTruth]:
    """Render one frame of ``field`` under the conditions of ``spec``.

    Parameters
    ----------
    field : Field
        Sky truth.
    spec : FrameSpec
        Observing conditions.

    Returns
    -------
    hdul : astropy.io.fits.HDUList
        PRIMARY (empty), ``SCI`` (float32 electrons, sky not subtracted), and when enabled ``BPM`` (uint8:
        1 bad column, 2 saturated) and ``ERR`` (float32, sqrt of the expected variance in electrons:
        sky + stars + host + read noise squared).
    truth : FrameTruth
        Star positions (0-based pixels), fluxes (electrons), magnitudes and the rest.
    """
    ny, nx = (int(v) for v in spec.shape)
    band = spec.band
    rng = np.random.default_rng([spec.seed, 1])

    _, iso, mjd_obs = _obs_times(spec.mjd_start)
    mjd_mid = mjd_obs + spec.exptime / 2.0 / 86400.0

    true_cards = _true_wcs_cards(field, spec)
    wcs_true = _wcs_from_cards(true_cards, (ny, nx))
    header_cards = (
        _wrong_wcs_cards(true_cards, spec)
        if spec.wcs_error
        else _jittered_wcs_cards(true_cards, spec)
        if spec.wcs_jitter_arcsec > 0
        else true_cards
    )
    hvals = {k: v for k, v, _ in header_cards}
    pointing = (float(hvals["CRVAL1"]), float(hvals["CRVAL2"]))  # type: ignore[arg-type]

    x, y = wcs_true.wcs_world2pix(field.star_ra, field.star_dec, 0)
    x, y = _distort(np.asarray(x, dtype=float), np.asarray(y, dtype=float), spec)
    mags, flux = _star_fluxes(field, spec, mjd_mid)

    model, peak = _render_stars(x, y, flux, spec, (ny, nx))
    host_x, host_y, host_flux, host_peak = _render_host(model, field, wcs_true, spec)

    # ---- sky
    if spec.sky_gradient:
        ramp = (np.arange(nx, dtype=np.float32) - np.float32((nx - 1) / 2.0)) / np.float32(nx)
        sky_row = np.float32(spec.sky) * (np.float32(1.0) + np.float32(spec.sky_gradient) * ramp)
        model += sky_row[None, :]
    else:
        model += np.float32(spec.sky)
    np.maximum(model, 0.0, out=model)

    sci, err = _add_noise(model, spec, rng)

    cx_list, cy_list = _add_cosmic_rays(sci, spec, rng)
    bpm = _saturate_and_spoil_columns(sci, spec, rng)

    header = _sci_header(field, spec, header_cards, iso, mjd_obs, pointing)
    hdus: list[fits.PrimaryHDU | fits.ImageHDU] = [fits.PrimaryHDU(), fits.ImageHDU(sci, header, name="SCI")]
    if spec.with_bpm:
        hdus.append(fits.ImageHDU(bpm, name="BPM"))
    if spec.with_err:
        hdus.append(fits.ImageHDU(err, name="ERR"))
    truth = FrameTruth(
        x=x,
        y=y,
        flux=flux,
        mag=mags,
        fwhm_pix=spec.fwhm_pix,
        mjd_mid=mjd_mid,
        band=band,
        peak=peak,
        saturated=peak + spec.sky >= spec.saturate,
        sky=float(spec.sky),
        cosmic_x=np.asarray(cx_list, dtype=int),
        cosmic_y=np.asarray(cy_list, dtype=int),
        wcs=wcs_true,
        host_x=host_x,
        host_y=host_y,
        host_flux=host_flux,
        host_peak=host_peak,
    )
    return fits.HDUList(hdus), truth


def header_wcs_error_arcsec(header: fits.Header | fits.HDUList, truth: FrameTruth, *, grid: int = 9) -> float:
    """Largest sky offset between a frame's header WCS and its true WCS, arcsec.

    Parameters
    ----------
    header : astropy.io.fits.Header or astropy.io.fits.HDUList
        The SCI header, or the frame (its ``SCI`` extension is used).
    truth : FrameTruth
        The frame's truth; :attr:`FrameTruth.wcs` is the reference.
    grid : int
        The offset is evaluated at ``grid x grid`` pixel positions spanning the frame from corner pixel to
        corner pixel (the centre included when ``grid`` is odd).

    Returns
    -------
    float
        The largest angle between the sky positions that the two WCS give to the same pixel: 0 for an exact
        header, 0.5-1 x ``wcs_jitter_arcsec`` for a jittered one. ``distortion_pix`` is not included (both
        WCS are linear).
    """
    if isinstance(header, fits.HDUList):
        header = header["SCI"].header
    if truth.wcs is None or truth.wcs.pixel_shape is None:
        raise ValueError("the truth carries no WCS with a frame shape")
    nx, ny = truth.wcs.pixel_shape
    x, y = np.meshgrid(np.linspace(0.0, nx - 1.0, grid), np.linspace(0.0, ny - 1.0, grid))
    return float(_sky_offset_arcsec(WCS(header), truth.wcs, x.ravel(), y.ravel()).max())


# --------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------


def lco_filename(spec: FrameSpec, compress: str | None = "fz") -> str:
    """LCO-style file name for a frame, e.g. ``cpt1m012-fa06-20260113-0102-e91.fits.fz``.

    Parameters
    ----------
    spec : FrameSpec
        The frame (site, telescope, instrument, DATE-OBS date, frame number).
    compress : {None, "fz", "gz"}
        Extension ``.fits``, ``.fits.fz`` or ``.fits.gz``.

    Returns
    -------
    str
    """
    ext = {None: ".fits", "fz": ".fits.fz", "gz": ".fits.gz"}
    if compress not in ext:
        raise ValueError(f"compress must be None, 'fz' or 'gz', got {compress!r}")
    _, iso, _ = _obs_times(spec.mjd_start)
    date = iso[:10].replace("-", "")
    tel = spec.telescope.replace("-", "")
    return f"{spec.site}{tel}-{spec.instrument}-{date}-{int(spec.frame_number):04d}-e91{ext[compress]}"


def _to_fpack(hdul: fits.HDUList, seed: int, tile_rows: int = 1) -> fits.HDUList:
    """fpack-like layout: empty PRIMARY + RICE-compressed extensions (float: quantize 64, dithered), tiles of
    ``tile_rows`` full rows (fpack's and LCO's: 1)."""
    dither_seed = 1 + (int(seed) % 10000)
    out = fits.HDUList([fits.PrimaryHDU()])
    for hdu in hdul[1:]:
        tiles = {"tile_shape": (min(tile_rows, hdu.data.shape[0]), hdu.data.shape[1])}
        if hdu.name == "ERR":
            # Smooth image: a fixed quantisation step (0.1 % of its smallest value) is precise and twice as
            # fast as estimating the noise tile by tile.
            step = max(float(np.min(hdu.data)) / 1000.0, 1e-4)
            comp = fits.CompImageHDU(
                hdu.data,
                hdu.header,
                name=hdu.name,
                compression_type="RICE_1",
                quantize_level=-step,
                quantize_method=1,
                dither_seed=dither_seed,
                **tiles,
            )
        elif hdu.data.dtype.kind == "f":
            comp = fits.CompImageHDU(
                hdu.data,
                hdu.header,
                name=hdu.name,
                compression_type="RICE_1",
                quantize_level=64.0,
                quantize_method=1,
                dither_seed=dither_seed,
                **tiles,
            )
        else:
            comp = fits.CompImageHDU(hdu.data, hdu.header, name=hdu.name, compression_type="RICE_1", **tiles)
        out.append(comp)
    return out


def write_frame(
    path: str | Path, field: Field, spec: FrameSpec, *, compress: str | None = None, tile_rows: int = 1
) -> FrameTruth:
    """Render a frame and write it to ``path``.

    Parameters
    ----------
    path : str or Path
        Output file (overwritten). The name is used as given; see :func:`lco_filename`.
    field : Field
        Sky truth.
    spec : FrameSpec
        Observing conditions.
    compress : {None, "fz", "gz"}
        None: plain FITS, PRIMARY empty + ImageHDUs SCI, BPM, ERR. ``"fz"``: fpack-style, PRIMARY empty +
        CompImageHDUs (RICE_1; float data quantised at level 64 with SUBTRACTIVE_DITHER_1 like BANZAI, so
        pixel values differ from the plain file by up to ~noise/64). ``"gz"``: the plain file, gzipped.
    tile_rows : int
        ``"fz"`` only: rows per compression tile. 1, as fpack and LCO write, unless a test writing many
        frames wants them faster: astropy's cost per tile is mostly Python, and 64 rows halve the time to
        render and write a 512x512 frame (0.18 s to 0.09 s) and to read it (0.045 s to 0.024 s). The pixels
        differ only by their quantisation.

    Returns
    -------
    FrameTruth
    """
    if compress not in (None, "fz", "gz"):
        raise ValueError(f"compress must be None, 'fz' or 'gz', got {compress!r}")
    hdul, truth = render_frame(field, spec)
    path = Path(path)
    if compress == "fz":
        _to_fpack(hdul, spec.seed, tile_rows).writeto(path, overwrite=True)
    elif compress == "gz":
        buffer = io.BytesIO()
        hdul.writeto(buffer)
        with (
            open(path, "wb") as raw,
            gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0, filename="") as gz,
        ):
            gz.write(buffer.getbuffer())
    else:
        hdul.writeto(path, overwrite=True)
    return truth


# --------------------------------------------------------------------------------------------------------
# Series
# --------------------------------------------------------------------------------------------------------


def _hour_angle_deg(mjd: np.ndarray | float, ra: float, lon_east: float) -> np.ndarray:
    gmst = 280.46061837 + 360.98564736629 * (np.asarray(mjd, dtype=float) - 51544.5)
    return (gmst + lon_east - ra + 180.0) % 360.0 - 180.0


def _sun_ra_deg(mjd: float) -> float:
    """Apparent right ascension of the Sun, degrees (low-precision almanac formula, ~0.01 deg)."""
    n = mjd - 51544.5
    mean_lon = 280.460 + 0.9856474 * n
    g = math.radians(357.528 + 0.9856003 * n)
    lam = math.radians(mean_lon + 1.915 * math.sin(g) + 0.020 * math.sin(2.0 * g))
    eps = math.radians(23.439 - 4.0e-7 * n)
    return math.degrees(math.atan2(math.cos(eps) * math.sin(lam), math.cos(lam))) % 360.0


def _local_midnight(mjd: float, lon_east: float) -> float:
    """MJD of the Sun's lower transit at longitude ``lon_east`` nearest to ``mjd``."""
    t = mjd
    for _ in range(3):
        ha = float(_hour_angle_deg(t, _sun_ra_deg(t), lon_east))  # -180..180; midnight at +-180
        t -= ((ha % 360.0) - 180.0) / 360.98564736629
    return t


def _altitude_deg(mjd: np.ndarray, ra: float, dec: float, lat: float, lon: float) -> np.ndarray:
    ha = np.radians(_hour_angle_deg(mjd, ra, lon))
    phi, delta = math.radians(lat), math.radians(dec)
    sin_alt = math.sin(phi) * math.sin(delta) + math.cos(phi) * math.cos(delta) * np.cos(ha)
    return np.degrees(np.arcsin(np.clip(sin_alt, -1.0, 1.0)))


def _airmass(mjd: np.ndarray, ra: float, dec: float, lat: float, lon: float) -> np.ndarray:
    alt = _altitude_deg(mjd, ra, dec, lat, lon)
    # Young (1994) airmass; low altitudes clipped to 3.
    zen = np.radians(90.0 - np.clip(alt, 19.0, 90.0))
    cz = np.cos(zen)
    x = (1.002432 * cz**2 + 0.148386 * cz + 0.0096467) / (cz**3 + 0.149864 * cz**2 + 0.0102963 * cz + 0.000303978)
    return np.minimum(x, 3.0)


#: Nightly median seeing of a 1 m telescope, arcsec (low, high).
DEFAULT_SEEING = (1.6, 2.5)


def simulate_series(
    field: Field,
    out_dir: str | Path,
    *,
    nights: int = 3,
    frames_per_night: int = 8,
    filters: tuple[str, ...] = ("rp",),
    shape: tuple[int, int] = (512, 512),
    seed: int = 0,
    compress: str | None = "fz",
    tile_rows: int = 1,
    seeing: tuple[float, float] = DEFAULT_SEEING,
    seeing_of_night: Mapping[int, float] | None = None,
    wcs_jitter: tuple[float, float] | None = None,
    sky_scale: float = 1.0,
    zeropoint_offset: float = 0.0,
    first_frame_number: int = 11,
    **spec_overrides: object,
) -> list[tuple[Path, FrameSpec, FrameTruth]]:
    """Write a realistic series of frames of ``field`` into ``out_dir``.

    Night ``i`` is the night whose local midnight (the Sun's lower transit at the site) is nearest to
    ``mjd_start + i + 0.5`` (default ``mjd_start`` 61000.2). Its ``frames_per_night`` visits are spread
    evenly over the part of the night (midnight +-4 hours) when the target is above 30 degrees altitude
    (or over +-1 hour around its highest point that night if it never is); each visit takes one exposure
    through every filter in ``filters``, 100 s or so apart. Per frame: pointing offsets of tens of pixels,
    rotations below 0.5 degree, seeing around the night's median (1.6-2.5", frames clipped to 1.5-3" by
    default), sky varying by filter and night, airmass from the site and time, zero point per filter with
    extinction ``k * (airmass - 1)``, transparency 0.85-1, and a few cosmic rays. Frame numbers run through
    the whole series from ``first_frame_number``, so file names are unique.

    Parameters
    ----------
    field : Field
        Sky truth.
    out_dir : str or Path
        Folder for the files (created if needed).
    nights, frames_per_night : int
        Number of nights, and of visits per night.
    filters : tuple of str
        LCO filter names observed at each visit.
    shape : tuple of int
        Frame shape ``(ny, nx)``.
    seed : int
        Seed for the conditions and the frames' noise.
    compress : {None, "fz", "gz"}
        File format, see :func:`write_frame`.
    tile_rows : int
        Rows per compression tile of ``"fz"`` files, see :func:`write_frame`.
    seeing : tuple of float
        ``(low, high)`` range of the nightly median seeing, arcsec (a 0.4 m telescope: 2.5-5). Each frame's
        FWHM (the median times ``airmass**0.6``, plus noise) is clipped to 1.5-3" at the default range, to
        ``0.9 * low`` - ``1.2 * high`` otherwise.
    seeing_of_night : mapping of int to float, optional
        Median seeing (arcsec) of the given nights (0-based), in place of the drawn ones: a night clearly
        better than the others makes a template change. Frames are still clipped as above; the other nights
        stay as without it.
    wcs_jitter : tuple of float, optional
        ``(low, high)``: each frame's ``wcs_jitter_arcsec`` is drawn uniformly in it (e.g. 0.5-5" like
        real BANZAI solutions). Drawn apart from the other conditions, which stay as without it.
    sky_scale : float
        Multiplies every frame's sky (high sky: several times). The sky is not scaled by ``pixscale``
        or ``zeropoint_offset`` otherwise.
    zeropoint_offset : float
        Added to every frame's zero point, magnitudes (a 0.4 m telescope collects about 2 mag less than a
        1 m: -2).
    first_frame_number : int
        Frame number of the first frame; give distinct ranges to several series of one telescope written
        to one folder, so that their file names differ.
    **spec_overrides
        :class:`FrameSpec` fields that replace the simulated values in every frame (e.g. ``exptime``,
        ``zeropoint``, ``wcs_error``, ``distortion_pix``; another telescope through ``site``, ``telescope``,
        ``instrument``, ``pixscale`` and ``color_term``). ``mjd_start`` sets the series start instead (the
        same value for two telescopes observes the same nights).

    Returns
    -------
    list of (Path, FrameSpec, FrameTruth)
        One entry per frame, in time order.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 2])
    overrides = dict(spec_overrides)
    base_mjd = float(overrides.pop("mjd_start", FrameSpec.mjd_start))  # type: ignore[arg-type]
    base = replace(FrameSpec(shape=tuple(shape)), **overrides)  # type: ignore[arg-type]
    for f in filters:
        if f not in BAND_OF_FILTER:
            raise ValueError(f"filter {f!r} has no standard band; use one of {sorted(BAND_OF_FILTER)}")
    lat, lon, _ = _site(base.site)
    area = shape[0] * shape[1] / 4096.0**2

    results: list[tuple[Path, FrameSpec, FrameTruth]] = []
    frame_number = first_frame_number
    # Drawn apart from rng, so that a series without jitter is the same as it always was.
    jitter_rng = np.random.default_rng([seed, 3])
    # The default range keeps its historical clip, so that default series are unchanged.
    fwhm_range = (1.5, 3.0) if tuple(seeing) == DEFAULT_SEEING else (0.9 * seeing[0], 1.2 * seeing[1])
    for night in range(nights):
        midnight = _local_midnight(base_mjd + night + 0.5, lon)
        grid = midnight + np.linspace(-0.17, 0.17, 205)
        alt = _altitude_deg(grid, field.ra, field.dec, lat, lon)
        up = grid[alt >= 30.0]
        if len(up) >= 2:
            first, last = float(up[0]), float(up[-1])
        else:
            best = float(grid[np.argmax(alt)])
            first, last = best - 0.04, best + 0.04
        night_seeing = rng.uniform(*seeing)
        if seeing_of_night and night in seeing_of_night:
            night_seeing = seeing_of_night[night]
        night_sky = rng.uniform(0.8, 1.6)
        reqnum = int(rng.integers(1_000_000, 4_000_000))
        visits = np.linspace(first, last, frames_per_night) + rng.uniform(-0.004, 0.004, frames_per_night)
        for t_visit in np.sort(visits):
            blkuid = int(rng.integers(100_000_000, 999_999_999))
            t = float(t_visit)
            for filt in filters:
                airmass = float(_airmass(np.array([t]), field.ra, field.dec, lat, lon)[0])
                exptime = base.exptime
                values: dict[str, object] = {
                    "filter": filt,
                    "mjd_start": t,
                    "exptime": exptime,
                    "shape": tuple(shape),
                    "fwhm_arcsec": float(np.clip(night_seeing * airmass**0.6 + rng.normal(0.0, 0.12), *fwhm_range)),
                    "sky": _SKY_RATE_OF_FILTER[filt] * exptime * night_sky * rng.uniform(0.9, 1.1) * sky_scale,
                    "zeropoint": (
                        _ZP_OF_FILTER[filt] - _EXTINCTION_OF_FILTER[filt] * (airmass - 1.0) + zeropoint_offset
                    ),
                    "transparency": float(rng.uniform(0.85, 1.0)),
                    "offset_pix": (
                        float(np.clip(rng.normal(0.0, 20.0), -60, 60)),
                        float(np.clip(rng.normal(0.0, 20.0), -60, 60)),
                    ),
                    "rotation_deg": float(rng.uniform(-0.5, 0.5)),
                    "n_cosmics": int(rng.poisson(100.0 * area * exptime / 60.0)),
                    "airmass": round(airmass, 4),
                    "frame_number": frame_number,
                    "reqnum": reqnum,
                    "blkuid": blkuid,
                    "seed": int(seed) * 100_003 + len(results),
                }
                if wcs_jitter is not None:
                    values["wcs_jitter_arcsec"] = float(jitter_rng.uniform(*wcs_jitter))
                values.update(overrides)
                values["filter"] = filt
                values["mjd_start"] = t
                values["frame_number"] = frame_number
                spec = replace(base, **values)  # type: ignore[arg-type]
                path = out_dir / lco_filename(spec, compress)
                truth = write_frame(path, field, spec, compress=compress, tile_rows=tile_rows)
                results.append((path, spec, truth))
                frame_number += 1
                t += (exptime + 40.0) / 86400.0
    return results


def render_galaxy(
    shape: tuple[int, int],
    x: float,
    y: float,
    flux: float,
    scale: float,
    *,
    ellipticity: float = 0.0,
    theta: float = 0.0,
    oversample: int = 5,
) -> np.ndarray:
    """An exponential-disk galaxy integrated over pixels (before seeing; convolve with the PSF after).

    Parameters
    ----------
    shape : tuple of int
        ``(ny, nx)`` of the returned image.
    x, y : float
        Nucleus position, pixels (0-based centres; ``x`` the column).
    flux : float
        Total flux, electrons (the part falling on the image is returned).
    scale : float
        Exponential scale length along the major axis, pixels (half-light radius 1.678 times it).
    ellipticity : float
        ``1 - b/a``.
    theta : float
        Position angle of the major axis from the +x axis towards +y, radians.
    oversample : int
        Sub-pixels per pixel side used to integrate the profile over each pixel.

    Returns
    -------
    numpy.ndarray
        Electrons per pixel.
    """
    ny, nx = shape
    offsets = (np.arange(oversample) + 0.5) / oversample - 0.5
    sub_y = (np.arange(ny)[:, None] + offsets[None, :]).ravel() - y
    sub_x = (np.arange(nx)[:, None] + offsets[None, :]).ravel() - x
    dx, dy = np.meshgrid(sub_x, sub_y)
    axis_ratio = 1.0 - ellipticity
    major = dx * math.cos(theta) + dy * math.sin(theta)
    minor = -dx * math.sin(theta) + dy * math.cos(theta)
    radius = np.hypot(major, minor / axis_ratio)
    surface = np.exp(-radius / scale) / (2.0 * math.pi * scale**2 * axis_ratio) / oversample**2
    return np.asarray(flux * surface.reshape(ny, oversample, nx, oversample).sum(axis=(1, 3)))
