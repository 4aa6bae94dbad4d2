"""Image subtraction for targets with ``method: difference`` (a transient on its host galaxy): the target's
flux is measured on the frame minus its reference image, so the host's light, which aperture photometry
would add to every point, cancels.

One reference image per target, filter and instrument class (:mod:`lcowatch.state.images`): the first good
frame of that filter and class outside the transient's window (``reference_before`` / ``reference_after``;
any frame without them), deepened by later ones while the target shows nothing new (without a window, until
it first changes in any filter). Frames that come before a reference exists and cannot be one wait, and are
processed again once it is made. The difference flux replaces the target's aperture flux
before the differential and calibration stages, whose zero points come from the unsubtracted comparison
stars in the same apertures (as lcogtsnpipe does), so ``diff_mag``, ``mag`` and ``limit_mag`` follow
unchanged. A point is relative to the reference: the reference frame's own point has flux 0 by definition
(flag ``is_reference``), so the reference should hold no transient light. Where one founded without a
window does (a camera or filter that joins after the explosion), that light is measured against another
camera's reference free of it and added back to every point; where nothing can measure it, the points are
flagged ``reference_has_transient``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from lcowatch import flags
from lcowatch.errors import Reject
from lcowatch.pipeline.pixels import Pixels
from lcowatch.science.calibrate import instrumental_mag
from lcowatch.science.quality import recentre
from lcowatch.science.register import MAX_RMS, Affine, apply_affine, compose, invert, register
from lcowatch.science.subtract import Difference, encircled_energy, forced_photometry, resample_reference, subtract
from lcowatch.science.template import TARGET_CENTROID_SNR
from lcowatch.state.images import ReferenceImage, clean_reference_image, reference_image, reference_pins
from lcowatch.states import Step

if TYPE_CHECKING:
    from lcowatch.pipeline.stages import FrameWork

#: Flags of the unsubtracted target that the subtraction removes: the host (detected as a source beside
#: the target) made it look blended or crowded, and its light is in the reference too.
CLEARED_BY_SUBTRACTION = flags.value("blended", "crowded")


@dataclass(frozen=True)
class SubtractionViews:
    """Cutouts for a diagnostic picture, named, and the target's position on them (0-based pixels)."""

    panels: list[tuple[str, np.ndarray]]
    target_xy: tuple[float, float]


@dataclass(frozen=True)
class _Measured:
    """A frame minus a reference at the target: flux and error (electrons, the frame's flux scale) in each
    aperture, the residual RMS at bright stars, the frame's flux over the reference's (``scale``), the
    fraction of a point source's light in each aperture on the frame, the reference with this frame
    averaged in (or None), the diagnostic cutouts (or None) and the transient's centroid (frame pixels, or
    None)."""

    flux: np.ndarray
    flux_err: np.ndarray
    residual: float
    scale: float
    encircled: np.ndarray
    deeper: ReferenceImage | None
    views: SubtractionViews | None
    centroid: tuple[float, float] | None

    def with_light_of(self, reference: ReferenceImage) -> tuple[np.ndarray, np.ndarray]:
        """Flux and error with the transient's light that ``reference`` holds added back (its error too:
        one error shared by every point measured against it)."""
        if not reference.light_measured:
            return self.flux, self.flux_err
        light = self.scale * self.encircled
        return (
            self.flux + reference.transient_total * light,
            np.hypot(self.flux_err, reference.transient_total_err * light),
        )


def instrument_class(instrument: str | None) -> str:
    """The camera family of an LCO instrument name (``fa`` Sinistro, ``kb`` SBIG, ``sq`` QHY600, ``ep``
    MuSCAT): frames of one family share pixel scale and PSF shape well enough to share a reference."""
    return (instrument or "unknown")[:2].lower()


