"""Reference stars for photometric calibration: VizieR catalogs and local files behind one interface.

Every provider returns the same *normalised* table: ``ra``, ``dec`` (deg, ICRS, ``ra`` in [0, 360)) and,
for each band it has, ``<band>`` and ``<band>_err`` (mag, NaN where missing), with the provenance in
``table.meta`` (catalog id, name and release, query centre, radius, UTC time of the query).

The one entry point is :func:`get_reference_stars`. For ``source="vizier"`` it walks the band's catalog
preference (:data:`DEFAULT_PREFERENCE`) and returns the stars of the first catalog that has the band and
its colour bands (:func:`color_for_band`) in the field. Decisions callers rely on:

* **Cache.** Each VizieR answer is kept under ``cache_dir`` as one ECSV per (catalog, rounded centre,
  radius), provenance in its meta, written atomically. A cached field that covers the request is used
  without touching the network (empty answers are cached too, so "this catalog has nothing here" is
  remembered); ``refresh=True`` queries again.
* **Failures do not fall through.** Catalogs are tried in order only past catalogs that *answered* with
  no usable stars. When the preferred catalog cannot be reached (timeouts and connection errors,
  retried with exponential back-off) :class:`lcowatch.errors.RetryLater` is raised rather than
  silently calibrating this field against a lower-preference catalog: a light curve stays on one
  catalog's system, and the daemon keeps the point uncalibrated and tries later.
* **Malformed answers** (not a VOTable: an HTML error page, garbage, a truncated document, VizieR's own
  ``QUERY_STATUS=ERROR``, or a table without the expected columns) raise :class:`CatalogResponseError`,
  a subclass of :class:`~lcowatch.errors.RetryLater`: such answers are almost always a service fault
  (maintenance page, proxy, cut transfer), so the point is kept uncalibrated and retried later; the
  distinct class and its message let logs tell it from an unreachable service. Nothing is cached.
* **An empty field** in every catalog returns an empty table (not an error).
* **Local files** problems (missing ``ra``/``dec``, no band column, the wanted band absent) raise
  :class:`CatalogFileError`, naming the file and what is missing: a configuration problem, not
  transient.

No provider lets astropy download anything (IERS auto-download is switched off here as well).
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Any, Literal

import numpy as np
import requests
from astropy import units as u
from astropy.table import Table
from astropy.utils import iers

from lcowatch.bands import BAND_OF_FILTER
from lcowatch.config import Config
from lcowatch.errors import LcowatchError, RetryLater
from lcowatch.log import get_logger
from lcowatch.science.calibrate import MAG_PER_LN
from lcowatch.states import Step

# The data host may be offline: astropy must never try to download IERS tables (nothing here needs them).
iers.conf.auto_download = False

__all__ = [
    "BANDS",
    "CATALOGS",
    "DEFAULT_PREFERENCE",
    "REFCAT_BAND",
    "CatalogFileError",
    "CatalogResponseError",
    "VizierCatalog",
    "color_for_band",
    "get_reference_stars",
    "read_local_catalog",
    "standard_band",
]

log = get_logger()

#: LCO filter -> standard band (the table lives in :mod:`lcowatch.bands`).
REFCAT_BAND = BAND_OF_FILTER

#: Standard bands a local file may carry, in output order.
BANDS: tuple[str, ...] = ("u", "g", "r", "i", "z", "B", "V", "R", "I")
_ALL_BANDS: tuple[str, ...] = ("U", *BANDS[:5], "y", *BANDS[5:])  # output order incl. catalog extras

_COLOR: dict[str, tuple[str, str]] = {
    "u": ("u", "g"),
    "g": ("g", "r"),
    "r": ("g", "r"),
    "i": ("r", "i"),
    "z": ("i", "z"),
    "B": ("B", "V"),
    "V": ("B", "V"),
    "R": ("V", "R"),
    "I": ("R", "I"),
}

#: Catalog order tried for each standard band.
DEFAULT_PREFERENCE: dict[str, list[str]] = {
    **{b: ["refcat2", "ps1", "apass"] for b in "griz"},
    **{b: ["apass", "gaia_synth"] for b in "BVRI"},
    "u": ["sdss", "gaia_synth"],
}

CACHE_DIR = "catalogs"  # under state_dir
_ROW_LIMIT = 100_000  # rows per VizieR query; answers are sorted by distance, so a cut loses the edge
_CENTRE_DECIMALS = 3  # cache key: centre rounded to 0.001 deg
_RADIUS_STEP = 0.1  # arcmin; query radius rounded up to this step

# Test seam: the retry back-off sleeps through this name.
_sleep: Callable[[float], None] = time.sleep


class CatalogResponseError(RetryLater):
    """A catalog service answered with something that is not a usable table (see module docstring)."""


class CatalogFileError(LcowatchError):
    """A local reference catalog file is unreadable or lacks what is needed; the message names both."""


def standard_band(filter_or_band: str) -> str:
    """Standard band for an LCO filter name (``gp`` -> ``g``, ``w`` -> ``r``) or a band name.

    Raises
    ------
    ValueError
        No standard band is known for it (e.g. ``Y``).
    """
    band = REFCAT_BAND.get(filter_or_band, filter_or_band)
    if band not in _COLOR:
        raise ValueError(
            f"no reference band for filter {filter_or_band!r}; known: {sorted(set(REFCAT_BAND) | set(BANDS))}"
        )
    return band


def color_for_band(band: str) -> tuple[str, str]:
    """The colour used with ``band``, as ``(blue, red)``: colour = blue - red (mag).

    g, r: g-r; i: r-i; z: i-z; u: u-g; B, V: B-V; R: V-R; I: R-I. LCO filter names are accepted.
    """
    return _COLOR[standard_band(band)]


# ------------------------------------------------------------------------------------------- providers


@dataclass(frozen=True)
class VizierCatalog:
    """How one VizieR table is queried and normalised.

    ``mags`` maps a band to candidate magnitude column names (the first present is used), ``errs`` the
    same for its error; ``fluxes`` gives ``(flux, flux_err)`` columns from which the magnitude error is
    computed when the catalog has no magnitude error; ``flags`` a column whose value 0 marks the band's
    magnitude as unreliable; ``keep`` column values a row must have (when the column is present);
    ``unreliable`` a test per column marking rows the catalog itself calls doubtful (extended, variable,
    duplicated; applied when the column is present); ``bright_limit`` the magnitude brighter than which the
    survey saturated (its magnitudes there are dropped).
    """

    key: str
    table: str
    catalog: str
    name: str
    release: str
    system: str
    ra: tuple[str, ...]
    dec: tuple[str, ...]
    mags: Mapping[str, tuple[str, ...]]
    errs: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    fluxes: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    flags: Mapping[str, str] = field(default_factory=dict)
    keep: Mapping[str, int] = field(default_factory=dict)
    unreliable: Mapping[str, Callable[[np.ndarray], np.ndarray]] = field(default_factory=dict)
    bright_limit: float | None = None

    @property
    def bands(self) -> frozenset[str]:
        """Bands this catalog provides."""
        return frozenset(self.mags)

    @property
    def columns(self) -> list[str]:
        """VizieR ``-out`` columns: ``+_r`` (distance, sort key), positions, magnitudes, errors, flags."""
        cols = ["+_r", self.ra[0], self.dec[0]]
        for band in self.mags:
            cols.append(self.mags[band][0])
            if band in self.errs:
                cols.append(self.errs[band][0])
            if band in self.fluxes:
                cols.extend(self.fluxes[band])
            if band in self.flags:
                cols.append(self.flags[band])
        cols.extend(self.keep)
        cols.extend(self.unreliable)
        return cols


def _simple(bands: str) -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]:
    """``<b>mag`` / ``e_<b>mag`` column names for catalogs that use VizieR's plain convention."""
    mags: dict[str, tuple[str, ...]] = {b: (f"{b}mag",) for b in bands}
    errs: dict[str, tuple[str, ...]] = {b: (f"e_{b}mag",) for b in bands}
    return mags, errs


