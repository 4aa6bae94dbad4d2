"""The science store: frame metadata, quality and source lists, in the ledger's SQLite file."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import numpy as np

from lcowatch.science.frame import FrameMeta
from lcowatch.science.photometry import Photometry
from lcowatch.science.quality import SOURCE_DTYPE, InstrumentHistory, Quality
from lcowatch.science.register import IDENTITY, Affine
from lcowatch.science.template import Reference, Template, weighted_centroid

ANY_FILTER = "(? IS NULL OR {column} = ?)"  # bound twice to the filter: None matches every filter
TEMPLATE_ROW = "id, target, filter, sha256, file, score, pinned, nx, ny, wcs_header, from_reference"

FRAME_COLUMNS = (
    "file", "target", "filter", "mjd", "exptime", "background", "background_rms",
    "fwhm", "ellipticity", "nstars", "quality", "reasons",
)  # fmt: skip


def _affine(text: str | None) -> Affine:
    return np.array(json.loads(text), dtype=float).reshape(2, 3) if text else IDENTITY


def _affine_text(matrix: Affine) -> str:
    return json.dumps([float(v) for v in np.asarray(matrix).ravel()])


def _nullable(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


class Store:
    """Frames, their quality and source lists, sharing the ledger's connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self._templates: dict[tuple[int, bool], Template] = {}

    @staticmethod
    def write_frame(
        conn: sqlite3.Connection,
        sha256: str,
        path: Path,
        meta: FrameMeta,
        quality: Quality,
        sources: np.ndarray,
        wcs_header: str | None,
        template_score: float,
    ) -> None:
        """Insert one frame's record and source list (inside the caller's transaction).

        ``wcs_header`` (solved frames only) and ``template_score`` let a frame be pinned as the template
        later without reading its image again.
        """
        assert meta.target is not None
        conn.execute("DELETE FROM sources WHERE sha256 = ?", (sha256,))
        conn.execute(
            "INSERT OR REPLACE INTO frames VALUES "
            "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                sha256, path.name, meta.object, meta.target, meta.filter, meta.date_obs, meta.mjd_mid,
                meta.bjd_tdb, meta.exptime, meta.airmass, meta.site, meta.telescope, meta.instrument,
                meta.pixscale, meta.shape[1], meta.shape[0], int(meta.wcs_usable), wcs_header,
                _nullable(template_score), quality.background, quality.background_rms, _nullable(quality.fwhm_arcsec),
                _nullable(quality.fwhm_pix), _nullable(quality.ellipticity), quality.nstars,
                quality.verdict, json.dumps(quality.reasons),
            ),
        )  # fmt: skip
        names = SOURCE_DTYPE.names
        assert names is not None
        rows = (
            (sha256, i, *(None if isinstance(v, float) and np.isnan(v) else v for v in row.tolist()))
            for i, row in enumerate(sources[list(names)])
        )
        conn.executemany(f"INSERT INTO sources VALUES ({', '.join('?' * (len(names) + 2))})", rows)

    @staticmethod
    def forget_results(conn: sqlite3.Connection, sha256: str) -> None:
        """Drop a frame's points, star photometry and template role (inside the caller's transaction)."""
        conn.execute("DELETE FROM points WHERE sha256 = ?", (sha256,))
        conn.execute("DELETE FROM photometry WHERE sha256 = ?", (sha256,))
        conn.execute("UPDATE templates SET active = 0 WHERE sha256 = ?", (sha256,))

    def frames(self, target: str | None = None) -> list[dict[str, object]]:
        """Every frame in observation-time order, with quality; ``reasons`` joined by '; '."""
        query = f"SELECT {', '.join(FRAME_COLUMNS)}, sha256 FROM frames"
        args: tuple[str, ...] = ()
        if target is not None:
            query += " WHERE target = ?"
            args = (target,)
        rows = self.conn.execute(query + " ORDER BY mjd, file", args).fetchall()
        return [dict(row) | {"reasons": "; ".join(json.loads(row["reasons"]))} for row in rows]

    def sources(self, sha256: str) -> np.ndarray:
        """The frame's source list as an array of :data:`~lcowatch.science.quality.SOURCE_DTYPE`."""
        names = SOURCE_DTYPE.names
        assert names is not None
        rows = self.conn.execute(
            f"SELECT {', '.join(names)} FROM sources WHERE sha256 = ? ORDER BY id", (sha256,)
        ).fetchall()
        nan_for_null = [tuple(np.nan if v is None else v for v in row) for row in rows]
        return np.array(nan_for_null, dtype=SOURCE_DTYPE)

    def current_template(self, target: str, filter: str) -> Template | None:
        """The active template of a target and filter, loaded once per template."""
        templates = self.active_templates(target, filter)
        return templates[0] if templates else None

    def active_templates(self, target: str, filter: str | None = None) -> list[Template]:
        """The target's active templates (of one filter, or of every filter), each loaded once."""
        rows = self.conn.execute(
            f"SELECT {TEMPLATE_ROW} FROM templates WHERE target = ? AND active = 1 "
            f"AND {ANY_FILTER.format(column='filter')} ORDER BY id",
            (target, filter, filter),
        ).fetchall()
        return self._load_templates(target, rows)

    def instrument_templates(self, target: str, instrument: str | None, limit: int = 3) -> list[Template]:
        """The target's latest templates, current or replaced, made from frames of ``instrument``: a frame
        matches its own instrument's stars best (pixel scale, depth, field of view)."""
        columns = ", ".join(f"t.{name.strip()}" for name in TEMPLATE_ROW.split(","))
        rows = self.conn.execute(
            f"SELECT {columns} FROM templates t JOIN frames f USING (sha256) WHERE t.target = ? "
            "AND f.instrument IS ? ORDER BY t.id DESC LIMIT ?",
            (target, instrument, limit),
        ).fetchall()
        return self._load_templates(target, rows)

    def _load_templates(self, target: str, rows: list[sqlite3.Row]) -> list[Template]:
        templates = []
        for row in rows:
            key = (row["id"], bool(row["pinned"]))  # unpinning changes the row in place
            if key not in self._templates:
                self._templates[key] = Template(
                    id=row["id"], target=target, filter=row["filter"], sha256=row["sha256"], file=row["file"],
                    score=row["score"], pinned=bool(row["pinned"]), shape=(row["ny"], row["nx"]),
                    wcs_header=row["wcs_header"] or None, sources=self.sources(row["sha256"]),
                    from_reference=_affine(row["from_reference"]),
                )  # fmt: skip
            templates.append(self._templates[key])
        return templates

    @staticmethod
    def write_template(conn: sqlite3.Connection, template: Template, reason: str) -> None:
        """Make ``template`` the active one for its target and filter; the history stays."""
        conn.execute(
            "UPDATE templates SET active = 0 WHERE target = ? AND filter = ?",
            (template.target, template.filter),
        )
        conn.execute(
            "INSERT INTO templates (target, filter, sha256, file, score, pinned, active, created, reason, nx, ny, "
            "wcs_header, from_reference) VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?)",
            (
                template.target, template.filter, template.sha256, template.file, template.score,
                int(template.pinned), time.time(), reason, template.shape[1], template.shape[0],
                template.wcs_header or "", _affine_text(template.from_reference),
            ),
        )  # fmt: skip

    def processed_frame_as_template(self, name_or_sha: str, target: str) -> Template:
        """A processed frame of ``target`` (by file name or sha256) as a pinned template, not yet placed in the
        reference frame; raises ``LookupError`` or ``ValueError`` with the reason when there is none."""
        row = self.conn.execute(
            "SELECT sha256, file, target, filter, nx, ny, wcs_header, template_score FROM frames "
            "WHERE sha256 = ? OR file = ? ORDER BY mjd DESC",
            (name_or_sha, Path(name_or_sha).name),
        ).fetchone()
        if row is None:
            raise LookupError(f"{name_or_sha}: no such processed frame")
        if row["target"] != target:
            raise ValueError(f"{row['file']} belongs to {row['target']}, not {target}")
        return Template(
            id=None, target=row["target"], filter=row["filter"], sha256=row["sha256"], file=row["file"],
            score=row["template_score"] if row["template_score"] is not None else float("-inf"), pinned=True,
            shape=(row["ny"], row["nx"]), wcs_header=row["wcs_header"], sources=self.sources(row["sha256"]),
        )  # fmt: skip

    def unpin_template(self, target: str, filter: str | None) -> int:
        """Let better frames replace the current templates again; returns how many were pinned."""
        query = (
            "UPDATE templates SET pinned = 0 WHERE target = ? AND active = 1 AND pinned = 1 "
            f"AND {ANY_FILTER.format(column='filter')}"
        )
        with self.conn:
            return self.conn.execute(query, (target, filter, filter)).rowcount

    def template_history(self, target: str, filter: str | None = None) -> list[dict[str, object]]:
        query = (
            "SELECT t.filter, t.file, t.score, t.pinned, t.active, t.created, t.reason, f.mjd, f.fwhm, "
            "f.background_rms, f.nstars FROM templates t JOIN frames f USING (sha256) WHERE t.target = ? "
            f"AND {ANY_FILTER.format(column='t.filter')} ORDER BY t.filter, t.id"
        )
        return [dict(row) for row in self.conn.execute(query, (target, filter, filter))]

    def field_stars(self, target: str) -> tuple[np.ndarray, np.ndarray]:
        """(star_id, xy) of the target's comparison stars: ids from 1 (the target is 0), positions (N, 2) in
        the target's reference pixels."""
        rows = self.conn.execute(
            "SELECT star_id, x, y FROM comparison_stars WHERE target = ? ORDER BY star_id", (target,)
        ).fetchall()
        table = np.array([tuple(row) for row in rows], dtype=float).reshape(-1, 3)
        return table[:, 0].astype(int), table[:, 1:]

    @staticmethod
    def write_field_stars(
        conn: sqlite3.Connection, target: str, star_ids: np.ndarray, xy: np.ndarray, origin: str
    ) -> None:
        conn.executemany(
            "INSERT OR IGNORE INTO comparison_stars VALUES (?, ?, ?, ?, ?)",
            [(target, int(i), float(x), float(y), origin) for i, (x, y) in zip(star_ids, xy, strict=True)],
        )

    def reference(self, target: str) -> Reference | None:
        """The target's reference pixel frame, or None before its first template."""
        row = self.conn.execute("SELECT * FROM reference_frames WHERE target = ?", (target,)).fetchone()
        if row is None:
            return None
        return Reference(
            target=target, sha256=row["sha256"], file=row["file"], shape=(row["ny"], row["nx"]),
            pixscale=row["pixscale"], wcs_header=row["wcs_header"],
            sky_fix=_affine(row["sky_fix"]) if row["sky_fix"] else None,
            target_xy=np.array([row["target_x"], row["target_y"]]), target_origin=row["target_origin"],
        )  # fmt: skip

    @staticmethod
    def write_reference(conn: sqlite3.Connection, reference: Reference) -> None:
        conn.execute(
            "INSERT OR REPLACE INTO reference_frames VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                reference.target, reference.sha256, reference.file, reference.shape[1], reference.shape[0],
                reference.pixscale, reference.wcs_header,
                _affine_text(reference.sky_fix) if reference.sky_fix is not None else None,
                float(reference.target_xy[0]), float(reference.target_xy[1]), reference.target_origin, time.time(),
            ),
        )  # fmt: skip

    @staticmethod
    def add_target_centroid(conn: sqlite3.Connection, target: str, sha256: str, xy: np.ndarray, snr: float) -> None:
        """Record a bright epoch's centroid of the target (reference pixels) and move the target's
        reference position to the S/N-weighted mean of all of them."""
        conn.execute(
            "INSERT OR REPLACE INTO target_centroids VALUES (?, ?, ?, ?, ?)",
            (target, sha256, float(xy[0]), float(xy[1]), float(snr)),
        )
        rows = np.array(conn.execute("SELECT x, y, snr FROM target_centroids WHERE target = ?", (target,)).fetchall())
        x, y = weighted_centroid(rows[:, :2], rows[:, 2])
        conn.execute(
            "UPDATE reference_frames SET target_x = ?, target_y = ?, target_origin = ? WHERE target = ?",
            (float(x), float(y), "centroids", target),
        )

    @staticmethod
    def calibrated_points_near(conn: sqlite3.Connection, target: str, mjd: float, days: float) -> list[sqlite3.Row]:
        """The target's calibrated, detected points within ``days`` of ``mjd``, every filter and aperture."""
        return conn.execute(
            "SELECT p.sha256, p.aperture, p.filter, p.band, p.mag, p.mag_err, p.color, p.color_term, "
            "p.comparison_color, p.flags, f.mjd FROM points p JOIN frames f USING (sha256) "
            "WHERE p.target = ? AND p.mag IS NOT NULL AND f.mjd BETWEEN ? AND ?",
            (target, mjd - days, mjd + days),
        ).fetchall()

    @staticmethod
    def set_point_colour(
        conn: sqlite3.Connection,
        sha256: str,
        aperture: int,
        mag: float,
        mag_err: float,
        color: float,
        point_flags: int,
    ) -> None:
        conn.execute(
            "UPDATE points SET mag = ?, mag_err = ?, color = ?, flags = ? WHERE sha256 = ? AND aperture = ?",
            (mag, mag_err, color, point_flags, sha256, aperture),
        )

    def instrument_history(self, target: str, instrument: str | None) -> InstrumentHistory | None:
        """Median FWHM and star count of the target's good frames from one instrument."""
        rows = self.conn.execute(
            "SELECT f.fwhm, f.nstars FROM frames f JOIN files USING (sha256) WHERE f.target = ? AND "
            "f.instrument IS ? AND f.quality = 'good' AND files.state = 'done' AND f.fwhm IS NOT NULL",
            (target, instrument),
        ).fetchall()
        if not rows:
            return None
        values = np.array([tuple(row) for row in rows], dtype=float)
        return InstrumentHistory(float(np.median(values[:, 0])), float(np.median(values[:, 1])), len(rows))

    def reference_instrument(self, target: str, filter: str) -> str | None:
        """The instrument of the frame that set the reference magnitudes: the first template."""
        row = self.conn.execute(
            "SELECT f.instrument FROM templates t JOIN frames f USING (sha256) WHERE t.target = ? AND t.filter = ? "
            "ORDER BY t.id LIMIT 1",
            (target, filter),
        ).fetchone()
        return row[0] if row else None

    def star_refs(self, target: str, filter: str) -> dict[int, tuple[float, float]]:
        """Reference (magnitude, error) of the comparison stars in a filter, by star id."""
        rows = self.conn.execute(
            "SELECT star_id, ref_mag, ref_err FROM star_refs WHERE target = ? AND filter = ?", (target, filter)
        ).fetchall()
        return {row["star_id"]: (row["ref_mag"], row["ref_err"] or 0.0) for row in rows}

    @staticmethod
    def write_star_refs(
        conn: sqlite3.Connection, target: str, filter: str, refs: dict[int, tuple[float, float]]
    ) -> None:
        conn.executemany(
            "INSERT OR IGNORE INTO star_refs VALUES (?, ?, ?, ?, ?)",
            [(target, filter, star, mag, err) for star, (mag, err) in refs.items()],
        )

    @staticmethod
    def write_photometry(conn: sqlite3.Connection, sha256: str, star_ids: np.ndarray, phot: Photometry) -> None:
        conn.execute("DELETE FROM photometry WHERE sha256 = ?", (sha256,))
        rows = [
            (
                sha256, int(star), k, _nullable(phot.x[i]), _nullable(phot.y[i]), float(phot.radii[k]),
                _nullable(phot.flux[i, k]), _nullable(phot.flux_err[i, k]), _nullable(phot.inst_mag[i, k]),
                _nullable(phot.inst_err[i, k]), _nullable(phot.background[i]), int(phot.flags[i, k]),
            )
            for i, star in enumerate(star_ids)
            for k in range(len(phot.radii))
        ]  # fmt: skip
        conn.executemany(f"INSERT INTO photometry VALUES ({', '.join('?' * 12)})", rows)

    @staticmethod
    def write_points(conn: sqlite3.Connection, points: list[dict[str, object]]) -> None:
        if not points:
            return
        conn.execute("DELETE FROM points WHERE sha256 = ?", (points[0]["sha256"],))
        columns = list(points[0])
        conn.executemany(
            f"INSERT INTO points ({', '.join(columns)}) VALUES ({', '.join(':' + c for c in columns)})",
            points,
        )

    def lightcurve(self, target: str, filter: str | None = None) -> list[dict[str, object]]:
        """The target's points joined with their frames, in time order, one row per frame and aperture."""
        query = (
            "SELECT f.file, f.mjd, f.bjd_tdb, p.filter, p.mag, p.mag_err, p.zp, p.zp_err, f.fwhm, f.airmass, "
            "p.flags, p.diff_mag, p.diff_mag_err, p.aperture_text AS aperture, p.x, p.y, p.registration_rms, "
            "p.flux, p.flux_err, p.snr, p.limit_mag, p.color, p.color_term, "
            "p.template, p.band, p.n_comparison, p.n_matched, f.exptime, f.sha256 "
            "FROM points p JOIN frames f USING (sha256) WHERE p.target = ? "
            f"AND {ANY_FILTER.format(column='p.filter')} ORDER BY f.mjd, f.file, p.aperture"
        )
        return [dict(row) for row in self.conn.execute(query, (target, filter, filter))]

    def photometry_arrays(
        self, sha256: str, star_ids: np.ndarray, apertures: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A frame's stored (inst_mag, inst_err, flags), each (N, K), rows in ``star_ids`` order."""
        row_of = {int(star): i for i, star in enumerate(star_ids)}
        inst_mag = np.full((len(star_ids), apertures), np.nan)
        inst_err = np.full_like(inst_mag, np.nan)
        star_flags = np.zeros(inst_mag.shape, dtype=np.int64)
        query = "SELECT star_id, aperture, inst_mag, inst_err, flags FROM photometry WHERE sha256 = ?"
        for star, k, mag, err, mask in self.conn.execute(query, (sha256,)):
            if star in row_of and k < apertures:
                i = row_of[star]
                inst_mag[i, k] = np.nan if mag is None else mag
                inst_err[i, k] = np.nan if err is None else err
                star_flags[i, k] = mask
        return inst_mag, inst_err, star_flags

    @staticmethod
    def update_points(conn: sqlite3.Connection, sha256: str, columns: list[dict[str, object]]) -> None:
        """Replace calibration columns of a frame's points, one dict per aperture (inside the caller's
        transaction)."""
        for k, values in enumerate(columns):
            assignments = ", ".join(f"{name} = :{name}" for name in values)
            conn.execute(
                f"UPDATE points SET {assignments} WHERE sha256 = :sha256 AND aperture = :aperture",
                {**values, "sha256": sha256, "aperture": k},
            )

    def point_rows(self, sha256: str) -> list[sqlite3.Row]:
        """A frame's stored points, by aperture."""
        return self.conn.execute("SELECT * FROM points WHERE sha256 = ? ORDER BY aperture", (sha256,)).fetchall()

    def done_frames(self, target: str) -> list[sqlite3.Row]:
        """The target's frames that gave points, in time order."""
        return self.conn.execute(
            "SELECT f.sha256, f.filter, f.instrument, f.mjd FROM frames f JOIN files USING (sha256) "
            "WHERE f.target = ? AND files.state = 'done' ORDER BY f.mjd",
            (target,),
        ).fetchall()