class SubtractReference:
    """For a ``difference`` target: the target's flux in each aperture on the frame minus its reference."""

    name = Step.SUBTRACT

    def __call__(self, work: FrameWork) -> None:
        meta, config = work.frame.meta, work.config
        assert meta.target is not None
        if config.targets[meta.target].method != "difference":
            return
        assert work.to_frame is not None and work.reference is not None and work.photometry is not None
        assert work.quality is not None
        target_xy = apply_affine(work.to_frame, work.reference.target_xy[None, :])[0]
        klass = instrument_class(meta.instrument)
        reference = reference_image(work.store.conn, meta.target, meta.filter, klass)
        # An earlier version of this very file (a part of it) made the reference: the same pixels.
        is_reference = reference is None or reference.sha256 == work.replaces
        own: _Measured | None = None  # the reference frame's own light, where it holds the transient's
        if reference is None:
            if not self._may_be_reference(work):
                raise Reject(f"waiting for a reference image of {meta.filter} ({klass})", step=Step.SUBTRACT)
            reference, own = self._new_reference(work, target_xy, klass)
            work.new_reference_image = reference
            at = (float(target_xy[0] - reference.origin[0]), float(target_xy[1] - reference.origin[1]))
            work.subtraction_views = SubtractionViews([("new reference image", reference.image)], at)
        elif is_reference and reference.light_measured:
            own = self._against_clean_reference(work, target_xy, klass)
        # A reference frame measured again whose light nothing can measure now is flagged like its points.
        unmeasured = reference.light_unmeasured or (is_reference and reference.light_measured and own is None)
        if is_reference:
            flux, flux_err, residual = (
                (own.flux, own.flux_err, own.residual) if own is not None
                else (np.zeros_like(work.photometry.flux[0]), work.photometry.flux_err[0], 0.0)
            )  # fmt: skip
        else:
            # Measured against the reference as it is; then, while it is shallow and free of the transient
            # and the target shows nothing new, averaged into it.
            grow = (
                reference.frames < config.subtraction.reference_frames
                and reference.transient_total == 0.0  # one that holds the transient's light stays as it is
                and self._may_be_reference(work)
                and work.replaces is None  # its earlier version may be averaged in already
                and not self._transient_seen(work)
            )
            measured = self._measure(work, reference, target_xy, config.photometry.detection_snr if grow else 0.0)
            work.new_reference_image = measured.deeper
            flux, flux_err, residual = *measured.with_light_of(reference), measured.residual
            if measured.views is not None and residual > config.subtraction.max_residual:
                work.subtraction_views = measured.views
            centroid = measured.centroid
            if centroid is not None and residual <= config.subtraction.max_residual and work.quality.flags == 0:
                # The transient alone, on the difference: the unsubtracted light's centroid is the host's.
                at_reference = apply_affine(invert(work.to_frame), np.array([centroid]))[0]
                work.target_centroid_ref = (at_reference, float(measured.flux[0] / measured.flux_err[0]))
        work.reference_image_file = reference.file
        self._replace_target(
            work, target_xy, flux, flux_err, residual, is_reference=is_reference, unmeasured=unmeasured
        )

    @staticmethod
    def _measure(work: FrameWork, reference: ReferenceImage, target_xy: np.ndarray, quiet_snr: float) -> _Measured:
        """The frame minus ``reference`` at the target (see :func:`_difference_flux`)."""
        assert work.quality is not None and work.photometry is not None
        config = work.config
        return work.pixels.run(
            _difference_flux, reference, _cutout_map(reference, _from_reference_frame(work, reference)),
            config.subtraction.cutout, target_xy, work.photometry.radii, work.quality.fwhm_pix, quiet_snr,
            config.diagnostics,
        )  # fmt: skip

    @staticmethod
    def _may_be_reference(work: FrameWork) -> bool:
        """Whether the frame may be, or be averaged into, the reference image: one set by hand
        (``lcowatch reference --set``) takes its frames only; else a good frame outside the window."""
        meta, quality = work.frame.meta, work.quality
        assert meta.target is not None and quality is not None
        pins = reference_pins(work.store.conn, meta.target, meta.filter, instrument_class(meta.instrument))
        if pins:
            return work.frame.sha256 in pins
        window = work.config.targets[meta.target].reference_window()
        outside = window is None or not window[0] <= meta.mjd_mid <= window[1]
        return outside and quality.flags == 0

    @staticmethod
    def _transient_seen(work: FrameWork) -> bool:
        """Without a window, whether the target changed against its references before this frame: its light
        is then in this frame too, even where too faint to show (a 0.4 m frame holding a supernova at S/N 2.6,
        averaged into its reference, made every later 0.4 m point 17 % faint). A new camera's first frame
        still founds its reference: without one its frames would wait for good."""
        meta = work.frame.meta
        assert meta.target is not None
        if work.config.targets[meta.target].reference_window() is not None:
            return False
        return work.store.changed_before(meta.target, meta.mjd_mid, work.config.photometry.detection_snr)

    def _new_reference(
        self, work: FrameWork, target_xy: np.ndarray, klass: str
    ) -> tuple[ReferenceImage, _Measured | None]:
        """The frame's cutout as a new reference image, with the transient's light it holds (see
        :meth:`_with_transient_light`) and the subtraction that measured it, if any."""
        meta, quality, to_frame = work.frame.meta, work.quality, work.to_frame
        assert meta.target is not None and quality is not None and to_frame is not None
        # Twice the cutout: a frame whose cutout has too few stars to fit the kernel tries twice the size.
        image, variance, origin = work.pixels.run(_cutout, target_xy, 2 * work.config.subtraction.cutout)
        window = work.config.targets[meta.target].reference_window()
        reason = "first good frame" + ("" if window is None else " outside the transient's window")
        pinned = bool(reference_pins(work.store.conn, meta.target, meta.filter, klass))
        if pinned:
            reason = "set by hand"
        reference = ReferenceImage(
            meta.target, meta.filter, klass, work.frame.sha256, work.frame.name, meta.mjd_mid, quality.fwhm_pix,
            origin, to_frame, image, variance, 1, reason,
        )  # fmt: skip
        if window is not None or pinned:
            return reference, None  # the user's word that it holds no transient light
        return self._with_transient_light(work, reference, target_xy)

    def _against_clean_reference(self, work: FrameWork, target_xy: np.ndarray, klass: str) -> _Measured | None:
        """The frame minus another camera's earlier reference free of the transient
        (:func:`~lcowatch.state.images.clean_reference_image`), where there is one and the subtraction is good;
        else None."""
        meta = work.frame.meta
        assert meta.target is not None
        clean = clean_reference_image(work.store.conn, meta.target, meta.filter, klass, meta.mjd_mid)
        if clean is None:
            return None
        try:
            measured = self._measure(work, clean, target_xy, 0.0)
        except Reject as exc:
            work.log.warning("reference_transient_light_unmeasured", against=clean.file, reason=str(exc))
            return None
        good = measured.residual <= work.config.subtraction.max_residual and np.isfinite(measured.flux_err[0])
        work.log.info("reference_transient_light", against=clean.file, good=bool(good),
                      flux=round(float(measured.flux[0]), 1), flux_err=round(float(measured.flux_err[0]), 1),
                      residual_rms=round(float(measured.residual), 3))  # fmt: skip
        return measured if good else None

    def _with_transient_light(
        self, work: FrameWork, reference: ReferenceImage, target_xy: np.ndarray
    ) -> tuple[ReferenceImage, _Measured | None]:
        """A new reference image (no window, no frames set by hand) with the transient's light it holds: its
        frame measured against another camera's earlier reference free of it. The light is added back where
        the transient was seen before this frame or shows at ``photometry.detection_snr``; where it was seen
        and nothing can measure it (no such reference, a failed or poor subtraction, or one that shows that
        reference brighter), ``transient_total`` is inf and the points are flagged."""
        seen = self._transient_seen(work)
        measured = self._against_clean_reference(work, target_xy, reference.instrument_class)
        snr = math.nan if measured is None else float(measured.flux[0] / measured.flux_err[0])
        detection = work.config.photometry.detection_snr
        if measured is not None and snr >= (-detection if seen else detection):
            total = float(measured.flux[0] / measured.encircled[0])
            total_err = float(measured.flux_err[0] / measured.encircled[0])
            return replace(
                reference, transient_total=total, transient_total_err=total_err,
                reason=f"{reference.reason}; holds the transient's light (S/N {snr:.1f}), added back",
            ), measured  # fmt: skip
        if not seen:
            return reference, None
        return replace(
            reference, transient_total=math.inf,
            reason=f"{reference.reason}; holds the transient's light, not measured (no other camera's earlier "
            "reference free of it)",
        ), None  # fmt: skip

    @staticmethod
    def _replace_target(
        work: FrameWork, target_xy: np.ndarray, flux: np.ndarray, flux_err: np.ndarray, residual: float, *,
        is_reference: bool, unmeasured: bool,
    ) -> None:  # fmt: skip
        phot = work.photometry
        assert phot is not None
        phot.inst_mag[0], phot.inst_err[0] = instrumental_mag(flux, flux_err, work.frame.meta.exptime)
        phot.flux[0], phot.flux_err[0] = flux, flux_err
        phot.x[0], phot.y[0] = target_xy  # not where recentring on the host's light put it
        mark = flags.value("is_reference") if is_reference else 0
        if residual > work.config.subtraction.max_residual:
            mark |= flags.value("bad_subtraction")
        if unmeasured:
            mark |= flags.value("reference_has_transient")
        phot.flags[0] = phot.flags[0] & ~CLEARED_BY_SUBTRACTION | mark
        work.log.info("target_subtracted", residual_rms=round(float(residual), 3), is_reference=is_reference,
                      flux=[round(float(f), 1) for f in flux])  # fmt: skip


