"""The science stages of one frame, in order: an ordered list of small stages with one signature,
``stage(work) -> None``, in the manner of BANZAI.

A stage that decides the frame cannot give a point sets ``work.rejection``; that is a normal outcome,
recorded with its reasons, not an exception. Exceptions are kept for what the daemon must act on
(:mod:`lcowatch.errors`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
from astropy.table import Table
from scipy.spatial import cKDTree

from lcowatch import flags
from lcowatch.bands import BAND_OF_FILTER, STANDARD_FILTERS
from lcowatch.config import Config, PhotometryConfig
from lcowatch.errors import Reject
from lcowatch.pipeline.pixels import Pixels, PixelSite
from lcowatch.pipeline.subtraction import SubtractionViews, SubtractReference
from lcowatch.science.calibrate import (
    Calibration,
    TooFewStars,
    calibrate_apertures,
    fit_zeropoint,
)
from lcowatch.science.frame import Frame
from lcowatch.science.photometry import Photometry, comparison_mask, comparison_stars, measure
from lcowatch.science.quality import Quality, judge_quality
from lcowatch.science.refcat import FieldCatalogs
from lcowatch.science.register import (
    IDENTITY,
    MAX_RMS,
    Affine,
    Registration,
    apply_affine,
    compose,
    invert,
    match_positions,
    register,
    wcs_guess,
)
from lcowatch.science.template import (
    SOLVED_WCS_ERROR_ARCSEC,
    TARGET_CENTROID_SNR,
    Reference,
    Template,
    choose_field_stars,
    fit_sky_fix,
    template_score,
)
from lcowatch.state.images import ReferenceImage
from lcowatch.state.store import CalibrationColumns, PointRecord, Store
from lcowatch.states import Step

MIN_COMPARISONS = 3
#: The ensemble keeps to stars measured this well (mag) when it has at least ENSEMBLE_PRECISE_STARS of them.
ENSEMBLE_MAX_ERROR = 0.03
ENSEMBLE_PRECISE_STARS = 5


@dataclass
class FrameWork:
    """What the stages build up for one frame. Positions named ``*_ref`` are in the target's reference
    pixels; ``to_frame`` maps those into this frame's pixels."""

    frame: Frame
    config: Config
    log: Any
    store: Store
    pixels: PixelSite
    sources: np.ndarray | None = None
    quality: Quality | None = None
    reference: Reference | None = None
    new_reference: bool = False
    reference_changed: bool = False
    fill_in_calibration: bool = False  # a catalog answered where earlier points of the target went without
    replaces: str | None = None  # sha256 of an earlier version of this file, measured before (see earlier_version)
    template: Template | None = None
    template_reason: str | None = None
    instrument_template: Template | None = None  # this frame, kept for its instrument's frames to register to
    new_field_ids: np.ndarray | None = None
    new_field_ref: np.ndarray | None = None
    registration: Registration | None = None
    to_frame: Affine | None = None
    star_ids: np.ndarray | None = None
    field_ref: np.ndarray | None = None
    photometry: Photometry | None = None
    target_centroid_ref: tuple[np.ndarray, float] | None = None
    catalog_match: CatalogMatch | None = None
    new_refs: dict[int, tuple[float, float]] = field(default_factory=dict)  # reference magnitudes set or refined
    first_in_filter: bool = False  # this frame set its filter's reference magnitudes
    points: list[PointRecord] = field(default_factory=list)
    rejection: list[str] = field(default_factory=list)
    new_reference_image: ReferenceImage | None = None  # this frame became a reference image
    reference_image_file: str | None = None  # the reference image the target's flux was measured against
    subtraction_views: SubtractionViews | None = None  # cutouts to draw (diagnostics: a new reference, a bad one)


class Stage(Protocol):
    @property
    def name(self) -> str: ...

    def __call__(self, work: FrameWork) -> None: ...


class Preprocess:
    """Mask bad and saturated pixels; model and subtract the background."""

    name = Step.PREPROCESS

    def __call__(self, work: FrameWork) -> None:
        work.pixels.preprocess()


class MeasureQuality:
    """Detect sources and judge the frame against its instrument's own history for the target.

    A poor frame still gives points, flagged; only a frame whose FWHM cannot be measured is rejected here.
    """

    name = Step.QUALITY

    def __call__(self, work: FrameWork) -> None:
        meta = work.frame.meta
        assert meta.target is not None
        work.sources, measured = work.pixels.image_quality()
        history = work.store.instrument_history(meta.target, meta.instrument)
        work.quality = judge_quality(measured, meta.pixscale, work.config.quality, history)
        if not work.quality.measurable:
            work.rejection.extend(work.quality.reasons)


