"""Light curves out of the store: tables for ``lcowatch export`` and the per-target result files.

The per-target ECSV under ``state_dir/results/`` is rewritten atomically (temporary file, fsync, rename)
so a reader never sees half a file.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import IO

import astropy.units as u
import numpy as np
from astropy.coordinates import SkyCoord
from astropy.table import MaskedColumn, Table

from lcowatch import __version__, flags
from lcowatch.config import Config
from lcowatch.science.refcat import FieldCatalogs
from lcowatch.state.store import Store

RESULTS_DIR = "results"

LIGHTCURVE_COLUMNS: dict[str, tuple[str, u.UnitBase | None, str]] = {
    "file": ("str", None, "frame file name"),
    "mjd": ("f8", u.day, "MJD (UTC) at mid-exposure"),
    "bjd_tdb": ("f8", u.day, "BJD (TDB) at mid-exposure, at the target"),
    "filter": ("str", None, "LCO filter"),
    "band": ("str", None, "standard band the magnitude is calibrated to"),
    "mag": ("f8", u.mag, "calibrated standard magnitude (empty when not calibrated or not detected)"),
    "mag_err": ("f8", u.mag, "photometric, zero-point and ensemble-scatter errors combined"),
    "zp": ("f8", u.mag, "zero point: mag = zp + m_inst + color_term * color"),
    "zp_err": ("f8", u.mag, "zero-point error"),
    "color_term": ("f8", None, "colour term applied (mag per mag of colour)"),
    "color": ("f8", u.mag, "the target's colour used (its own that night, else the comparison stars' median)"),
    "diff_mag": ("f8", u.mag, "differential magnitude against the comparison ensemble (empty when not detected)"),
    "diff_mag_err": ("f8", u.mag, "error of diff_mag"),
    "flux": ("f8", u.electron / u.s, "the target's background-subtracted aperture flux (may be negative)"),
    "flux_err": ("f8", u.electron / u.s, "error of flux"),
    "snr": ("f8", None, "flux / flux_err"),
    "limit_mag": ("f8", u.mag, "5 sigma limit at the target (calibrated; else on the diff_mag scale)"),
    "aperture": ("str", None, "aperture radius (multiple of FWHM or arcsec)"),
    "fwhm": ("f8", u.arcsec, "frame FWHM"),
    "airmass": ("f8", None, "airmass"),
    "x": ("f8", u.pix, "target x, 0-based"),
    "y": ("f8", u.pix, "target y, 0-based"),
    "registration_rms": ("f8", u.pix, "residual RMS of the registration"),
    "n_comparison": ("i8", None, "comparison stars used"),
    "template": ("str", None, "template frame"),
    "reference": ("str", None, "reference image subtracted (method: difference; empty for aperture photometry)"),
    "flags": ("i8", None, "quality-flag bits (see flag_names)"),
    "flag_names": ("str", None, "names of the flags set"),
}


def lightcurve_table(store: Store, target: str, filter: str | None = None) -> Table:
    """The target's light curve, one row per frame and aperture, in time order, with units."""
    rows = store.lightcurve(target, filter)
    names = {bits: flags.describe(bits) for bits in {int(row["flags"]) for row in rows}}  # type: ignore[call-overload]
    for row in rows:
        row["flag_names"] = names[int(row["flags"])]  # type: ignore[call-overload]
    table = Table()
    for name, (dtype, unit, description) in LIGHTCURVE_COLUMNS.items():
        values = [row.get(name) for row in rows]
        missing = [v is None for v in values]
        # Arrays, not lists: from a list, numpy.ma looks at every element for a mask (seconds at 30,000 rows).
        if dtype == "str":
            text = np.array(["" if v is None else str(v) for v in values], dtype=str)
            table[name] = MaskedColumn(text, description=description)
        else:
            filled = np.array([0 if v is None else v for v in values], dtype=dtype)
            table[name] = MaskedColumn(filled, mask=np.array(missing, dtype=bool), unit=unit, description=description)
    table.meta.update(
        {
            "target": target,
            "filter": filter or "all",
            "software": f"lcowatch {__version__}",
            "flags": {flag.name: f"bit {flag.bit}: {flag.description}" for flag in flags.FLAGS},
        }
    )
    return table


