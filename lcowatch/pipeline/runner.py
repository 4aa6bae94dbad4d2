"""The worker's pipeline: one frame from its file to its results and ledger state, through the stages of
:mod:`lcowatch.pipeline.stages`, with every outcome recorded in one transaction; and the stored-data jobs
that reuse the stages' pieces (recalibration, pinning a template, colours).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from stat import S_ISREG
from typing import Any

import numpy as np
from astropy.coordinates import SkyCoord

from lcowatch import flags
from lcowatch.bands import STANDARD_FILTERS
from lcowatch.config import Config
from lcowatch.errors import Quarantine, Reject, RetryLater, Stop
from lcowatch.intake.quarantine import quarantine_file
from lcowatch.intake.readiness import Verdict, check_complete, max_frame_bytes
from lcowatch.log import display_name, frame_logger, get_logger
from lcowatch.outputs.export import lightcurve_table, write_result_file
from lcowatch.outputs.plot import DIAGNOSTICS_DIR, PLOTS_DIR, plot_frame_preview, plot_lightcurve, plot_subtraction
from lcowatch.pipeline.executor import Executor, SerialExecutor
from lcowatch.pipeline.pixels import PixelSite, image_of
from lcowatch.pipeline.stages import (
    CatalogMatcher,
    FrameWork,
    Stage,
    calibrate_frame,
    calibration_columns,
    catalog_radius_arcmin,
    default_stages,
    place_target,
    wcs_text,
)
from lcowatch.pipeline.subtraction import SubtractionViews
from lcowatch.science.calibrate import (
    COLOR_WINDOW_DAYS,
    solve_colours,
)
from lcowatch.science.frame import Frame, file_sha256, read_content
from lcowatch.science.frame import warm_up as warm_up  # the daemon warms its process through here
from lcowatch.science.refcat import FieldCatalogs, color_for_band
from lcowatch.science.register import (
    register,
    wcs_guess,
)
from lcowatch.science.template import (
    SOLVED_WCS_ERROR_ARCSEC,
    Template,
    template_score,
)
from lcowatch.state.images import reference_image, write_reference_image
from lcowatch.state.ledger import UNMATCHED, VANISHED, Ledger, path_text, transaction
from lcowatch.state.store import ColourColumns, PointRecord, Store
from lcowatch.states import State, Step


class _Superseded(Exception):
    """Another process set up the frame's target while the frame was measured: measure it again."""


@dataclass(frozen=True)
class Outcome:
    """How one file ended: ``state`` is a ledger state, or ``skipped`` (already seen) or ``retry``."""

    path: Path
    state: str
    sha256: str | None = None
    reason: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)


#: How far (arcmin) beyond a frame's half diagonal its target may lie before a warning: an unsolved WCS
#: (WCSERR != 0) is the telescope pointing, off by a few arcminutes.
TARGET_FAR_ARCMIN = 10.0

#: Standard deviation of field stars' colours (mag): the error of a colour assumed to be their median.
ASSUMED_COLOR_SPREAD = 0.3
#: Same-visit colours of the target before their spread stands for the error of their median.
TYPICAL_COLOR_VISITS = 3


def typical_colour(colours: np.ndarray) -> tuple[float, float] | None:
    """The target's usual colour from its same-visit colours, and the error of using it for a visit without
    one: their spread (the colour's change with the target's phase and the measurements' noise), or the
    field's spread while there are too few of them."""
    if len(colours) == 0:
        return None
    median = float(np.median(colours))
    if len(colours) < TYPICAL_COLOR_VISITS:
        return median, ASSUMED_COLOR_SPREAD
    return median, float(np.std(colours, ddof=1))


#: The target's typical colour and its error per band (mag), as :func:`typical_colour` gives them.
Typicals = dict[str | None, tuple[float, float] | None]


