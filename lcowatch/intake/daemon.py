"""The daemon (``lcowatch run``): watch the folders, process every complete frame exactly once.

Threads and what they own:

- the **main thread** handles signals, drains watch events, runs the scans (a full one at start-up, a
  reconcile scan every ``watch.rescan_seconds``), tracks files until they are complete
  (:mod:`lcowatch.intake.readiness`), quarantines files that never will be, keeps the observer alive and talks
  to systemd (:mod:`lcowatch.intake.notify`);
- one **worker thread** pops the queue (earliest observation first) and runs
  :meth:`lcowatch.pipeline.runner.Pipeline.process_path` on one path at a time;
- watchdog's observer threads only record paths (:mod:`lcowatch.intake.watcher`).

The ledger is the source of truth: nothing in memory needs to survive a crash. The queue holds paths
(and their size, mtime and observation time), never frames, so memory stays flat with the backlog.

Signals: SIGTERM / SIGINT stop taking new files, let the frame in hand finish within
``daemon.stop_timeout`` and exit 0; a second one exits at once. SIGHUP reloads the config (a bad one is
logged and the old one kept). Fatal errors (:class:`lcowatch.errors.Stop`, a state folder that cannot be
written, a corrupt ledger) exit 1 so that systemd restarts the daemon.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import heapq
import json
import os
import signal
import sqlite3
import stat
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from lcowatch import __version__, log
from lcowatch.config import Config, load
from lcowatch.errors import ConfigError, Stop
from lcowatch.intake.notify import Notifier
from lcowatch.intake.quarantine import quarantine_file, quarantined_names
from lcowatch.intake.readiness import Result, Tracker, is_wanted
from lcowatch.intake.watcher import PathSink, Watcher
from lcowatch.pipeline.runner import Outcome, Pipeline, warm_up
from lcowatch.pipeline.stages import Stage
from lcowatch.state.ledger import Ledger, connect
from lcowatch.states import TERMINAL_STATES, State, Step

EXIT_OK, EXIT_FATAL = 0, 1
TICK = 0.1  # seconds between looks of the main loop when nothing wakes it
STATUS_INTERVAL = 1.0
MAX_FAILED_TICKS = 20  # consecutive main-loop failures before the daemon gives up (and systemd restarts it)


@dataclass(order=True)
class QueueItem:
    """A complete file waiting for the worker: only its path and what identifies its content."""

    key: tuple[bool, float, str]
    path: Path = field(compare=False)
    size: int = field(compare=False)
    mtime_ns: int = field(compare=False)


def queue_key(path: Path, mjd: float | None) -> tuple[bool, float, str]:
    """Observation time order (as :meth:`Pipeline.unseen`); files without a time first."""
    return (mjd is not None, mjd or 0.0, str(path))


class WorkQueue:
    """A thread-safe priority queue of paths, earliest observation first, each path at most once."""

    def __init__(self) -> None:
        self._heap: list[QueueItem] = []
        self._members: set[Path] = set()
        self._cond = threading.Condition()
        self._closed = False

    def push_many(self, items: Sequence[QueueItem]) -> None:
        """Add a batch at once, so the worker never starts on a batch half pushed."""
        with self._cond:
            for item in items:
                if item.path not in self._members:
                    self._members.add(item.path)
                    heapq.heappush(self._heap, item)
            self._cond.notify_all()

    def pop(self, timeout: float) -> QueueItem | None:
        with self._cond:
            if not self._heap and not self._closed:
                self._cond.wait(timeout)
            if not self._heap or self._closed:
                return None
            item = heapq.heappop(self._heap)
            self._members.discard(item.path)
            return item

    def close(self) -> None:
        """Wake the worker and give it nothing more."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __contains__(self, path: object) -> bool:
        with self._cond:
            return path in self._members

    def __len__(self) -> int:
        with self._cond:
            return len(self._heap)


@dataclass
class InHand:
    path: Path
    started: float


