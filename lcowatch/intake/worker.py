"""The worker thread: pops the queue (earliest observation first) and runs
:meth:`lcowatch.pipeline.runner.Pipeline.process_path` on one path at a time.

What crosses threads, and how:

- the configuration, as an immutable :class:`Settings` snapshot the coordinator swaps in whole
  (:meth:`Worker.configure`); the worker takes it between frames, never within one;
- :attr:`Worker.in_hand` and :attr:`Worker.fatal`, written here and read by the coordinator (single
  assignments of immutable values);
- the queue, the path sink, the counts and :meth:`~lcowatch.intake.admission.Admission.defer`, which lock.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import stat
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lcowatch.config import Config
from lcowatch.errors import Stop
from lcowatch.intake.admission import is_within
from lcowatch.intake.queue import QueueItem, WorkQueue
from lcowatch.intake.watcher import PathSink
from lcowatch.pipeline.executor import Executor, SerialExecutor, make_executor
from lcowatch.pipeline.runner import Outcome, Pipeline, warm_up
from lcowatch.pipeline.stages import Stage
from lcowatch.state.ledger import Ledger, connect
from lcowatch.states import State


@dataclass(frozen=True)
class Settings:
    """The configuration the worker runs with; ``generation`` grows with every reload."""

    config: Config
    generation: int


@dataclass(frozen=True)
class InHand:
    path: Path
    started: float  # monotonic


class Counts:
    """Files finished since start, by state (both threads add)."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, state: str) -> None:
        with self._lock:
            self._counts[state] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


def state_dir_writable(state_dir: Path) -> bool:
    try:
        with tempfile.TemporaryFile(dir=state_dir):
            return True
    except OSError:
        return False


def give_back_attempt(state_dir: Path, hand: InHand | None) -> None:
    """The frame we cut short is not to blame: take back its attempt (best effort, own connection)."""
    if hand is None:
        return
    with contextlib.suppress(OSError, sqlite3.Error):
        st = hand.path.stat()
        conn = connect(state_dir, busy_seconds=1.0, create=False)  # never hold up the exit for long
        try:
            ledger = Ledger(conn)
            sha = ledger.known_path(hand.path, st.st_size, st.st_mtime_ns)
            record = ledger.get(sha) if sha else None
            if record is not None and record.state == State.PENDING:
                ledger.uncount_attempt(record.sha256)
        finally:
            conn.close()


#: SQLite primary result codes (https://www.sqlite.org/rescode.html): I/O error; full; busy or locked.
SQLITE_IOERR = 10
SQLITE_FULL = 13
SQLITE_BUSY_CODES = (5, 6)
#: Free space (bytes) below which an I/O error of the ledger is taken for a full disk: SQLite reports some
#: failed writes (of its WAL index, of a new file) as "disk I/O error", not as full.
NEARLY_FULL_BYTES = 1 << 20


def _sqlite_primary(exc: BaseException) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None) if isinstance(exc, sqlite3.Error) else None
    return None if code is None else code & 0xFF  # extended codes (e.g. 517 BUSY_SNAPSHOT) keep it


def disk_full(exc: BaseException, state_dir: Path) -> bool:
    """Whether a storage error comes from a full disk: a transient condition to wait out."""
    primary = _sqlite_primary(exc)
    if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or primary == SQLITE_FULL:
        return True
    if primary != SQLITE_IOERR:
        return False
    try:
        space = os.statvfs(state_dir)
    except OSError:
        return False
    return space.f_bavail * space.f_frsize < NEARLY_FULL_BYTES


