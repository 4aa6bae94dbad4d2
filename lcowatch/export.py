"""Light curves out of the store: tables for ``lcowatch export`` and the per-target result files.

The per-target ECSV under ``state_dir/results/`` is rewritten atomically (temporary file, fsync, rename)
so a reader never sees half a file.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import IO

import astropy.units as u
from astropy.table import MaskedColumn, Table

from lcowatch import __version__, flags
from lcowatch.store import Store

RESULTS_DIR = "results"

LIGHTCURVE_COLUMNS: dict[str, tuple[str, u.UnitBase | None, str]] = {
    "file": ("str", None, "frame file name"),
    "mjd": ("f8", u.day, "MJD (UTC) at mid-exposure"),
    "bjd_tdb": ("f8", u.day, "BJD (TDB) at mid-exposure, at the target"),
    "filter": ("str", None, "LCO filter"),
    "band": ("str", None, "standard band the magnitude is calibrated to"),
    "mag": ("f8", u.mag, "calibrated standard magnitude (empty when not calibrated)"),
    "mag_err": ("f8", u.mag, "photometric and zero-point errors combined"),
    "zp": ("f8", u.mag, "zero point: mag = zp + m_inst"),
    "zp_err": ("f8", u.mag, "zero-point error"),
    "diff_mag": ("f8", u.mag, "differential magnitude against the comparison ensemble"),
    "diff_mag_err": ("f8", u.mag, "error of diff_mag"),
    "aperture": ("str", None, "aperture radius (multiple of FWHM or arcsec)"),
    "fwhm": ("f8", u.arcsec, "frame FWHM"),
    "airmass": ("f8", None, "airmass"),
    "x": ("f8", u.pix, "target x, 0-based"),
    "y": ("f8", u.pix, "target y, 0-based"),
    "registration_rms": ("f8", u.pix, "residual RMS of the registration"),
    "n_comparison": ("i8", None, "comparison stars used"),
    "template": ("str", None, "template frame"),
    "flags": ("i8", None, "quality-flag bits (see flag_names)"),
    "flag_names": ("str", None, "names of the flags set"),
}


def lightcurve_table(store: Store, target: str, filter: str | None = None) -> Table:
    """The target's light curve, one row per frame and aperture, in time order, with units."""
    rows = store.lightcurve(target, filter)
    for row in rows:
        row["flag_names"] = flags.describe(int(row["flags"]))  # type: ignore[call-overload]
    table = Table()
    for name, (dtype, unit, description) in LIGHTCURVE_COLUMNS.items():
        values = [row.get(name) for row in rows]
        missing = [v is None for v in values]
        if dtype == "str":
            table[name] = MaskedColumn(
                ["" if v is None else str(v) for v in values], dtype=str, description=description
            )
        else:
            filled = [0 if v is None else v for v in values]
            table[name] = MaskedColumn(filled, dtype=dtype, mask=missing, unit=unit, description=description)
    table.meta.update(
        {
            "target": target,
            "filter": filter or "all",
            "software": f"lcowatch {__version__}",
            "flags": {flag.name: f"bit {flag.bit}: {flag.description}" for flag in flags.FLAGS},
        }
    )
    return table


def write_table(table: Table, out: IO[str], fmt: str) -> None:
    if fmt == "ecsv":
        table.write(out, format="ascii.ecsv")
    else:
        table.write(out, format="ascii.csv", fill_values=[("--", "")])  # type: ignore[arg-type]


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``: temporary file in the same folder, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def update_result_file(store: Store, target: str, state_dir: Path) -> Path:
    """Rewrite ``state_dir/results/<target>.ecsv`` from the store."""
    buffer = io.StringIO()
    write_table(lightcurve_table(store, target), buffer, "ecsv")
    path = state_dir / RESULTS_DIR / f"{target}.ecsv"
    write_atomically(path, buffer.getvalue())
    return path
