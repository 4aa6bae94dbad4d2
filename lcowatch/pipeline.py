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
from astropy.table import Table

from lcowatch import flags
from lcowatch.bands import BAND_OF_FILTER, STANDARD_FILTERS
from lcowatch.calibrate import Calibration, TooFewStars, calibrate_apertures, fit_zeropoint
from lcowatch.config import Config
from lcowatch.errors import Quarantine, Reject, RetryLater, Stop
from lcowatch.export import lightcurve_table, write_result_file
from lcowatch.frame import Frame, read_content, read_frame, read_observation_time
from lcowatch.ledger import TERMINAL_STATES, Ledger
from lcowatch.log import frame_logger, get_logger
from lcowatch.photometry import Photometry, comparison_mask, comparison_stars, measure
from lcowatch.plot import DIAGNOSTICS_DIR, PLOTS_DIR, plot_frame_preview, plot_lightcurve
from lcowatch.preprocess import Preprocessed, preprocess
from lcowatch.quality import Quality, detect_sources, measure_quality
from lcowatch.quarantine import quarantine_file
from lcowatch.refcat import FieldCatalogs
from lcowatch.register import IDENTITY, MAX_RMS, Registration, match_positions, register, wcs_guess
from lcowatch.store import Store
from lcowatch.template import Template, choose_field_stars, template_score

MIN_COMPARISONS = 3
FITS_SUFFIXES = (".fits", ".fits.fz", ".fits.gz", ".fit", ".fts")


@dataclass
class FrameWork:
    """What the stages build up for one frame."""

    frame: Frame
    config: Config
    log: Any
    store: Store
    pre: Preprocessed | None = None
    sources: np.ndarray | None = None
    quality: Quality | None = None
    template: Template | None = None
    template_reason: str | None = None
    new_field: tuple[np.ndarray, np.ndarray] | None = None
    registration: Registration | None = None
    star_ids: np.ndarray | None = None
    field_xy: np.ndarray | None = None
    photometry: Photometry | None = None
    new_refs: dict[int, float] = field(default_factory=dict)
    points: list[dict[str, object]] = field(default_factory=list)
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


class SelectTemplate:
    """Use the target's template for this filter, or make this frame the template when it is better.

    The first template of a target also fixes the field's comparison stars in the sky.
    """

    name = "template"

    def __call__(self, work: FrameWork) -> None:
        frame, quality, config = work.frame, work.quality, work.config
        assert quality is not None and work.sources is not None and frame.meta.target is not None
        target, filter = frame.meta.target, frame.meta.filter
        current = work.store.current_template(target, filter)
        score = template_score(quality, config.template)
        # A target given as a pixel position belongs to its template: never swap that template by itself.
        replaceable = current is not None and not current.pinned and config.targets[target].ra is not None
        better = current is None or (replaceable and score > current.score + config.template.min_improvement)
        if frame.wcs is not None and np.isfinite(score) and better:
            work.template = Template(
                id=None, target=target, filter=filter, sha256=frame.sha256, file=frame.path.name,
                score=score, pinned=False, shape=frame.meta.shape,
                wcs_header=frame.wcs.to_header(relax=True).tostring(), sources=work.sources,
            )  # fmt: skip
            work.template_reason = (
                "first template" if current is None
                else f"score {score:.3f} beats {current.score:.3f} by more than {config.template.min_improvement:g}"
            )  # fmt: skip
            _, ra, _ = work.store.field_stars(target)
            if ra.size == 0:
                target_xy = work.template.target_xy(config.targets[target])
                chosen = choose_field_stars(
                    work.sources,
                    target_xy,
                    frame.meta.shape,
                    quality.fwhm_pix,
                    config.photometry.max_field_stars,
                )
                xy = np.column_stack([work.sources["x"][chosen], work.sources["y"][chosen]])
                work.new_field = work.template.sky_of(xy)
        elif current is None:
            raise Reject("no template yet, and this frame has no solved WCS to make one", step=self.name)
        else:
            work.template = current


