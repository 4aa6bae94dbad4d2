"""Helpers for the daemon tests: simulated frames, a daemon subprocess, ledger queries, polling.

Nothing here depends on timing luck: every wait polls a condition with a generous timeout.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lcowatch.simulation.simulate import FrameSpec, lco_filename, make_field, write_frame, write_refcat

TARGET = "SIMFIELD"
RA, DEC = 150.0, 2.0
DRIVER = Path(__file__).with_name("daemon_driver.py")
WAIT = 60.0  # seconds; generous: this machine may be busy


def wait_for(condition: Callable[[], Any], timeout: float = WAIT, interval: float = 0.05, what: str = "") -> Any:
    """Poll ``condition`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or condition}")
        time.sleep(interval)


@dataclass(frozen=True)
class SimFrame:
    """A simulated frame in the cache: copy it where a test needs it."""

    index: int
    name: str
    path: Path
    mjd: float

    @property
    def content(self) -> bytes:
        return self.path.read_bytes()


class FrameFactory:
    """Small (256x256) simulated frames of one field, made once per test session and cached."""

    COMPRESSIONS = ("fz", "gz", None)

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.field = make_field(TARGET, RA, DEC, nstars=120, seed=1, box_arcmin=1.8, n_bright=1, min_sep_arcsec=3.0)
        self.refcat = folder / "refcat.csv"
        write_refcat(self.field, self.refcat)
        self._made: dict[tuple[int, str | None, int | None, str | None, bool], SimFrame] = {}

    def frame(
        self,
        index: int,
        compress: str | None = "default",
        *,
        number: int | None = None,
        object_name: str | None = None,
        wcs_error: bool = False,
    ) -> SimFrame:
        """Frame ``index``: observed at MJD 61000.2 + index/1000; ``number`` sets the name's frame number,
        ``object_name`` the OBJECT keyword (default: the target); ``wcs_error`` a failed WCS (WCSERR=4)."""
        if compress == "default":
            compress = self.COMPRESSIONS[index % 3]
        key = (index, compress, number, object_name, wcs_error)
        if key not in self._made:
            mjd = 61000.2 + index * 0.001
            spec = FrameSpec(
                filter="rp", mjd_start=mjd, shape=(256, 256), seed=index, exptime=60.0,
                frame_number=number if number is not None else index + 1, object_name=object_name,
                wcs_error=wcs_error,
            )  # fmt: skip
            folder = self.folder / hashlib.sha1(repr(key).encode()).hexdigest()[:12]
            folder.mkdir(exist_ok=True)
            path = folder / lco_filename(spec, compress)
            write_frame(path, self.field, spec, compress=compress)
            self._made[key] = SimFrame(index, path.name, path, mjd)
        return self._made[key]

    def frames(self, count: int, start: int = 0) -> list[SimFrame]:
        return [self.frame(i) for i in range(start, start + count)]

    def config(self, folder: Path, **overrides: Any) -> Path:
        """A daemon config (see :func:`write_config`) calibrating against this field's local catalog."""
        return write_config(folder, refcat=self.refcat, **overrides)


def write_config(folder: Path, *, refcat: Path | None = None, **overrides: Any) -> Path:
    """A daemon config in ``folder`` watching ``folder/in`` with state in ``folder/state``.

    The catalog is local (``refcat``, or none: points stay uncalibrated): tests never touch the network.
    ``overrides`` are merged section by section (``watch={...}`` updates the watch section).
    """
    (folder / "in").mkdir(parents=True, exist_ok=True)
    document: dict[str, Any] = {
        "watch": {"paths": ["in"], "quiet_seconds": 0.3, "incomplete_after": 60.0, "rescan_seconds": 60.0},
        "state_dir": "state",
        "catalog": {"source": "file"},
        "targets": {TARGET: {"ra": RA, "dec": DEC, **({"refcat": str(refcat)} if refcat else {})}},
        "daemon": {"stop_timeout": 20.0, "retry_seconds": 0.5, "max_retry_seconds": 2.0},
        "log_level": "debug",
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(document.get(key), dict):
            document[key] = {**document[key], **value}
        else:
            document[key] = value
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


class Daemon:
    """``lcowatch run`` as a real subprocess; its JSON log lines go to a file that tests read."""

    def __init__(self, config: Path, *, env: dict[str, str] | None = None, driver_stage: str | None = None) -> None:
        self.config = config
        self.env = env or {}
        self.driver_stage = driver_stage
        self.runs = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = config.parent / "daemon.log"
        self.err_path = config.parent / "daemon.err"
        self._offset = 0  # where this run's log starts

    def start(self, *, wait_ready: bool = True) -> Daemon:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.runs += 1
        if self.driver_stage:
            command = [sys.executable, str(DRIVER), str(self.config), self.driver_stage]
        else:
            command = [sys.executable, "-m", "lcowatch", "run", "--config", str(self.config)]
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        env.update(self.env)
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as out, open(self.err_path, "ab") as err:
            self.proc = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=self.config.parent)
        if wait_ready:
            self.wait_event("daemon_ready", what="daemon_ready")
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def events(self, *, all_runs: bool = False) -> list[dict[str, Any]]:
        """JSON log events of this run (or of every run)."""
        if not self.log_path.exists():
            return []
        with open(self.log_path, "rb") as handle:
            handle.seek(0 if all_runs else self._offset)
            lines = handle.read().decode(errors="replace").splitlines()
        events = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                events.append(event)
        return events

    def find(self, name: str, *, all_runs: bool = False, **match: Any) -> list[dict[str, Any]]:
        return [
            e for e in self.events(all_runs=all_runs)
            if e.get("event") == name and all(e.get(k) == v for k, v in match.items())
        ]  # fmt: skip

    def wait_event(self, name: str, timeout: float = WAIT, what: str = "", **match: Any) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            hits = self.find(name, **match)
            if not hits and not self.running():
                raise AssertionError(f"daemon exited ({self.returncode}) before {name}:\n{self.output()}")
            return hits[0] if hits else None

        return wait_for(found, timeout, what=what or name)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def kill9(self) -> None:
        if self.running():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)

    def wait_exit(self, timeout: float = WAIT) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = WAIT) -> int:
        """SIGTERM and wait; the exit code."""
        if not self.running():
            return self.returncode
        self.signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    @property
    def returncode(self) -> int:
        assert self.proc is not None
        code = self.proc.poll()
        assert code is not None
        return code

    def output(self) -> str:
        text = self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""
        err = self.err_path.read_text(errors="replace")[-4000:] if self.err_path.exists() else ""
        return f"--- stdout (tail)\n{text}\n--- stderr (tail)\n{err}"

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace") if self.err_path.exists() else ""

    def cleanup(self) -> None:
        if self.running():
            self.kill9()


class LedgerView:
    """Read-only questions to the daemon's SQLite file."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "lcowatch.sqlite"

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        if not self.path.exists():
            return []
        conn = sqlite3.connect(self.path, timeout=30.0)
        try:
            return conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError as exc:  # tables not created yet
            if "no such table" in str(exc):
                return []
            raise
        finally:
            conn.close()

    def states(self) -> dict[str, str]:
        """sha256 -> state."""
        return dict(self.query("SELECT sha256, state FROM files"))  # type: ignore[arg-type]

    def count(self, state: str) -> int:
        return int(self.query("SELECT COUNT(*) FROM files WHERE state = ?", (state,))[0][0] or 0)

    def file(self, sha256: str) -> dict[str, Any] | None:
        rows = self.query("SELECT state, attempts, step, error, path FROM files WHERE sha256 = ?", (sha256,))
        if not rows:
            return None
        state, attempts, step, error, path = rows[0]
        return {"state": state, "attempts": attempts, "step": step, "error": error, "path": path}

    def frame_rows(self) -> dict[str, int]:
        """sha256 -> number of rows in the frames table."""
        return dict(self.query("SELECT sha256, COUNT(*) FROM frames GROUP BY sha256"))  # type: ignore[arg-type]

    def tables(self) -> set[str]:
        return {row[0] for row in self.query("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def done_order(self) -> list[str]:
        return [row[0] for row in self.query("SELECT sha256 FROM files WHERE state = 'done' ORDER BY updated")]


def sha256_of(path_or_bytes: Path | bytes) -> str:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else path_or_bytes.read_bytes()
    return hashlib.sha256(data).hexdigest()


def drop(frame: SimFrame, folder: Path, *, how: str = "rename", name: str | None = None) -> Path:
    """Put a frame into ``folder`` the way a transfer tool would: ``rename`` (write a temporary name,
    then rename into place) or ``copy`` (write the final name directly, in one go)."""
    destination = folder / (name or frame.name)
    if how == "rename":
        partial = destination.with_name(destination.name + ".part")
        partial.write_bytes(frame.content)
        os.replace(partial, destination)
    elif how == "copy":
        destination.write_bytes(frame.content)
    else:
        raise ValueError(how)
    return destination


def assert_exactly_once(ledger: LedgerView, frames: list[SimFrame]) -> None:
    """Every frame is done, with exactly one set of rows; nothing else is in the ledger; nothing pending."""
    expected = {sha256_of(f.path) for f in frames}
    states = ledger.states()
    assert set(states) == expected, f"unexpected ledger rows: {set(states) ^ expected}"
    assert all(state == "done" for state in states.values()), Counter(states.values())
    rows = ledger.frame_rows()
    assert set(rows) == expected and all(n == 1 for n in rows.values())
    if "points" in ledger.tables():
        per_frame = dict(ledger.query("SELECT sha256, COUNT(*) FROM points GROUP BY sha256"))
        assert set(per_frame) <= expected
        assert len(set(per_frame.values())) <= 1, "frames with different numbers of light-curve rows"
        duplicated = ledger.query("SELECT sha256, aperture FROM points GROUP BY 1, 2 HAVING COUNT(*) > 1")
        assert not duplicated
