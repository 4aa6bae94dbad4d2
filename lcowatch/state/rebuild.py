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


def measured_files(conn: sqlite3.Connection, target: str) -> list[TargetFile]:
    """A target's files that gave a point or were rejected, in observation-time order."""
    rows = conn.execute(
        "SELECT sha256, path, mjd FROM files WHERE target = ? AND state IN (?, ?) ORDER BY mjd, path",
        (target, *MEASURED),
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


def _replace_rows(conn: sqlite3.Connection, target: str) -> None:
    for table, where in TARGET_ROWS.items():
        conn.execute(f"DELETE FROM main.{table} WHERE {where.format(db='main.')}", {"target": target})
    for table, where in reversed(TARGET_ROWS.items()):
        own = OWN_KEYS.get(table, set())
        columns = ", ".join(row[1] for row in conn.execute(f"PRAGMA scratch.table_info({table})") if row[1] not in own)
        conn.execute(
            f"INSERT INTO main.{table} ({columns}) SELECT {columns} FROM scratch.{table} "
            f"WHERE {where.format(db='scratch.')}",
            {"target": target},
        )