def _sha256_of(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or path.is_relative_to(folder)


def prepare_state_dir(state_dir: Path) -> None:
    """Create the state folder owner-only and prove it can be written; raise :class:`Stop` if not."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with tempfile.TemporaryFile(dir=state_dir):
            pass
    except OSError as exc:
        raise Stop(f"state folder {state_dir} cannot be written: {exc.strerror or exc}") from None
    mode = state_dir.stat().st_mode & 0o777
    if mode & 0o077:
        log.get_logger().warning("state_dir_not_private", path=str(state_dir), mode=oct(mode))


class Daemon:
    """One run of ``lcowatch run``; :meth:`run` returns the exit code."""

    def __init__(self, config: Config, *, stages: Sequence[Stage] | None = None) -> None:
        self.config = config
        self.stages = stages
        self.log = log.get_logger()
        self.notifier = Notifier()
        self.sink = PathSink()
        self.queue = WorkQueue()
        self.tracker = Tracker(config.watch.quiet_seconds, config.watch.incomplete_after, config.processing.max_pixels)
        self.watcher = Watcher(
            config.watch.paths, self.sink, poll=config.watch.poll, poll_interval=config.watch.poll_interval
        )
        self.generation = 0  # bumped on every config reload; the worker rebuilds its pipeline
        self.counts: Counter[str] = Counter()
        self._counts_lock = threading.Lock()
        self.in_hand: InHand | None = None
        self.fatal: BaseException | None = None
        self._stopping = threading.Event()  # no new files; the worker finishes the one in hand
        self._wake = threading.Event()
        self._signal: int | None = None
        self._reload = False
        self._deferred: list[tuple[float, str]] = []  # (not before, path): failed files retried later
        self._deferred_lock = threading.Lock()
        self._pause_until = 0.0  # the worker backs off until then (monotonic)
        self._backoff = 0.0
        self._warned_links: set[Path] = set()
        self._stalled_logged = False
        self._ledger: Ledger | None = None
        self._worker: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------------
    # main thread

    def run(self) -> int:
        self._install_signals()
        try:
            prepare_state_dir(self.config.state_dir)
            self._ledger = Ledger(connect(self.config.state_dir))
        except (Stop, sqlite3.Error, OSError) as exc:
            self.log.error("daemon_fatal", reason=str(exc))
            return EXIT_FATAL
        self.log.info(
            "daemon_starting", version=__version__, pid=os.getpid(), state_dir=str(self.config.state_dir),
            paths=[str(p) for p in self.config.watch.paths], poll=self.config.watch.poll,
            watchdog_seconds=self.notifier.watchdog_seconds,
        )  # fmt: skip
        try:
            self._recover()
            self.watcher.start()
            found = self._scan("startup")
            self._poll_readiness()
        except (Stop, sqlite3.DatabaseError) as exc:
            return self._exit_fatal(exc)
        self.notifier.ready(self._status_text())
        self.log.info("daemon_ready", found=found, queued=len(self.queue), waiting=len(self.tracker))
        self._worker = threading.Thread(target=self._work, name="lcowatch-worker", daemon=True)
        self._worker.start()
        return self._loop()

    def _loop(self) -> int:
        next_rescan = time.monotonic() + self.config.watch.rescan_seconds
        next_watch_check = time.monotonic() + 1.0
        next_status = 0.0
        next_ping = 0.0
        last_status = ""
        failed_ticks = 0
        while True:
            if self._signal is not None:
                return self._shutdown(self._signal)
            if self.fatal is not None:
                return self._exit_fatal(self.fatal)
            now = time.monotonic()
            try:
                if self._reload:
                    self._reload = False
                    self._reload_config()
                if now >= next_watch_check:
                    next_watch_check = now + 1.0
                    if self.watcher.check():
                        self._scan("observer restarted")
                self._drain_events()
                self._release_deferred(now)
                if now >= next_rescan:
                    next_rescan = now + self.config.watch.rescan_seconds
                    self._scan("reconcile")
                self._poll_readiness()
                failed_ticks = 0
            except (Stop, sqlite3.DatabaseError) as exc:
                if not isinstance(exc, sqlite3.OperationalError) or not self._state_dir_writable():
                    return self._exit_fatal(exc)
                failed_ticks += 1
                self.log.warning("main_loop_error", error=str(exc), consecutive=failed_ticks)
            except Exception as exc:
                failed_ticks += 1
                self.log.exception("main_loop_error", error=str(exc), consecutive=failed_ticks)
            if failed_ticks >= MAX_FAILED_TICKS:
                return self._exit_fatal(Stop(f"main loop failed {failed_ticks} times in a row"))
            now = time.monotonic()
            if now >= next_ping:
                next_ping = now + (self.notifier.watchdog_interval or 1.0)
                self._ping_watchdog()
            if now >= next_status:
                next_status = now + STATUS_INTERVAL
                status = self._status_text()
                if status != last_status:
                    self.notifier.status(status)
                    last_status = status
            self._wake.wait(TICK)
            self._wake.clear()

    def _healthy(self) -> bool:
        """Work makes progress: the worker runs and no frame has been in hand beyond ``stall_seconds``."""
        if self.fatal is not None or self._worker is None or not self._worker.is_alive():
            return False
        hand = self.in_hand
        if hand is not None and time.monotonic() - hand.started > self.config.daemon.stall_seconds:
            if not self._stalled_logged:
                self.log.error(
                    "worker_stalled", file=hand.path.name, path=str(hand.path),
                    seconds=round(time.monotonic() - hand.started, 1),
                )  # fmt: skip
                self._stalled_logged = True
            return False
        self._stalled_logged = False
        return True

    def _ping_watchdog(self) -> None:
        if self._healthy() and self.notifier.watchdog_interval:
            self.notifier.watchdog()

    def _status_text(self) -> str:
        done = ", ".join(f"{state} {n}" for state, n in sorted(self.counted().items())) or "nothing yet"
        hand = self.in_hand
        working = f"; working on {hand.path.name}" if hand else ""
        pause = self._pause_until - time.monotonic()
        waiting = f"; backing off {pause:.0f} s" if pause > 0 else ""
        queued, settling = len(self.queue), len(self.tracker)
        return f"{queued} queued, {settling} waiting to complete; processed: {done}{working}{waiting}"

    # -- discovery ------------------------------------------------------------------------------------

    def _roots(self) -> list[Path]:
        return self.config.watch.paths  # resolved when the config was loaded

    def _admit(self, path: Path) -> bool:
        """Whether ``path`` may be looked at: a wanted name, really inside a watched folder, not state."""
        if not is_wanted(path):
            return False
        real = Path(os.path.realpath(path))
        if _is_within(real, self.config.state_dir):
            return False
        if not any(_is_within(real, root) for root in self._roots()):
            if path not in self._warned_links:
                self._warned_links.add(path)
                self.log.warning("symlink_outside_watch_ignored", file=path.name, path=str(path), target=str(real))
            return False
        return True

    def _finished(self, path: Path, st: os.stat_result) -> bool:
        assert self._ledger is not None
        sha = self._ledger.known_path(path, st.st_size, st.st_mtime_ns)
        if sha is None:
            return False
        record = self._ledger.get(sha)
        return record is not None and record.state in TERMINAL_STATES

    def _consider(self, path: Path) -> bool:
        """Track ``path`` unless it is queued, finished or not admissible; True when tracked.

        A queued path is checked again by the worker before it is processed (same size and mtime).
        """
        if path in self.queue:
            return False
        if path in self.tracker:
            self.tracker.add(path)  # look again soon
            return True
        if not self._admit(path):
            return False
        try:
            st = path.stat()
        except OSError:
            return False
        if self._finished(path, st):
            return False
        self.tracker.add(path)
        return True

    def _walk(self, folders: Sequence[Path]) -> Iterator[Path]:
        state_dir = self.config.state_dir
        for folder in folders:
            if not folder.is_dir():
                continue
            for dirpath, dirnames, filenames in os.walk(folder):  # never follows symlinked folders
                here = Path(dirpath)
                dirnames[:] = sorted(
                    d for d in dirnames if not d.startswith(".") and not _is_within(here / d, state_dir)
                )
                for name in sorted(filenames):
                    yield here / name

    def _scan(self, why: str) -> int:
        """Walk every watched folder and track what is not finished; return the number tracked."""
        started = time.monotonic()
        tracked = 0
        last_ping = started
        for path in self._walk(self._roots()):
            tracked += self._consider(path)
            if time.monotonic() - last_ping > 1.0:
                self._ping_watchdog()
                last_ping = time.monotonic()
        self.log.info("scan_finished", why=why, tracked=tracked, seconds=round(time.monotonic() - started, 3))
        return tracked

    def _drain_events(self) -> None:
        files, folders = self.sink.drain()
        for path in files:
            self._consider(path)
        if folders:
            for path in self._walk([f for f in folders if any(_is_within(f, r) for r in self._roots())]):
                self._consider(path)

    def _release_deferred(self, now: float) -> None:
        with self._deferred_lock:
            while self._deferred and self._deferred[0][0] <= now:
                _, raw = heapq.heappop(self._deferred)
                self._consider(Path(raw))

    def _poll_readiness(self) -> None:
        ready: list[QueueItem] = []
        for result in self.tracker.poll(tick=self._ping_watchdog):
            if result.kind == "ready":
                ready.append(QueueItem(queue_key(result.path, result.mjd), result.path, result.size, result.mtime_ns))
            elif result.kind in ("poison", "incomplete"):
                self._quarantine_unready(result)
        if ready:
            self.queue.push_many(ready)
            for item in ready:
                self.log.debug("file_ready", file=item.path.name, path=str(item.path), mjd=item.key[1])

    def _quarantine_unready(self, result: Result) -> None:
        """Move aside a file that never became complete, or never can; record it in the ledger."""
        assert self._ledger is not None
        path = result.path
        flog = self.log.bind(file=path.name, path=str(path))
        try:
            sha256 = _sha256_of(path)
            record = self._ledger.get(sha256)
            if record is not None and record.state in TERMINAL_STATES:
                st = path.stat()
                self._ledger.remember_path(path, st.st_size, st.st_mtime_ns, sha256)
                flog.info("already_seen", sha256=sha256, state=record.state)
                return
            step = Step.READINESS
            reason = result.reason or result.kind
            try:
                destination: Path | None = quarantine_file(
                    path, self.config.state_dir, sha256=sha256, reason=reason, step=step
                )
            except FileNotFoundError:
                return
            except OSError as exc:  # e.g. a read-only watched folder: record it, leave it where it is
                flog.error("quarantine_move_failed", reason=reason, error=str(exc))
                destination = None
                reason = f"{reason} (left in place: {exc.strerror or exc})"
                st = path.stat()
                self._ledger.remember_path(path, st.st_size, st.st_mtime_ns, sha256)
            self._ledger.record(sha256, path, result.size, State.QUARANTINED, step=step, error=reason)
        except FileNotFoundError:
            return
        except OSError as exc:
            flog.error("quarantine_failed", reason=result.reason, error=str(exc))
            return
        self._count(State.QUARANTINED)
        flog.warning(
            "file_quarantined", sha256=sha256, step=step, reason=reason,
            moved_to=str(destination) if destination else None,
        )  # fmt: skip

    def _recover(self) -> None:
        """Settle ledger rows a crash left pending whose file was already moved into quarantine."""
        assert self._ledger is not None
        for record in self._ledger.in_state(State.PENDING):
            path = Path(record.path)
            if path.exists():
                continue  # the scan finds it and the worker finishes it
            name = path.name
            for candidate in quarantined_names(name, record.sha256, self.config.state_dir):
                if candidate.is_file() and _sha256_of(candidate) == record.sha256:
                    note = candidate.with_name(candidate.name + ".reason.json")
                    reason, step = "quarantined (settled after a crash)", record.step
                    with contextlib.suppress(OSError, ValueError):
                        details = json.loads(note.read_text())
                        reason, step = details.get("reason") or reason, details.get("step") or step
                    self._ledger.finish(record.sha256, State.QUARANTINED, step=step, error=reason)
                    self.log.warning("recovered_quarantine", file=name, sha256=record.sha256, reason=reason)
                    break
            else:
                self.log.warning("pending_file_missing", file=name, path=str(path), sha256=record.sha256)

    # -- configuration and signals ---------------------------------------------------------------------

    def _install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_hup)

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._signal is not None:
            # The second one: leave now. The ledger makes this safe (the frame in hand stays pending).
            # No logging machinery here: its lock may be held by the code this handler interrupted.
            line = {"event": "exit_now", "signal": signal.Signals(signum).name, "level": "warning"}
            with contextlib.suppress(OSError):
                os.write(sys.stdout.fileno(), (json.dumps(line) + "\n").encode())
            os._exit(128 + signum)
        self._signal = signum
        self._wake.set()

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self._reload = True
        self._wake.set()

    def _reload_config(self) -> None:
        source = self.config.source
        try:
            new = load(source)
        except ConfigError as exc:
            self.log.error("config_reload_failed", config=str(source), problems=exc.problems, kept="old config")
            return
        if new.state_dir != self.config.state_dir:
            self.log.error(
                "config_reload_failed", config=str(source), kept="old config",
                problems=["state_dir: cannot change while running; restart the daemon"],
            )  # fmt: skip
            return
        old, self.config = self.config, new
        log.configure(sys.stdout, level=new.log_level)
        self.tracker.configure(new.watch.quiet_seconds, new.watch.incomplete_after, new.processing.max_pixels)
        self.generation += 1
        watch_changed = (old.watch.paths, old.watch.poll, old.watch.poll_interval) != (
            new.watch.paths, new.watch.poll, new.watch.poll_interval,
        )  # fmt: skip
        self.log.info("config_reloaded", config=str(source), targets=sorted(new.targets), watch_changed=watch_changed)
        if watch_changed:
            self.watcher.stop()
            self.watcher = Watcher(
                new.watch.paths, self.sink, poll=new.watch.poll, poll_interval=new.watch.poll_interval
            )
            self.watcher.start()
            self._scan("config reloaded")

    # -- leaving ---------------------------------------------------------------------------------------

    def _shutdown(self, signum: int) -> int:
        name = signal.Signals(signum).name
        budget = self.config.daemon.stop_timeout
        hand = self.in_hand
        self.log.info(
            "daemon_stopping", signal=name, budget_seconds=budget, queued=len(self.queue),
            in_hand=hand.path.name if hand else None,
        )  # fmt: skip
        deadline = time.monotonic() + budget
        self.notifier.stopping(f"stopping on {name}")
        self._stopping.set()
        self.queue.close()
        self.watcher.stop(timeout=min(2.0, budget / 4))
        worker = self._worker
        if worker is not None:
            worker.join(max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                hand = self.in_hand
                self.log.warning(
                    "stop_budget_exceeded", budget_seconds=budget,
                    file=hand.path.name if hand else None, note="the frame stays pending and is redone at start",
                )  # fmt: skip
                self._give_back_attempt(hand)
                self._flush()
                os._exit(EXIT_OK)  # the worker thread cannot be joined; the ledger is consistent
        self.log.info("daemon_stopped", signal=name, processed=self.counted())
        self.notifier.close()
        return EXIT_OK

    def _give_back_attempt(self, hand: InHand | None) -> None:
        """The frame we cut short is not to blame: take back its attempt (best effort, own connection)."""
        if hand is None:
            return
        with contextlib.suppress(OSError, sqlite3.Error):
            st = hand.path.stat()
            conn = connect(self.config.state_dir)
            try:
                conn.execute("PRAGMA busy_timeout = 1000")  # never hold up the exit for long
                ledger = Ledger(conn)
                sha = ledger.known_path(hand.path, st.st_size, st.st_mtime_ns)
                record = ledger.get(sha) if sha else None
                if record is not None and record.state == State.PENDING:
                    ledger.uncount_attempt(record.sha256)
            finally:
                conn.close()

    def _exit_fatal(self, exc: BaseException) -> int:
        self.log.error("daemon_fatal", reason=str(exc), error=type(exc).__name__)
        self.notifier.stopping(f"fatal: {exc}")
        self._stopping.set()
        self.queue.close()
        self.watcher.stop()
        worker = self._worker
        if worker is not None and worker is not threading.current_thread():
            worker.join(min(5.0, self.config.daemon.stop_timeout))
        self._flush()
        return EXIT_FATAL

    @staticmethod
    def _flush() -> None:
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()

    def _state_dir_writable(self) -> bool:
        try:
            with tempfile.TemporaryFile(dir=self.config.state_dir):
                return True
        except OSError:
            return False

    # ------------------------------------------------------------------------------------------------
    # worker thread

    def _work(self) -> None:
        try:
            conn = connect(self.config.state_dir)
        except (sqlite3.Error, OSError) as exc:
            self.fatal = Stop(f"cannot open the ledger: {exc}")
            self._wake.set()
            return
        pipeline: Pipeline | None = None
        generation = -1
        warm_up()  # not in the first frame's latency
        try:
            while not self._stopping.is_set():
                pause = self._pause_until - time.monotonic()
                if pause > 0:
                    self._stopping.wait(min(pause, 1.0))
                    continue
                item = self.queue.pop(timeout=0.5)
                if item is None and pipeline is not None:
                    pipeline.flush_results(force=True)  # the queue is empty: bring result files up to date
                if item is None or self._stopping.is_set():
                    continue
                if pipeline is None or generation != self.generation:
                    generation = self.generation
                    pipeline = Pipeline(self.config, conn, self.stages)
                self._process(pipeline, item)
                for path in pipeline.take_requeued():
                    self.sink.add(path)  # a template exists now: admission queues them at once
                self._wake.set()
        except BaseException as exc:  # a fatal error: the main thread exits non-zero
            self.fatal = exc
            self._wake.set()
        finally:
            if pipeline is not None and self.fatal is None:
                with contextlib.suppress(sqlite3.Error):
                    pipeline.flush_results(force=True)
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def _still_the_same(self, item: QueueItem) -> bool:
        """The path is still the regular file, inside the watch, that was found complete."""
        try:
            st = os.lstat(item.path)
        except OSError:
            return False
        if os.path.islink(item.path):
            real = Path(os.path.realpath(item.path))
            if not any(_is_within(real, root) for root in self._roots()):
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

    def _process(self, pipeline: Pipeline, item: QueueItem) -> None:
        path = item.path
        if not self._still_the_same(item):
            return
        self.in_hand = InHand(path, time.monotonic())
        flog = self.log.bind(file=path.name, path=str(path))
        flog.debug("file_processing")
        try:
            outcome = pipeline.process_path(path)
        except Stop:
            self._give_back_attempt(InHand(path, 0.0))  # not this frame's fault
            raise
        except sqlite3.DatabaseError as exc:
            self._storage_error(exc, item, flog)
            return
        except OSError as exc:
            if exc.filename and _is_within(Path(os.path.abspath(exc.filename)), self.config.state_dir):
                self._storage_error(exc, item, flog)
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
        self._after(outcome, item, flog)

    def _after(self, outcome: Outcome, item: QueueItem, flog: Any) -> None:
        if outcome.state == State.RETRY:
            self._back_off(item, flog, outcome.reason)
            return
        self._backoff = 0.0
        if outcome.state == State.FAILED:
            self._defer(item.path)
            return
        self._count(outcome.state)

    def _count(self, state: str) -> None:
        with self._counts_lock:
            self.counts[state] += 1

    def counted(self) -> dict[str, int]:
        with self._counts_lock:
            return dict(self.counts)

    def _back_off(self, item: QueueItem, flog: Any, reason: str | None) -> None:
        """A transient condition: wait (longer each time), then try the same file again; no attempt counted."""
        daemon = self.config.daemon
        self._backoff = min(daemon.max_retry_seconds, max(daemon.retry_seconds, self._backoff * 2))
        self._pause_until = time.monotonic() + self._backoff
        self.queue.push_many([item])
        flog.warning("backing_off", seconds=self._backoff, reason=reason)

    def _defer(self, path: Path) -> None:
        """Try a failed file again later (its attempts are counted; the pipeline quarantines at the limit)."""
        with self._deferred_lock:
            heapq.heappush(self._deferred, (time.monotonic() + self.config.daemon.retry_seconds, str(path)))

    def _storage_error(self, exc: BaseException, item: QueueItem, flog: Any) -> None:
        """The ledger or the state folder failed: disk full is transient; unwritable or corrupt is fatal."""
        message = str(exc).lower()
        full = (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "full" in message
        locked = "locked" in message or "busy" in message
        if not self._state_dir_writable():
            raise Stop(f"state folder {self.config.state_dir} cannot be written: {exc}")
        if full or locked:
            self._give_back_attempt(InHand(item.path, 0.0))
            self._back_off(item, flog, f"{type(exc).__name__}: {exc}")
            return
        raise Stop(f"ledger error: {type(exc).__name__}: {exc}")


def run(config: Config, *, stages: Sequence[Stage] | None = None) -> int:
    """The ``lcowatch run`` entry point; returns the exit code."""
    return Daemon(config, stages=stages).run()


__all__ = ["Daemon", "WorkQueue", "prepare_state_dir", "queue_key", "run"]
