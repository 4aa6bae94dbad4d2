"""The science store: frame metadata, quality and source lists, in the ledger's SQLite file."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, NotRequired, TypedDict

import numpy as np

from lcowatch import flags
from lcowatch.log import display_name
from lcowatch.science.frame import FrameMeta
from lcowatch.science.quality import SOURCE_DTYPE, InstrumentHistory, Quality
from lcowatch.state.ledger import path_text
from lcowatch.state.references import ANY_FILTER, ReferenceRecords

if TYPE_CHECKING:  # photometry pulls in scipy.ndimage, which commands that only read the store do not need
    from lcowatch.science.photometry import Photometry

FRAME_COLUMNS = (
    "file", "state", "target", "filter", "mjd", "exptime", "background", "background_rms",
    "fwhm", "ellipticity", "nstars", "quality", "reasons",
)  # fmt: skip


def _nullable(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


class CalibrationColumns(TypedDict, total=False):
    """The points-table columns a calibration sets (see :func:`lcowatch.pipeline.stages.calibration_columns`)."""

    mag: float | None
    mag_err: float | None
    zp: float | None
    zp_err: float | None
    color_term: float | None
    zp_nstars: int | None
    zp_scatter: float | None
    catalog: str | None
    band: str | None
    color: float | None
    comparison_color: float | None
    limit_mag: float | None
    flags: int


class PointRecord(TypedDict):
    """One row of the points table: a frame's measurement of its target through one aperture (magnitudes
    in mag, fluxes in e-/s, positions in 0-based frame pixels). Calibration columns come later."""

    sha256: str
    aperture: int
    aperture_text: str
    target: str
    filter: str
    x: float
    y: float
    diff_mag: float | None
    diff_mag_err: float | None
    flux: float | None
    flux_err: float | None
    snr: float | None
    limit_mag: float | None
    ensemble_scatter: float | None
    diff_color_term: float
    n_comparison: int
    registration_rms: float
    n_matched: int
    template: str
    reference: str | None  # the reference image subtracted (method: difference), else None
    flags: int
    mag: NotRequired[float | None]
    mag_err: NotRequired[float | None]
    zp: NotRequired[float | None]
    zp_err: NotRequired[float | None]
    color_term: NotRequired[float | None]
    zp_nstars: NotRequired[int | None]
    zp_scatter: NotRequired[float | None]
    catalog: NotRequired[str | None]
    band: NotRequired[str | None]
    color: NotRequired[float | None]
    comparison_color: NotRequired[float | None]


class ColourColumns(TypedDict):
    """The points-table columns the target's colour changes."""

    mag: float
    mag_err: float
    diff_mag: float | None
    diff_mag_err: float | None
    color: float
    color_err: float | None
    flags: int


