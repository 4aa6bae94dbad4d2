"""Watching: file-system events are hints that a path may need a look; they are never trusted alone.

The watchdog handler only records paths (created, modified, closed after writing, moved-in
destinations) in a thread-safe set and returns; the daemon drains the set from its own thread. inotify
drops events silently when its queue overflows and does not see changes made on other hosts of a network
file system, so the daemon also rescans (``watch.rescan_seconds``), and ``watch.poll: true`` switches to
watchdog's polling observer. :meth:`Watcher.check` notices an observer (or one of its emitter threads)
that died, and starts a new one.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from lcowatch.log import get_logger

# Event types that may mean new content. Opened / closed-without-writing (our own reads) and deletions
# are not interesting.
INTERESTING_EVENTS = frozenset({"created", "modified", "moved", "closed"})


class PathSink:
    """A thread-safe set of paths (and of folders to walk) waiting to be looked at."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: set[Path] = set()
        self._folders: set[Path] = set()

    def add(self, path: Path, *, folder: bool = False) -> None:
        with self._lock:
            (self._folders if folder else self._files).add(path)

    def drain(self) -> tuple[set[Path], set[Path]]:
        """Take every recorded (files, folders), leaving the sink empty."""
        with self._lock:
            files, folders = self._files, self._folders
            self._files, self._folders = set(), set()
        return files, folders

    def __len__(self) -> int:
        with self._lock:
            return len(self._files) + len(self._folders)


class _Recorder(FileSystemEventHandler):
    def __init__(self, sink: PathSink) -> None:
        self.sink = sink

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in INTERESTING_EVENTS:
            return
        raw = event.dest_path if event.event_type == "moved" else event.src_path
        if raw:
            self.sink.add(Path(os.fsdecode(raw)), folder=event.is_directory)


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of a folder, None when it is not one (now)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


class Watcher:
    """A watchdog observer over every watched folder (recursive), restarted when it dies."""

    def __init__(self, paths: Iterable[Path], sink: PathSink, *, poll: bool, poll_interval: float) -> None:
        self.paths = list(paths)
        self.sink = sink
        self.poll = poll
        self.poll_interval = poll_interval
        self.log = get_logger()
        self._observer: Any = None
        self._watched: list[Path] = []
        self._identity: dict[Path, tuple[int, int] | None] = {}
        self.restarts = 0

    def _new_observer(self, polling: bool) -> Any:
        if polling:
            return PollingObserver(timeout=self.poll_interval)
        return Observer()

    def start(self) -> None:
        """Start an observer on every watched folder that exists."""
        polling = self.poll
        observer = self._new_observer(polling)
        handler = _Recorder(self.sink)
        watched = []
        for path in self.paths:
            if not path.is_dir():
                self.log.warning("watch_path_missing", path=str(path))
                continue
            try:
                observer.schedule(handler, str(path), recursive=True)
            except OSError as exc:
                if polling:
                    raise
                # inotify limits (max_user_watches, max_user_instances): fall back to polling, once.
                self.log.warning("watch_fallback_to_polling", path=str(path), error=str(exc))
                return self._start_polling_instead(observer)
            watched.append(path)
        observer.daemon = True
        observer.start()
        self._observer, self._watched = observer, watched
        self._identity = {path: _identity(path) for path in watched}
        self.log.info(
            "watching", paths=[str(p) for p in watched], observer=type(observer).__name__,
        )  # fmt: skip

    def _start_polling_instead(self, failed: Any) -> None:
        with contextlib.suppress(Exception):  # it was never started; nothing more to clean
            failed.unschedule_all()
        self.poll = True
        self.start()

    def alive(self) -> bool:
        """True when the observer thread and every emitter thread are running."""
        observer = self._observer
        if observer is None or not observer.is_alive():
            return False
        return all(emitter.is_alive() for emitter in observer.emitters)

    def check(self) -> bool:
        """Restart the observer if it died, a missing folder appeared, or a watched folder was replaced (moved
        away, deleted, made anew: the old watch sees nothing of the new one); True when it was restarted

        (events may have been lost: the caller rescans).
        """
        appeared = [p for p in self.paths if p not in self._watched and p.is_dir()]
        replaced = [p for p in self._watched if _identity(p) != self._identity.get(p)]
        if self.alive() and not appeared and not replaced:
            return False
        if replaced:
            self.log.warning("watch_path_replaced", paths=[str(p) for p in replaced])
        elif appeared and self.alive():
            self.log.info("watch_path_appeared", paths=[str(p) for p in appeared])
        else:
            self.log.error("observer_died", restarts=self.restarts)
        self.stop()
        self.restarts += 1
        self.start()
        return True

    def stop(self, timeout: float = 2.0) -> None:
        observer, self._observer = self._observer, None
        self._watched = []
        if observer is None:
            return
        try:
            observer.stop()
            if observer.is_alive():
                observer.join(timeout)
        except Exception as exc:  # a broken observer must not stop the daemon from replacing it
            self.log.warning("observer_stop_failed", error=str(exc))