def apply_colours(
    conn: sqlite3.Connection,
    store: Store,
    target: str,
    mjd: float,
    *,
    refresh_stand_ins: bool = True,
    typical: Typicals | None = None,
) -> None:
    """Apply the colour terms of the target's calibrated points near ``mjd`` with its colour that visit.

    Where the colour's bands were not both measured in the same visit, the target's median colour over
    the visits where they were stands in (else the comparison stars' median colour), and the point is
    flagged ``color_assumed`` (when a colour term applies at all). ``diff_mag`` from another instrument
    than the reference frame's moves with the difference of their colour terms. The colour's error, times
    the term, is in ``mag_err`` and ``diff_mag_err``: the measured colour's from its two magnitudes, an
    assumed one's the spread of the target's own colours (:func:`typical_colour`) or of field stars'.
    Where a colour was measured and ``refresh_stand_ins``, the stand-ins of other visits that the target's
    typical colour has moved away from are set again (:func:`_refresh_stand_ins`). ``typical`` is the
    typical colour per band when the caller knows it already.
    """
    rows = store.calibrated_points_near(conn, target, mjd, 2 * COLOR_WINDOW_DAYS)
    assumed = flags.value("color_assumed")
    typical = {} if typical is None else typical
    any_measured = False
    for aperture in {row["aperture"] for row in rows}:
        group = [row for row in rows if row["aperture"] == aperture]
        term = np.array([row["color_term"] or 0.0 for row in group])
        mag0 = np.array([row["mag"] - (row["color_term"] or 0.0) * (row["color"] or 0.0) for row in group])
        # The error each point had before any colour was applied to it.
        previous_err = np.array([_colour_error(row) for row in group])
        base_err = np.array(
            [_without(row["mag_err"] or 0.0, c * e) for row, c, e in zip(group, term, previous_err, strict=True)]
        )
        times = np.array([row["mjd"] for row in group])
        bands = [row["band"] if row["filter"] in STANDARD_FILTERS else None for row in group]
        colour, colour_err = solve_colours(bands, times, mag0, base_err, term, color_for_band)
        for k, row in enumerate(group):
            if abs(times[k] - mjd) > COLOR_WINDOW_DAYS:
                continue  # its partners may lie outside what was read
            c, change = term[k], row["diff_color_term"] or 0.0
            field_color = row["comparison_color"] or 0.0
            if row["band"] not in typical:
                typical[row["band"]] = typical_colour(store.measured_colours(target, row["band"]))
            measured = bool(np.isfinite(colour[k]))
            any_measured |= measured
            stand_in = typical[row["band"]] or (field_color, ASSUMED_COLOR_SPREAD)
            used, used_err = (float(colour[k]), float(colour_err[k])) if measured else stand_in
            diff_mag, diff_err = row["diff_mag"], row["diff_mag_err"]
            if diff_mag is not None and change:
                # diff_mag was made for the field's median colour, moved since by the colour last applied.
                previous = row["color"] if row["color"] is not None else field_color
                diff_mag += change * (used - previous)
                diff_err = float(np.hypot(_without(diff_err, change * previous_err[k]), change * used_err))
            now_assumed = bool((c != 0 or change != 0) and not measured)
            # A stand-in where no term applies is neither flagged nor given an error: measured_colours must
            # not count it as the target's own.
            stored_err = used_err if measured or now_assumed else None
            columns = ColourColumns(
                mag=float(mag0[k] + c * used), mag_err=float(np.hypot(base_err[k], c * used_err)),
                diff_mag=diff_mag, diff_mag_err=diff_err, color=float(used), color_err=stored_err,
                flags=row["flags"] & ~assumed | (assumed if now_assumed else 0),
            )  # fmt: skip
            store.set_point_colour(conn, row["sha256"], aperture, columns)
    if refresh_stand_ins and any_measured:
        _refresh_stand_ins(conn, store, target)


#: A stand-in colour (or its error) this far from the target's typical colour now is set again (mag).
STAND_IN_TOLERANCE = 0.005