class SelectTemplate:
    """Use the target's template for this filter, or make this frame the template when it is better.

    A target's first template defines its reference pixel frame: the comparison stars are chosen on it
    and the target is placed on it (from its RA/Dec through the header WCS, corrected on catalog stars
    when a catalog is at hand). Later templates are registered to the reference frame by their stars and
    need no WCS.
    """

    name = Step.TEMPLATE

    def __init__(self, catalogs: FieldCatalogs) -> None:
        self.catalogs = catalogs

    def __call__(self, work: FrameWork) -> None:
        frame, quality, config = work.frame, work.quality, work.config
        assert quality is not None and work.sources is not None and frame.meta.target is not None
        target, filter = frame.meta.target, frame.meta.filter
        work.reference = work.store.reference(target)
        if work.reference is None:
            self._found_reference(work)
            return
        current = work.store.current_template(target, filter)
        score = template_score(quality, config.template)
        # Frames flagged by quality control give points but never become templates, unless there is none.
        candidate = current is None or (quality.flags == 0 and not current.pinned)
        if candidate and (current is None or score > current.score + config.template.min_improvement):
            try:
                *_, from_reference = place_in_reference(work, self._reference_template(work))
            except Reject:
                if current is None:
                    raise
                work.log.warning("template_candidate_not_registered", reason="cannot be placed in the reference frame")
            else:
                work.template = frame_template(work, score, from_reference)
                self._grow_field(work, invert(from_reference))
                work.template_reason = (
                    f"first template of {filter}" if current is None
                    else f"score {score:.3f} beats {current.score:.3f} by more than {config.template.min_improvement:g}"
                )  # fmt: skip
                return
        assert current is not None
        work.template = current

    def _reference_template(self, work: FrameWork) -> Template:
        """The reference frame as a template (its sources in reference pixels)."""
        reference = work.reference
        assert reference is not None
        return Template(
            id=None, target=reference.target, filter="", sha256=reference.sha256, file=reference.file, score=0.0,
            pinned=False, shape=reference.shape, wcs_header=reference.wcs_header,
            sources=work.store.sources(reference.sha256),
        )  # fmt: skip

    def _found_reference(self, work: FrameWork) -> None:
        frame, quality, config = work.frame, work.quality, work.config
        assert quality is not None and work.sources is not None and frame.meta.target is not None
        target_config = config.targets[frame.meta.target]
        if target_config.x is None and frame.wcs is None:
            raise Reject("no template yet, and this frame has no solved WCS to place the target", step=self.name)
        reference = Reference(
            target=frame.meta.target, sha256=frame.sha256, file=frame.name, shape=frame.meta.shape,
            pixscale=frame.meta.pixscale, wcs_header=wcs_text(frame), sky_fix=None,
            target_xy=np.array([target_config.x, target_config.y], dtype=float), target_origin="config",
        )  # fmt: skip
        if target_config.ra is not None:
            catalog = self.catalogs.get(frame.meta.target, _catalog_band(frame.meta.filter), _radius_arcmin(work))
            sky_fix = fit_sky_fix(reference, work.sources, catalog) if catalog is not None else None
            reference = place_target(replace(reference, sky_fix=sky_fix, target_origin="wcs"), config)
        work.reference, work.new_reference, work.reference_changed = reference, True, True
        work.template = frame_template(work, template_score(quality, config.template), IDENTITY)
        work.template_reason = "first template: defines the target's reference pixel frame"
        self._grow_field(work, IDENTITY)

    def _grow_field(self, work: FrameWork, to_reference: Affine) -> None:
        """Add this new template's good comparison stars that a thin field lacks, up to
        ``photometry.max_field_stars``: a first template from a small telescope must not leave the
        target with a handful of comparison stars for good. A field of :data:`ENOUGH_FIELD_STARS` stays as
        it is: stars isolated in a sharper template may be blended in the frames of the usual seeing."""
        frame, quality, reference = work.frame, work.quality, work.reference
        assert quality is not None and work.sources is not None and reference is not None
        assert frame.meta.target is not None
        known_ids, known_ref = work.store.field_stars(frame.meta.target)
        room = work.config.photometry.max_field_stars - len(known_ids)
        if room <= 0 or len(known_ids) >= ENOUGH_FIELD_STARS:
            return
        target_xy = apply_affine(invert(to_reference), reference.target_xy[None, :])[0]
        chosen = choose_field_stars(
            work.sources, target_xy, frame.meta.shape, quality.fwhm_pix, work.config.photometry.max_field_stars,
            _linear_peak(work),
        )  # fmt: skip
        candidates = apply_affine(to_reference, np.column_stack([work.sources["x"][chosen], work.sources["y"][chosen]]))
        if len(known_ref):
            distance, _ = cKDTree(known_ref).query(candidates)
            candidates = candidates[distance > 2.0 * quality.fwhm_pix]
        if len(candidates):
            first = int(known_ids.max()) + 1 if len(known_ids) else 1
            work.new_field_ids = np.arange(first, first + min(room, len(candidates)))
            work.new_field_ref = candidates[:room]