_REFCAT2_MAGS, _REFCAT2_ERRS = _simple("griz")
_PS1_MAGS, _PS1_ERRS = _simple("grizy")
_SDSS_MAGS, _SDSS_ERRS = _simple("ugriz")
_GAIA_BANDS = "UBVRIugriz"


def _ps1_doubtful(qual: np.ndarray) -> np.ndarray:
    """PS1 ``Qual`` bits: 1 extended in PS1 (a galaxy), 128 poor-quality stack object."""
    return (qual.astype(np.int64) & (1 | 128)) != 0


#: Known VizieR catalogs, by key (used in preferences).
CATALOGS: dict[str, VizierCatalog] = {
    "refcat2": VizierCatalog(
        key="refcat2",
        table="J/ApJ/867/105/refcat2",
        catalog="J/ApJ/867/105",
        name="ATLAS-RefCat2",
        release="Tonry et al. 2018, ApJ 867, 105",
        system="Pan-STARRS1 griz (AB)",
        ra=("RA_ICRS",),
        dec=("DE_ICRS",),
        mags=_REFCAT2_MAGS,
        errs=_REFCAT2_ERRS,
    ),
    "ps1": VizierCatalog(
        key="ps1",
        table="II/349/ps1",
        catalog="II/349",
        name="Pan-STARRS1 DR1",
        release="Chambers et al. 2016 (DR1 mean PSF magnitudes)",
        system="Pan-STARRS1 grizy (AB)",
        ra=("RAJ2000",),
        dec=("DEJ2000",),
        mags=_PS1_MAGS,
        errs=_PS1_ERRS,
        unreliable={"Qual": _ps1_doubtful},
        bright_limit=14.0,  # mean PSF magnitudes of brighter stars are saturated
    ),
    "apass": VizierCatalog(
        key="apass",
        table="II/336/apass9",
        catalog="II/336",
        name="APASS DR9",
        release="Henden et al. 2016, APASS DR9",
        system="Johnson BV (Vega), Sloan g'r'i' (AB)",
        ra=("RAJ2000",),
        dec=("DEJ2000",),
        # astroquery keeps VizieR's field names ("g'mag"); older versions sanitised them to "g_mag".
        mags={
            "B": ("Bmag",),
            "V": ("Vmag",),
            "g": ("g'mag", "g_mag"),
            "r": ("r'mag", "r_mag"),
            "i": ("i'mag", "i_mag"),
        },
        errs={
            "B": ("e_Bmag",),
            "V": ("e_Vmag",),
            "g": ("e_g'mag", "e_g_mag"),
            "r": ("e_r'mag", "e_r_mag"),
            "i": ("e_i'mag", "e_i_mag"),
        },
        bright_limit=10.0,  # APASS saturates near 10 mag
    ),
    "sdss": VizierCatalog(
        key="sdss",
        table="V/147/sdss12",
        catalog="V/147",
        name="SDSS DR12",
        release="Alam et al. 2015, SDSS DR12 (model magnitudes)",
        system="SDSS ugriz (~AB)",
        ra=("RA_ICRS",),
        dec=("DE_ICRS",),
        mags=_SDSS_MAGS,
        errs=_SDSS_ERRS,
        keep={"mode": 1, "class": 6},  # primary detections of stars only
        bright_limit=14.0,  # SDSS imaging saturates near 14 mag
    ),
    "gaia_synth": VizierCatalog(
        key="gaia_synth",
        table="I/360/syntphot",
        catalog="I/360",
        name="Gaia DR3 synthetic photometry (GSPC)",
        release="Gaia Collaboration, Montegriffo et al. 2023, A&A 674, A33",
        system="Johnson-Kron-Cousins UBVRI (Vega), SDSS ugriz (AB)",
        ra=("RA_ICRS", "_RAJ2000"),
        dec=("DE_ICRS", "_DEJ2000"),
        mags={b: (f"{b}mag",) for b in _GAIA_BANDS},
        # No magnitude errors in this table: they come from the flux errors.
        fluxes={b: (f"F{b}", f"e_F{b}") for b in _GAIA_BANDS},
        flags={b: f"{b}Flag" for b in _GAIA_BANDS},
    ),
}