class Worker:
    """Processes queued files one at a time on its own thread, with back-off on transient faults."""

    def __init__(
        self,
        config: Config,
        queue: WorkQueue,
        sink: PathSink,
        counts: Counts,
        log: Any,
        *,
        defer: Callable[[Path], None],
        wake: Callable[[], None],
        stages: Sequence[Stage] | None = None,
    ) -> None:
        self._settings = Settings(config, 0)
        self.queue = queue
        self.sink = sink
        self.counts = counts
        self.log = log
        self.stages = stages
        self._defer = defer
        self._wake = wake
        self.stopping = threading.Event()  # no new files; the frame in hand is finished
        self.released = threading.Event()  # set once the start-up backlog is checked and queued
        self.in_hand: InHand | None = None
        self.fatal: BaseException | None = None
        self.pause_until = 0.0  # backing off until then (monotonic)
        self._backoff = 0.0
        self._thread: threading.Thread | None = None

    def configure(self, config: Config) -> None:
        """Use ``config`` from the next frame on (called by the coordinator on a reload)."""
        self._settings = Settings(config, self._settings.generation + 1)

    @property
    def config(self) -> Config:
        return self._settings.config

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lcowatch-worker", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float) -> bool:
        """Wait for the thread to end; False if it is still running."""
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        return not self.alive()

    def _run(self) -> None:
        settings = self._settings
        try:
            # The daemon made the ledger before READY; a missing one now was deleted, and must stop it.
            conn = connect(settings.config.state_dir, create=False)
        except (sqlite3.Error, OSError) as exc:
            self._fail(Stop(f"cannot open the ledger: {exc}"))
            return
        pipeline: Pipeline | None = None
        executor: Executor | None = None
        warm_up()  # not in the first frame's latency
        try:
            while not self.stopping.is_set():
                if not self.released.is_set():  # the start-up backlog is still being checked
                    self.released.wait(0.5)
                    continue
                pause = self.pause_until - time.monotonic()
                if pause > 0:
                    self.stopping.wait(min(pause, 1.0))
                    continue
                item = self.queue.pop(timeout=0.5)
                if item is None and pipeline is not None:
                    pipeline.flush_results(force=True)  # the queue is empty: bring result files up to date
                if item is None or self.stopping.is_set():
                    continue
                if pipeline is None or settings is not self._settings:
                    settings = self._settings
                    executor = self._executor(settings.config, executor)
                    pipeline = Pipeline(settings.config, conn, self.stages, executor=executor)
                pipeline.executor.prefetch([item.path, *self.queue.upcoming(pipeline.executor.ahead)], 0)
                self._process(pipeline, item, settings.config)
                for path in pipeline.take_requeued():
                    self.sink.add(path)  # a template exists now: admission queues them at once
                self._wake()
        except BaseException as exc:  # a fatal error: the coordinator exits non-zero
            self._fail(exc)
        finally:
            if pipeline is not None and self.fatal is None:
                with contextlib.suppress(sqlite3.Error):
                    pipeline.flush_results(force=True)
            with contextlib.suppress(sqlite3.Error):
                conn.close()
            if executor is not None:
                executor.close()

    def _executor(self, config: Config, previous: Executor | None) -> Executor:
        """Where frames are measured under ``config`` (a reload may change it): a cluster that cannot be
        reached is said in the log, and frames are measured here meanwhile."""
        if previous is not None:
            previous.close()
        try:
            return make_executor(config)
        except (OSError, TimeoutError) as exc:
            self.log.error("cluster_unreachable", scheduler=config.processing.scheduler, error=str(exc),
                           note="processing in this process until the next reload")  # fmt: skip
            return SerialExecutor(config)

    def _fail(self, exc: BaseException) -> None:
        self.fatal = exc
        self._wake()

    def _still_the_same(self, item: QueueItem, config: Config) -> bool:
        """The path is still the regular file, inside the watch, that was found complete.

        The whole path is resolved, not only its last part: a watched sub-folder swapped for a symlink after
        its file was queued would otherwise have the daemon read, and quarantine, a file outside the watch.
        """
        real = Path(os.path.realpath(item.path))
        if not any(is_within(real, root) for root in config.watch.paths):
            self.log.warning("path_left_the_watch", file=item.path.name, path=str(item.path), target=str(real))
            return False
        try:
            st = os.stat(item.path)
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode):
            return False
        if (st.st_size, st.st_mtime_ns) != (item.size, item.mtime_ns):
            self.sink.add(item.path)  # changed since it was found complete: look at it again
            return False
        return True

    def _process(self, pipeline: Pipeline, item: QueueItem, config: Config) -> None:
        path = item.path
        if not self._still_the_same(item, config):
            return
        self.in_hand = InHand(path, time.monotonic())
        flog = self.log.bind(file=path.name, path=str(path))
        flog.debug("file_processing")
        try:
            outcome = pipeline.process_path(path)
        except Stop:
            give_back_attempt(config.state_dir, InHand(path, 0.0))  # not this frame's fault
            raise
        except sqlite3.DatabaseError as exc:
            self._storage_error(exc, item, flog, config)
            return
        except OSError as exc:
            if exc.filename and is_within(Path(os.path.abspath(exc.filename)), config.state_dir):
                self._storage_error(exc, item, flog, config)
            else:
                flog.error("file_unreadable", error=str(exc))
                self._defer(path)
            return
        except Exception as exc:
            flog.exception("file_failed", error=f"{type(exc).__name__}: {exc}")
            self._defer(path)
            return
        finally:
            self.in_hand = None
        self._after(outcome, item, flog, config)

    def _after(self, outcome: Outcome, item: QueueItem, flog: Any, config: Config) -> None:
        if outcome.state == State.RETRY:
            self._back_off(item, flog, outcome.reason, config)
            return
        self._backoff = 0.0
        if outcome.state == State.FAILED:
            self._defer(item.path)
            return
        self.counts.add(outcome.state)

    def _back_off(self, item: QueueItem, flog: Any, reason: str | None, config: Config) -> None:
        """A transient condition: wait (longer each time), then try the same file again; no attempt counted."""
        daemon = config.daemon
        self._backoff = min(daemon.max_retry_seconds, max(daemon.retry_seconds, self._backoff * 2))
        self.pause_until = time.monotonic() + self._backoff
        self.queue.push_many([item])
        flog.warning("backing_off", seconds=self._backoff, reason=reason)

    def _storage_error(self, exc: BaseException, item: QueueItem, flog: Any, config: Config) -> None:
        """The ledger or the state folder failed: disk full is transient; unwritable or corrupt is fatal."""
        locked = _sqlite_primary(exc) in SQLITE_BUSY_CODES
        if not state_dir_writable(config.state_dir):
            raise Stop(f"state folder {config.state_dir} cannot be written: {exc}")
        if disk_full(exc, config.state_dir) or locked:
            give_back_attempt(config.state_dir, InHand(item.path, 0.0))
            self._back_off(item, flog, f"{type(exc).__name__}: {exc}", config)
            return
        raise Stop(f"ledger error: {type(exc).__name__}: {exc}")