def place_target(reference: Reference, config: Config) -> Reference:
    """The reference with the target placed from its RA/Dec, unless bright epochs have centroided it."""
    target = config.targets[reference.target]
    if reference.target_origin not in ("wcs", "catalog") or target.ra is None or target.dec is None:
        return reference
    xy = reference.pixels_of(np.array([target.ra]), np.array([target.dec]))[0]
    return replace(reference, target_xy=xy, target_origin="catalog" if reference.sky_fix is not None else "wcs")


def wcs_text(frame: Frame) -> str | None:
    """The frame's header WCS as header text, for the store."""
    return frame.wcs.to_header(relax=True).tostring() if frame.wcs is not None else None


def _linear_peak(work: FrameWork) -> float | None:
    """The highest linear peak above the background (electrons), or None when the header gives none."""
    limit, quality = work.frame.meta.linearity_limit, work.quality
    return None if limit is None or quality is None else limit - quality.background


def _catalog_band(filter: str) -> str:
    return BAND_OF_FILTER.get(filter, "r")  # any band's positions serve the astrometry


def catalog_radius_arcmin(config: Config, shape: tuple[int, int], pixscale: float) -> float:
    """The catalog query radius: ``catalog.radius_arcmin``, else a little more than the frame's half diagonal."""
    return config.catalog.radius_arcmin or 0.6 * float(np.hypot(*shape)) * pixscale / 60.0


def _radius_arcmin(work: FrameWork) -> float:
    return catalog_radius_arcmin(work.config, work.frame.meta.shape, work.frame.meta.pixscale)


def frame_template(work: FrameWork, score: float, from_reference: Affine) -> Template:
    """This frame as a template, placed in the reference frame by ``from_reference``."""
    frame = work.frame
    assert frame.meta.target is not None and work.sources is not None
    return Template(
        id=None, target=frame.meta.target, filter=frame.meta.filter, sha256=frame.sha256, file=frame.name,
        score=score, pinned=False, shape=frame.meta.shape, wcs_header=wcs_text(frame),
        sources=work.sources, from_reference=from_reference,
    )  # fmt: skip


def register_to_template(work: FrameWork, template: Template) -> Registration:
    """The transform from ``template`` pixels to this frame's pixels, by matching stars (WCS as a guess)."""
    assert work.sources is not None and work.quality is not None
    guess = None
    if work.frame.wcs is not None and template.wcs is not None:
        guess = wcs_guess(template.wcs, work.frame.wcs, template.shape)
    # Broad or trailed stars centroid less precisely.
    max_rms = max(MAX_RMS, 0.15 * work.quality.fwhm_pix)
    guess_error = 2 * SOLVED_WCS_ERROR_ARCSEC / work.frame.meta.pixscale
    return register(template.sources, work.sources, guess=guess, guess_error=guess_error, max_rms=max_rms)


#: A registration on fewer stars than this (a 0.4 m frame against a 1 m template shares a handful) can be
#: off by pixels at the frame's edges: the other templates are tried too, and the best taken.
CONFIDENT_MATCHES = 15


def place_in_reference(work: FrameWork, *fallbacks: Template) -> tuple[Template, Registration, Affine]:
    """Register the frame to the first template that takes it with :data:`CONFIDENT_MATCHES` stars (else to
    the one that matches most), and chain that to the reference frame.

    Tried in order: the filter's template, the latest templates from the frame's own instrument (current
    or replaced: a 0.4 m frame with a dozen stars matches a 0.4 m template, not a 1 m one), the target's
    other templates, then ``fallbacks``. Returns the template, the registration and the map from reference
    pixels to this frame's pixels.
    """
    meta = work.frame.meta
    target = meta.target
    assert target is not None
    active = work.store.active_templates(target)

    def candidates() -> Iterator[Template]:
        # Lazily: the usual frame registers to its filter's template, and the store is asked for no more.
        yield from (t for t in active if t.filter == meta.filter)
        yield from work.store.instrument_templates(target, meta.instrument)
        yield from sorted((t for t in active if t.filter != meta.filter), key=lambda t: t.shape != meta.shape)
        yield from fallbacks

    failure: Reject | None = None
    tried: set[int | None] = set()
    best: tuple[Template, Registration] | None = None
    for template in candidates():
        if template.id in tried and template.id is not None:
            continue
        tried.add(template.id)
        try:
            registration = register_to_template(work, template)
        except Reject as exc:
            failure = failure or exc
            continue
        if best is None or registration.n_matched > best[1].n_matched:
            best = template, registration
        if registration.n_matched >= CONFIDENT_MATCHES:
            break
    if best is None:
        raise failure or Reject("registration failed: no template to register to", step=Step.REGISTER)
    template, registration = best
    return template, registration, compose(registration.matrix, template.from_reference)