class Register:
    """Find the transform from template pixels to this frame's pixels by matching stars."""

    name = "register"

    def __call__(self, work: FrameWork) -> None:
        template, sources = work.template, work.sources
        assert template is not None and sources is not None
        if template.sha256 == work.frame.sha256:
            work.registration = Registration(IDENTITY, len(sources), 0.0, "identity")
            return
        guess = None
        if work.frame.wcs is not None:
            guess = wcs_guess(template.wcs, work.frame.wcs, template.shape)
        assert work.quality is not None
        max_rms = max(MAX_RMS, 0.15 * work.quality.fwhm_pix)
        work.registration = register(template.sources, sources, guess=guess, max_rms=max_rms)
        work.log.debug(
            "registered", method=work.registration.method, n_matched=work.registration.n_matched,
            rms=round(work.registration.rms, 4), rotation_deg=round(work.registration.rotation_deg, 3),
        )  # fmt: skip


class MeasurePhotometry:
    """Aperture photometry of the target and the field's comparison stars at registered positions."""

    name = "photometry"

    def __call__(self, work: FrameWork) -> None:
        template, registration, quality, pre = work.template, work.registration, work.quality, work.pre
        assert template is not None and registration is not None and quality is not None and pre is not None
        assert work.sources is not None and work.frame.meta.target is not None
        config = work.config
        if work.new_field is not None:
            ra, dec = work.new_field
            star_ids = np.arange(1, len(ra) + 1)
        else:
            star_ids, ra, dec = work.store.field_stars(work.frame.meta.target)
        work.field_xy = template.field_pixels(ra, dec)
        template_xy = np.vstack([template.target_xy(config.targets[work.frame.meta.target]), work.field_xy])
        xy = registration.apply(template_xy)
        work.star_ids = np.concatenate([[0], star_ids])
        work.photometry = measure(
            work.frame, pre, work.sources, xy[:, 0], xy[:, 1],
            config.photometry.apertures, config.photometry.annulus, quality.fwhm_pix,
            recentre_snr=config.photometry.recentre_snr, min_snr=config.photometry.min_snr,
            max_shift=max(1.0, 0.5 * quality.fwhm_pix),
        )  # fmt: skip


class DifferentialPhotometry:
    """The target's magnitude against a weighted ensemble of the field's comparison stars."""

    name = "differential"

    def __call__(self, work: FrameWork) -> None:
        phot, star_ids, template, registration = (
            work.photometry,
            work.star_ids,
            work.template,
            work.registration,
        )
        assert phot is not None and star_ids is not None and template is not None and registration is not None
        meta = work.frame.meta
        assert meta.target is not None
        refs = work.store.star_refs(meta.target, meta.filter)
        if not refs:
            # The first frame measured in a filter (its template) sets the reference magnitudes.
            clean = comparison_stars(phot, 0)
            refs = {
                int(star): float(mag)
                for star, mag in zip(star_ids[1:][clean], phot.inst_mag[1:, 0][clean], strict=True)
            }
            work.new_refs = refs
        ref_mag = np.array([refs.get(int(star), np.nan) for star in star_ids[1:]])
        # Light lost to clouds shows against the reference frame only on the same instrument; another
        # telescope's throughput differs by magnitudes.
        same_instrument = (
            bool(work.new_refs) or work.store.reference_instrument(meta.target, meta.filter) == meta.instrument
        )
        for k, aperture in enumerate(work.config.photometry.apertures):
            # The ensemble is a zero point against the reference magnitudes: the same robust fit (clipping,
            # intrinsic scatter so no few bright stars dominate) as the calibration against a catalog.
            comparison = comparison_stars(phot, k)
            try:
                ensemble = fit_zeropoint(
                    phot.inst_mag[1:, k][comparison], phot.inst_err[1:, k][comparison],
                    ref_mag[comparison], np.zeros(int(comparison.sum())),
                )  # fmt: skip
                offset, offset_err, n_used = ensemble.zp, ensemble.zp_err, ensemble.n_used
            except TooFewStars:
                offset, offset_err, n_used = np.nan, np.nan, 0
            point_flags = int(phot.flags[0, k])
            if n_used < MIN_COMPARISONS:
                point_flags |= flags.value("few_comparisons")
            if same_instrument and -offset > work.config.quality.max_cloud_loss:
                point_flags |= flags.value("cloudy")
            work.points.append(
                {
                    "sha256": work.frame.sha256, "aperture": k, "aperture_text": str(aperture),
                    "target": meta.target, "filter": meta.filter,
                    "x": float(phot.x[0]), "y": float(phot.y[0]),
                    "diff_mag": _finite(phot.inst_mag[0, k] + offset),
                    "diff_mag_err": _finite(np.hypot(phot.inst_err[0, k], offset_err)),
                    "n_comparison": n_used, "registration_rms": registration.rms,
                    "n_matched": registration.n_matched, "template": template.file,
                    "flags": point_flags | flags.value("uncalibrated"),
                }
            )  # fmt: skip


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