# ------------------------------------------------------------------------------------------ public API


def get_reference_stars(
    ra: float,
    dec: float,
    radius_arcmin: float,
    band: str,
    *,
    source: Literal["vizier", "file"] = "vizier",
    path: str | os.PathLike[str] | None = None,
    preference: Mapping[str, list[str]] | None = None,
    cache_dir: str | os.PathLike[str],
    timeout: float = 30.0,
    retries: int = 2,
    backoff: float = 2.0,
    refresh: bool = False,
) -> Table:
    """Reference stars around a position with magnitudes in ``band`` and its colour.

    Parameters
    ----------
    ra, dec : float
        Field centre (deg, ICRS).
    radius_arcmin : float
        Search radius (arcmin).
    band : str
        Standard band (``g``, ``V``...) or LCO filter name (``gp``, ``w``...; see :data:`REFCAT_BAND`).
    source : {"vizier", "file"}
        Query VizieR catalogs, or read the local catalog ``path``.
    path : path-like, optional
        Local CSV/ECSV catalog (``source="file"``); see :func:`read_local_catalog`.
    preference : dict, optional
        Band -> catalog keys (of :data:`CATALOGS`) to try in order; bands not given keep
        :data:`DEFAULT_PREFERENCE`.
    cache_dir : path-like
        Folder of the per-field catalog cache (created when missing).
    timeout : float
        Seconds per HTTP request.
    retries : int
        Extra attempts after a timeout, connection error or 5xx/429 answer.
    backoff : float
        Seconds before the first retry; doubled at each further retry.
    refresh : bool
        Query again even when the cache covers the request.

    Returns
    -------
    astropy.table.Table
        Normalised columns ``ra``, ``dec`` (deg), ``<band>``, ``<band>_err`` (mag) for every band of the
        catalog, plus ``mag``, ``mag_err`` (the requested band) and ``color``, ``color_err`` (blue - red,
        mag; NaN when a local file lacks a colour band). Only stars within the radius and with a finite
        ``mag`` (and, for VizieR, a finite colour) are kept. ``meta`` holds the provenance: ``catalog``,
        ``vizier_id``, ``catalog_name``, ``release``, ``system``, ``query_ra``, ``query_dec``,
        ``query_radius_arcmin``, ``query_time_utc``, ``band``, ``color``, ``from_cache``, ``cache_file``.
        Zero rows when no catalog has stars there (``meta["tried"]`` lists the catalogs asked).

    Raises
    ------
    lcowatch.errors.RetryLater
        The catalog to use could not be reached ("catalog unreachable").
    CatalogResponseError
        The catalog answered with something malformed (a :class:`RetryLater`).
    CatalogFileError
        ``source="file"`` and the file is unusable or lacks ``band``.
    ValueError
        Bad arguments: unknown band, source or catalog key; no ``path`` for a file source; no catalog in
        the preference that has the band and its colour bands.
    """
    std = standard_band(band)
    ra = float(ra) % 360.0
    dec = float(dec)
    radius_arcmin = float(radius_arcmin)
    if not (-90.0 <= dec <= 90.0) or not radius_arcmin > 0:
        raise ValueError(f"bad field: dec={dec} deg, radius={radius_arcmin} arcmin")

    if source == "file":
        if path is None:
            raise ValueError("source='file' needs path= to a local reference catalog")
        return _local_field(path, std, ra, dec, radius_arcmin)
    if source != "vizier":
        raise ValueError(f"unknown reference catalog source {source!r}; use 'vizier' or 'file'")
    return _vizier_field(
        std, ra, dec, radius_arcmin, preference=preference, cache=Path(cache_dir), timeout=timeout,
        retries=retries, backoff=backoff, refresh=refresh,
    )  # fmt: skip


