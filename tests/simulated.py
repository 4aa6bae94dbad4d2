"""Simulated observing campaigns shared by the tests: frames with known truth, processed once."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from conftest import write_config
from lcowatch.cli import main
from lcowatch.pipeline.stages import ENSEMBLE_MAX_ERROR, ENSEMBLE_PRECISE_STARS
from lcowatch.science.photometry import comparison_mask
from lcowatch.simulation.simulate import (
    DEFAULT_SEEING,
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
#: Rows per compression tile of the constant-star campaign's frames: 64 halves the time to write and read
#: them (the readers' row-tile path is exercised by every other simulated frame and the real ones). The
#: hazard campaign keeps LCO's row tiles: its V2 differential median (0.0074-0.0083 against a bar of 0.008)
#: moves with the quantisation noise a change of tiles brings.
TILE_ROWS = 64


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
    targets["SN2026A"]["aavso_name"] = "SN 2026A"
    config = write_config(folder, targets, catalog={"source": "file"}, aavso_obscode="TST01")
    assert main(["process", "--config", str(config), str(incoming)]) == 0
    return Campaign(folder, config, fields, truth)


#: Colour terms of the two simulated telescopes (the simulator's convention: flux from mag + term * colour;
#: a calibration recovers minus these, which is what the config is given).
ONE_METRE_TERMS = {"rp": 0.03, "gp": -0.05, "ip": 0.02}
SBIG_TERMS = {"rp": -0.08, "gp": 0.10, "ip": 0.06}


def build_hazard_campaign(folder: Path, *, nights: int = 10) -> Campaign:
    """The hazards of real LCO data, processed once.

    - SN2026H, red (g - r = 1.4) and fading 0.45 mag a day from r = 16 (below detection by the last
      nights), in rp and gp from a 1 m Sinistro (0.389"/pix) and a 0.4 m SBIG (0.571"/pix, 2 mag less
      light, 2.5-5" seeing, 3x the sky, other colour terms); every header WCS off by 0.5-5", differently
      per frame, with a little distortion;
    - V2, a variable in rp and ip from the 1 m, where every ip frame's WCS failed (WCSERR=4);
    - V3, a bright red variable (r = 13, g - r = 1.0) in rp from both telescopes and in gp from the 1 m:
      the colour terms put the 0.4 m's magnitudes on the 1 m's scale, or the other way round.
    Seeing varies from night to night, the middle night is clearly the best of each series (the 1 m's frames
    of V2 and V3, low in the sky, are otherwise all at the 3" clip), and the nights are processed one after
    the other, so templates change in every filter. Cosmic rays hit every frame and no mask marks them.
    """
    fields = {
        "SN2026H": make_field(
            "SN2026H", 150.0, 2.0, nstars=FIELD_STARS, radius_arcmin=FIELD_RADIUS_ARCMIN, seed=31,
            min_sep_arcsec=15.0, target_mag=16.0, target_gr=1.4, fade_rate=0.45, epoch=61000.0,
        ),
        "V2": field_for("V2", 210.0, -20.0, 32),
        "V3": make_field(
            "V3", 300.0, 30.0, nstars=FIELD_STARS, radius_arcmin=FIELD_RADIUS_ARCMIN, seed=33, min_sep_arcsec=15.0,
            target_mag=13.0, target_gr=1.0,
        ),
    }  # fmt: skip
    incoming = folder / "in"
    common: dict[str, Any] = {"nights": nights, "frames_per_night": 2, "shape": SHAPE, "wcs_jitter": (0.5, 5.0)}
    one_metre = {"site": "cpt", "distortion_pix": 0.5}
    sbig = {
        "site": "coj", "telescope": "0m4-14", "instrument": "kb29", "pixscale": 0.571, "zeropoint_offset": -2.0,
        "seeing": (2.5, 5.0), "sky_scale": 3.0,
    }  # fmt: skip
    plan = [
        ("SN2026H", "rp", one_metre, ONE_METRE_TERMS, {}), ("SN2026H", "gp", one_metre, ONE_METRE_TERMS, {}),
        ("SN2026H", "rp", sbig, SBIG_TERMS, {}), ("SN2026H", "gp", sbig, SBIG_TERMS, {}),
        ("V2", "rp", one_metre, ONE_METRE_TERMS, {}), ("V2", "ip", one_metre, ONE_METRE_TERMS, {"wcs_error": True}),
        ("V3", "rp", one_metre, ONE_METRE_TERMS, {}), ("V3", "rp", sbig, SBIG_TERMS, {}),
        ("V3", "gp", one_metre, ONE_METRE_TERMS, {}),
    ]  # fmt: skip
    series = []
    for number, (name, filter, telescope, terms, extra) in enumerate(plan):
        # One series per filter and telescope, so that each carries its own colour term and file names.
        best_night = {nights // 2: 0.8 * telescope.get("seeing", DEFAULT_SEEING)[0]}
        series += simulate_series(
            fields[name], incoming, filters=(filter,), seed=41 + number, first_frame_number=100 * (number + 1),
            color_term=terms[filter], seeing_of_night=best_night, **telescope, **extra, **common,
        )  # fmt: skip
    truth = {path.name: (spec, frame_truth) for path, spec, frame_truth in series}
    targets: dict[str, dict[str, object]] = {}
    for name, field in fields.items():
        write_refcat(field, folder / f"{name}.csv", bands=("g", "r", "i", "z"))
        targets[name] = {"ra": field.ra, "dec": field.dec, "refcat": f"{name}.csv"}
    terms = {f"fa06:{f}": -t for f, t in ONE_METRE_TERMS.items()} | {f"kb29:{f}": -t for f, t in SBIG_TERMS.items()}
    config = write_config(folder, targets, catalog={"source": "file", "color_terms": terms})
    # Night by night, as the daemon meets them: a better night changes the template of a filter.
    nights: dict[str, list[str]] = {}
    for path, *_ in series:
        nights.setdefault(path.name.split("-")[2], []).append(str(path))
    for night in sorted(nights):
        assert main(["process", "--config", str(config), *nights[night]]) == 0
    return Campaign(folder, config, fields, truth)


def build_constant_campaign(folder: Path, *, frames: int = 48) -> Campaign:
    """Two constant fields from the 1 m, one under a dark sky and one under 8x the sky (moonlight): every
    star's scatter is noise alone, so it measures how honest the errors are."""
    fields = {
        "DARK": make_field("DARK", 30.0, 10.0, nstars=FIELD_STARS, radius_arcmin=FIELD_RADIUS_ARCMIN, seed=51,
                           min_sep_arcsec=15.0, amplitude=0.0),
        "BRIGHT": make_field("BRIGHT", 60.0, 10.0, nstars=FIELD_STARS, radius_arcmin=FIELD_RADIUS_ARCMIN, seed=52,
                             min_sep_arcsec=15.0, amplitude=0.0),
    }  # fmt: skip
    incoming = folder / "in"
    series = []
    for number, (name, sky_scale) in enumerate([("DARK", 1.0), ("BRIGHT", 8.0)]):
        series += simulate_series(
            fields[name], incoming, nights=frames // 2, frames_per_night=2, shape=SHAPE, seed=61 + number,
            sky_scale=sky_scale, first_frame_number=100 * (number + 1), tile_rows=TILE_ROWS,
        )  # fmt: skip
    truth = {path.name: (spec, frame_truth) for path, spec, frame_truth in series}
    targets: dict[str, dict[str, object]] = {name: {"ra": f.ra, "dec": f.dec} for name, f in fields.items()}
    config = write_config(folder, targets)
    assert main(["process", "--config", str(config), str(incoming)]) == 0
    return Campaign(folder, config, fields, truth)


def isolated_star_residuals(
    campaign: Campaign, target: str, *, clear_fwhm: float = 3.0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per star of a target's field outside the ensemble (the target too): its magnitudes on the target's
    diff_mag scale, frame by frame, and their errors as the target's are made (own error and ensemble offset
    error).

    A frame's measurement counts when, in that frame's truth, no other star brighter than 4 mag fainter than
    it lies within ``clear_fwhm`` FWHM: the light of an unresolved neighbour changes with the seeing. Stars
    the ensemble may use (measured to ``ENSEMBLE_MAX_ERROR`` in any frame) are left out: the offset follows
    them, so their scatter about it is smaller than their errors by an amount that depends on the fit. So are
    frames with fewer than ``ENSEMBLE_PRECISE_STARS`` such stars, whose ensembles take every comparison star.
    """
    per_star: dict[int, list[tuple[float, float]]] = {}
    in_ensemble: set[int] = set()
    with campaign.connect() as conn:
        for point in campaign.points(target, "rp"):
            if point["diff_mag"] is None:
                continue
            truth = campaign.truth[point["file"]][1]
            rows = conn.execute(
                "SELECT star_id, x, y, inst_mag, inst_err, flags FROM photometry WHERE sha256 = ? AND aperture = 0",
                (point["sha256"],),
            ).fetchall()
            field = [r for r in rows if r["star_id"] != 0]
            mags, errors, star_flags = (
                np.array([r[c] for r in field], dtype=float) for c in ("inst_mag", "inst_err", "flags")
            )
            comparison = comparison_mask(mags, errors, star_flags.astype(np.int64))
            if np.sum(comparison & (errors <= ENSEMBLE_MAX_ERROR)) < ENSEMBLE_PRECISE_STARS:
                continue  # the ensemble took every comparison star: which of them weigh in it is not known
            target_row = next(r for r in rows if r["star_id"] == 0)
            offset = point["diff_mag"] - target_row["inst_mag"]
            offset_err = np.sqrt(max(point["diff_mag_err"] ** 2 - target_row["inst_err"] ** 2, 0.0))
            for row in rows:
                if row["inst_mag"] is None:
                    continue
                if row["star_id"] != 0 and row["inst_err"] <= ENSEMBLE_MAX_ERROR:
                    in_ensemble.add(row["star_id"])
                distance = np.hypot(truth.x - row["x"], truth.y - row["y"])
                star = int(np.argmin(distance))
                crowd = (distance < clear_fwhm * truth.fwhm_pix) & (truth.mag < truth.mag[star] + 4.0)
                if row["flags"] or distance[star] > 1.0 or crowd.sum() > 1:
                    continue
                per_star.setdefault(row["star_id"], []).append(
                    (row["inst_mag"] + offset, float(np.hypot(row["inst_err"], offset_err)))
                )
    return [
        (np.array([m for m, _ in values]), np.array([e for _, e in values]))
        for star, values in per_star.items()
        if star not in in_ensemble and len(values) > 1
    ]