AAVSO_FILTERS = {"up": "SU", "gp": "SG", "rp": "SR", "ip": "SI", "zs": "SZ", "B": "B", "V": "V", "R": "R", "I": "I",
                 "w": "CR"}  # fmt: skip
AAVSO_FIELDS = ("NAME", "DATE", "MAG", "MERR", "FILT", "TRANS", "MTYPE", "CNAME", "CMAG", "KNAME", "KMAG", "AMASS",
                "GROUP", "CHART", "NOTES")  # fmt: skip


#: Flags that do not make a point doubtful: an AAVSO export keeps points that carry only these.
AAVSO_ACCEPTED_FLAGS = flags.value("forced_position", "nondetection", "nonstandard_band", "color_assumed", "crowded")


def write_aavso(
    table: Table,
    out: IO[str],
    *,
    target: str,
    obscode: str,
    check: tuple[str, dict[str, float]] | None = None,
    include_flagged: bool = False,
) -> int:
    """AAVSO Extended File Format: calibrated points of the first aperture, JD (UTC) at mid-exposure.

    A non-detection is written as its 5 sigma limit, ``<MAG`` with MERR ``na``. Points with flags other
    than :data:`AAVSO_ACCEPTED_FLAGS` are left out unless ``include_flagged``. The comparison is the
    ensemble (``CNAME=ENSEMBLE``, ``CMAG=na``, as the format asks for ensembles); ``check`` is the check
    star's name (KNAME) and its calibrated magnitude per frame file (KMAG). Returns the number of
    observations written.
    """
    out.write("#TYPE=EXTENDED\n")
    out.write(f"#OBSCODE={obscode}\n")
    out.write(f"#SOFTWARE=lcowatch {__version__}\n")
    out.write("#DELIM=,\n#DATE=JD\n#OBSTYPE=CCD\n")
    out.write("#" + ",".join(AAVSO_FIELDS) + "\n")
    if not len(table):
        return 0
    first = table[table["aperture"] == table["aperture"][0]]
    written = 0
    for row in first:
        if row["flags"] & ~AAVSO_ACCEPTED_FLAGS and not include_flagged:
            continue
        if row["flags"] & flags.value("nondetection") and not np.ma.is_masked(row["zp"]):
            magnitude, error = f"<{row['limit_mag']:.4f}", "na"
        elif not np.ma.is_masked(row["mag"]):
            magnitude, error = f"{row['mag']:.4f}", f"{row['mag_err']:.4f}"
        else:
            continue
        check_name, check_mags = check or ("na", {})
        kmag = check_mags.get(str(row["file"]))
        notes = f"lcowatch flags={row['flag_names'] or 'none'}; band={row['band']}; zp={row['zp']:.4f}"
        fields = (
            target, f"{row['mjd'] + 2400000.5:.6f}", magnitude, error,
            AAVSO_FILTERS.get(str(row["filter"]), "na"), "NO", "STD", "ENSEMBLE", "na",
            check_name if kmag is not None else "na", f"{kmag:.4f}" if kmag is not None else "na",
            "na" if np.ma.is_masked(row["airmass"]) else f"{row['airmass']:.4f}", "na", "na", notes.replace(",", ";"),
        )  # fmt: skip
        out.write(",".join(fields) + "\n")
        written += 1
    return written


def check_star_candidates(store: Store, target: str) -> list[tuple[int, dict[str, float]]]:
    """Candidate check stars, best first, each with its calibrated magnitude per frame file: the field stars
    measured cleanly in at least 80 % as many frames as the most measured one, nearest in brightness to
    the target first (first aperture)."""
    rows = store.calibrated_star_photometry(target)
    target_mags = [r["inst_mag"] for r in rows if r["star_id"] == 0]
    clean: dict[int, list[tuple[str, float, float]]] = {}
    for r in rows:
        if r["star_id"] > 0 and r["flags"] & ~flags.value("forced_position") == 0:
            clean.setdefault(r["star_id"], []).append((r["file"], r["inst_mag"], r["zp"]))
    if not clean or not target_mags:
        return []
    most = max(len(v) for v in clean.values())
    reference = float(np.median(target_mags))
    candidates = {star: v for star, v in clean.items() if len(v) >= 0.8 * most}
    order = sorted(candidates, key=lambda s: abs(float(np.median([m for _, m, _ in candidates[s]])) - reference))
    return [(star, {file: mag + zp for file, mag, zp in candidates[star]}) for star in order]


