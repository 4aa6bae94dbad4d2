"""The worker's pipeline: one frame from its file to its results and ledger state.

An ordered list of small stages with one signature, ``stage(work) -> None``, in the manner of BANZAI.
A stage that decides the frame cannot give a point sets ``work.rejection``; that is a normal outcome,
recorded with its reasons, not an exception. Exceptions are kept for what the daemon must act on
(:mod:`lcowatch.errors`).
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lcowatch.config import Config
from lcowatch.errors import Quarantine, Reject, RetryLater
from lcowatch.frame import Frame, read_content, read_frame, read_observation_time
from lcowatch.ledger import TERMINAL_STATES, Ledger
from lcowatch.log import frame_logger, get_logger
from lcowatch.preprocess import Preprocessed, preprocess
from lcowatch.quality import Quality, detect_sources, measure_quality
from lcowatch.quarantine import quarantine_file
from lcowatch.store import Store

FITS_SUFFIXES = (".fits", ".fits.fz", ".fits.gz", ".fit", ".fts")


@dataclass
class FrameWork:
    """What the stages build up for one frame."""

    frame: Frame
    config: Config
    log: Any
    pre: Preprocessed | None = None
    sources: np.ndarray | None = None
    quality: Quality | None = None
    rejection: list[str] = field(default_factory=list)


class Stage(Protocol):
    name: str

    def __call__(self, work: FrameWork) -> None: ...


class Preprocess:
    """Mask bad and saturated pixels; model and subtract the background."""

    name = "preprocess"

    def __call__(self, work: FrameWork) -> None:
        work.pre = preprocess(work.frame)


class MeasureQuality:
    """Detect sources and judge the frame; a poor frame is rejected with its reasons."""

    name = "quality"

    def __call__(self, work: FrameWork) -> None:
        assert work.pre is not None
        work.sources = detect_sources(work.pre, work.config.quality)
        work.quality = measure_quality(work.frame, work.pre, work.sources, work.config.quality)
        work.rejection.extend(work.quality.reasons)


def default_stages() -> list[Stage]:
    return [Preprocess(), MeasureQuality()]


@dataclass(frozen=True)
class Outcome:
    """How one file ended: ``state`` is a ledger state, or ``skipped`` (already seen) or ``retry``."""

    path: Path
    state: str
    sha256: str | None = None
    reason: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def is_candidate(path: Path) -> bool:
    """A file name the pipeline looks at: FITS suffixes, no hidden or temporary names."""
    name = path.name
    return not name.startswith(".") and name.lower().endswith(FITS_SUFFIXES)


def find_files(paths: Iterable[Path]) -> list[Path]:
    """Candidate files under ``paths`` (files or folders, recursively), without duplicates."""
    found: dict[Path, None] = {}
    for root in paths:
        if root.is_dir():
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    if is_candidate(Path(name)):
                        found[Path(dirpath) / name] = None
        elif root.is_file():
            found[root] = None
    return list(found)


class Pipeline:
    """Runs files through the stages and records every outcome in the ledger and store."""

    def __init__(self, config: Config, conn: sqlite3.Connection, stages: Sequence[Stage] | None = None):
        self.config = config
        self.ledger = Ledger(conn)
        self.store = Store(conn)
        self.stages = list(stages) if stages is not None else default_stages()
        self.log = get_logger()

    def unseen(self, paths: Iterable[Path]) -> list[Path]:
        """Files not already finished (by path, size and mtime), in observation-time order."""
        pending = []
        for path in paths:
            try:
                stat = path.stat()
            except OSError:
                continue
            sha = self.ledger.known_path(path, stat.st_size, stat.st_mtime_ns)
            record = self.ledger.get(sha) if sha else None
            if record is None or record.state not in TERMINAL_STATES:
                pending.append(path)
        times = {path: read_observation_time(path) for path in pending}
        return sorted(pending, key=lambda p: (times[p] is not None, times[p] or 0.0, str(p)))

    def process_path(self, path: Path) -> Outcome:
        """Process one file; never raises for bad input (see :class:`Outcome`)."""
        try:
            stat = path.stat()
            content, sha256 = read_content(path)
        except FileNotFoundError:
            return Outcome(path, "skipped", reason="file vanished")
        self.ledger.remember_path(path, stat.st_size, stat.st_mtime_ns, sha256)
        record = self.ledger.get(sha256)
        if record is not None and record.state in TERMINAL_STATES:
            self.log.debug("already_seen", file=path.name, sha256=sha256, state=record.state)
            return Outcome(path, "skipped", sha256, f"already {record.state}")
        max_attempts = self.config.processing.max_attempts
        if record is not None and record.attempts >= max_attempts:
            reason = f"gave up after {record.attempts} attempts; last error: {record.error}"
            return self._quarantine(path, sha256, Quarantine(reason, step=record.step))
        self.ledger.start_attempt(sha256, path, stat.st_size)
        try:
            frame = read_frame(path, content, sha256, self.config)
        except Quarantine as exc:
            return self._quarantine(path, sha256, exc)
        del content
        return self._run_stages(frame)

    def _quarantine(self, path: Path, sha256: str, exc: Quarantine) -> Outcome:
        destination = quarantine_file(
            path, self.config.state_dir, sha256=sha256, reason=str(exc), step=exc.step
        )
        self.ledger.finish(sha256, "quarantined", step=exc.step, error=str(exc))
        self.log.warning(
            "frame_quarantined", file=path.name, sha256=sha256, step=exc.step, reason=str(exc),
            moved_to=str(destination),
        )  # fmt: skip
        return Outcome(path, "quarantined", sha256, str(exc))

    def _run_stages(self, frame: Frame) -> Outcome:
        meta = frame.meta
        log = frame_logger(frame.path.name, frame.sha256, meta.target, meta.filter)
        identity = {"object": meta.object, "target": meta.target, "filter": meta.filter, "mjd": meta.mjd_mid}
        for note in frame.warnings:
            log.warning("frame_warning", message=note)
        if meta.target is None:
            reason = f"OBJECT {meta.object!r} matches no configured target"
            self.ledger.finish(frame.sha256, "ignored", step="read", error=reason, identity=identity)
            log.info("frame_ignored", reason=reason)
            return Outcome(frame.path, "ignored", frame.sha256, reason)

        work = FrameWork(frame=frame, config=self.config, log=log)
        seconds: dict[str, float] = {}
        step = "read"
        try:
            for stage in self.stages:
                step = stage.name
                started = time.perf_counter()
                stage(work)
                seconds[stage.name] = round(time.perf_counter() - started, 4)
                if work.rejection:
                    break
        except RetryLater as exc:
            log.warning("frame_retry_later", step=step, reason=str(exc))
            self.ledger.uncount_attempt(frame.sha256)
            return Outcome(frame.path, "retry", frame.sha256, str(exc), seconds)
        except Reject as exc:
            work.rejection.append(str(exc))
        except Quarantine as exc:
            exc.step = exc.step or step
            return self._quarantine(frame.path, frame.sha256, exc)
        except Exception as exc:  # a bug, not bad input: keep the file pending; attempts bound the retries
            log.exception("frame_failed", step=step)
            self.ledger.note_error(frame.sha256, step, f"{type(exc).__name__}: {exc}")
            return Outcome(frame.path, "failed", frame.sha256, str(exc), seconds)

        state = "rejected" if work.rejection else "done"
        reason = "; ".join(work.rejection) or None
        quality, sources = work.quality, work.sources

        def write(conn: sqlite3.Connection) -> None:
            if quality is not None and sources is not None:
                self.store.write_frame(conn, frame.sha256, frame.path, meta, quality, sources)

        started = time.perf_counter()
        self.ledger.finish(frame.sha256, state, step=step, error=reason, identity=identity, write=write)
        seconds["store"] = round(time.perf_counter() - started, 4)
        log.info(
            "frame_processed", outcome=state, reason=reason, seconds=seconds,
            quality=quality.verdict if quality else None,
            fwhm_arcsec=round(quality.fwhm_arcsec, 3) if quality else None,
            nstars=quality.nstars if quality else None,
        )  # fmt: skip
        return Outcome(frame.path, state, frame.sha256, reason, seconds)