def _from_reference_frame(work: FrameWork, reference: ReferenceImage) -> Affine:
    """The map from the pixels of the frame the reference image was cut from into this frame's, by matching
    this frame's stars to that frame's.

    Both frames are of one camera family, so an affine map between them is as good as their centroids. The
    chain through the target's reference pixel frame, perhaps another telescope's (the first template), is
    not: a 1 m frame and its reference, each mapped onto a 0.4 m frame by its own affine fit, came out 0.5
    px apart across a 256 px cutout, which left the host's light in the difference (false detections before
    the explosion, fluxes 40-90 % high at S/N 7-12). The chain is the first guess, and the fallback.
    """
    assert work.to_frame is not None and work.sources is not None and work.quality is not None
    chained = compose(work.to_frame, invert(reference.frame_from_reference))
    max_rms = max(MAX_RMS, 0.15 * work.quality.fwhm_pix)  # as for a frame against its template
    try:
        return register(work.store.sources(reference.sha256), work.sources, guess=chained, max_rms=max_rms).matrix
    except Reject as exc:
        work.log.warning("reference_mapped_through_chain", reference=reference.file, reason=str(exc))
        return chained


def _cutout_map(reference: ReferenceImage, frame_from_reference_frame: Affine) -> np.ndarray:
    """The 3x3 map from the reference image's cutout pixels into this frame's pixels, given the map from the
    pixels of the frame the reference image was cut from."""
    shift = np.array([[1.0, 0.0, reference.origin[0]], [0.0, 1.0, reference.origin[1]]])
    return np.vstack([compose(frame_from_reference_frame, shift), [0.0, 0.0, 1.0]])