def _local_field(path: str | os.PathLike[str], std: str, ra: float, dec: float, radius_arcmin: float) -> Table:
    blue, red = _COLOR[std]
    tab = read_local_catalog(path)
    if std not in tab.colnames:
        have = [b for b in _ALL_BANDS if b in tab.colnames]
        raise CatalogFileError(
            f"{path}: no column for band {std!r} (accepted names: {', '.join(_mag_names(std))}); "
            f"the file has bands {', '.join(have)}"
        )
    tab = _within(tab, ra, dec, radius_arcmin)
    tab.meta.update(query_ra=ra, query_dec=dec, query_radius_arcmin=radius_arcmin, from_cache=False)
    return _finish(tab, std, blue, red, require_color=False)


def _vizier_field(
    std: str,
    ra: float,
    dec: float,
    radius_arcmin: float,
    *,
    preference: Mapping[str, list[str]] | None,
    cache: Path,
    timeout: float,
    retries: int,
    backoff: float,
    refresh: bool,
) -> Table:
    """The first catalog of the preference that has stars in the field (from the cache, else VizieR)."""
    blue, red = _COLOR[std]
    order = _preference(std, preference)
    if not any({std, blue, red} <= CATALOGS[key].bands for key in order):
        raise ValueError(f"no catalog in the preference {order} for band {std!r} has {std} and colour {blue}-{red}")
    tried: list[str] = []
    for key in order:
        spec = CATALOGS[key]
        if not {std, blue, red} <= spec.bands:
            continue  # this catalog cannot calibrate the band: not asked at all
        tried.append(key)
        tab = None if refresh else _cache_lookup(cache, spec, ra, dec, radius_arcmin)
        if tab is None:
            q_ra, q_dec, q_radius = _query_field(ra, dec, radius_arcmin)
            tab = _query_vizier(spec, q_ra, q_dec, q_radius, timeout=timeout, retries=retries, backoff=backoff)
            tab.meta["cache_file"] = str(_cache_write(cache, spec, tab))
            tab.meta["from_cache"] = False
        tab = _within(tab, ra, dec, radius_arcmin)
        out = _finish(tab, std, blue, red, require_color=True)
        log.info(
            "refcat.field",
            catalog=key,
            band=std,
            n_stars=len(out),
            from_cache=bool(tab.meta.get("from_cache")),
            ra=ra,
            dec=dec,
            radius_arcmin=radius_arcmin,
        )
        if len(out):
            out.meta["tried"] = list(tried)
            return out
    empty = _finish(_empty_normalised(()), std, blue, red, require_color=True)
    empty.meta.update(catalog=None, tried=tried, request_ra=ra, request_dec=dec, request_radius_arcmin=radius_arcmin)
    log.warning("refcat.empty_field", band=std, tried=tried, ra=ra, dec=dec, radius_arcmin=radius_arcmin)
    return empty


#: Accepted names (any letter case) of a local catalog's position columns: ours, VizieR's, PS1's, Gaia's.
POSITION_NAMES = {
    "ra": ("ra", "raj2000", "ra_icrs", "ramean", "radeg", "ra_deg"),
    "dec": ("dec", "dej2000", "decj2000", "de_icrs", "decmean", "dedeg", "dec_deg"),
}