def _refresh_stand_ins(conn: sqlite3.Connection, store: Store, target: str) -> None:
    """Set again the target's stand-in colours that are no longer its typical colour (set before its colours
    were measured, or while they were fewer): the visit of each such point at aperture 0, every filter and
    aperture of it, once per visit."""
    typical: Typicals = {}
    last_mjd = -np.inf
    for row in store.stand_in_colours(conn, target):  # in time order
        if row["band"] not in typical:
            typical[row["band"]] = typical_colour(store.measured_colours(target, row["band"]))
        now = typical[row["band"]]
        if now is None or row["mjd"] - last_mjd <= COLOR_WINDOW_DAYS:
            continue
        if (
            abs(row["color"] - now[0]) > STAND_IN_TOLERANCE
            or abs((row["color_err"] or 0.0) - now[1]) > STAND_IN_TOLERANCE
        ):
            apply_colours(conn, store, target, row["mjd"], refresh_stand_ins=False, typical=typical)
            last_mjd = row["mjd"]


def _colour_error(row: sqlite3.Row) -> float:
    """The error of the colour last applied to a point (none yet: 0; before colour errors were stored, an
    assumed colour's spread)."""
    if row["color_err"] is not None:
        return float(row["color_err"])
    return ASSUMED_COLOR_SPREAD if row["flags"] & flags.value("color_assumed") else 0.0


def _without(error: float, part: float) -> float:
    """An error with one independent part taken out (never below 0)."""
    return float(np.sqrt(max(error**2 - part**2, 0.0)))