class Register:
    """Find the transform from reference pixels to this frame's pixels, through a template."""

    name = Step.REGISTER

    def __call__(self, work: FrameWork) -> None:
        assert work.template is not None and work.sources is not None
        if work.template.sha256 == work.frame.sha256:
            work.registration = Registration(IDENTITY, len(work.sources), 0.0, "identity")
            work.to_frame = work.template.from_reference
        else:
            work.template, work.registration, work.to_frame = place_in_reference(work)
            meta = work.frame.meta
            assert meta.target is not None and work.quality is not None
            trailed = work.quality.flags & flags.value("elongated")
            if not trailed and not work.store.instrument_templates(meta.target, meta.instrument, limit=1):
                # A telescope's frames match its own stars best (pixel scale, depth, field of view): a sparse
                # 0.4 m frame shares a handful of stars with a 1 m template. The first frame of each instrument
                # is kept, inactive, as a template its later frames register to.
                score = template_score(work.quality, work.config.template)
                work.instrument_template = frame_template(work, score, work.to_frame)
        work.log.debug(
            "registered", method=work.registration.method, n_matched=work.registration.n_matched,
            rms=round(work.registration.rms, 4), rotation_deg=round(work.registration.rotation_deg, 3),
        )  # fmt: skip


#: A field with this many comparison stars is not grown from later templates.
ENOUGH_FIELD_STARS = 50


class MeasurePhotometry:
    """Aperture photometry of the target and the comparison stars at their registered positions.

    Bright stars are recentroided where the move agrees with the registration; faint ones, and the target
    when it is faint, are measured where the registration puts them (forced photometry).
    """

    name = Step.PHOTOMETRY

    def __call__(self, work: FrameWork) -> None:
        reference, to_frame, quality = work.reference, work.to_frame, work.quality
        assert reference is not None and to_frame is not None and quality is not None
        assert work.sources is not None and work.frame.meta.target is not None
        config = work.config
        star_ids, field_ref = work.store.field_stars(work.frame.meta.target)
        if work.new_field_ids is not None and work.new_field_ref is not None:
            star_ids = np.concatenate([star_ids, work.new_field_ids])
            field_ref = np.vstack([field_ref, work.new_field_ref])
        work.star_ids, work.field_ref = np.concatenate([[0], star_ids]), field_ref
        xy = apply_affine(to_frame, np.vstack([reference.target_xy, field_ref]))
        # On a galaxy, the nearest detection and the light's centroid are the host's, not the target's.
        on_host = config.targets[work.frame.meta.target].method == "difference"
        if reference.target_placed_by_wcs and not on_host:
            xy[0] = self._acquire_target(work, xy[0])
        work.photometry = phot = work.pixels.run(_measure, xy, config.photometry, quality.fwhm_pix)
        if on_host:
            return
        snr = phot.flux[0, 0] / phot.flux_err[0, 0]
        clean = phot.flags[0, 0] & flags.value("forced_position", "blended", "saturated", "nonlinear", "bad_pixel") == 0
        if clean and snr >= TARGET_CENTROID_SNR and quality.flags == 0:
            centroid = apply_affine(invert(to_frame), np.array([[phot.x[0], phot.y[0]]]))[0]
            work.target_centroid_ref = (centroid, float(snr))

    @staticmethod
    def _acquire_target(work: FrameWork, predicted: np.ndarray) -> np.ndarray:
        """Until the target has been centroided, its position is only as good as the header WCS: take the
        nearest bright detection within that WCS's error, if there is one."""
        sources, meta = work.sources, work.frame.meta
        assert sources is not None
        bright = sources[(sources["snr"] >= work.config.photometry.recentre_snr) & ~sources["sharp"]]
        if not len(bright):
            return predicted
        distance = np.hypot(bright["x"] - predicted[0], bright["y"] - predicted[1])
        nearest = int(np.argmin(distance))
        if distance[nearest] > SOLVED_WCS_ERROR_ARCSEC / meta.pixscale:
            return predicted
        return np.array([bright["x"][nearest], bright["y"][nearest]])


