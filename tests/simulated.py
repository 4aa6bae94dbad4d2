"""Simulated observing campaigns shared by the tests: frames with known truth, processed once."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from conftest import write_config
from lcowatch.cli import main
from lcowatch.simulate import (
    Field,
    FrameSpec,
    FrameTruth,
    lco_filename,
    make_field,
    simulate_series,
    write_frame,
    write_refcat,
)

FIELD_STARS = 1000
FIELD_RADIUS_ARCMIN = 4.0
SHAPE = (512, 512)


@dataclass
class Campaign:
    """A processed series: its config, its frames' truth by file name, and the store."""

    folder: Path
    config: Path
    fields: dict[str, Field]
    truth: dict[str, tuple[FrameSpec, FrameTruth]]

    def connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.folder / "state" / "lcowatch.sqlite")
        conn.row_factory = sqlite3.Row
        return conn

    def points(self, target: str, filter: str, aperture: int = 0) -> list[sqlite3.Row]:
        with self.connect() as conn:
            return conn.execute(
                "SELECT f.file, f.mjd, p.* FROM points p JOIN frames f USING (sha256) "
                "WHERE p.target = ? AND p.filter = ? AND p.aperture = ? ORDER BY f.mjd",
                (target, filter, aperture),
            ).fetchall()

    def calibrated(self, target: str, filter: str) -> tuple[np.ndarray, np.ndarray, list[sqlite3.Row]]:
        """Calibrated mag - true magnitude and mag_err of the target's clean points."""
        rows = [r for r in self.points(target, filter) if _clean(r["flags"])]
        delta = np.array([r["mag"] - self.truth[r["file"]][1].mag[0] for r in rows])
        return delta, np.array([r["mag_err"] for r in rows]), rows

    def residuals(self, target: str, filter: str, *, clean: bool = True) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """diff_mag - true magnitude (its median removed), errors and file names of the target's points."""
        rows = [r for r in self.points(target, filter) if not clean or _clean(r["flags"])]
        delta = np.array([r["diff_mag"] - self.truth[r["file"]][1].mag[0] for r in rows])
        error = np.array([r["diff_mag_err"] for r in rows])
        return delta - np.median(delta), error, [r["file"] for r in rows]


def _clean(mask: int) -> bool:
    from lcowatch import flags

    return mask & ~flags.value("uncalibrated", "forced_position") == 0


def field_for(name: str, ra: float, dec: float, seed: int) -> Field:
    # The target is kept clear of neighbours, whose wings would change its aperture flux with the seeing.
    return make_field(
        name, ra, dec, nstars=FIELD_STARS, radius_arcmin=FIELD_RADIUS_ARCMIN, seed=seed, min_sep_arcsec=15.0
    )


def add_frame(folder: Path, field: Field, base: FrameSpec, truth: dict, **changes: object) -> str:
    spec = replace(base, **changes)  # type: ignore[arg-type]
    name = lco_filename(spec, "fz")
    truth[name] = (spec, write_frame(folder / name, field, spec, compress="fz"))
    return name


def build_campaign(folder: Path) -> Campaign:
    """Two targets, two filters for the first, several nights, pointing offsets and small rotations, one
    frame whose header WCS is off by arcminutes (WCSERR=4), one cloudy frame; all processed once."""
    fields = {"SN2026A": field_for("SN2026A", 150.0, 2.0, 11), "V1": field_for("V1", 210.0, -20.0, 12)}
    truth: dict[str, tuple[FrameSpec, FrameTruth]] = {}
    incoming = folder / "in"
    series = simulate_series(
        fields["SN2026A"], incoming, nights=2, frames_per_night=4, filters=("rp", "gp"), shape=SHAPE, seed=5
    )
    series += simulate_series(fields["V1"], incoming, nights=2, frames_per_night=3, shape=SHAPE, seed=6, site="lsc")
    truth.update({path.name: (spec, frame_truth) for path, spec, frame_truth in series})
    base = series[2][1]
    add_frame(
        incoming, fields["SN2026A"], base, truth, wcs_error=True, frame_number=901, mjd_start=base.mjd_start + 0.01
    )
    add_frame(
        incoming, fields["SN2026A"], base, truth, transparency=0.12, frame_number=902, mjd_start=base.mjd_start + 0.02
    )
    targets: dict[str, dict[str, object]] = {name: {"ra": field.ra, "dec": field.dec} for name, field in fields.items()}
    # Only SN2026A has a reference catalog: V1 shows the uncalibrated path, and recalibration later.
    write_refcat(fields["SN2026A"], folder / "sn2026a-stars.csv")
    targets["SN2026A"]["refcat"] = "sn2026a-stars.csv"
    config = write_config(folder, targets, catalog={"source": "file"})
    assert main(["process", "--config", str(config), str(incoming)]) == 0
    return Campaign(folder, config, fields, truth)