class Pipeline:
    """Runs files through the stages and records every outcome in the ledger and store."""

    def __init__(
        self, config: Config, conn: sqlite3.Connection, stages: Sequence[Stage] | None = None,
        executor: Executor | None = None,
    ):  # fmt: skip
        self.config = config
        self.executor = executor or SerialExecutor(config)
        self.ledger = Ledger(conn)
        self.store = Store(conn)
        self.stages = list(stages) if stages is not None else default_stages(config)
        self._stale_results: set[str] = set()
        self._requeued: list[Path] = []  # frames that waited for a template and can go now
        self._results_written: dict[str, float] = {}
        self.log = get_logger()

    def requeue_ignored(self) -> list[Path]:
        """Frames once ignored whose OBJECT a configured target now matches, made pending again."""
        paths = self.ledger.requeue_ignored(lambda name: self.config.target_for_object(name) is not None)
        for path in paths:
            self.log.info("ignored_frame_requeued", file=display_name(path.name), path=str(path))
        return paths

    def take_requeued(self) -> list[Path]:
        """Frames that waited for their target's first template and can be processed now (each once)."""
        waiting, self._requeued = self._requeued, []
        return waiting

    def flush_results(self, *, force: bool = False) -> None:
        """Rewrite the stale result files (and plots), each at most every ``processing.results_interval``.

        The store holds every point already; the files are views of it. Rewriting a target's file after
        every frame would make a backlog cost grow with the light curve's length, so a burst is
        written at its first frame and then at most once per interval; ``force`` (the daemon when its
        queue is empty, ``process`` at its end) brings every file up to date.
        """
        now = time.monotonic()
        for target in sorted(self._stale_results):
            if not force and now - self._results_written.get(target, -np.inf) < self.config.processing.results_interval:
                continue
            try:
                table = lightcurve_table(self.store, target)
                write_result_file(table, target, self.config.state_dir)
                if self.config.plot_after_each_frame:
                    plot_lightcurve(table, self.config.state_dir / PLOTS_DIR / f"{target}.png", title=target)
            except OSError as exc:
                self.log.warning("result_file_not_written", target=target, reason=str(exc))
                continue
            self._results_written[target] = now
            self._stale_results.discard(target)

    def unseen(self, paths: Iterable[Path]) -> list[tuple[Path, Verdict | None]]:
        """Files not already finished (by path, size and mtime), each with its readiness verdict (None for
        what is not a regular file), in observation-time order. The verdict is the daemon's: one walk of the
        file gives both its completeness and its time."""
        pending = []
        for path in paths:
            try:
                stat = path.stat()
            except OSError:
                continue
            sha = self.ledger.known_path(path, stat.st_size, stat.st_mtime_ns)
            record = self.ledger.get(sha) if sha else None
            if record is None or not record.finished:
                pending.append((path, self._readiness(path)))
        return sorted(pending, key=lambda p: (p[1] is None or p[1].mjd is None, (p[1] and p[1].mjd) or 0.0, str(p[0])))

    def _readiness(self, path: Path) -> Verdict | None:
        # A FIFO or a device is never opened: the read could block, or never end.
        return check_complete(path, max_pixels=self.config.processing.max_pixels) if path.is_file() else None

    def process_unwatched(self, path: Path, verdict: Verdict | None = None) -> Outcome:
        """Process a file named on the command line, held to the daemon's readiness rules (``verdict``, found
        here when not given): one that is not whole (empty, truncated) or can never be a frame (a gzip bomb,
        not FITS) is quarantined with the reason, without being read whole. Unlike the daemon's folders,
        nothing is still being written."""
        verdict = verdict or self._readiness(path)
        if verdict is not None and verdict.kind != "ready":
            return self.process_path(path, poison=verdict.reason)
        return self.process_path(path)

    def process_path(self, path: Path, *, poison: str | None = None) -> Outcome:
        """Process one file; never raises for bad input (see :class:`Outcome`). ``poison``: why the file can
        never be a frame, found without reading it whole; it is quarantined with that reason."""
        limit = max_frame_bytes(self.config.processing.max_pixels)
        content: bytes | None = None
        try:
            stat = path.stat()
            if not S_ISREG(stat.st_mode):  # a FIFO would block the read, a device never end it
                self.log.warning("not_a_regular_file", file=path.name, path=str(path))
                return Outcome(path, State.SKIPPED, reason="not a regular file")
            if stat.st_size > limit or poison:
                sha256 = file_sha256(path)
            else:
                content, sha256 = read_content(path)
        except FileNotFoundError:
            return Outcome(path, State.SKIPPED, reason="file vanished")
        except OSError as exc:  # unreadable (permissions, I/O error): nothing recorded, try again later
            self.log.error("file_unreadable", file=path.name, path=str(path), error=str(exc))
            return Outcome(path, State.FAILED, reason=str(exc))
        self.ledger.remember_path(path, stat.st_size, stat.st_mtime_ns, sha256)
        record = self.ledger.get(sha256)
        if record is not None and record.finished:
            self.log.debug("already_seen", file=path.name, sha256=sha256, state=record.state)
            return Outcome(path, State.SKIPPED, sha256, f"already {record.state}")
        max_attempts = self.config.processing.max_attempts
        if record is not None and record.attempts >= max_attempts:
            reason = f"gave up after {record.attempts} attempts; last error: {record.error}"
            return self._quarantine(path, sha256, Quarantine(reason, step=record.step))
        self.ledger.start_attempt(sha256, path, stat.st_size)
        if content is None:
            poison = (
                poison or f"file of {stat.st_size} bytes, more than a frame of processing.max_pixels ({limit} bytes)"
            )
            return self._quarantine(path, sha256, Quarantine(poison, step=Step.READ))
        try:
            frame, pixels = self.executor.open(path, content, sha256)
        except Quarantine as exc:
            return self._quarantine(path, sha256, exc)
        except RetryLater as exc:
            self.log.warning("frame_retry_later", file=path.name, step=Step.READ, reason=str(exc))
            self.ledger.uncount_attempt(sha256)
            return Outcome(path, State.RETRY, sha256, str(exc))
        del content
        return self._run_stages(frame, pixels)

    def _quarantine(self, path: Path, sha256: str, exc: Quarantine) -> Outcome:
        try:
            destination = quarantine_file(path, self.config.state_dir, sha256=sha256, reason=str(exc), step=exc.step)
        except FileNotFoundError:  # deleted while it was read: nothing to move aside, nothing left pending
            self.ledger.mark_vanished(sha256, path, exc.step, f" (it was to be quarantined: {exc})")
            self.log.warning("file_vanished", file=path.name, sha256=sha256, reason=str(exc))
            return Outcome(path, State.IGNORED, sha256, VANISHED)
        self.ledger.finish(sha256, State.QUARANTINED, step=exc.step, error=str(exc))
        self.log.warning(
            "frame_quarantined", file=path.name, sha256=sha256, step=exc.step, reason=str(exc),
            moved_to=str(destination),
        )  # fmt: skip
        return Outcome(path, State.QUARANTINED, sha256, str(exc))

    def _write_results(self, conn: sqlite3.Connection, work: FrameWork, state: str, requeued: list[Path]) -> None:
        """Everything a measured frame adds to the store, inside the transaction that marks it finished;
        frames that waited for the target's reference frame or a reference image are added to ``requeued``."""
        frame, meta, quality, sources = work.frame, work.frame.meta, work.quality, work.sources
        if quality is None or sources is None:
            return
        if state == State.DONE and self._superseded(work):
            raise _Superseded
        score = template_score(quality, self.config.template)
        self.store.write_frame(conn, frame.sha256, frame.path, meta, quality, sources, wcs_text(frame), score)
        if state != State.DONE:
            self.store.forget_results(conn, frame.sha256)  # a redo that now fails leaves no old point
            return
        assert meta.target is not None and work.star_ids is not None and work.photometry is not None
        if work.reference_changed and work.reference is not None:
            self.store.write_reference(conn, work.reference)
        if work.new_reference_image is not None:
            write_reference_image(conn, work.new_reference_image)
        new_template = work.template_reason is not None or work.instrument_template is not None
        first_image = work.new_reference_image is not None and work.new_reference_image.frames == 1
        if work.new_reference or new_template or first_image:
            requeued.extend(
                self.ledger.requeue_waiting(conn, meta.target, unregistered_in=meta.filter if new_template else None)
            )
        if work.template_reason is not None and work.template is not None:
            self.store.write_template(conn, work.template, work.template_reason)
        if work.instrument_template is not None:
            reason = f"first frame of {meta.instrument}: its frames register to it"
            self.store.write_template(conn, work.instrument_template, reason, active=False)
        if work.new_field_ids is not None and work.new_field_ref is not None:
            origin = f"template {frame.name}"
            self.store.write_field_stars(conn, meta.target, work.new_field_ids, work.new_field_ref, origin)
        if work.new_refs:
            self.store.write_star_refs(conn, meta.target, meta.filter, work.new_refs)
        if work.target_centroid_ref is not None:
            self.store.add_target_centroid(conn, meta.target, frame.sha256, *work.target_centroid_ref)
        self.store.write_photometry(conn, frame.sha256, work.star_ids, work.photometry)
        self.store.write_points(conn, work.points)
        apply_colours(conn, self.store, meta.target, meta.mjd_mid)

    def _superseded(self, work: FrameWork) -> bool:
        """Whether what this frame set up from an empty slot (the target's reference frame, its first field
        stars, a filter's reference magnitudes) was set up by another process (the daemon beside a
        ``process`` run) while it was measured. Asked inside the write transaction, which holds the lock."""
        target, filter = work.frame.meta.target, work.frame.meta.filter
        assert target is not None
        if work.new_reference and self.store.reference(target) is not None:
            return True
        if work.new_field_ids is not None and np.isin(work.new_field_ids, self.store.field_stars(target)[0]).any():
            return True
        if work.new_reference_image is not None:
            image = work.new_reference_image
            stored = reference_image(self.store.conn, target, filter, image.instrument_class)
            if (0 if stored is None else stored.frames) != image.frames - 1:
                return True
        return work.first_in_filter and bool(self.store.star_refs(target, filter))

    def _run_stages(self, frame: Frame, pixels: PixelSite, *, first_try: bool = True) -> Outcome:
        meta = frame.meta
        log = frame_logger(frame.name, frame.sha256, meta.target, meta.filter)
        identity = {"object": meta.object, "target": meta.target, "filter": meta.filter, "mjd": meta.mjd_mid}
        for note in frame.warnings:
            log.warning("frame_warning", message=note)
        if meta.target is None:
            unmatched = f"OBJECT {meta.object!r} {UNMATCHED}"
            self.ledger.finish(frame.sha256, State.IGNORED, step=Step.READ, error=unmatched, identity=identity)
            log.info("frame_ignored", reason=unmatched)
            return Outcome(frame.path, State.IGNORED, frame.sha256, unmatched)
        warn_if_target_far(self.config, frame, log)
        target = meta.target
        first, replaces = earlier_version(self.store, frame)
        if first is not None:
            duplicate = f"the same exposure as {first}, already measured"
            self.ledger.finish(frame.sha256, State.IGNORED, step=Step.READ, error=duplicate, identity=identity)
            log.info("frame_duplicate", reason=duplicate, first=first)
            return Outcome(frame.path, State.IGNORED, frame.sha256, duplicate)

        work = FrameWork(frame=frame, config=self.config, log=log, store=self.store, pixels=pixels, replaces=replaces)
        seconds: dict[str, float] = {}
        step: str = Step.READ
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
            return Outcome(frame.path, State.RETRY, frame.sha256, str(exc), seconds)
        except Reject as exc:
            work.rejection.append(str(exc))
        except Quarantine as exc:
            exc.step = exc.step or step
            return self._quarantine(frame.path, frame.sha256, exc)
        except Stop:
            raise  # fatal for the daemon (which exits non-zero), not a fault of this frame
        except Exception as exc:  # a bug, not bad input: keep the file pending; attempts bound the retries
            log.exception("frame_failed", step=step)
            self.ledger.note_error(frame.sha256, step, f"{type(exc).__name__}: {exc}")
            return Outcome(frame.path, State.FAILED, frame.sha256, str(exc), seconds)

        state = State.REJECTED if work.rejection else State.DONE
        reason: str | None = "; ".join(work.rejection) or None
        quality = work.quality

        requeued: list[Path] = []

        def write(conn: sqlite3.Connection) -> None:
            if replaces is not None:  # gone before this version's colours are solved
                retire_earlier_version(conn, self.store, replaces, frame.sha256)
            self._write_results(conn, work, state, requeued)
            if replaces is not None and state != State.DONE:
                apply_colours(conn, self.store, target, meta.mjd_mid)

        started = time.perf_counter()
        try:
            self.ledger.finish(frame.sha256, state, step=step, error=reason, identity=identity, write=write)
        except _Superseded:
            if not first_try:
                raise RuntimeError("another process keeps changing the target's reference frame") from None
            log.info("frame_redone", reason="another process set up the target first; measured again against it")
            return self._run_stages(frame, pixels, first_try=False)
        self._requeued.extend(requeued)
        if replaces is not None:
            log.info("frame_replaced", replaced=replaces, reason="the file changed since it was measured")
        if state == State.DONE and meta.target is not None and work.fill_in_calibration:
            examined, calibrated = recalibrate(self.config, self.ledger.conn, meta.target)
            log.info("calibration_filled_in", frames=examined, calibrated=calibrated)
        if state == State.DONE and meta.target is not None:
            self._stale_results.add(meta.target)
            self.flush_results()
        if self.config.diagnostics and (work.template_reason is not None or (quality and quality.verdict == "poor")):
            draw_preview(
                self.config, work, "template" if work.template_reason is not None and state == State.DONE else "poor"
            )
        if self.config.diagnostics and work.subtraction_views is not None and state == State.DONE:
            draw_subtraction(self.config, work, work.subtraction_views)
        seconds["store"] = round(time.perf_counter() - started, 4)
        log.info(
            "frame_processed", outcome=state, reason=reason, seconds=seconds,
            quality=quality.verdict if quality else None,
            fwhm_arcsec=round(quality.fwhm_arcsec, 3) if quality else None,
            nstars=quality.nstars if quality else None,
            **(_point_summary(work.points[0]) if state == State.DONE and work.points else {}),
        )  # fmt: skip
        return Outcome(frame.path, state, frame.sha256, reason, seconds)