def _measure(pixels: Pixels, xy: np.ndarray, config: PhotometryConfig, fwhm_pix: float) -> Photometry:
    """Aperture photometry at ``xy`` (frame pixels), where the pixels are."""
    return measure(
        pixels.frame, pixels.pre, pixels.sources, xy[:, 0], xy[:, 1], config.apertures, config.annulus, fwhm_pix,
        recentre_snr=config.recentre_snr, min_snr=config.min_snr, max_shift=max(1.0, 0.5 * fwhm_pix),
    )  # fmt: skip


class DifferentialPhotometry:
    """The target against a weighted ensemble of the comparison stars; a limit where it is not detected."""

    name = Step.DIFFERENTIAL

    def __call__(self, work: FrameWork) -> None:
        phot, star_ids, template, registration = work.photometry, work.star_ids, work.template, work.registration
        assert phot is not None and star_ids is not None and template is not None and registration is not None
        assert work.quality is not None
        meta, config = work.frame.meta, work.config
        assert meta.target is not None
        filter_key = (meta.target, meta.filter)
        refs = work.store.star_refs(*filter_key)
        first_in_filter = work.first_in_filter = not refs
        if first_in_filter:
            # The first frame measured in a filter (its template) sets the reference magnitudes.
            unset = np.full(len(star_ids) - 1, np.nan)
            refs = work.new_refs = self._refs_for_new_stars(
                phot.inst_mag[1:], phot, star_ids, unset, 0.0, 0.0, phot.inst_err[1:, 0]
            )  # fmt: skip
        ref_mag = np.array([refs.get(int(star), (np.nan, np.nan))[0] for star in star_ids[1:]])
        ref_err = np.array([refs.get(int(star), (np.nan, np.nan))[1] for star in star_ids[1:]])
        reference_instrument = meta.instrument if first_in_filter else work.store.reference_instrument(*filter_key)
        # Light lost to clouds shows against the reference frame only on the same instrument; another
        # telescope's throughput differs by magnitudes.
        same_instrument = reference_instrument == meta.instrument
        term_change = 0.0 if same_instrument else self._color_term_change(work, reference_instrument)
        # Another instrument's colour term makes its magnitudes differ from the reference frame's by
        # term_change x colour: comparison stars are put on the reference frame's system with their catalog
        # colours, the target (until its colour is known) as if of the field's median colour.
        field_inst = phot.inst_mag[1:]
        if term_change and work.catalog_match is not None:
            colors = work.catalog_match.star_colors(len(star_ids) - 1) - work.catalog_match.field_color
            field_inst = field_inst + term_change * np.nan_to_num(colors)[:, None]
        apertures = config.photometry.apertures
        for k, aperture in enumerate(apertures):
            # The ensemble is a zero point against the reference magnitudes: the same robust fit (clipping,
            # intrinsic scatter so no few bright stars dominate) as the calibration against a catalog.
            comparison = comparison_stars(phot, k)
            # Faint stars add little precision and most of the bias: their magnitudes move with the
            # background left under them (neighbours' wings in the annulus at poor seeing).
            precise = comparison & (phot.inst_err[1:, k] <= ENSEMBLE_MAX_ERROR)
            if precise.sum() >= ENSEMBLE_PRECISE_STARS:
                comparison = precise
            try:
                ensemble = fit_zeropoint(
                    field_inst[:, k][comparison], phot.inst_err[1:, k][comparison],
                    ref_mag[comparison], ref_err[comparison],
                )  # fmt: skip
                offset, offset_err, n_used = ensemble.zp, ensemble.zp_err, ensemble.n_used
                scatter = ensemble.intrinsic_scatter
            except TooFewStars:
                offset, offset_err, n_used, scatter = np.nan, np.nan, 0, np.nan
            point_flags = int(phot.flags[0, k]) | work.quality.flags
            if n_used < MIN_COMPARISONS:
                point_flags |= flags.value("few_comparisons")
            if same_instrument and -offset > config.quality.max_cloud_loss:
                point_flags |= flags.value("cloudy")
            flux, flux_err = phot.flux[0, k], phot.flux_err[0, k]
            snr = flux / flux_err if flux_err > 0 else np.nan
            detected = bool(snr >= config.photometry.detection_snr)
            if not detected:
                point_flags |= flags.value("nondetection")
            if k == 0 and n_used >= MIN_COMPARISONS and point_flags & FRAME_DOUBT == 0:
                # A star measured here strays from its reference by its noise and by the frame's scatter beyond
                # noise (neighbours' light changing with the seeing). Weighted by its noise alone, the sharpest
                # frame (a new template) pulled the references its way: the template-change test stepped by
                # -0.004, and by -0.010 with a detection of fainter stars.
                star_err = np.hypot(phot.inst_err[1:, 0], np.nan_to_num(scatter))
                work.new_refs |= self._refs_for_new_stars(
                    field_inst, phot, star_ids, ref_mag, offset, offset_err, star_err
                )  # fmt: skip
                if not first_in_filter:  # its own measurements set the references: nothing to average
                    used = np.flatnonzero(comparison)[ensemble.used]
                    work.new_refs |= self._refined_refs(
                        star_ids[1:][used], ref_mag[used], ref_err[used], field_inst[used, 0] + offset, star_err[used]
                    )  # fmt: skip
            # The comparison stars' scatter beyond their errors (ensemble_scatter) is exported, not added: one
            # frame's estimate follows its few worst stars (blends) and made constant stars' chi2/dof 0.75.
            diff_err = np.hypot(phot.inst_err[0, k], offset_err)
            work.points.append(
                {
                    "sha256": work.frame.sha256, "aperture": k, "aperture_text": str(aperture),
                    "target": meta.target, "filter": meta.filter,
                    "x": float(phot.x[0]), "y": float(phot.y[0]),
                    "diff_mag": _finite(phot.inst_mag[0, k] + offset) if detected else None,
                    "diff_mag_err": _finite(diff_err) if detected else None,
                    "flux": _finite(flux / meta.exptime), "flux_err": _finite(flux_err / meta.exptime),
                    "snr": _finite(snr), "limit_mag": _finite(limit_mag(flux_err, meta.exptime) + offset),
                    "ensemble_scatter": _finite(scatter), "diff_color_term": term_change,
                    "n_comparison": n_used, "registration_rms": registration.rms,
                    "n_matched": registration.n_matched, "template": template.file,
                    "reference": work.reference_image_file,
                    "flags": point_flags | flags.value("uncalibrated"),
                }
            )  # fmt: skip

    @staticmethod
    def _refined_refs(
        star_ids: np.ndarray, ref_mag: np.ndarray, ref_err: np.ndarray, measured: np.ndarray, measured_err: np.ndarray
    ) -> dict[int, tuple[float, float]]:
        """The ensemble stars' reference magnitudes averaged with this frame's measurements of them, by
        inverse variance. Reference magnitudes set by one frame carry its noise, which the ensemble passes on
        to the target whenever its membership changes; averaged over the frames, that noise fades. The
        offset fit makes the weighted mean change of the ensemble zero, so the scale stays where it is."""
        known = (ref_err > 0) & np.isfinite(ref_mag) & (measured_err > 0) & np.isfinite(measured)
        prior, weight = 1.0 / ref_err[known] ** 2, 1.0 / measured_err[known] ** 2
        mags = (ref_mag[known] * prior + measured[known] * weight) / (prior + weight)
        errors = 1.0 / np.sqrt(prior + weight)
        return {int(star): (float(m), float(e)) for star, m, e in zip(star_ids[known], mags, errors, strict=True)}

    @staticmethod
    def _color_term_change(work: FrameWork, reference_instrument: str | None) -> float:
        """This instrument's colour term minus the reference instrument's, in the frame's filter (0 where
        either is to be fitted per frame rather than fixed in the config)."""
        config, meta = work.config, work.frame.meta
        own = fixed_color_term(config, meta.instrument, meta.filter)
        reference = fixed_color_term(config, reference_instrument, meta.filter)
        return own - reference if own is not None and reference is not None else 0.0

    @staticmethod
    def _refs_for_new_stars(
        field_inst: np.ndarray,
        phot: Photometry,
        star_ids: np.ndarray,
        ref_mag: np.ndarray,
        offset: float,
        offset_err: float,
        star_err: np.ndarray,
    ) -> dict[int, tuple[float, float]]:
        """Reference magnitudes of comparison stars added since the filter's first template, put on the
        existing scale through this frame's ensemble offset (``field_inst``: the field stars' magnitudes on
        the reference frame's system; ``star_err``: their errors in the first aperture)."""
        new = comparison_stars(phot, 0) & ~np.isfinite(ref_mag)
        mags, errors = field_inst[:, 0][new], star_err[new]
        return {
            int(star): (float(mag + offset), float(np.hypot(err, offset_err)))
            for star, mag, err in zip(star_ids[1:][new], mags, errors, strict=True)
        }


