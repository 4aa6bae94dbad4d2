"""The ledger: every file seen, keyed by the sha256 of its content. It is the source of truth.

States: ``pending`` (seen, not finished; ``attempts`` counts the starts), ``done``, ``rejected``,
``ignored`` (OBJECT matches no target), ``quarantined``. Attempts are committed *before* work starts,
so a crash counts as an attempt too. Results and the final state are written in one transaction by
:meth:`Ledger.finish`.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lcowatch.log import display_name
from lcowatch.state.schema import migrate
from lcowatch.states import LEDGER_STATES, TERMINAL_STATES, State, Step

LEDGER_NAME = "lcowatch.sqlite"


@dataclass(frozen=True)
class FileRecord:
    sha256: str
    path: str
    size: int
    state: str
    attempts: int
    object: str | None
    target: str | None
    filter: str | None
    mjd: float | None
    step: str | None
    error: str | None

    @property
    def finished(self) -> bool:
        """In a final state; a file that vanished before it was finished is not, should it come back."""
        return self.state in TERMINAL_STATES and not (self.state == State.IGNORED and self.vanished)

    @property
    def vanished(self) -> bool:
        return (self.error or "").startswith(VANISHED)


#: The reason of a file that was deleted or moved away before it was finished (``ignored``: nothing to do).
VANISHED = "vanished before it was finished"
#: How the reason of a frame ignored for want of a target ends (``OBJECT 'X' matches no configured target``).
UNMATCHED = "matches no configured target"


def path_value(path: Path | str) -> str | bytes:
    """A path as the ledger stores it: its text, or its bytes when it is not UTF-8 (a name the file system
    allows but SQLite text cannot hold), so that nothing of it is lost."""
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(text)
    return text


def path_text(value: str | bytes) -> str:
    """A stored path back as the file system's string (undecodable bytes as surrogates, as ``os`` gives)."""
    return os.fsdecode(value) if isinstance(value, bytes) else value


def connect(state_dir: Path, *, busy_seconds: float = 30.0, create: bool = True) -> sqlite3.Connection:
    """Open (and create) the one SQLite file under ``state_dir``, in WAL mode, owner-only; a statement waits
    up to ``busy_seconds`` for another writer.

    ``create=False`` opens only an existing file (``sqlite3.OperationalError`` otherwise): a daemon's second
    connection must not make a new, empty ledger beside a deleted one, which would hide the deletion.
    """
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state_dir / LEDGER_NAME
    target = f"{path.absolute().as_uri()}?mode=rw" if not create else str(path)
    conn = sqlite3.connect(target, timeout=busy_seconds, isolation_level=None, check_same_thread=False, uri=not create)
    os.chmod(path, 0o600)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    migrate(conn)
    return conn