def earlier_version(store: Store, frame: Frame) -> tuple[str | None, str | None]:
    """How an exposure measured before bears on ``frame``: (the file it duplicates, the sha256 it replaces).

    Another copy or encoding (.fits.fz and its funpacked .fits, a re-delivery under a new name) is a
    duplicate: one exposure gives one point. The same file grown or rewritten in place (a writer that paused
    at an HDU boundary for longer than the quiet period) replaces the part measured before.
    """
    first = store.same_exposure(frame.sha256, frame.meta)
    if first is None:
        return None, None
    if path_text(first["path"]) == str(frame.path.absolute()):
        return None, first["sha256"]
    return first["file"], None


def retire_earlier_version(conn: sqlite3.Connection, store: Store, sha256: str, by: str) -> None:
    """Drop what an earlier version of a file gave and record it as replaced by ``by`` (the caller's
    transaction)."""
    store.forget_measurements(conn, sha256)
    Ledger.mark_replaced(conn, sha256, f"replaced by a later version of the same file ({by})")


def draw_preview(config: Config, work: FrameWork, kind: str) -> None:
    """A diagnostic PNG (the old ``verbose 2``): a poor frame, or a new template, with its apertures."""
    frame, quality = work.frame, work.quality
    phot = work.photometry
    radius = float(phot.radii[0]) if phot is not None else 2.0 * (quality.fwhm_pix if quality else 3.0)
    target_xy = (float(phot.x[0]), float(phot.y[0])) if phot is not None else None
    stars = np.column_stack([phot.x[1:], phot.y[1:]]) if phot is not None else np.empty((0, 2))
    reasons = "; ".join(quality.reasons) if quality and quality.reasons else "new template"
    path = config.state_dir / DIAGNOSTICS_DIR / f"{kind}-{frame.path.name}.png"
    try:
        plot_frame_preview(
            work.pixels.run(image_of), path,
            title=f"{frame.name} ({frame.meta.target}, {frame.meta.filter}): {reasons}",
            target_xy=target_xy, star_xy=stars, radius=radius,
        )  # fmt: skip
    except (OSError, ValueError) as exc:
        work.log.warning("diagnostic_not_written", reason=str(exc))
        return
    work.log.info("diagnostic_written", path=str(path), kind=kind)