def named_check_star(config: Config, store: Store, target: str, table: Table) -> tuple[str, dict[str, float]] | None:
    """The AAVSO check star: the best candidate (:func:`check_star_candidates`) that is a star of the
    target's catalog (in the band of the report's first calibrated point), named by its catalog position
    (:func:`designation`); None without one."""
    bands = [str(band) for band in table["band"][~np.ma.getmaskarray(table["band"])]] if len(table) else []
    reference = store.reference(target)
    catalog = FieldCatalogs(config).get(target, bands[0], None) if bands else None
    if reference is None or reference.wcs is None or catalog is None or not len(catalog):
        return None
    stars = SkyCoord(np.asarray(catalog["ra"], dtype=float), np.asarray(catalog["dec"], dtype=float), unit="deg")
    ids, field_ref = store.field_stars(target)
    row_of = {int(star): row for row, star in enumerate(ids)}
    for star, mags in check_star_candidates(store, target):
        position = reference.sky_of(field_ref[row_of[star]][None, :])
        index, separation, _ = position.match_to_catalog_sky(stars)
        if separation[0].arcsec <= config.catalog.match_radius_arcsec:
            return designation(stars[int(index[0])]), mags
    return None


def designation(position: SkyCoord) -> str:
    """The IAU-style name of a position: ``J`` and its J2000 right ascension and declination, truncated
    (``J083612.34+124532.1``)."""
    ra = position.ra.hms
    sign = "-" if position.dec.deg < 0 else "+"
    dec = abs(position.dec).dms
    seconds_ra = math.floor(ra.s * 100) / 100
    seconds_dec = math.floor(dec.s * 10) / 10
    return f"J{int(ra.h):02d}{int(ra.m):02d}{seconds_ra:05.2f}{sign}{int(dec.d):02d}{int(dec.m):02d}{seconds_dec:04.1f}"


def _ecsv_cell(value: object, masked: bool) -> str:
    if masked or value is None:
        return '""'
    if isinstance(value, str):
        # A control character (a newline in a file name) would end the row: shown as \xNN, as in the logs.
        value = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in value)
        return '"' + value.replace('"', '""') + '"' if (not value or set(value) & {" ", '"', "#"}) else value
    return repr(value)


def write_ecsv(table: Table, out: IO[str]) -> None:
    """ECSV as astropy writes it, but with the rows written directly: astropy's writer needs seconds for a
    light curve of tens of thousands of rows, and the result files are rewritten while frames arrive."""
    header = io.StringIO()
    table[:0].write(header, format="ascii.ecsv")
    out.write(header.getvalue())
    columns = []
    for name in table.colnames:
        column = table[name]
        mask = np.ma.getmaskarray(column).tolist()
        columns.append(zip(np.ma.getdata(column).tolist(), mask, strict=True))
    for cells in zip(*columns, strict=True):
        out.write(" ".join(_ecsv_cell(value, masked) for value, masked in cells))
        out.write("\n")


def write_table(table: Table, out: IO[str], fmt: str) -> None:
    if fmt == "ecsv":
        write_ecsv(table, out)
    else:
        table.write(out, format="ascii.csv", fill_values=[("--", "")])


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``: temporary file in the same folder, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_result_file(table: Table, target: str, state_dir: Path) -> Path:
    """Rewrite ``state_dir/results/<target>.ecsv`` with ``table`` (see :func:`lightcurve_table`)."""
    buffer = io.StringIO()
    write_table(table, buffer, "ecsv")
    path = state_dir / RESULTS_DIR / f"{target}.ecsv"
    write_atomically(path, buffer.getvalue())
    return path


def update_result_file(store: Store, target: str, state_dir: Path) -> Path:
    """Rewrite ``state_dir/results/<target>.ecsv`` from the store."""
    return write_result_file(lightcurve_table(store, target), target, state_dir)