def count_finished(state_dir: Path) -> int:
    """Files in a terminal state, read without changing anything (another process may be creating the
    database): 0 until it exists."""
    if not (state_dir / LEDGER_NAME).exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(state_dir / LEDGER_NAME, timeout=5)) as conn:
            marks = ",".join("?" * len(TERMINAL_STATES))
            query = f"SELECT COUNT(*) FROM files WHERE state IN ({marks})"
            return int(conn.execute(query, tuple(TERMINAL_STATES)).fetchone()[0])
    except sqlite3.OperationalError:  # its tables are being created
        return 0


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One immediate transaction: all of it is written, or none of it."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class Ledger:
    """File states in the shared SQLite connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def get(self, sha256: str) -> FileRecord | None:
        row = self.conn.execute(
            "SELECT sha256, path, size, state, attempts, object, target, filter, mjd, step, error "
            "FROM files WHERE sha256 = ?",
            (sha256,),
        ).fetchone()
        return FileRecord(**(dict(row) | {"path": path_text(row["path"])})) if row else None

    def known_path(self, path: Path, size: int, mtime_ns: int) -> str | None:
        """The sha256 last seen at ``path`` if its size and mtime are unchanged, so rescans skip hashing."""
        row = self.conn.execute(
            "SELECT sha256 FROM paths WHERE path = ? AND size = ? AND mtime_ns = ?",
            (path_value(path), size, mtime_ns),
        ).fetchone()
        return row["sha256"] if row else None

    def remember_path(self, path: Path, size: int, mtime_ns: int, sha256: str) -> None:
        """Remember that ``path`` holds ``sha256``, so rescans skip hashing it. Rows left pending for earlier
        content of the path (a file rewritten or grown in place while a crash interrupted its first
        measurement) are settled in the same transaction: that content is nowhere any more."""
        with transaction(self.conn):
            self.conn.execute(
                "INSERT INTO paths (path, size, mtime_ns, sha256) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (path) DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns, "
                "sha256 = excluded.sha256",
                (path_value(path), size, mtime_ns, sha256),
            )
            self.conn.execute(
                "UPDATE files SET state = ?, error = ?, updated = ? WHERE path = ? AND sha256 != ? AND state = ?",
                (State.IGNORED, f"{VANISHED}: the file was rewritten ({sha256})", time.time(),
                 path_value(path.absolute()), sha256, State.PENDING),
            )  # fmt: skip

    def start_attempt(self, sha256: str, path: Path, size: int) -> FileRecord:
        """Record the file if new and count one attempt, committed before any work starts."""
        now = time.time()
        with transaction(self.conn):
            self.conn.execute(
                "INSERT INTO files (sha256, path, size, state, attempts, first_seen, updated) "
                "VALUES (?, ?, ?, 'pending', 0, ?, ?) ON CONFLICT (sha256) DO NOTHING",
                (sha256, path_value(path.absolute()), size, now, now),
            )
            self.conn.execute(
                "UPDATE files SET state = 'pending', attempts = attempts + 1, path = ?, updated = ? WHERE sha256 = ?",
                (path_value(path.absolute()), now, sha256),
            )
        record = self.get(sha256)
        assert record is not None
        return record

    def finish(
        self,
        sha256: str,
        state: str,
        *,
        step: str | None = None,
        error: str | None = None,
        identity: Mapping[str, object] | None = None,
        write: Callable[[sqlite3.Connection], None] | None = None,
    ) -> None:
        """Write the frame's results (``write``) and its final state in one transaction.

        ``identity`` may carry ``object``, ``target``, ``filter`` and ``mjd`` for the file row.
        """
        if state not in LEDGER_STATES:
            raise ValueError(f"unknown state {state!r}")
        fields = {k: v for k, v in (identity or {}).items() if k in ("object", "target", "filter", "mjd")}
        assignments = "".join(f", {k} = :{k}" for k in fields)
        with transaction(self.conn):
            if write is not None:
                write(self.conn)
            self.conn.execute(
                f"UPDATE files SET state = :state, step = :step, error = :error, updated = :now{assignments} "
                "WHERE sha256 = :sha256",
                {
                    "state": state,
                    "step": step,
                    "error": error,
                    "now": time.time(),
                    "sha256": sha256,
                    **fields,
                },
            )

    def record(
        self, sha256: str, path: Path, size: int, state: str, *, step: str | None = None, error: str | None = None
    ) -> None:
        """Record a file the pipeline never worked on in its final state, in one transaction, no attempt.

        The daemon uses it for files it quarantines because they never became complete.
        """
        if state not in LEDGER_STATES:
            raise ValueError(f"unknown state {state!r}")
        now = time.time()
        with transaction(self.conn):
            self.conn.execute(
                "INSERT INTO files (sha256, path, size, state, attempts, step, error, first_seen, updated) "
                "VALUES (?, ?, ?, ?, 0, ?, ?, ?, ?) ON CONFLICT (sha256) DO UPDATE SET path = excluded.path, "
                "state = excluded.state, step = excluded.step, error = excluded.error, updated = excluded.updated",
                (sha256, path_value(path.absolute()), size, state, step, error, now, now),
            )

    def mark_vanished(self, sha256: str, path: Path, step: str | None, note: str = "") -> None:
        """Record a file that was deleted or moved away before it was finished, if it is still pending (another
        process may have finished it, or moved it into quarantine, meanwhile)."""
        with transaction(self.conn):
            self.conn.execute(
                "UPDATE files SET state = ?, step = ?, error = ?, updated = ? WHERE sha256 = ? AND state = ?",
                (
                    State.IGNORED,
                    step,
                    f"{VANISHED}: {display_name(str(path))}{note}",
                    time.time(),
                    sha256,
                    State.PENDING,
                ),
            )

    @staticmethod
    def mark_replaced(conn: sqlite3.Connection, sha256: str, reason: str) -> None:
        """Record that a finished file's content was replaced by a later version of the same file (inside the
        caller's transaction, which writes the later version's results)."""
        conn.execute(
            "UPDATE files SET state = ?, step = ?, error = ?, updated = ? WHERE sha256 = ?",
            (State.IGNORED, Step.READ, reason, time.time(), sha256),
        )

    @staticmethod
    def requeue_waiting(conn: sqlite3.Connection, target: str, *, unregistered_in: str | None = None) -> list[Path]:
        """Make a target's frames rejected for want of a reference frame or a reference image pending again
        (inside the caller's transaction); with ``unregistered_in`` (a filter that has a new template), its
        frames that could not be registered too.

        Returns their paths; the daemon's reconcile scan, or ``process`` itself, picks them up.
        """
        where = (
            f"state = '{State.REJECTED}' AND target = :target AND (step IN ('{Step.TEMPLATE}', '{Step.SUBTRACT}') "
            f"OR (step = '{Step.REGISTER}' AND filter = :filter))"
        )
        keys = {"target": target, "filter": unregistered_in}
        paths = [Path(path_text(row[0])) for row in conn.execute(f"SELECT path FROM files WHERE {where}", keys)]
        conn.execute(f"UPDATE files SET state = 'pending', attempts = 0, error = NULL, step = NULL WHERE {where}", keys)
        return paths

    def requeue_ignored(self, matches: Callable[[str], bool]) -> list[Path]:
        """Make frames ignored for want of a target pending again where their OBJECT ``matches`` one now
        (the config gained the target); returns their paths."""
        unmatched = f"state = '{State.IGNORED}' AND step = '{Step.READ}' AND object IS NOT NULL"
        rows = self.conn.execute(f"SELECT sha256, path, object, error FROM files WHERE {unmatched}").fetchall()
        wanted = [row for row in rows if (row["error"] or "").endswith(UNMATCHED) and matches(row["object"])]
        with transaction(self.conn):
            self.conn.executemany(
                "UPDATE files SET state = 'pending', attempts = 0, error = NULL, step = NULL WHERE sha256 = ?",
                [(row["sha256"],) for row in wanted],
            )
        return [Path(path_text(row["path"])) for row in wanted]

    def uncount_attempt(self, sha256: str) -> None:
        """Take back the attempt of a run that stopped on a transient condition."""
        self.conn.execute(
            "UPDATE files SET attempts = MAX(attempts - 1, 0), updated = ? WHERE sha256 = ?",
            (time.time(), sha256),
        )

    def note_error(self, sha256: str, step: str, error: str) -> None:
        """Keep the last error of a failed attempt; the file stays pending for the next one."""
        self.conn.execute(
            "UPDATE files SET step = ?, error = ?, updated = ? WHERE sha256 = ?",
            (step, error, time.time(), sha256),
        )

    def reset(self, sha256: str) -> None:
        """Make a file pending again with no attempts (``lcowatch retry``)."""
        self.conn.execute(
            "UPDATE files SET state = 'pending', attempts = 0, step = NULL, error = NULL, updated = ? WHERE sha256 = ?",
            (time.time(), sha256),
        )

    def counts(self) -> dict[str, int]:
        rows = self.conn.execute("SELECT state, COUNT(*) AS n FROM files GROUP BY state").fetchall()
        return {str(state): 0 for state in LEDGER_STATES} | {row["state"]: row["n"] for row in rows}

    def in_state(self, state: str) -> list[FileRecord]:
        rows = self.conn.execute(
            "SELECT sha256, path, size, state, attempts, object, target, filter, mjd, step, error "
            "FROM files WHERE state = ? ORDER BY mjd, path",
            (state,),
        ).fetchall()
        return [FileRecord(**(dict(row) | {"path": path_text(row["path"])})) for row in rows]