def draw_subtraction(config: Config, work: FrameWork, views: SubtractionViews) -> None:
    """Cutouts of a new reference image, or of a subtraction flagged bad_subtraction, as a PNG."""
    frame = work.frame
    path = config.state_dir / DIAGNOSTICS_DIR / f"subtraction-{frame.path.name}.png"
    radius = float(work.photometry.radii[0]) if work.photometry is not None else 5.0
    title = f"{frame.name} ({frame.meta.target}, {frame.meta.filter})"
    try:
        plot_subtraction(views.panels, path, title=title, target_xy=views.target_xy, radius=radius)
    except (OSError, ValueError) as exc:
        work.log.warning("diagnostic_not_written", reason=str(exc))
        return
    work.log.info("diagnostic_written", path=str(path), kind="subtraction")


def _point_summary(point: PointRecord) -> dict[str, object]:
    """The first aperture's point as the log shows it, so that ``jq`` can follow a light curve (the colour of
    the visit may still move ``mag`` by its colour term)."""
    values = {key: point.get(key) for key in ("mag", "mag_err", "diff_mag", "diff_mag_err", "limit_mag")}
    summary = {key: round(value, 4) if isinstance(value, float) else value for key, value in values.items()}
    return summary | {"flags": flags.describe(point["flags"])}