#: Flags that make a frame unfit to set reference magnitudes.
FRAME_DOUBT = flags.value(*flags.FRAME_FLAGS, "cloudy")


def limit_mag(flux_err: float, exptime: float) -> float:
    """Instrumental magnitude of a 5 sigma detection, for a flux error in electrons."""
    return float(-2.5 * np.log10(5.0 * flux_err / exptime)) if flux_err > 0 else np.nan


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


@dataclass(frozen=True)
class CatalogMatch:
    """A target's catalog stars in one band matched to its field stars (in reference pixels):
    ``catalog[catalog_index[j]]`` is field star ``star_index[j]`` (0-based among the field stars)."""

    catalog: Table
    catalog_index: np.ndarray
    star_index: np.ndarray

    def star_colors(self, n_stars: int) -> np.ndarray:
        """Catalog colour of each of ``n_stars`` field stars, NaN where a star has no catalog entry."""
        colors = np.full(n_stars, np.nan)
        colors[self.star_index] = np.asarray(self.catalog["color"], dtype=float)[self.catalog_index]
        return colors

    @property
    def field_color(self) -> float:
        """Median colour of the matched stars: the colour the target is given until its own is measured."""
        colors = np.asarray(self.catalog["color"], dtype=float)[self.catalog_index]
        return float(np.nanmedian(colors)) if np.isfinite(colors).any() else float("nan")