def read_local_catalog(path: str | os.PathLike[str]) -> Table:
    """Read and normalise a local reference catalog (CSV or ECSV).

    The file has ``ra``, ``dec`` in degrees (any letter case; also ``RAJ2000``/``DEJ2000``, ``RA_ICRS``,
    ``raMean``/``decMean``, see :data:`POSITION_NAMES`) and one column per band named ``u g r i z B
    V R I``; ``gmag`` / ``g_mag`` style names are accepted too. Errors are ``<band>_err``, also
    ``e_gmag``, ``gmagerr``, ``gmag_err``, ``e_g``, ``g_mag_err``. A band without an error column gets
    errors of 0.0 (the zero-point fit's intrinsic scatter then absorbs the catalog errors) and is
    listed in ``meta["errors_missing"]``.

    Returns
    -------
    astropy.table.Table
        Normalised: ``ra``, ``dec`` (deg), ``<band>``, ``<band>_err`` (mag), provenance in ``meta``.

    Raises
    ------
    CatalogFileError
        The file cannot be read, lacks ``ra``/``dec`` or has no band column; the message names the
        file and what is missing.
    """
    p = Path(path)
    try:
        fmt = {".ecsv": "ascii.ecsv", ".csv": "ascii.csv"}.get(p.suffix.lower(), "ascii")
        raw = Table.read(p, format=fmt)
    except FileNotFoundError as exc:
        raise CatalogFileError(f"{p}: reference catalog file not found") from exc
    except Exception as exc:  # astropy raises many types for unreadable text tables
        raise CatalogFileError(f"{p}: cannot read as a CSV/ECSV reference catalog: {exc}") from exc

    lower = {c.lower(): c for c in raw.colnames}
    position = {
        axis: next((lower[name] for name in names if name in lower), None) for axis, names in POSITION_NAMES.items()
    }
    missing = [f"{axis} (one of {', '.join(POSITION_NAMES[axis])})" for axis, column in position.items() if not column]
    if missing:
        raise CatalogFileError(
            f"{p}: missing column(s) {'; '.join(missing)}, in decimal degrees; columns are {raw.colnames}"
        )
    try:
        ra = _as_float(raw[position["ra"]], u.deg) % 360.0
        dec = _as_float(raw[position["dec"]], u.deg)
    except (TypeError, ValueError, u.UnitsError) as exc:
        raise CatalogFileError(f"{p}: ra/dec must be decimal degrees: {exc}") from exc

    out = Table()
    out["ra"] = ra
    out["dec"] = dec
    errors_missing = []
    for band in BANDS:
        mag_col = _first_present(raw.colnames, _mag_names(band))
        if mag_col is None:
            continue
        err_col = _first_present(raw.colnames, _err_names(band))
        try:
            out[band] = _as_float(raw[mag_col], u.mag)
            if err_col is None:
                errors_missing.append(band)
                out[f"{band}_err"] = np.zeros(len(raw))
            else:
                out[f"{band}_err"] = _as_float(raw[err_col], u.mag)
        except (TypeError, ValueError, u.UnitsError) as exc:
            raise CatalogFileError(f"{p}: band column {mag_col!r} is not numeric magnitudes: {exc}") from exc
    bands = [b for b in BANDS if b in out.colnames]
    if not bands:
        raise CatalogFileError(
            f"{p}: no band column; expected one of {' '.join(BANDS)} (or gmag-style names); columns are {raw.colnames}"
        )
    _set_units(out)
    out.meta.update(
        catalog="file",
        vizier_id=None,
        catalog_name=p.name,
        release=str(p.resolve()),
        system="as given in the file",
        source="file",
        bands=bands,
        errors_missing=errors_missing,
        query_time_utc=_utc_now(),
    )
    return out


# ------------------------------------------------------------------------------------------ internals


def _preference(band: str, preference: Mapping[str, list[str]] | None) -> list[str]:
    order = list((preference or {}).get(band, DEFAULT_PREFERENCE[band]))
    unknown = [k for k in order if k not in CATALOGS]
    if unknown:
        raise ValueError(f"unknown catalog(s) {unknown} in preference for {band!r}; known: {sorted(CATALOGS)}")
    return order


def _mag_names(band: str) -> list[str]:
    return [band, f"{band}mag", f"{band}_mag", f"{band}MAG"]


def _err_names(band: str) -> list[str]:
    return [
        f"{band}_err",
        f"e_{band}mag",
        f"{band}magerr",
        f"{band}mag_err",
        f"e_{band}",
        f"{band}err",
        f"e_{band}_mag",
        f"{band}_mag_err",
        f"{band}_magerr",
        f"{band}MAGERR",
        f"{band}MAG_ERR",
    ]


def _first_present(colnames: Iterable[str], candidates: Iterable[str]) -> str | None:
    names = set(colnames)
    return next((c for c in candidates if c in names), None)


def _as_float(col: Any, unit: u.UnitBase) -> np.ndarray:
    """Column -> float64 array in ``unit`` (if the column carries a unit); masked or empty -> NaN.

    Raises ValueError for text that is not a number (e.g. sexagesimal coordinates).
    """
    data = np.ma.asarray(col)
    if data.dtype.kind in "US":
        text = np.ma.filled(data.astype(str), "")
        values = np.array([float(v) if v.strip() else np.nan for v in text], dtype=float)
    else:
        values = np.ma.filled(data.astype(float), np.nan)
        if data.dtype == np.float32 and unit == u.mag:  # float32 noise: 14.177000045 -> 14.177 mag
            values = np.round(values, 6)
    col_unit = getattr(col, "unit", None)
    if col_unit is not None and col_unit != unit:
        values = values * u.Unit(col_unit).to(unit)
    return np.asarray(values, dtype=float)


def _set_units(tab: Table) -> None:
    for name in tab.colnames:
        tab[name].unit = u.deg if name in ("ra", "dec") else u.mag