class Store(ReferenceRecords):
    """Frames, their quality, photometry and points, and (from :class:`ReferenceRecords`) each target's
    reference frame, templates and comparison stars; sharing the ledger's connection."""

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
                sha256, display_name(path.name), meta.object, meta.target, meta.filter, meta.date_obs, meta.mjd_mid,
                meta.bjd_tdb, meta.exptime, meta.airmass, meta.site, meta.telescope, meta.instrument,
                meta.pixscale, meta.shape[1], meta.shape[0], int(meta.wcs_usable), wcs_header,
                _nullable(template_score), quality.background, quality.background_rms, _nullable(quality.fwhm_arcsec),
                _nullable(quality.fwhm_pix), _nullable(quality.ellipticity), quality.nstars,
                quality.verdict, json.dumps(quality.reasons),
            ),
        )  # fmt: skip
        names = SOURCE_DTYPE.names
        assert names is not None
        # SQLite stores a bound NaN as NULL, which sources() reads back as NaN. One tolist() for the whole
        # array: row by row, with a NaN test per value, it took 0.035 s for 2,500 sources.
        rows = [(sha256, i, *row) for i, row in enumerate(sources[list(names)].tolist())]
        conn.executemany(f"INSERT INTO sources VALUES ({', '.join('?' * (len(names) + 2))})", rows)

    @staticmethod
    def forget_results(conn: sqlite3.Connection, sha256: str) -> None:
        """Drop a frame's points, star photometry and template role (inside the caller's transaction)."""
        Store.forget_measurements(conn, sha256)
        conn.execute("UPDATE templates SET active = 0 WHERE sha256 = ?", (sha256,))

    @staticmethod
    def forget_measurements(conn: sqlite3.Connection, sha256: str) -> None:
        """Drop a frame's points, star photometry and target centroid (inside the caller's transaction); what
        it set up for its target (template, reference frame, field stars) stays."""
        conn.execute("DELETE FROM points WHERE sha256 = ?", (sha256,))
        conn.execute("DELETE FROM photometry WHERE sha256 = ?", (sha256,))
        conn.execute("DELETE FROM target_centroids WHERE sha256 = ?", (sha256,))

    def frames(self, target: str | None = None, state: str | None = None) -> list[dict[str, object]]:
        """Every file the ledger knows, in observation-time order: its state, and for those measured their
        quality. ``reasons`` joins the quality notes and the ledger's reason (rejection, quarantine, ...)."""
        measured = ", ".join(f"f.{c}" for c in FRAME_COLUMNS if c not in ("file", "state", "target", "filter", "mjd"))
        rows = self.conn.execute(
            f"SELECT fi.path, fi.state, fi.error, COALESCE(f.target, fi.target) AS target, "
            f"COALESCE(f.filter, fi.filter) AS filter, COALESCE(f.mjd, fi.mjd) AS mjd, f.file, {measured}, "
            "fi.sha256 FROM files fi LEFT JOIN frames f USING (sha256) "
            "WHERE (? IS NULL OR COALESCE(f.target, fi.target) = ?) AND (? IS NULL OR fi.state = ?) "
            "ORDER BY COALESCE(f.mjd, fi.mjd), fi.path",
            (target, target, state, state),
        ).fetchall()
        out = []
        for row in rows:
            notes = json.loads(row["reasons"]) if row["reasons"] else []
            record = dict(row) | {"file": row["file"] or display_name(Path(path_text(row["path"])).name)}
            record["reasons"] = "; ".join([*notes, *([row["error"]] if row["error"] else [])])
            out.append(record)
        return out

    @staticmethod
    def calibrated_points_near(conn: sqlite3.Connection, target: str, mjd: float, days: float) -> list[sqlite3.Row]:
        """The target's calibrated, detected points within ``days`` of ``mjd``, every filter and aperture.

        The frames are found first, on the (target, filter, mjd) index: left to itself, SQLite read every
        point of the target (30 ms per frame once its light curve held 10,000 frames, against 1 ms).
        """
        return conn.execute(
            "SELECT p.sha256, p.aperture, p.filter, p.band, p.mag, p.mag_err, p.color, p.color_term, "
            "p.comparison_color, p.color_err, p.diff_mag, p.diff_mag_err, p.diff_color_term, p.flags, f.mjd "
            "FROM frames f CROSS JOIN points p ON p.sha256 = f.sha256 "
            "WHERE f.target = ? AND f.mjd BETWEEN ? AND ? AND p.mag IS NOT NULL",
            (target, mjd - days, mjd + days),
        ).fetchall()

    @staticmethod
    def stand_in_colours(conn: sqlite3.Connection, target: str) -> list[sqlite3.Row]:
        """Band, time (MJD), colour and its error (mag) of the target's points at aperture 0 whose colour is a
        stand-in, in time order."""
        return conn.execute(
            "SELECT p.band, f.mjd, p.color, p.color_err FROM points p JOIN frames f USING (sha256) "
            "WHERE p.target = ? AND p.aperture = 0 AND p.mag IS NOT NULL AND p.flags & ? != 0 ORDER BY f.mjd",
            (target, flags.value("color_assumed")),
        ).fetchall()

    def measured_colours(self, target: str, band: str | None) -> np.ndarray:
        """The target's colours measured in the same visit, over the points in ``band``."""
        rows = self.conn.execute(
            "SELECT color FROM points WHERE target = ? AND band IS ? AND aperture = 0 AND color IS NOT NULL "
            "AND color_err IS NOT NULL AND mag IS NOT NULL AND flags & ? = 0",
            (target, band, flags.value("color_assumed")),
        ).fetchall()
        return np.array([row[0] for row in rows], dtype=float)

    @staticmethod
    def set_point_colour(conn: sqlite3.Connection, sha256: str, aperture: int, columns: ColourColumns) -> None:
        conn.execute(
            "UPDATE points SET mag = :mag, mag_err = :mag_err, diff_mag = :diff_mag, diff_mag_err = :diff_mag_err, "
            "color = :color, color_err = :color_err, flags = :flags WHERE sha256 = :sha256 AND aperture = :aperture",
            {**columns, "sha256": sha256, "aperture": aperture},
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
    def write_points(conn: sqlite3.Connection, points: list[PointRecord]) -> None:
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
            "p.template, p.reference, p.band, p.n_comparison, p.n_matched, f.exptime, f.sha256 "
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
    def update_points(conn: sqlite3.Connection, sha256: str, columns: list[CalibrationColumns]) -> None:
        """Replace calibration columns of a frame's points, one dict per aperture (inside the caller's
        transaction)."""
        for k, values in enumerate(columns):
            assignments = ", ".join(f"{name} = :{name}" for name in values)
            conn.execute(
                f"UPDATE points SET {assignments} WHERE sha256 = :sha256 AND aperture = :aperture",
                {**values, "sha256": sha256, "aperture": k},
            )

    def same_exposure(self, sha256: str, meta: FrameMeta) -> sqlite3.Row | None:
        """Another finished frame of the same exposure (same target, telescope, instrument, filter and
        DATE-OBS): its ``sha256``, ``file`` name and ledger ``path``; or None. Looked up through the (target,
        filter, mjd) index: once per frame."""
        return self.conn.execute(
            "SELECT f.sha256, f.file, fi.path FROM frames f JOIN files fi USING (sha256) "
            "WHERE f.target = ? AND f.filter = ? "
            "AND f.mjd = ? AND f.sha256 != ? AND f.date_obs = ? AND f.instrument IS ? AND f.telescope IS ? "
            "AND f.site IS ? AND fi.state IN ('done', 'rejected') LIMIT 1",
            (meta.target, meta.filter, meta.mjd_mid, sha256, meta.date_obs, meta.instrument, meta.telescope, meta.site),
        ).fetchone()

    def has_uncalibrated_points(self, target: str, band: str | None) -> bool:
        """Whether the target has detected points in ``band`` left uncalibrated."""
        uncalibrated, nondetection = flags.value("uncalibrated"), flags.value("nondetection")
        row = self.conn.execute(
            "SELECT 1 FROM points WHERE target = ? AND band IS ? AND flags & ? != 0 AND flags & ? = 0 LIMIT 1",
            (target, band, uncalibrated, nondetection),
        ).fetchone()
        return row is not None

    def changed_before(self, target: str, mjd: float, snr: float) -> bool:
        """Whether a difference point of the target (any filter) from before ``mjd`` differs from its reference
        by ``snr`` sigmas or more in the first aperture; points of doubtful frames or subtractions do not count."""
        doubtful = flags.value("bad_subtraction", *flags.FRAME_FLAGS)
        row = self.conn.execute(
            "SELECT 1 FROM points p JOIN frames f USING (sha256) WHERE p.target = ? AND p.aperture = 0 "
            "AND p.reference IS NOT NULL AND f.mjd < ? AND ABS(p.snr) >= ? AND p.flags & ? = 0 LIMIT 1",
            (target, mjd, snr, doubtful),
        ).fetchone()
        return row is not None

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

    def status(self) -> list[dict[str, object]]:
        """Per target and filter: frames, rejected, template, last point, and the zero point's trend (median of
        all frames against the median of the last five)."""
        rows = [
            dict(row)
            for row in self.conn.execute(
                "SELECT fr.target, fr.filter, COUNT(*) AS frames, SUM(fi.state = 'rejected') AS rejected "
                "FROM frames fr JOIN files fi USING (sha256) "
                "GROUP BY fr.target, fr.filter ORDER BY fr.target, fr.filter"
            )
        ]
        for row in rows:
            key = (row["target"], row["filter"])
            template = self.conn.execute(
                "SELECT file FROM templates WHERE target = ? AND filter = ? AND active = 1", key
            ).fetchone()
            row["template"] = template[0] if template else None
            points = self.conn.execute(
                "SELECT f.mjd, p.mag, p.diff_mag, p.zp FROM points p JOIN frames f USING (sha256) "
                "WHERE p.target = ? AND p.filter = ? AND p.aperture = 0 ORDER BY f.mjd",
                key,
            ).fetchall()
            if points:
                row["last_mjd"], row["last_mag"], row["last_diff_mag"] = points[-1][0], points[-1][1], points[-1][2]
                zps = [p[3] for p in points if p[3] is not None]
                if zps:
                    row["zp_median"], row["zp_recent"] = float(np.median(zps)), float(np.median(zps[-5:]))
        return rows

    def calibrated_star_photometry(self, target: str) -> list[sqlite3.Row]:
        """Every star's first-aperture instrumental magnitude in the target's calibrated frames, with the
        frame's file and zero point (the target is star 0)."""
        return self.conn.execute(
            "SELECT f.file, ph.star_id, ph.inst_mag, ph.flags, p.zp FROM photometry ph "
            "JOIN points p ON p.sha256 = ph.sha256 AND p.aperture = ph.aperture JOIN frames f ON f.sha256 = ph.sha256 "
            "WHERE p.target = ? AND ph.aperture = 0 AND p.zp IS NOT NULL AND ph.inst_mag IS NOT NULL",
            (target,),
        ).fetchall()