class CatalogMatcher:
    """Cross-matches a target's catalog with its field stars through the reference frame's header WCS,
    corrected on the catalog stars themselves; each match is made once per reference, band and field."""

    def __init__(self, catalogs: FieldCatalogs) -> None:
        self.catalogs = catalogs
        self._matches: dict[tuple[object, ...], CatalogMatch] = {}

    def fix_reference(self, store: Store, reference: Reference, radius_arcmin: float, filter: str) -> Affine | None:
        """Correct a reference frame's header WCS once a catalog can be had (it could not when it was made)."""
        catalog = self.catalogs.get(reference.target, _catalog_band(filter), radius_arcmin)
        if catalog is None:
            return None
        return fit_sky_fix(reference, store.sources(reference.sha256), catalog)

    def match(
        self, config: Config, reference: Reference, filter: str, field_ref: np.ndarray, radius_arcmin: float
    ) -> CatalogMatch | None:
        """The match in ``filter``'s band, or None without a catalog (or without any WCS to place it)."""
        band = BAND_OF_FILTER.get(filter)
        catalog = self.catalogs.get(reference.target, band, radius_arcmin) if band is not None else None
        if catalog is None or len(catalog) == 0 or reference.wcs is None:
            return None
        fix = None if reference.sky_fix is None else reference.sky_fix.tobytes()
        key = (reference.target, band, reference.sha256, fix, len(field_ref), id(catalog))
        if key not in self._matches:
            order = np.argsort(np.asarray(catalog["mag"], dtype=float))
            cat_xy = reference.pixels_of(np.asarray(catalog["ra"])[order], np.asarray(catalog["dec"])[order])
            radius = config.catalog.match_radius_arcsec / reference.pixscale
            shift = 0.0 if reference.sky_fix is not None else SOLVED_WCS_ERROR_ARCSEC / reference.pixscale
            _, cat_index, star_index = match_positions(cat_xy, field_ref, radius, max_offset=shift)
            self._matches[key] = CatalogMatch(catalog, order[cat_index], star_index)
        return self._matches[key]


class MatchCatalog:
    """Find the target's reference stars in its catalog (old step 4.5): their colours put other telescopes'
    magnitudes on the reference frame's system, and their magnitudes give the zero point.

    The reference frame's header WCS is corrected on the catalog stars the first time a catalog answers.
    """

    name = Step.CATALOG

    def __init__(self, matcher: CatalogMatcher) -> None:
        self.matcher = matcher

    def __call__(self, work: FrameWork) -> None:
        reference, meta = work.reference, work.frame.meta
        assert reference is not None and work.field_ref is not None
        if reference.sky_fix is None and reference.wcs is not None:
            sky_fix = self.matcher.fix_reference(work.store, reference, _radius_arcmin(work), meta.filter)
            if sky_fix is not None:
                work.reference = reference = place_target(replace(reference, sky_fix=sky_fix), work.config)
                work.reference_changed = True
        work.catalog_match = self.matcher.match(
            work.config, reference, meta.filter, work.field_ref, _radius_arcmin(work)
        )


def fixed_color_term(config: Config, instrument: str | None, filter: str) -> float | None:
    """The configured colour term of an instrument and filter (0 when none is set and none is to be fitted);
    None when it is to be fitted per frame."""
    terms = config.catalog.color_terms
    fixed = terms.get(f"{instrument}:{filter}", terms.get(filter))
    if fixed is None and not config.catalog.fit_color_terms:
        return 0.0
    return fixed