def _empty_normalised(bands: Iterable[str]) -> Table:
    tab = Table()
    tab["ra"] = np.zeros(0)
    tab["dec"] = np.zeros(0)
    for band in bands:
        tab[band] = np.zeros(0)
        tab[f"{band}_err"] = np.zeros(0)
    _set_units(tab)
    return tab


def _separation_arcmin(ra1: Any, dec1: Any, ra2: float, dec2: float) -> np.ndarray:
    """Great-circle distance (arcmin), haversine; all angles in deg."""
    r1, d1, r2, d2 = (np.radians(np.asarray(v, dtype=float)) for v in (ra1, dec1, ra2, dec2))
    h = np.sin((d2 - d1) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r2 - r1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0)))) * 60.0


def _within(tab: Table, ra: float, dec: float, radius_arcmin: float) -> Table:
    if len(tab) == 0:
        return tab
    keep = _separation_arcmin(tab["ra"], tab["dec"], ra, dec) <= radius_arcmin
    out = tab[keep]
    out.meta = dict(tab.meta)
    return out


def _finish(tab: Table, band: str, blue: str, red: str, *, require_color: bool) -> Table:
    """Add ``mag``, ``mag_err``, ``color``, ``color_err``; keep rows with a usable magnitude."""
    nan = np.full(len(tab), np.nan)
    mag = np.asarray(tab[band], float) if band in tab.colnames else nan
    mag_err = np.asarray(tab[f"{band}_err"], float) if band in tab.colnames else nan
    has_color = blue in tab.colnames and red in tab.colnames
    if has_color:
        color = np.asarray(tab[blue], float) - np.asarray(tab[red], float)
        color_err = np.hypot(np.asarray(tab[f"{blue}_err"], float), np.asarray(tab[f"{red}_err"], float))
    else:
        color, color_err = nan, nan
    keep = np.isfinite(mag)
    if require_color:
        keep &= np.isfinite(color)
    out = tab[keep]
    out["mag"] = mag[keep] * u.mag
    out["mag_err"] = mag_err[keep] * u.mag
    out["color"] = color[keep] * u.mag
    out["color_err"] = color_err[keep] * u.mag
    out.meta = dict(tab.meta)
    out.meta.update(band=band, color=f"{blue}-{red}" if has_color or require_color else None)
    return out


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------- VizieR


def _query_field(ra: float, dec: float, radius_arcmin: float) -> tuple[float, float, float]:
    """Rounded query centre (deg) and a radius (arcmin) that still covers the requested circle."""
    q_ra = round(ra, _CENTRE_DECIMALS) % 360.0
    q_dec = round(dec, _CENTRE_DECIMALS)
    offset = float(_separation_arcmin(q_ra, q_dec, ra, dec))
    q_radius = math.ceil((radius_arcmin + offset) / _RADIUS_STEP - 1e-9) * _RADIUS_STEP
    return q_ra, q_dec, round(q_radius, 1)


def _query_vizier(
    spec: VizierCatalog,
    ra: float,
    dec: float,
    radius_arcmin: float,
    *,
    timeout: float,
    retries: int,
    backoff: float,
) -> Table:
    """One cone search on VizieR through astroquery, retried on transient failures; normalised table."""
    from astropy.coordinates import SkyCoord
    from astroquery.vizier import Vizier

    vizier = Vizier(columns=spec.columns, row_limit=_ROW_LIMIT, timeout=timeout)
    centre = SkyCoord(ra * u.deg, dec * u.deg, frame="icrs")
    attempts = max(int(retries), 0) + 1
    last: Exception | None = None
    for attempt in range(1, attempts + 1):
        started = _utc_now()
        try:
            response = vizier.query_region_async(
                centre, radius=radius_arcmin * u.arcmin, catalog=spec.table, frame="icrs", cache=False
            )
            response.raise_for_status()
        except (requests.exceptions.Timeout, requests.exceptions.ConnectionError) as exc:
            last = exc
        except requests.exceptions.ChunkedEncodingError as exc:  # connection dropped mid-answer
            last = exc
        except requests.exceptions.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if status < 500 and status != 429:
                raise CatalogResponseError(
                    f"{spec.name} ({spec.table}): VizieR refused the query with HTTP {status}", step=Step.CATALOG
                ) from exc
            last = exc
        else:
            tab = _parse_votable(response.content, spec)
            tab.meta.update(
                catalog=spec.key,
                vizier_id=spec.table,
                vizier_catalog=spec.catalog,
                catalog_name=spec.name,
                release=spec.release,
                system=spec.system,
                source="vizier",
                query_ra=ra,
                query_dec=dec,
                query_radius_arcmin=radius_arcmin,
                query_time_utc=started,
                n_rows=len(tab),
            )
            return tab
        log.warning(
            "refcat.query_failed",
            catalog=spec.key,
            attempt=attempt,
            attempts=attempts,
            error=f"{type(last).__name__}: {last}",
        )
        if attempt < attempts:
            _sleep(backoff * 2 ** (attempt - 1))
    raise RetryLater(
        f"catalog unreachable: {spec.name} ({spec.table}) failed {attempts} time(s); last error: "
        f"{type(last).__name__}: {last}",
        step=Step.CATALOG,
    )