def _window(pixels: Pixels, target_xy: np.ndarray, size: int) -> tuple[slice, slice, tuple[int, int]]:
    ny, nx = pixels.frame.meta.shape
    x0 = int(np.clip(round(target_xy[0]) - size // 2, 0, max(nx - size, 0)))
    y0 = int(np.clip(round(target_xy[1]) - size // 2, 0, max(ny - size, 0)))
    return slice(y0, min(y0 + size, ny)), slice(x0, min(x0 + size, nx)), (x0, y0)


def _science(pixels: Pixels, rows: slice, cols: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Background-subtracted electrons, their variance (sky and read noise from the background RMS, plus the
    sources' own shot noise) and the mask, on a window of the frame."""
    pre = pixels.pre
    image = pre.subtracted[rows, cols].astype(np.float64)
    variance = pre.rms[rows, cols].astype(np.float64) ** 2 + np.clip(image, 0.0, None)
    return image, variance, pre.mask[rows, cols]


def _cutout(pixels: Pixels, target_xy: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """A frame's cutout to keep as a reference image: masked pixels NaN."""
    rows, cols, origin = _window(pixels, target_xy, size)
    image, variance, mask = _science(pixels, rows, cols)
    image[mask] = np.nan
    variance[mask] = np.nan
    return image.astype(np.float32), variance.astype(np.float32), origin


def _difference_flux(
    pixels: Pixels, reference: ReferenceImage, cutout_map: np.ndarray, size: int, target_xy: np.ndarray,
    radii: np.ndarray, fwhm_pix: float, quiet_snr: float, with_views: bool,
) -> _Measured:  # fmt: skip
    """The frame minus its reference at the target, in each aperture radius (pixels): the reference with this
    frame averaged in when the target's difference is below ``quiet_snr`` (0: never), (``with_views``) the
    three cutouts for a diagnostic picture, and the transient's centroid on the difference (frame pixels)
    where it is at least :data:`TARGET_CENTROID_SNR` and within half a FWHM of ``target_xy``."""
    scale = float(np.sqrt(abs(np.linalg.det(cutout_map[:2, :2]))))
    for side in (size, 2 * size):
        rows, cols, origin = _window(pixels, target_xy, side)
        science, variance, mask = _science(pixels, rows, cols)
        ref, ref_var = resample_reference(reference.image, reference.variance, cutout_map, science.shape, origin)
        at = (float(target_xy[0] - origin[0]), float(target_xy[1] - origin[1]))
        try:
            difference: Difference = subtract(
                science, variance, ref, ref_var, mask, fwhm_science=fwhm_pix,
                fwhm_reference=reference.fwhm_pix * scale, exclude_xy=[at],
            )  # fmt: skip
        except ValueError as exc:  # too few stars to fit a kernel on the cutout
            failure = exc
            continue
        flux, flux_err = forced_photometry(difference, at[0], at[1], [float(r) for r in radii])
        # A frame where the target differs from the reference shows the transient: it must not enter it.
        quiet = abs(flux[0]) < quiet_snr * flux_err[0]
        deeper = _averaged_in(pixels, reference, cutout_map, target_xy, difference.scale, fwhm_pix) if quiet else None
        views = None
        if with_views:
            named = [("frame", science), ("reference, resampled", ref), ("difference", difference.image)]
            views = SubtractionViews([(name, image.astype(np.float32)) for name, image in named], at)
        return _Measured(
            flux, flux_err, difference.residual_rms, difference.scale,
            np.array([encircled_energy(difference.psf_science, float(r)) for r in radii]), deeper, views,
            _centroid(difference, at, origin, fwhm_pix, flux, flux_err),
        )  # fmt: skip
    raise Reject(f"cannot subtract the reference: {failure}", step=Step.SUBTRACT)


def _centroid(
    difference: Difference, at: tuple[float, float], origin: tuple[int, int], fwhm_pix: float, flux: np.ndarray,
    flux_err: np.ndarray,
) -> tuple[float, float] | None:  # fmt: skip
    """The transient's windowed centroid on the difference (frame pixels), where it is at least
    :data:`TARGET_CENTROID_SNR` in the first aperture and within half a FWHM of ``at`` (cutout pixels)."""
    if not flux[0] >= TARGET_CENTROID_SNR * flux_err[0]:
        return None
    image = np.nan_to_num(difference.image)
    cx, cy = recentre(image, np.array([at[0]]), np.array([at[1]]), fwhm_pix)
    if not np.hypot(cx[0] - at[0], cy[0] - at[1]) <= 0.5 * fwhm_pix:
        return None
    return float(cx[0] + origin[0]), float(cy[0] + origin[1])


def _averaged_in(
    pixels: Pixels, reference: ReferenceImage, cutout_map: np.ndarray, target_xy: np.ndarray, scale: float,
    fwhm_pix: float,
) -> ReferenceImage:  # fmt: skip
    """The reference with this frame's cutout resampled onto it, put on its flux scale (``scale`` is this
    frame's flux over the reference's) and averaged in; pixels this frame does not cover keep their value."""
    # A window around the target that holds the reference's whole cutout at any small rotation.
    rows, cols, origin = _window(pixels, target_xy, int(1.5 * max(reference.image.shape)))
    image, variance, mask = _science(pixels, rows, cols)
    image[mask], variance[mask] = np.nan, np.nan
    shift = np.array([[1.0, 0.0, origin[0]], [0.0, 1.0, origin[1]], [0.0, 0.0, 1.0]])
    onto = np.linalg.inv(cutout_map) @ shift  # this window's pixels into the reference's cutout
    new, new_var = resample_reference(image, variance, onto, reference.image.shape, (0, 0))
    n = reference.frames
    covered = np.isfinite(new) & np.isfinite(reference.image)
    stacked = np.where(covered, (n * reference.image + new / scale) / (n + 1), reference.image)
    stacked_var = np.where(covered, (n**2 * reference.variance + new_var / scale**2) / (n + 1) ** 2, reference.variance)
    pixel_scale = float(np.sqrt(abs(np.linalg.det(cutout_map[:2, :2]))))
    fwhm = (n * reference.fwhm_pix + fwhm_pix / pixel_scale) / (n + 1)
    return replace(
        reference, image=stacked.astype(np.float32), variance=stacked_var.astype(np.float32), frames=n + 1,
        fwhm_pix=fwhm, reason=f"{reference.reason.split(' (')[0]} ({n + 1} frames averaged)",
    )  # fmt: skip