class Calibrate:
    """Standard magnitudes: a zero point per aperture from the field's catalog stars (old steps 4.5-6).

    Without a catalog the points stay uncalibrated and flagged; ``lcowatch recalibrate`` fills them in
    later from the stored star photometry.
    """

    name = "calibrate"

    def __init__(self, catalogs: FieldCatalogs) -> None:
        self.catalogs = catalogs
        self._matches: dict[tuple[str, str, str, int], tuple[np.ndarray, np.ndarray]] = {}

    def __call__(self, work: FrameWork) -> None:
        phot, template, meta = work.photometry, work.template, work.frame.meta
        assert phot is not None and template is not None and work.field_xy is not None and meta.target is not None
        ny, nx = meta.shape
        radius_arcmin = work.config.catalog.radius_arcmin or 0.6 * np.hypot(nx, ny) * meta.pixscale / 60.0
        calibrations, catalog = self.calibrate(
            work.config, meta.target, meta.filter, meta.instrument, template, work.field_xy,
            phot.inst_mag, phot.inst_err, phot.flags, radius_arcmin,
        )  # fmt: skip
        for point, calibration in zip(work.points, calibrations, strict=True):
            point_flags = point["flags"]
            assert isinstance(point_flags, int)
            point.update(calibration_columns(calibration, catalog, meta.filter, point_flags))

    def calibrate(
        self,
        config: Config,
        target: str,
        filter: str,
        instrument: str | None,
        template: Template,
        field_xy: np.ndarray,
        inst_mag: np.ndarray,
        inst_err: np.ndarray,
        star_flags: np.ndarray,
        radius_arcmin: float,
    ) -> tuple[list[Calibration | None], Table | None]:
        """Zero points for one frame's stored or fresh photometry (rows: target, then field stars)."""
        apertures = inst_mag.shape[1]
        band = BAND_OF_FILTER.get(filter)
        catalog = self.catalogs.get(target, band, radius_arcmin) if band is not None else None
        if catalog is None or len(catalog) == 0:
            return [None] * apertures, catalog
        key = (target, filter, template.sha256, len(field_xy))
        if key not in self._matches:
            cat_xy = template.pixels_of(np.asarray(catalog["ra"]), np.asarray(catalog["dec"]))
            radius = config.catalog.match_radius_arcsec / template.pixscale
            _, cat_index, star_index = match_positions(cat_xy, field_xy, radius)
            self._matches[key] = (cat_index, star_index)
        cat_index, star_index = self._matches[key]
        usable = np.column_stack(
            [comparison_mask(inst_mag[1:, k], inst_err[1:, k], star_flags[1:, k]) for k in range(apertures)]
        )
        color_terms = config.catalog.color_terms
        fixed = color_terms.get(f"{instrument}:{filter}", color_terms.get(filter))
        return calibrate_apertures(
            inst_mag, inst_err, usable, catalog, cat_index, star_index, color_term=fixed
        ), catalog


