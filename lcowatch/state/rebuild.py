"""A target's light curve rebuilt in a scratch database beside the live one, then swapped in by one
transaction: until the swap every reader sees the old curve; a failure or kill -9 before it changes nothing.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from lcowatch.state.ledger import path_text, transaction
from lcowatch.states import State

_OF_TARGET_FRAMES = "sha256 IN (SELECT sha256 FROM {db}frames WHERE target = :target)"
_OF_TARGET = "target = :target"

#: The store's tables and how a target's rows are found in each; ``frames`` last, as the others refer to it.
TARGET_ROWS = {
    "photometry": _OF_TARGET_FRAMES,
    "points": _OF_TARGET,
    "sources": _OF_TARGET_FRAMES,
    "templates": _OF_TARGET,
    "reference_frames": _OF_TARGET,
    "target_centroids": _OF_TARGET,
    "comparison_stars": _OF_TARGET,
    "star_refs": _OF_TARGET,
    "reference_images": _OF_TARGET,
    "frames": _OF_TARGET,
}
#: Columns the live database numbers itself.
OWN_KEYS = {"templates": {"id"}}
#: Ledger states of the files a rebuild measures again.
MEASURED = (State.DONE, State.REJECTED)


@dataclass(frozen=True)
class TargetFile:
    sha256: str
    path: Path
    mjd: float | None


def measured_files(conn: sqlite3.Connection, target: str, filter: str | None = None) -> list[TargetFile]:
    """A target's files (of one filter, or all) that gave a point or were rejected, in observation-time order."""
    rows = conn.execute(
        "SELECT sha256, path, mjd FROM files WHERE target = ? AND state IN (?, ?) AND (? IS NULL OR filter = ?) "
        "ORDER BY mjd, path",
        (target, *MEASURED, filter, filter),
    ).fetchall()
    return [TargetFile(row[0], Path(path_text(row[1])), row[2]) for row in rows]


def swap_in(conn: sqlite3.Connection, scratch: Path, target: str) -> list[str]:
    """Replace ``target``'s rows in the live store by those of the scratch database at ``scratch``, and take
    over the scratch ledger's verdicts on its files, in one transaction.

    Returns the sha256 of live files the scratch has not measured (they arrived during the rebuild); then
    nothing is changed, and the caller measures them and asks again.
    """
    conn.execute("ATTACH DATABASE ? AS scratch", (str(scratch),))
    try:
        with transaction(conn):
            missing = [
                row[0]
                for row in conn.execute(
                    "SELECT sha256 FROM main.files WHERE target = ? AND state IN (?, ?) "
                    "AND sha256 NOT IN (SELECT sha256 FROM scratch.files)",
                    (target, *MEASURED),
                )
            ]
            if missing:
                return missing
            _replace_rows(conn, target)
            conn.execute(
                "UPDATE main.files SET state = s.state, step = s.step, error = s.error, updated = s.updated "
                "FROM scratch.files AS s WHERE main.files.sha256 = s.sha256"
            )
        return []
    finally:
        conn.execute("DETACH DATABASE scratch")


#: Per table, the rows of a target that a rebuild of one filter keeps (:func:`seed`): everything of the other
#: filters, and what places the target (its reference frame, comparison stars), whichever filter made it.
_OTHER_FILTERS = "sha256 IN (SELECT sha256 FROM main.frames WHERE target = :target AND filter != :filter)"
KEPT_ROWS = {
    "frames": "target = :target AND (filter != :filter OR sha256 IN "
    "(SELECT sha256 FROM main.reference_frames WHERE target = :target))",
    "sources": "sha256 IN (SELECT sha256 FROM scratch.frames)",
    "photometry": _OTHER_FILTERS,
    "points": "target = :target AND filter != :filter",
    "templates": "target = :target AND filter != :filter",
    "reference_frames": _OF_TARGET,
    "target_centroids": _OTHER_FILTERS,
    "comparison_stars": _OF_TARGET,
    "star_refs": "target = :target AND filter != :filter",
    "reference_images": "target = :target AND filter != :filter",
}


def seed(conn: sqlite3.Connection, scratch: Path, target: str, filter: str) -> None:
    """Copy into the (new, empty) scratch database at ``scratch`` what a rebuild of ``target``'s ``filter``
    keeps: the ledger's rows of the target, its files of ``filter`` made pending again, and the store's rows
    of :data:`KEPT_ROWS`. The rebuild then measures only that filter's frames, in the same reference frame
    and against the same comparison stars as the other filters."""
    conn.execute("ATTACH DATABASE ? AS scratch", (str(scratch),))
    names = {"target": target, "filter": filter}
    try:
        with transaction(conn):
            conn.execute(f"INSERT INTO scratch.files ({_columns(conn, 'files')}) "
                         f"SELECT {_columns(conn, 'files')} FROM main.files WHERE target = :target", names)  # fmt: skip
            conn.execute(
                "UPDATE scratch.files SET state = 'pending', attempts = 0, step = NULL, error = NULL "
                f"WHERE target = :target AND filter = :filter AND state IN ('{State.DONE}', '{State.REJECTED}')",
                names,
            )
            for table in ("frames", *(t for t in KEPT_ROWS if t != "frames")):
                columns = _columns(conn, table)
                conn.execute(f"INSERT INTO scratch.{table} ({columns}) SELECT {columns} FROM main.{table} "
                             f"WHERE {KEPT_ROWS[table]}", names)  # fmt: skip
    finally:
        conn.execute("DETACH DATABASE scratch")


def _columns(conn: sqlite3.Connection, table: str) -> str:
    return ", ".join(row[1] for row in conn.execute(f"PRAGMA scratch.table_info({table})"))


def _replace_rows(conn: sqlite3.Connection, target: str) -> None:
    for table, where in TARGET_ROWS.items():
        conn.execute(f"DELETE FROM main.{table} WHERE {where.format(db='main.')}", {"target": target})
    for table, where in reversed(TARGET_ROWS.items()):
        own = OWN_KEYS.get(table, set())
        columns = ", ".join(row[1] for row in conn.execute(f"PRAGMA scratch.table_info({table})") if row[1] not in own)
        conn.execute(
            # In the scratch's row order: new ids keep which template came first (the reference magnitudes'
            # instrument is the first template's), whatever index the query walks.
            f"INSERT INTO main.{table} ({columns}) SELECT {columns} FROM scratch.{table} "
            f"WHERE {where.format(db='scratch.')} ORDER BY scratch.{table}.rowid",
            {"target": target},
        )