def _parse_votable(content: bytes, spec: VizierCatalog) -> Table:
    """VizieR VOTable bytes -> normalised table; anything else -> :class:`CatalogResponseError`."""
    from astropy.io import votable

    head = content[:512].lstrip()
    if not (head.startswith(b"<?xml") or head.startswith(b"<VOTABLE")) or b"<VOTABLE" not in content[:4096]:
        raise CatalogResponseError(
            f"{spec.name} ({spec.table}): answer is not a VOTable (starts with {content[:80]!r})",
            step=Step.CATALOG,
        )
    try:
        with warnings.catch_warnings():
            # verify="ignore" already silences the VOTable spec warnings (W-codes) that VizieR answers
            # trigger (non-standard unit strings, ucd syntax); harmless for reading numbers. Units that
            # astropy cannot parse are kept as UnrecognizedUnit and raise UnitsWarning: also harmless,
            # only mag and deg columns are used and those parse.
            warnings.simplefilter("ignore", u.UnitsWarning)
            vot = votable.parse(BytesIO(content), verify="ignore", invalid="mask")
            tables = [t.to_table(use_names_over_ids=True) for t in vot.iter_tables()]
            infos = list(vot.iter_info())
    except Exception as exc:  # expat, value and spec errors of a broken document
        raise CatalogResponseError(
            f"{spec.name} ({spec.table}): malformed VOTable: {type(exc).__name__}: {exc}", step=Step.CATALOG
        ) from exc

    for info in infos:
        if info.name == "QUERY_STATUS" and str(info.value).upper() == "ERROR":
            text = (info.content or "").strip()
            raise CatalogResponseError(
                f"{spec.name} ({spec.table}): VizieR reported an error: {text or 'QUERY_STATUS=ERROR'}",
                step=Step.CATALOG,
            )
        if info.name == "QUERY_STATUS" and str(info.value).upper() == "OVERFLOW":
            log.warning("refcat.truncated", catalog=spec.key, limit=_ROW_LIMIT)

    rows = [t for t in tables if len(t)]
    if not rows:
        return _empty_normalised(b for b in _ALL_BANDS if b in spec.bands)
    if len(rows) > 1:
        from astropy.table import vstack

        raw = vstack(rows, metadata_conflicts="silent")
    else:
        raw = rows[0]
    return _normalise(raw, spec)


def _normalise(raw: Table, spec: VizierCatalog) -> Table:
    ra_col = _first_present(raw.colnames, spec.ra)
    dec_col = _first_present(raw.colnames, spec.dec)
    found = {b: _first_present(raw.colnames, spec.mags[b]) for b in spec.mags}
    found = {b: c for b, c in found.items() if c is not None}
    if ra_col is None or dec_col is None or not found:
        raise CatalogResponseError(
            f"{spec.name} ({spec.table}): answer lacks the expected columns "
            f"(ra {spec.ra}, dec {spec.dec}, magnitudes); it has {raw.colnames}",
            step=Step.CATALOG,
        )
    keep = np.ones(len(raw), bool)
    for name, value in spec.keep.items():
        if name in raw.colnames:
            keep &= np.ma.filled(np.ma.asarray(raw[name]) == value, False)
    for name, doubtful in spec.unreliable.items():
        if name in raw.colnames:
            keep &= ~np.ma.filled(doubtful(np.ma.filled(np.ma.asarray(raw[name]), 0)), True)
    raw = raw[keep]

    out = Table()
    out["ra"] = _as_float(raw[ra_col], u.deg) % 360.0
    out["dec"] = _as_float(raw[dec_col], u.deg)
    for band in _ALL_BANDS:
        if band not in found:
            continue
        mag = _as_float(raw[found[band]], u.mag)
        err_col = _first_present(raw.colnames, spec.errs.get(band, ()))
        if err_col is not None:
            err = _as_float(raw[err_col], u.mag)
        elif band in spec.fluxes and all(c in raw.colnames for c in spec.fluxes[band]):
            flux_col, ferr_col = spec.fluxes[band]
            flux = _as_float(raw[flux_col], raw[flux_col].unit or u.one)
            ferr = _as_float(raw[ferr_col], raw[flux_col].unit or u.one)
            with np.errstate(divide="ignore", invalid="ignore"):
                err = np.where(flux > 0, MAG_PER_LN * ferr / flux, np.nan)
        else:
            err = np.full(len(raw), np.nan)
        flag_col = spec.flags.get(band)
        if flag_col is not None and flag_col in raw.colnames:
            bad = np.ma.filled(np.ma.asarray(raw[flag_col]) == 0, False)
            mag = np.where(bad, np.nan, mag)
        if spec.bright_limit is not None:
            mag = np.where(mag < spec.bright_limit, np.nan, mag)
        out[band] = mag
        out[f"{band}_err"] = err
    _set_units(out)
    return out


