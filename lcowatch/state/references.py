"""Each target's reference frame, its templates, comparison stars and their reference magnitudes."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import numpy as np

from lcowatch.science.quality import SOURCE_DTYPE
from lcowatch.science.register import IDENTITY, Affine
from lcowatch.science.template import Reference, Template, weighted_centroid

ANY_FILTER = "(? IS NULL OR {column} = ?)"  # bound twice to the filter: None matches every filter
TEMPLATE_ROW = "id, target, filter, sha256, file, score, pinned, nx, ny, wcs_header, from_reference"


def affine_from_text(text: str | None) -> Affine:
    return np.array(json.loads(text), dtype=float).reshape(2, 3) if text else IDENTITY


def affine_to_text(matrix: Affine) -> str:
    return json.dumps([float(v) for v in np.asarray(matrix).ravel()])


class ReferenceRecords:
    """The records that place a target's frames: templates (loaded once each), the reference frame and the
    comparison stars in its pixels, the target's centroids, and the stars' reference magnitudes."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self._templates: dict[tuple[int, bool], Template] = {}

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
                    from_reference=affine_from_text(row["from_reference"]),
                )  # fmt: skip
            templates.append(self._templates[key])
        return templates

    @staticmethod
    def write_template(conn: sqlite3.Connection, template: Template, reason: str, *, active: bool = True) -> None:
        """Make ``template`` the active one for its target and filter (the history stays), or with ``active``
        false add it to the history only (a template its instrument's frames may register to)."""
        if active:
            conn.execute(
                "UPDATE templates SET active = 0 WHERE target = ? AND filter = ?",
                (template.target, template.filter),
            )
        conn.execute(
            "INSERT INTO templates (target, filter, sha256, file, score, pinned, active, created, reason, nx, ny, "
            "wcs_header, from_reference) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                template.target, template.filter, template.sha256, template.file, template.score,
                int(template.pinned), int(active), time.time(), reason, template.shape[1], template.shape[0],
                template.wcs_header or "", affine_to_text(template.from_reference),
            ),
        )  # fmt: skip

    def processed_frame(self, name_or_sha: str, target: str) -> sqlite3.Row:
        """A processed frame of ``target`` (by file name or sha256): its frames row and its ledger path; raises
        ``LookupError`` or ``ValueError`` with the reason when there is none."""
        row = self.conn.execute(
            "SELECT f.sha256, f.file, f.target, f.filter, f.instrument, f.nx, f.ny, f.wcs_header, f.template_score, "
            "files.path FROM frames f JOIN files USING (sha256) WHERE f.sha256 = ? OR f.file = ? "
            "ORDER BY files.state = 'ignored', f.mjd DESC",  # not the part of a file rewritten since
            (name_or_sha, Path(name_or_sha).name),
        ).fetchone()
        if row is None:
            raise LookupError(f"{name_or_sha}: no such processed frame")
        if row["target"] != target:
            raise ValueError(f"{row['file']} belongs to {row['target']}, not {target}")
        return row

    def processed_frame_as_template(self, name_or_sha: str, target: str) -> Template:
        """A processed frame of ``target`` (by file name or sha256) as a pinned template, not yet placed in the
        reference frame; raises ``LookupError`` or ``ValueError`` with the reason when there is none."""
        row = self.processed_frame(name_or_sha, target)
        return Template(
            id=None, target=row["target"], filter=row["filter"], sha256=row["sha256"], file=row["file"],
            score=row["template_score"] if row["template_score"] is not None else float("-inf"), pinned=True,
            shape=(row["ny"], row["nx"]), wcs_header=row["wcs_header"], sources=self.sources(row["sha256"]),
        )  # fmt: skip

    def unpin_template(self, target: str, filter: str | None) -> int:
        """Let better frames replace the current templates again; returns how many were pinned."""
        query = (
            "UPDATE templates SET pinned = 0, reason = reason || '; unpinned by hand' WHERE target = ? AND active = 1 "
            f"AND pinned = 1 AND {ANY_FILTER.format(column='filter')}"
        )
        return self.conn.execute(query, (target, filter, filter)).rowcount  # one statement: atomic

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
            sky_fix=affine_from_text(row["sky_fix"]) if row["sky_fix"] else None,
            target_xy=np.array([row["target_x"], row["target_y"]]), target_origin=row["target_origin"],
        )  # fmt: skip

    @staticmethod
    def write_reference(conn: sqlite3.Connection, reference: Reference) -> None:
        conn.execute(
            "INSERT OR REPLACE INTO reference_frames VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                reference.target, reference.sha256, reference.file, reference.shape[1], reference.shape[0],
                reference.pixscale, reference.wcs_header,
                affine_to_text(reference.sky_fix) if reference.sky_fix is not None else None,
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
            "INSERT INTO star_refs VALUES (?, ?, ?, ?, ?) ON CONFLICT (target, filter, star_id) "
            "DO UPDATE SET ref_mag = excluded.ref_mag, ref_err = excluded.ref_err",
            [(target, filter, star, mag, err) for star, (mag, err) in refs.items()],
        )