def calibration_columns(
    calibration: Calibration | None, catalog: Table | None, filter: str, point_flags: int
) -> dict[str, object]:
    """The points-table columns a calibration sets (all empty, and flagged, without one)."""
    band = BAND_OF_FILTER.get(filter)  # None: a filter no catalog covers (e.g. Y); points stay uncalibrated
    if filter not in STANDARD_FILTERS:
        point_flags |= flags.value("nonstandard_band")
    if calibration is None:
        empty = dict.fromkeys(("mag", "mag_err", "zp", "zp_err", "color_term", "zp_nstars", "zp_scatter", "catalog"))
        return empty | {"band": band, "flags": point_flags | flags.value("uncalibrated")}
    zp = calibration.zeropoint
    return {
        "mag": _finite(calibration.mag), "mag_err": _finite(calibration.mag_err), "zp": zp.zp, "zp_err": zp.zp_err,
        "color_term": zp.color_term, "zp_nstars": zp.n_used, "zp_scatter": _finite(zp.scatter),
        "catalog": catalog.meta.get("catalog") if catalog is not None else None, "band": band,
        "flags": point_flags & ~flags.value("uncalibrated"),
    }  # fmt: skip


def default_stages(config: Config) -> list[Stage]:
    return [
        Preprocess(), MeasureQuality(), SelectTemplate(), Register(), MeasurePhotometry(), DifferentialPhotometry(),
        Calibrate(FieldCatalogs(config)),
    ]  # fmt: skip


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
        self.stages = list(stages) if stages is not None else default_stages(config)
        self._stale_results: set[str] = set()
        self.requeued: list[Path] = []  # frames that waited for a template and can go now
        self._results_written: dict[str, float] = {}
        self.log = get_logger()

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

    def _preview(self, work: FrameWork, kind: str) -> None:
        """A diagnostic PNG (the old ``verbose 2``): a poor frame, or a new template, with its apertures."""
        frame, quality = work.frame, work.quality
        phot = work.photometry
        radius = float(phot.radii[0]) if phot is not None else 2.0 * (quality.fwhm_pix if quality else 3.0)
        target_xy = (float(phot.x[0]), float(phot.y[0])) if phot is not None else None
        stars = np.column_stack([phot.x[1:], phot.y[1:]]) if phot is not None else np.empty((0, 2))
        reasons = "; ".join(quality.reasons) if quality and quality.reasons else "new template"
        path = self.config.state_dir / DIAGNOSTICS_DIR / f"{kind}-{frame.path.name}.png"
        try:
            plot_frame_preview(
                frame.data, path, title=f"{frame.path.name} ({frame.meta.target}, {frame.meta.filter}): {reasons}",
                target_xy=target_xy, star_xy=stars, radius=radius,
            )  # fmt: skip
        except (OSError, ValueError) as exc:
            work.log.warning("diagnostic_not_written", reason=str(exc))
            return
        work.log.info("diagnostic_written", path=str(path), kind=kind)

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
        except OSError as exc:  # unreadable (permissions, I/O error): nothing recorded, try again later
            self.log.error("file_unreadable", file=path.name, path=str(path), error=str(exc))
            return Outcome(path, "failed", reason=str(exc))
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
        destination = quarantine_file(path, self.config.state_dir, sha256=sha256, reason=str(exc), step=exc.step)
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
            unmatched = f"OBJECT {meta.object!r} matches no configured target"
            self.ledger.finish(frame.sha256, "ignored", step="read", error=unmatched, identity=identity)
            log.info("frame_ignored", reason=unmatched)
            return Outcome(frame.path, "ignored", frame.sha256, unmatched)

        work = FrameWork(frame=frame, config=self.config, log=log, store=self.store)
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
        except Stop:
            raise  # fatal for the daemon (which exits non-zero), not a fault of this frame
        except Exception as exc:  # a bug, not bad input: keep the file pending; attempts bound the retries
            log.exception("frame_failed", step=step)
            self.ledger.note_error(frame.sha256, step, f"{type(exc).__name__}: {exc}")
            return Outcome(frame.path, "failed", frame.sha256, str(exc), seconds)

        state = "rejected" if work.rejection else "done"
        reason: str | None = "; ".join(work.rejection) or None
        quality, sources = work.quality, work.sources

        requeued: list[Path] = []

        def write(conn: sqlite3.Connection) -> None:
            if quality is None or sources is None:
                return
            wcs_header = frame.wcs.to_header(relax=True).tostring() if frame.wcs is not None else None
            score = template_score(quality, self.config.template)
            self.store.write_frame(conn, frame.sha256, frame.path, meta, quality, sources, wcs_header, score)
            if state != "done":
                self.store.forget_results(conn, frame.sha256)  # a redo that now fails leaves no old point
                return
            assert meta.target is not None and work.star_ids is not None and work.photometry is not None
            if work.template_reason is not None and work.template is not None:
                self.store.write_template(conn, work.template, work.template_reason)
                requeued.extend(self.ledger.requeue_waiting_for_template(conn, meta.target, meta.filter))
            if work.new_field is not None:
                self.store.write_field_stars(conn, meta.target, *work.new_field, origin=f"template {frame.path.name}")
            if work.new_refs:
                self.store.write_star_refs(conn, meta.target, meta.filter, work.new_refs)
            self.store.write_photometry(conn, frame.sha256, work.star_ids, work.photometry)
            self.store.write_points(conn, work.points)

        started = time.perf_counter()
        self.ledger.finish(frame.sha256, state, step=step, error=reason, identity=identity, write=write)
        self.requeued.extend(requeued)
        if state == "done" and meta.target is not None:
            self._stale_results.add(meta.target)
            self.flush_results()
        if self.config.diagnostics and (work.template_reason is not None or (quality and quality.verdict == "poor")):
            self._preview(work, "template" if work.template_reason is not None and state == "done" else "poor")
        seconds["store"] = round(time.perf_counter() - started, 4)
        log.info(
            "frame_processed", outcome=state, reason=reason, seconds=seconds,
            quality=quality.verdict if quality else None,
            fwhm_arcsec=round(quality.fwhm_arcsec, 3) if quality else None,
            nstars=quality.nstars if quality else None,
        )  # fmt: skip
        return Outcome(frame.path, state, frame.sha256, reason, seconds)


