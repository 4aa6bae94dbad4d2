"""The daemon (``lcowatch run``): watch the folders, process every complete frame exactly once.

Threads and what they own:

- the **main thread** runs this coordinator: signals, config reloads, systemd readiness, status and
  watchdog (:mod:`lcowatch.intake.notify`), and the admission of files (:mod:`lcowatch.intake.admission`:
  watch events, scans, readiness, quarantine);
- one **worker thread** (:mod:`lcowatch.intake.worker`) pops the queue and runs the pipeline on one path at
  a time;
- watchdog's observer threads only record paths (:mod:`lcowatch.intake.watcher`).

The ledger is the source of truth: nothing in memory needs to survive a crash.

Signals: SIGTERM / SIGINT stop taking new files, let the frame in hand finish within
``daemon.stop_timeout`` and exit 0; a second one exits at once. SIGHUP reloads the config (a bad one is
logged and the old one kept). Fatal errors (:class:`lcowatch.errors.Stop`, a state folder that cannot be
written, a corrupt ledger) exit 1 so that systemd restarts the daemon.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import socket
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from lcowatch import __version__, log
from lcowatch.config import Config, load
from lcowatch.errors import ConfigError, Stop
from lcowatch.intake.admission import Admission
from lcowatch.intake.notify import Notifier
from lcowatch.intake.queue import WorkQueue
from lcowatch.intake.watcher import PathSink, Watcher
from lcowatch.intake.worker import Counts, Worker, disk_full, give_back_attempt, state_dir_writable
from lcowatch.pipeline.stages import Stage
from lcowatch.state.ledger import LEDGER_NAME, Ledger, connect
from lcowatch.states import State

EXIT_OK, EXIT_FATAL = 0, 1
TICK = 0.1  # seconds between looks of the main loop when nothing wakes it
STATUS_INTERVAL = 1.0
MAX_FAILED_TICKS = 20  # consecutive main-loop failures before the daemon gives up (and systemd restarts it)


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


LOCK_NAME = "lcowatch.lock"


def lock_state_dir(state_dir: Path) -> int:
    """Hold an exclusive lock on ``state_dir`` for the life of this process; returns its descriptor.

    The kernel drops the lock when the process ends, however it ends (kill -9 too). Raises :class:`Stop`
    naming the PID of the daemon that holds it.
    """
    fd = os.open(state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise Stop(f"another lcowatch daemon (PID {holder}) is running on state folder {state_dir}") from None
    write_pid(fd)
    return fd


def write_pid(fd: int) -> None:
    """Name this process in the lock file: best effort, as the lock holds without it (a full disk at start
    must not stop the start; the daemon writes it again once it is up)."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def running_daemon(state_dir: Path) -> int | None:
    """The PID of the daemon running on ``state_dir``, or None when none holds its lock."""
    try:
        fd = os.open(state_dir / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return None
    try:
        # A shared probe: it fails while a daemon holds the exclusive lock, and is dropped at once otherwise.
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        return int(holder) if holder.isdigit() else None
    finally:
        os.close(fd)
    return None


class Waker:
    """Wakes the main loop: from the worker thread (:meth:`wake`) and, through ``signal.set_wakeup_fd``,
    from signals, whose handlers then only set flags (a handler that takes a lock can deadlock against the
    code it interrupted)."""

    def __init__(self) -> None:
        self._read, self._write = socket.socketpair()
        for end in (self._read, self._write):
            end.setblocking(False)

    def fileno(self) -> int:
        return self._write.fileno()

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # a full buffer wakes the loop anyway
            self._write.send(b"\0")

    def wait(self, timeout: float) -> None:
        """Return after ``timeout`` seconds or as soon as something woke the loop."""
        ready, _, _ = select.select([self._read], [], [], timeout)
        if ready:
            with contextlib.suppress(BlockingIOError):
                while self._read.recv(4096):
                    pass


class Daemon:
    """One run of ``lcowatch run``, the coordinator of the threads; :meth:`run` returns the exit code."""

    def __init__(self, config: Config, *, stages: Sequence[Stage] | None = None) -> None:
        self.config = config
        self.stages = stages
        self.log = log.get_logger()
        self.notifier = Notifier()
        self.sink = PathSink()
        self.queue = WorkQueue()
        self.counts = Counts()
        self.watcher = Watcher(
            config.watch.paths, self.sink, poll=config.watch.poll, poll_interval=config.watch.poll_interval
        )
        self._waker = Waker()
        self._signal: int | None = None
        self._reload = False
        self._stalled_logged = False
        self._lock: int | None = None  # descriptor of the held state-folder lock
        self.admission: Admission | None = None
        self.worker: Worker | None = None

    def run(self) -> int:
        self._install_signals()
        try:
            prepare_state_dir(self.config.state_dir)
            self._lock = lock_state_dir(self.config.state_dir)
        except (Stop, OSError) as exc:
            self.log.error("daemon_fatal", reason=str(exc))
            return EXIT_FATAL
        self.log.info(
            "daemon_starting", version=__version__, pid=os.getpid(), state_dir=str(self.config.state_dir),
            paths=[str(p) for p in self.config.watch.paths], poll=self.config.watch.poll,
            watchdog_seconds=self.notifier.watchdog_seconds,
        )  # fmt: skip
        delay, waiting = self.config.daemon.retry_seconds, False
        while True:
            try:
                found = self._start_up()
                break
            except (Stop, sqlite3.Error, OSError) as exc:
                if not disk_full(exc, self.config.state_dir):
                    return self._exit_fatal(exc)
                reason = f"{type(exc).__name__}: {exc}"
            # A full disk at start is waited out as it is while running: a daemon that exits is restarted by
            # systemd into the same full disk, again and again. It says it is up, and why it does nothing.
            self.log.warning("start_waiting_for_disk_space", seconds=delay, reason=reason)
            if not waiting:
                self.notifier.ready(f"waiting for disk space in {self.config.state_dir}: {reason}")
                waiting = True
            if self._wait_alive(delay):
                return self._shutdown(self._signal or signal.SIGTERM)
            delay = min(self.config.daemon.max_retry_seconds, delay * 2)
        assert self.admission is not None and self.worker is not None
        if waiting and self._lock is not None:
            write_pid(self._lock)
        self.notifier.ready(self._status_text())
        self.log.info("daemon_ready", found=found, queued=len(self.queue), waiting=len(self.admission.tracker))
        self.worker.start()
        return self._loop(self.admission, self.worker)

    def _start_up(self) -> int:
        """Open the ledger, settle what a crash left, watch and scan; returns the number of files found."""
        conn = connect(self.config.state_dir)
        try:
            return self._admit_from(Ledger(conn))
        except BaseException:
            conn.close()
            raise

    def _admit_from(self, ledger: Ledger) -> int:
        self.admission = admission = Admission(
            self.config, ledger, self.sink, self.queue, self.log,
            on_quarantined=lambda: self.counts.add(State.QUARANTINED), tick=self._ping_watchdog,
        )  # fmt: skip
        self.worker = Worker(
            self.config, self.queue, self.sink, self.counts, self.log,
            defer=admission.defer, wake=self._waker.wake, stages=self.stages,
        )  # fmt: skip
        admission.recover()
        admission.requeue_ignored()
        if not self.watcher.alive():
            self.watcher.start()
        # READY once the backlog is tracked: the readiness checks (every gzip file inflated) come after,
        # in the main loop's slices, with the watchdog fed.
        return admission.scan("startup")

    def _wait_alive(self, seconds: float) -> bool:
        """Wait, keeping the watchdog fed; True as soon as a stop signal came."""
        deadline = time.monotonic() + seconds
        while self._signal is None and time.monotonic() < deadline:
            if self.notifier.watchdog_interval:
                self.notifier.watchdog()
            self._waker.wait(min(TICK * 10, max(0.0, deadline - time.monotonic())))
        return self._signal is not None

    def _loop(self, admission: Admission, worker: Worker) -> int:
        next_rescan = time.monotonic() + self.config.watch.rescan_seconds
        next_watch_check = time.monotonic() + 1.0
        next_status = 0.0
        next_ping = 0.0
        last_status = ""
        failed_ticks = 0
        while True:
            if self._signal is not None:
                return self._shutdown(self._signal)
            if worker.fatal is not None:
                return self._exit_fatal(worker.fatal)
            now = time.monotonic()
            try:
                if self._reload:
                    self._reload = False
                    self._reload_config()
                if now >= next_watch_check:
                    next_watch_check = now + 1.0
                    if not (self.config.state_dir / LEDGER_NAME).exists():
                        # Writing on into an unlinked file would lose everything: restart on a new ledger.
                        raise Stop(f"the ledger {self.config.state_dir / LEDGER_NAME} was deleted")
                    if self.watcher.check():
                        admission.scan("observer restarted")
                if now >= next_rescan:
                    next_rescan = now + self.config.watch.rescan_seconds
                    admission.scan("reconcile")
                admission.step(now)
                if not worker.released.is_set() and not admission.tracker.due():
                    # The start-up backlog is checked and queued whole, so that it is worked through in
                    # observation-time order.
                    self.log.info("backlog_checked", queued=len(self.queue), waiting=len(admission.tracker))
                    worker.released.set()
                failed_ticks = 0
            except (Stop, sqlite3.DatabaseError) as exc:
                if not isinstance(exc, sqlite3.OperationalError) or not state_dir_writable(self.config.state_dir):
                    return self._exit_fatal(exc)
                if disk_full(exc, self.config.state_dir):  # waited out, as the worker does: not a failing loop
                    self.log.warning("main_loop_disk_full", error=str(exc))
                else:
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
            self._waker.wait(TICK)

    # -- systemd -----------------------------------------------------------------------------------------

    def _healthy(self) -> bool:
        """Work makes progress: the worker runs and no frame has been in hand beyond ``stall_seconds``."""
        worker = self.worker
        if worker is None or worker.fatal is not None or not worker.alive():
            return False
        hand = worker.in_hand
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
        done = ", ".join(f"{state} {n}" for state, n in sorted(self.counts.snapshot().items())) or "nothing yet"
        hand = self.worker.in_hand if self.worker else None
        working = f"; working on {hand.path.name}" if hand else ""
        pause = (self.worker.pause_until if self.worker else 0.0) - time.monotonic()
        waiting = f"; backing off {pause:.0f} s" if pause > 0 else ""
        settling = len(self.admission.tracker) if self.admission else 0
        return f"{len(self.queue)} queued, {settling} waiting to complete; processed: {done}{working}{waiting}"

    # -- configuration and signals ---------------------------------------------------------------------

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self._waker.fileno(), warn_on_full_buffer=False)
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

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self._reload = True

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
        assert self.admission is not None and self.worker is not None
        self.admission.reconfigure(new)
        self.worker.configure(new)
        watch_changed = (old.watch.paths, old.watch.poll, old.watch.poll_interval) != (
            new.watch.paths, new.watch.poll, new.watch.poll_interval,
        )  # fmt: skip
        self.log.info("config_reloaded", config=str(source), targets=sorted(new.targets), watch_changed=watch_changed)
        self.admission.requeue_ignored()
        if watch_changed:
            self.watcher.stop()
            self.watcher = Watcher(
                new.watch.paths, self.sink, poll=new.watch.poll, poll_interval=new.watch.poll_interval
            )
            self.watcher.start()
        # Also how `lcowatch retry` reaches a running daemon: files made pending are looked at now.
        self.admission.scan("config reloaded")

    # -- leaving ---------------------------------------------------------------------------------------

    def _shutdown(self, signum: int) -> int:
        name = signal.Signals(signum).name
        budget = self.config.daemon.stop_timeout
        worker = self.worker
        hand = worker.in_hand if worker else None
        self.log.info(
            "daemon_stopping", signal=name, budget_seconds=budget, queued=len(self.queue),
            in_hand=hand.path.name if hand else None,
        )  # fmt: skip
        deadline = time.monotonic() + budget
        self.notifier.stopping(f"stopping on {name}")
        self._stop_taking_files(watcher_timeout=min(2.0, budget / 4))
        if worker is not None and not worker.join(max(0.0, deadline - time.monotonic())):
            hand = worker.in_hand
            self.log.warning(
                "stop_budget_exceeded", budget_seconds=budget,
                file=hand.path.name if hand else None, note="the frame stays pending and is redone at start",
            )  # fmt: skip
            give_back_attempt(self.config.state_dir, hand)
            self._flush()
            os._exit(EXIT_OK)  # the worker thread cannot be joined; the ledger is consistent
        self.log.info("daemon_stopped", signal=name, processed=self.counts.snapshot())
        self.notifier.close()
        return EXIT_OK

    def _exit_fatal(self, exc: BaseException) -> int:
        self.log.error("daemon_fatal", reason=str(exc), error=type(exc).__name__)
        self.notifier.stopping(f"fatal: {exc}")
        self._stop_taking_files(watcher_timeout=None)
        if self.worker is not None:
            self.worker.join(min(5.0, self.config.daemon.stop_timeout))
        self._flush()
        return EXIT_FATAL

    def _stop_taking_files(self, watcher_timeout: float | None) -> None:
        if self.worker is not None:
            self.worker.stopping.set()
        self.queue.close()
        if watcher_timeout is None:
            self.watcher.stop()
        else:
            self.watcher.stop(timeout=watcher_timeout)

    @staticmethod
    def _flush() -> None:
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()


def run(config: Config, *, stages: Sequence[Stage] | None = None) -> int:
    """The ``lcowatch run`` entry point; returns the exit code."""
    return Daemon(config, stages=stages).run()


__all__ = ["Daemon", "prepare_state_dir", "run"]