def warn_if_target_far(config: Config, frame: Frame, log: Any) -> None:
    """Say so when the target's configured position lies far outside a frame whose OBJECT matched it:
    a coordinate in the wrong unit (hours as degrees) would otherwise go unnoticed."""
    target = config.targets[frame.meta.target] if frame.meta.target else None
    if target is None or target.ra is None or target.dec is None or frame.wcs is None:
        return
    ny, nx = frame.meta.shape
    centre = frame.wcs.pixel_to_world((nx - 1) / 2, (ny - 1) / 2)
    distance = float(centre.separation(SkyCoord(target.ra, target.dec, unit="deg")).arcmin)
    # Half the diagonal, plus what an unsolved pointing may be off by.
    reach = frame.meta.pixscale * np.hypot(nx, ny) / 2 / 60 + TARGET_FAR_ARCMIN
    if distance > reach:
        log.warning(
            "target_far_from_frame", distance_arcmin=round(distance, 1), frame_reach_arcmin=round(reach, 1),
            note="check the target's ra/dec in the config (ra in degrees, or quoted hours)",
        )  # fmt: skip


def recalibrate(config: Config, conn: sqlite3.Connection, target: str) -> tuple[int, int]:
    """Calibrate a target's stored points again from the stored star photometry, reading no image.

    Returns (frames examined, frames calibrated).
    """
    store = Store(conn)
    matcher = CatalogMatcher(FieldCatalogs(config))
    reference = store.reference(target)
    if reference is None:
        return 0, 0
    star_ids, field_ref = store.field_stars(target)
    order = np.concatenate([[0], star_ids])
    apertures = len(config.photometry.apertures)
    frames = store.done_frames(target)
    radius = catalog_radius_arcmin(config, reference.shape, reference.pixscale)
    if reference.sky_fix is None and reference.wcs is not None:
        sky_fix = matcher.fix_reference(store, reference, radius, frames[0]["filter"] if frames else "rp")
        if sky_fix is not None:
            reference = place_target(replace(reference, sky_fix=sky_fix), config)
    calibrated = 0
    with transaction(conn):
        store.write_reference(conn, reference)
        for frame in frames:
            sha256, filter = frame["sha256"], frame["filter"]
            match = matcher.match(config, reference, filter, field_ref, radius)
            if match is None:
                continue  # nothing to calibrate against: keep what is stored
            inst_mag, inst_err, star_flags = store.photometry_arrays(sha256, order, apertures)
            points = store.point_rows(sha256)
            calibrations = calibrate_frame(config, match, filter, frame["instrument"], inst_mag, inst_err, star_flags)
            store.update_points(
                conn, sha256,
                [calibration_columns(c, match, filter, p["flags"], p["flux_err"])
                 for c, p in zip(calibrations, points, strict=False)],
            )  # fmt: skip
            calibrated += any(c is not None for c in calibrations)
        for frame in frames:
            apply_colours(conn, store, target, frame["mjd"], refresh_stand_ins=False)
        _refresh_stand_ins(conn, store, target)
    return len(frames), calibrated


def pin_template(config: Config, conn: sqlite3.Connection, name_or_sha: str, target: str) -> Template:
    """Make a processed frame the pinned template of its target and filter, placed in the target's reference
    frame by its stars. Raises ``LookupError`` or ``ValueError`` with the reason when it cannot be."""
    store = Store(conn)
    template = store.processed_frame_as_template(name_or_sha, target)
    reference = store.reference(target)
    if reference is None:
        raise ValueError(f"{target} has no reference frame yet: process a frame first")
    reference_sources = store.sources(reference.sha256)
    if template.sha256 != reference.sha256:
        guess = None
        if template.wcs is not None and reference.wcs is not None:
            guess = wcs_guess(reference.wcs, template.wcs, reference.shape)
        try:
            template.from_reference = register(
                reference_sources, template.sources, guess=guess, guess_error=2 * SOLVED_WCS_ERROR_ARCSEC, max_rms=2.0
            ).matrix
        except Reject as exc:
            raise ValueError(f"{template.file} cannot be placed in the reference frame: {exc}") from None
    with transaction(conn):
        store.write_template(conn, template, "pinned by hand")
    return template