def calibrate_frame(
    config: Config,
    match: CatalogMatch | None,
    filter: str,
    instrument: str | None,
    inst_mag: np.ndarray,
    inst_err: np.ndarray,
    star_flags: np.ndarray,
) -> list[Calibration | None]:
    """Zero points for one frame's stored or fresh photometry (rows: target, then field stars)."""
    apertures = inst_mag.shape[1]
    if match is None:
        return [None] * apertures
    usable = np.column_stack(
        [comparison_mask(inst_mag[1:, k], inst_err[1:, k], star_flags[1:, k]) for k in range(apertures)]
    )
    return calibrate_apertures(
        inst_mag, inst_err, usable, match.catalog, match.catalog_index, match.star_index,
        color_term=fixed_color_term(config, instrument, filter),
    )  # fmt: skip


class Calibrate:
    """Standard magnitudes: a zero point per aperture from the field's catalog stars (old steps 5-6).

    Without a catalog the points stay uncalibrated and flagged; the first frame calibrated after that (in
    this process: a catalog back after an outage, or added to the config) has the runner fill them in from
    the stored star photometry, as ``lcowatch recalibrate`` does. The colour term is applied with the
    target's own colour once the paired filter is measured the same night (see :func:`apply_colours`).
    """

    name = Step.CALIBRATE

    def __init__(self) -> None:
        self._calibrated: set[tuple[str, str | None]] = set()  # (target, band) calibrated in this process

    def __call__(self, work: FrameWork) -> None:
        phot, meta = work.photometry, work.frame.meta
        assert phot is not None and meta.target is not None
        match = work.catalog_match
        calibrations = calibrate_frame(
            work.config, match, meta.filter, meta.instrument, phot.inst_mag, phot.inst_err, phot.flags
        )
        for point, calibration in zip(work.points, calibrations, strict=True):
            point.update(calibration_columns(calibration, match, meta.filter, point["flags"], point["flux_err"]))
        key = (meta.target, BAND_OF_FILTER.get(meta.filter))
        if key not in self._calibrated and any(c is not None for c in calibrations):
            self._calibrated.add(key)
            work.fill_in_calibration = work.store.has_uncalibrated_points(*key)


def calibration_columns(
    calibration: Calibration | None,
    match: CatalogMatch | None,
    filter: str,
    point_flags: int,
    flux_err: float | None,
) -> CalibrationColumns:
    """The points-table columns a calibration sets (all empty, and flagged, without one).

    ``mag`` is the colour-0 magnitude here; the colour term is added by :func:`apply_colours`.
    ``flux_err`` (e-/s) gives the calibrated 5 sigma limit.
    """
    band = BAND_OF_FILTER.get(filter)  # None: a filter no catalog covers (e.g. Y); points stay uncalibrated
    if filter not in STANDARD_FILTERS:
        point_flags |= flags.value("nonstandard_band")
    if calibration is None:
        return CalibrationColumns(
            mag=None, mag_err=None, zp=None, zp_err=None, color_term=None, zp_nstars=None, zp_scatter=None,
            catalog=None, color=None, comparison_color=_finite(match.field_color) if match else None, band=band,
            flags=point_flags | flags.value("uncalibrated"),
        )  # fmt: skip
    zp = calibration.zeropoint
    detected = not point_flags & flags.value("nondetection")
    return {
        "mag": _finite(calibration.mag) if detected else None,
        "mag_err": _finite(calibration.mag_err) if detected else None,
        "zp": zp.zp, "zp_err": zp.zp_err, "color_term": zp.color_term, "zp_nstars": zp.n_used,
        "zp_scatter": _finite(zp.scatter), "catalog": match.catalog.meta.get("catalog") if match else None,
        "band": band, "color": None, "comparison_color": _finite(match.field_color) if match else None,
        "flags": point_flags & ~flags.value("uncalibrated", "color_assumed"),  # apply_colours decides
        "limit_mag": _finite(limit_mag(flux_err, 1.0) + zp.zp) if flux_err is not None else None,
    }  # fmt: skip


def default_stages(config: Config) -> list[Stage]:
    catalogs = FieldCatalogs(config)
    return [
        Preprocess(), MeasureQuality(), SelectTemplate(catalogs), Register(), MeasurePhotometry(),
        SubtractReference(), MatchCatalog(CatalogMatcher(catalogs)), DifferentialPhotometry(), Calibrate(),
    ]  # fmt: skip