# ---------------------------------------------------------------------------------------------- cache

_CACHE_NAME = re.compile(r"^(?P<key>[a-z0-9_]+)_(?P<ra>\d+\.\d+)_(?P<dec>[+-]\d+\.\d+)_r(?P<radius>\d+\.\d+)\.ecsv$")


def _cache_path(cache_dir: Path, spec: VizierCatalog, ra: float, dec: float, radius_arcmin: float) -> Path:
    nd = _CENTRE_DECIMALS
    return cache_dir / f"{spec.key}_{ra:.{nd}f}_{dec:+.{nd}f}_r{radius_arcmin:.1f}.ecsv"


def _cache_lookup(cache_dir: Path, spec: VizierCatalog, ra: float, dec: float, radius_arcmin: float) -> Table | None:
    """The smallest cached field of ``spec`` that covers the requested circle, read back; else None."""
    if not cache_dir.is_dir():
        return None
    covering: list[tuple[float, Path]] = []
    for file in cache_dir.glob(f"{spec.key}_*.ecsv"):
        m = _CACHE_NAME.match(file.name)
        if not m or m["key"] != spec.key:
            continue
        c_ra, c_dec, c_radius = float(m["ra"]), float(m["dec"]), float(m["radius"])
        if float(_separation_arcmin(c_ra, c_dec, ra, dec)) + radius_arcmin <= c_radius + 1e-6:
            covering.append((c_radius, file))
    for _, file in sorted(covering):
        try:
            tab = Table.read(file, format="ascii.ecsv")
        except Exception as exc:  # a damaged cache file is ignored and replaced by a fresh query
            log.warning("refcat.cache_unreadable", file=str(file), error=f"{type(exc).__name__}: {exc}")
            continue
        if tab.meta.get("catalog") != spec.key or not {"ra", "dec"} <= set(tab.colnames):
            log.warning("refcat.cache_mismatch", file=str(file))
            continue
        tab.meta["from_cache"] = True
        tab.meta["cache_file"] = str(file)
        return tab
    return None


def _cache_write(cache_dir: Path, spec: VizierCatalog, tab: Table) -> Path:
    """Write ``tab`` as the cache ECSV of its query, atomically (tmp file + fsync + os.replace)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    meta = tab.meta
    target = _cache_path(cache_dir, spec, meta["query_ra"], meta["query_dec"], meta["query_radius_arcmin"])
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=cache_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            to_write = tab.copy(copy_data=False)
            to_write.meta = {k: v for k, v in meta.items() if k not in ("cache_file", "from_cache")}
            to_write.write(fh, format="ascii.ecsv")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(cache_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return target


class FieldCatalogs:
    """Reference stars per target and band for a running pipeline: asked once, kept in memory.

    A catalog that cannot be had (offline, unreachable) is not asked again for ``retry_after`` seconds;
    meanwhile :meth:`get` returns None and points stay uncalibrated (``lcowatch recalibrate`` fills them in
    later).
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self._tables: dict[tuple[str, str], Table] = {}
        self._unavailable_until: dict[tuple[str, str], float] = {}

    def get(self, target: str, band: str, radius_arcmin: float | None, *, refresh: bool = False) -> Table | None:
        """The target's reference stars in ``band`` (columns mag, mag_err, color, color_err), or None.

        ``radius_arcmin`` None means ``catalog.radius_arcmin`` (10' when that is unset too).
        """
        key = (target, band)
        if key in self._tables and not refresh:
            return self._tables[key]
        if not refresh and time.monotonic() < self._unavailable_until.get(key, 0.0):
            return None
        settings, target_config = self.config.catalog, self.config.targets[target]
        local = target_config.refcat
        if local is None and settings.source == "file":
            # No catalog for this target: its points stay uncalibrated; say so once.
            if key not in self._unavailable_until:
                get_logger().warning(
                    "catalog_not_configured", target=target, reason="catalog.source is file, no refcat"
                )
            self._unavailable_until[key] = math.inf
            return None
        if target_config.ra is None or target_config.dec is None:
            # A target placed by pixel has no sky position to query around.
            self._unavailable_until[key] = math.inf
            return None
        try:
            table = get_reference_stars(
                target_config.ra, target_config.dec, radius_arcmin or settings.radius_arcmin or 10.0, band,
                source="file" if local is not None else "vizier", path=local, preference=settings.preference,
                cache_dir=self.config.state_dir / CACHE_DIR, timeout=settings.timeout, retries=settings.retries,
                refresh=refresh,
            )  # fmt: skip
        except (RetryLater, CatalogFileError) as exc:
            # Unreachable, or a local file that cannot be read: the frames are not at fault; keep their
            # points uncalibrated and ask again later.
            self._unavailable_until[key] = time.monotonic() + settings.retry_after
            get_logger().warning(
                "catalog_unavailable", target=target, band=band, reason=str(exc), retry_in=settings.retry_after
            )
            return None
        self._tables[key] = table
        return table
