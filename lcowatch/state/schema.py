"""The database's tables, their version and the forward migrations: the one place that creates or
changes them.

The version is SQLite's ``user_version``. :func:`migrate` runs when a connection is opened
(:func:`lcowatch.state.ledger.connect`): it creates a new database at :data:`SCHEMA_VERSION`, or brings an
older one forward in one transaction, so a crash mid-way leaves the old database as it was. A database
newer than this code is refused (downgrading would drop what it cannot read).
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable

from lcowatch.errors import Stop

#: Version of the tables below; one more for each entry of :data:`MIGRATIONS`.
SCHEMA_VERSION = 5

LEDGER_TABLES = """
CREATE TABLE IF NOT EXISTS files (
    sha256 TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'done', 'rejected', 'ignored', 'quarantined')),
    attempts INTEGER NOT NULL DEFAULT 0,
    object TEXT,
    target TEXT,
    filter TEXT,
    mjd REAL,
    step TEXT,
    error TEXT,
    first_seen REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS files_state ON files (state);
CREATE TABLE IF NOT EXISTS paths (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL
);
"""

STORE_TABLES = """
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
    wcs_header TEXT,
    template_score REAL,
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
CREATE TABLE IF NOT EXISTS templates (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    target TEXT NOT NULL,
    filter TEXT NOT NULL,
    sha256 TEXT NOT NULL REFERENCES frames (sha256),
    file TEXT NOT NULL,
    score REAL NOT NULL,
    pinned INTEGER NOT NULL,
    active INTEGER NOT NULL,
    created REAL NOT NULL,
    reason TEXT NOT NULL,
    nx INTEGER NOT NULL,
    ny INTEGER NOT NULL,
    wcs_header TEXT NOT NULL,
    from_reference TEXT
);
CREATE INDEX IF NOT EXISTS templates_active ON templates (target, filter, active);
CREATE TABLE IF NOT EXISTS reference_frames (
    target TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL REFERENCES frames (sha256),
    file TEXT NOT NULL,
    nx INTEGER NOT NULL,
    ny INTEGER NOT NULL,
    pixscale REAL NOT NULL,
    wcs_header TEXT,
    sky_fix TEXT,
    target_x REAL NOT NULL,
    target_y REAL NOT NULL,
    target_origin TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS target_centroids (
    target TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    x REAL NOT NULL,
    y REAL NOT NULL,
    snr REAL NOT NULL,
    PRIMARY KEY (target, sha256)
);
CREATE TABLE IF NOT EXISTS comparison_stars (
    target TEXT NOT NULL,
    star_id INTEGER NOT NULL,
    x REAL NOT NULL,
    y REAL NOT NULL,
    origin TEXT NOT NULL,
    PRIMARY KEY (target, star_id)
);
CREATE TABLE IF NOT EXISTS star_refs (
    target TEXT NOT NULL,
    filter TEXT NOT NULL,
    star_id INTEGER NOT NULL,
    ref_mag REAL NOT NULL,
    ref_err REAL,
    PRIMARY KEY (target, filter, star_id)
);
CREATE TABLE IF NOT EXISTS photometry (
    sha256 TEXT NOT NULL REFERENCES frames (sha256),
    star_id INTEGER NOT NULL,
    aperture INTEGER NOT NULL,
    x REAL,
    y REAL,
    radius REAL NOT NULL,
    flux REAL,
    flux_err REAL,
    inst_mag REAL,
    inst_err REAL,
    background REAL,
    flags INTEGER NOT NULL,
    PRIMARY KEY (sha256, star_id, aperture)
);
CREATE TABLE IF NOT EXISTS points (
    sha256 TEXT NOT NULL REFERENCES frames (sha256),
    aperture INTEGER NOT NULL,
    aperture_text TEXT NOT NULL,
    target TEXT NOT NULL,
    filter TEXT NOT NULL,
    x REAL,
    y REAL,
    diff_mag REAL,
    diff_mag_err REAL,
    flux REAL,
    flux_err REAL,
    snr REAL,
    limit_mag REAL,
    ensemble_scatter REAL,
    diff_color_term REAL,
    n_comparison INTEGER NOT NULL,
    registration_rms REAL NOT NULL,
    n_matched INTEGER NOT NULL,
    template TEXT NOT NULL,
    mag REAL,
    mag_err REAL,
    zp REAL,
    zp_err REAL,
    color_term REAL,
    color REAL,
    color_err REAL,
    comparison_color REAL,
    zp_nstars INTEGER,
    zp_scatter REAL,
    catalog TEXT,
    band TEXT,
    reference TEXT,
    flags INTEGER NOT NULL,
    PRIMARY KEY (sha256, aperture)
);
CREATE INDEX IF NOT EXISTS points_target ON points (target, filter);
CREATE TABLE IF NOT EXISTS reference_images (
    target TEXT NOT NULL,
    filter TEXT NOT NULL,
    instrument_class TEXT NOT NULL,
    sha256 TEXT NOT NULL REFERENCES frames (sha256),
    file TEXT NOT NULL,
    mjd REAL NOT NULL,
    fwhm_pix REAL NOT NULL,
    origin_x INTEGER NOT NULL,
    origin_y INTEGER NOT NULL,
    nx INTEGER NOT NULL,
    ny INTEGER NOT NULL,
    frame_from_reference TEXT NOT NULL,
    image BLOB NOT NULL,
    variance BLOB NOT NULL,
    frames INTEGER NOT NULL,
    reason TEXT NOT NULL,
    created REAL NOT NULL,
    transient_total REAL,
    transient_total_err REAL,
    PRIMARY KEY (target, filter, instrument_class)
);
CREATE TABLE IF NOT EXISTS reference_pins (
    target TEXT NOT NULL,
    filter TEXT NOT NULL,
    instrument_class TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    position INTEGER NOT NULL,
    PRIMARY KEY (target, filter, instrument_class, sha256)
);
"""


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """Add the nullable columns a table lacks: release 0.1 (no version yet) grew its tables by columns
    only, version 2 added ``points.diff_color_term`` and ``points.color_err``, version 3 ``points.reference``
    (and the ``reference_images`` table), version 4 the ``reference_pins`` table, version 5
    ``reference_images.transient_total`` and ``transient_total_err``."""
    for table, body in re.findall(r"CREATE TABLE IF NOT EXISTS (\w+) \((.*?)\n\);", STORE_TABLES, re.S):
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        for line in body.strip().splitlines():
            name, kind = line.strip().rstrip(",").split()[:2]
            if name.isidentifier() and name.upper() not in ("PRIMARY", "FOREIGN") and name not in have:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")


#: ``MIGRATIONS[v]`` brings a database from version ``v`` to ``v + 1`` (after the tables of the current
#: schema that it lacks entirely have been created).
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_add_missing_columns] * 5
assert len(MIGRATIONS) == SCHEMA_VERSION


class SchemaTooNew(Stop):
    """The database was written by a newer lcowatch."""


def migrate(conn: sqlite3.Connection) -> int:
    """Create the tables or bring them forward to :data:`SCHEMA_VERSION`; returns the version found.

    Raises
    ------
    SchemaTooNew
        The database's version is above this code's.
    """
    if _version(conn) == SCHEMA_VERSION:
        return SCHEMA_VERSION
    conn.execute("BEGIN IMMEDIATE")  # another process may be migrating: wait for it, then look again
    try:
        found = _version(conn)
        if found > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"the database has schema version {found}, newer than this lcowatch's {SCHEMA_VERSION}: "
                "upgrade lcowatch (or use another state_dir)"
            )
        for statement in _statements(LEDGER_TABLES + STORE_TABLES):
            conn.execute(statement)
        for step in MIGRATIONS[found:]:
            step(conn)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return found


def _version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _statements(script: str) -> list[str]:
    return [part.strip() for part in script.split(";") if part.strip()]
