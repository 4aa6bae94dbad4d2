"""The science store: frame metadata, quality and source lists, in the ledger's SQLite file."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np

from lcowatch.frame import FrameMeta
from lcowatch.quality import SOURCE_DTYPE, Quality

SCHEMA = """
CREATE TABLE IF NOT EXISTS frames (
    sha256 TEXT PRIMARY KEY REFERENCES files (sha256),
    file TEXT NOT NULL,
    object TEXT NOT NULL,
    target TEXT NOT NULL,
    filter TEXT NOT NULL,
    date_obs TEXT NOT NULL,
    mjd REAL NOT NULL,
    bjd_tdb REAL,
    exptime REAL NOT NULL,
    airmass REAL,
    site TEXT,
    telescope TEXT,
    instrument TEXT,
    pixscale REAL NOT NULL,
    nx INTEGER NOT NULL,
    ny INTEGER NOT NULL,
    wcs_usable INTEGER NOT NULL,
    background REAL,
    background_rms REAL,
    fwhm REAL,
    fwhm_pix REAL,
    ellipticity REAL,
    nstars INTEGER,
    quality TEXT NOT NULL,
    reasons TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS frames_target ON frames (target, filter, mjd);
CREATE TABLE IF NOT EXISTS sources (
    sha256 TEXT NOT NULL REFERENCES frames (sha256),
    id INTEGER NOT NULL,
    x REAL NOT NULL,
    y REAL NOT NULL,
    flux REAL NOT NULL,
    peak REAL NOT NULL,
    a REAL NOT NULL,
    b REAL NOT NULL,
    theta REAL NOT NULL,
    npix INTEGER NOT NULL,
    snr REAL NOT NULL,
    fwhm REAL,
    saturated INTEGER NOT NULL,
    sharp INTEGER NOT NULL,
    sep_flag INTEGER NOT NULL,
    PRIMARY KEY (sha256, id)
);
"""

FRAME_COLUMNS = (
    "file", "target", "filter", "mjd", "exptime", "background", "background_rms",
    "fwhm", "ellipticity", "nstars", "quality", "reasons",
)  # fmt: skip


def _nullable(value: float) -> float | None:
    return value if np.isfinite(value) else None


class Store:
    """Frames, their quality and source lists, sharing the ledger's connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        conn.executescript(SCHEMA)

    @staticmethod
    def write_frame(
        conn: sqlite3.Connection,
        sha256: str,
        path: Path,
        meta: FrameMeta,
        quality: Quality,
        sources: np.ndarray,
    ) -> None:
        """Insert one frame's record and source list (inside the caller's transaction)."""
        assert meta.target is not None
        conn.execute("DELETE FROM sources WHERE sha256 = ?", (sha256,))
        conn.execute(
            "INSERT OR REPLACE INTO frames VALUES "
            "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                sha256, path.name, meta.object, meta.target, meta.filter, meta.date_obs, meta.mjd_mid,
                meta.bjd_tdb, meta.exptime, meta.airmass, meta.site, meta.telescope, meta.instrument,
                meta.pixscale, meta.shape[1], meta.shape[0], int(meta.wcs_usable),
                quality.background, quality.background_rms, _nullable(quality.fwhm_arcsec),
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
        """The frame's source list as an array of :data:`~lcowatch.quality.SOURCE_DTYPE`."""
        names = SOURCE_DTYPE.names
        assert names is not None
        rows = self.conn.execute(
            f"SELECT {', '.join(names)} FROM sources WHERE sha256 = ? ORDER BY id", (sha256,)
        ).fetchall()
        nan_for_null = [tuple(np.nan if v is None else v for v in row) for row in rows]
        return np.array(nan_for_null, dtype=SOURCE_DTYPE)
