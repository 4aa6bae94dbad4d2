"""Admission, on the daemon's main thread: which files to look at, tracked until they are complete, then
queued for the worker; files that never will be are quarantined.

Paths come from the watch events (:class:`~lcowatch.intake.watcher.PathSink`), the scans of the watched
folders, the worker's hand-backs and the failed files whose retry is due (:meth:`Admission.defer`, the only
method another thread calls).
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from lcowatch.config import Config
from lcowatch.intake.quarantine import quarantine_file, quarantined_names, reason_file, write_reason
from lcowatch.intake.queue import QueueItem, WorkQueue, queue_key
from lcowatch.intake.readiness import Result, Tracker, is_wanted
from lcowatch.intake.watcher import PathSink
from lcowatch.log import display_name
from lcowatch.state.ledger import Ledger
from lcowatch.states import State, Step

#: Seconds of readiness checks per pass of the main loop: a backlog of gzip files (each inflated to be
#: checked) is worked through in slices, between which signals, reloads and the watchdog are seen to.
READINESS_SLICE = 0.5


def sha256_of(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def is_within(path: Path, folder: Path) -> bool:
    return path == folder or path.is_relative_to(folder)


class Admission:
    """Decides which files are worked on, and when.

    Parameters
    ----------
    config : Config
        Replaced by :meth:`reconfigure` on a reload.
    ledger : Ledger
        The main thread's ledger.
    sink, queue : PathSink, WorkQueue
        Shared with the watcher (in) and the worker (out).
    log : structlog logger
    on_quarantined : callable
        Called for each file quarantined here (the daemon counts them).
    tick : callable
        Called now and then during long passes (the daemon pings its watchdog there).
    """

    def __init__(
        self,
        config: Config,
        ledger: Ledger,
        sink: PathSink,
        queue: WorkQueue,
        log: Any,
        *,
        on_quarantined: Callable[[], None],
        tick: Callable[[], None],
    ) -> None:
        self.config = config
        self.ledger = ledger
        self.sink = sink
        self.queue = queue
        self.log = log
        self.tracker = Tracker(config.watch.quiet_seconds, config.watch.incomplete_after, config.processing.max_pixels)
        self._on_quarantined = on_quarantined
        self._tick = tick
        self._deferred: list[tuple[float, str]] = []  # (not before, path): failed files retried later
        self._deferred_lock = threading.Lock()
        self._warned_links: set[Path] = set()

    def reconfigure(self, config: Config) -> None:
        self.config = config
        self.tracker.configure(config.watch.quiet_seconds, config.watch.incomplete_after, config.processing.max_pixels)

    def roots(self) -> list[Path]:
        return self.config.watch.paths  # resolved when the config was loaded

    # -- one pass of the main loop ---------------------------------------------------------------------

    def step(self, now: float) -> None:
        """Take the watch events and the due retries, then queue what has become complete."""
        self.drain_events()
        self._release_deferred(now)
        self.poll_readiness()

    def scan(self, why: str) -> int:
        """Walk every watched folder and track what is not finished; return the number tracked."""
        started = time.monotonic()
        tracked = 0
        last_tick = started
        for path in self._walk(self.roots()):
            tracked += self.consider(path)
            if time.monotonic() - last_tick > 1.0:
                self._tick()
                last_tick = time.monotonic()
        self.log.info("scan_finished", why=why, tracked=tracked, seconds=round(time.monotonic() - started, 3))
        return tracked

    def drain_events(self) -> None:
        files, folders = self.sink.drain()
        for path in files:
            self.consider(path)
        if folders:
            for path in self._walk([f for f in folders if any(is_within(f, r) for r in self.roots())]):
                self.consider(path)

    def poll_readiness(self) -> None:
        """Queue the files that have become complete, then quarantine those that never will. A quarantine
        that fails (the ledger cannot be written) loses neither the ready files nor the other unready ones:
        they are queued first, and those not yet quarantined are looked at again after
        ``daemon.retry_seconds`` (a full disk must not spin the main loop)."""
        results = self.tracker.poll(tick=self._tick, budget=READINESS_SLICE)
        ready = [QueueItem(queue_key(r.path, r.mjd), r.path, r.size, r.mtime_ns) for r in results if r.kind == "ready"]
        if ready:
            self.queue.push_many(ready)
            for item in ready:
                self.log.debug("file_ready", file=item.path.name, path=str(item.path), mjd=item.key[1])
        unready = [r for r in results if r.kind in ("poison", "incomplete")]
        for done, result in enumerate(unready):
            try:
                self._quarantine_unready(result)
            except BaseException:
                for later in unready[done:]:
                    self.tracker.add(later.path, after=self.config.daemon.retry_seconds)
                raise

    def defer(self, path: Path) -> None:
        """Try a failed file again after ``daemon.retry_seconds`` (any thread; attempts are counted, and the
        pipeline quarantines a file at the limit)."""
        with self._deferred_lock:
            heapq.heappush(self._deferred, (time.monotonic() + self.config.daemon.retry_seconds, str(path)))

    # -- what is looked at -----------------------------------------------------------------------------

    def consider(self, path: Path) -> bool:
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

    def _admit(self, path: Path) -> bool:
        """Whether ``path`` may be looked at: a wanted name, really inside a watched folder, not state."""
        if not is_wanted(path):
            return False
        real = Path(os.path.realpath(path))
        if is_within(real, self.config.state_dir):
            return False
        if not any(is_within(real, root) for root in self.roots()):
            if path not in self._warned_links:
                self._warned_links.add(path)
                self.log.warning("symlink_outside_watch_ignored", file=path.name, path=str(path), target=str(real))
            return False
        return True

    def _finished(self, path: Path, st: os.stat_result) -> bool:
        sha = self.ledger.known_path(path, st.st_size, st.st_mtime_ns)
        if sha is None:
            return False
        record = self.ledger.get(sha)
        return record is not None and record.finished

    def _walk(self, folders: Sequence[Path]) -> Iterator[Path]:
        state_dir = self.config.state_dir
        for folder in folders:
            if not folder.is_dir():
                continue
            for dirpath, dirnames, filenames in os.walk(folder):  # never follows symlinked folders
                here = Path(dirpath)
                dirnames[:] = sorted(
                    d for d in dirnames if not d.startswith(".") and not is_within(here / d, state_dir)
                )
                for name in sorted(filenames):
                    yield here / name

    def _release_deferred(self, now: float) -> None:
        with self._deferred_lock:
            due = []
            while self._deferred and self._deferred[0][0] <= now:
                due.append(Path(heapq.heappop(self._deferred)[1]))
        for path in due:
            self.consider(path)

    # -- files that never will be complete, and crashes ------------------------------------------------

    def _quarantine_unready(self, result: Result) -> None:
        """Move aside a file that never became complete, or never can; record it in the ledger."""
        path = result.path
        flog = self.log.bind(file=path.name, path=str(path))
        try:
            sha256 = sha256_of(path)
            record = self.ledger.get(sha256)
            if record is not None and record.finished:
                st = path.stat()
                self.ledger.remember_path(path, st.st_size, st.st_mtime_ns, sha256)
                flog.info("already_seen", sha256=sha256, state=record.state)
                return
            step = Step.READINESS
            reason = result.reason or result.kind
            # Pending first: a crash after the move leaves a row that the next start settles from the note.
            self.ledger.record(sha256, path, result.size, State.PENDING, step=step, error=reason)
            try:
                destination: Path | None = quarantine_file(
                    path, self.config.state_dir, sha256=sha256, reason=reason, step=step
                )
            except FileNotFoundError:
                self.ledger.mark_vanished(sha256, path, step)
                return
            except OSError as exc:  # e.g. a read-only watched folder: record it, leave it where it is
                flog.error("quarantine_move_failed", reason=reason, error=str(exc))
                destination = None
                reason = f"{reason} (left in place: {exc.strerror or exc})"
                st = path.stat()
                self.ledger.remember_path(path, st.st_size, st.st_mtime_ns, sha256)
            self.ledger.record(sha256, path, result.size, State.QUARANTINED, step=step, error=reason)
        except FileNotFoundError:
            return
        except OSError as exc:
            flog.error("quarantine_failed", reason=result.reason, error=str(exc))
            return
        self._on_quarantined()
        flog.warning(
            "file_quarantined", sha256=sha256, step=step, reason=reason,
            moved_to=str(destination) if destination else None,
        )  # fmt: skip

    def requeue_ignored(self) -> int:
        """Frames ignored for want of a target that the config now has: pending again, and looked at."""
        paths = self.ledger.requeue_ignored(lambda name: self.config.target_for_object(name) is not None)
        for path in paths:
            self.log.info("ignored_frame_requeued", file=display_name(path.name), path=str(path))
            self.consider(path)
        return len(paths)

    def recover(self) -> None:
        """Settle ledger rows a crash left pending whose file was already moved into quarantine."""
        for record in self.ledger.in_state(State.PENDING):
            path = Path(record.path)
            if path.exists():
                continue  # the scan finds it and the worker finishes it
            name = path.name
            for candidate in quarantined_names(name, record.sha256, self.config.state_dir):
                if candidate.is_file() and sha256_of(candidate) == record.sha256:
                    reason, step = "quarantined (settled after a crash)", record.step
                    try:
                        details = json.loads(reason_file(candidate).read_text())
                        reason, step = details.get("reason") or reason, details.get("step") or step
                    except (OSError, ValueError):  # the crash came between the move and the note: write it
                        with contextlib.suppress(OSError):
                            write_reason(candidate, path, sha256=record.sha256, reason=reason, step=step)
                    self.ledger.finish(record.sha256, State.QUARANTINED, step=step, error=reason)
                    self.log.warning("recovered_quarantine", file=name, sha256=record.sha256, reason=reason)
                    break
            else:
                # Deleted or moved away after it was first read: not pending forever. Should the same content
                # come back (under any name), it is worked on.
                self.ledger.mark_vanished(record.sha256, path, record.step)
                self.log.warning("pending_file_vanished", file=name, path=str(path), sha256=record.sha256)