def recalibrate(config: Config, conn: sqlite3.Connection, target: str) -> tuple[int, int]:
    """Calibrate a target's stored points again from the stored star photometry, reading no image.

    Returns (frames examined, frames calibrated).
    """
    store = Store(conn)
    calibrate = Calibrate(FieldCatalogs(config))
    star_ids, ra, dec = store.field_stars(target)
    order = np.concatenate([[0], star_ids])
    apertures = len(config.photometry.apertures)
    frames = conn.execute(
        "SELECT f.sha256, f.filter, f.instrument, f.nx, f.ny, f.pixscale FROM frames f JOIN files USING (sha256) "
        "WHERE f.target = ? AND files.state = 'done' ORDER BY f.mjd",
        (target,),
    ).fetchall()
    calibrated = 0
    for sha256, filter, instrument, nx, ny, pixscale in frames:
        template = store.current_template(target, filter)
        if template is None:
            continue
        inst_mag, inst_err, star_flags = store.photometry_arrays(sha256, order, apertures)
        calibrations, catalog = calibrate.calibrate(
            config, target, filter, instrument, template, template.field_pixels(ra, dec),
            inst_mag, inst_err, star_flags, 0.6 * np.hypot(nx, ny) * pixscale / 60.0,
        )  # fmt: skip
        if catalog is None:
            continue  # nothing to calibrate against: keep what is stored
        point_flags = [row[0] for row in conn.execute(
            "SELECT flags FROM points WHERE sha256 = ? ORDER BY aperture", (sha256,)
        )]  # fmt: skip
        store.update_points(
            sha256,
            [calibration_columns(c, catalog, filter, f) for c, f in zip(calibrations, point_flags, strict=False)],
        )
        calibrated += any(c is not None for c in calibrations)
    return len(frames), calibrated
