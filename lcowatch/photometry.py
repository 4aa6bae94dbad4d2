"""Aperture photometry at registered positions, and the differential magnitude of the target.

Apertures are given in arcseconds or in multiples of the frame's FWHM, never in fixed pixels. The local
background of each star is the sigma-clipped median of an annulus, robust to cosmic rays and
neighbours. Errors follow the CCD equation (the ERR plane when the file has one). Pixel positions are
0-based.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sep
from scipy.spatial import cKDTree

from lcowatch import flags
from lcowatch.config import Aperture
from lcowatch.frame import Frame
from lcowatch.preprocess import Preprocessed

MAG_PER_LN = 2.5 / np.log(10.0)  # 1.0857: magnitude error per unit relative flux error
CENTROID_ITERATIONS = 5
MIN_ANNULUS_PIXELS = 20


@dataclass
class Photometry:
    """Measurements of N positions in K apertures.

    ``x``, ``y`` are the measured (or forced) 0-based positions; ``flux`` and ``flux_err`` (N, K) are
    electrons in the exposure; ``inst_mag`` = -2.5 log10(flux / exptime); ``background`` is the local
    background left after the global model (electrons per pixel); ``flags`` (N, K) use
    :mod:`lcowatch.flags`.
    """

    x: np.ndarray
    y: np.ndarray
    radii: np.ndarray
    flux: np.ndarray
    flux_err: np.ndarray
    inst_mag: np.ndarray
    inst_err: np.ndarray
    background: np.ndarray
    flags: np.ndarray


def annulus_background(
    image: np.ndarray, bad: np.ndarray, x: np.ndarray, y: np.ndarray, r_in: float, r_out: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sigma-clipped (3 sigma, 3 passes) median and RMS of annuli around each position, vectorised.

    Returns (median, rms, number of pixels used); NaN where fewer than a handful of good pixels.
    """
    reach = int(np.ceil(r_out))
    dy, dx = np.mgrid[-reach : reach + 1, -reach : reach + 1]
    ring = (np.hypot(dx, dy) >= r_in) & (np.hypot(dx, dy) <= r_out)
    dx, dy = dx[ring], dy[ring]
    cols = np.rint(x).astype(int)[:, None] + dx[None, :]
    rows = np.rint(y).astype(int)[:, None] + dy[None, :]
    ny, nx = image.shape
    inside = (cols >= 0) & (cols < nx) & (rows >= 0) & (rows < ny)
    cols, rows = np.clip(cols, 0, nx - 1), np.clip(rows, 0, ny - 1)
    values = image[rows, cols].astype(np.float64)
    values[~inside | bad[rows, cols]] = np.nan
    for _ in range(3):
        median = np.nanmedian(values, axis=1, keepdims=True) if values.size else values
        spread = 1.4826 * np.nanmedian(np.abs(values - median), axis=1, keepdims=True)
        values[np.abs(values - median) > 3 * np.maximum(spread, 1e-9)] = np.nan
    used = np.isfinite(values).sum(axis=1)
    with np.errstate(invalid="ignore"):
        median = np.where(
            used >= MIN_ANNULUS_PIXELS, np.nanmedian(np.where(used[:, None] > 0, values, 0), axis=1), np.nan
        )
        rms = np.where(used >= MIN_ANNULUS_PIXELS, np.nanstd(np.where(used[:, None] > 0, values, 0), axis=1), np.nan)
    return median, rms, used


def recentre(image: np.ndarray, x: np.ndarray, y: np.ndarray, fwhm_pix: float) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-windowed centroids (SExtractor's XWIN iteration), vectorised over positions.

    ``image`` must be background-subtracted. Positions whose window leaves the frame come back NaN.
    """
    sigma = max(fwhm_pix / 2.3548, 0.5)
    half = int(np.ceil(2.5 * sigma)) + 1
    dy, dx = np.mgrid[-half : half + 1, -half : half + 1]
    ny, nx = image.shape
    cx, cy = x.astype(float).copy(), y.astype(float).copy()
    for _ in range(CENTROID_ITERATIONS):
        alive = np.isfinite(cx) & np.isfinite(cy)
        ix = np.rint(np.where(alive, cx, half)).astype(int)
        iy = np.rint(np.where(alive, cy, half)).astype(int)
        valid = alive & (ix - half >= 0) & (ix + half < nx) & (iy - half >= 0) & (iy + half < ny)
        ix, iy = np.where(valid, ix, half), np.where(valid, iy, half)
        cut = image[iy[:, None, None] + dy, ix[:, None, None] + dx]
        ox = ix[:, None, None] + dx - np.where(valid, cx, half)[:, None, None]
        oy = iy[:, None, None] + dy - np.where(valid, cy, half)[:, None, None]
        weight = np.exp(-(ox**2 + oy**2) / (2 * sigma**2)) * cut
        total = weight.sum(axis=(1, 2))
        good = valid & (total > 0)
        safe_total = np.where(good, total, 1.0)
        cx = np.where(good, cx + 2 * (weight * ox).sum(axis=(1, 2)) / safe_total, np.nan)
        cy = np.where(good, cy + 2 * (weight * oy).sum(axis=(1, 2)) / safe_total, np.nan)
    return cx, cy


def measure(
    frame: Frame,
    pre: Preprocessed,
    frame_sources: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    apertures: list[Aperture],
    annulus: tuple[Aperture, Aperture],
    fwhm_pix: float,
    *,
    recentre_snr: float,
    min_snr: float,
    max_shift: float,
) -> Photometry:
    """Measure every position in every aperture.

    Positions are recentroided where a star has at least ``recentre_snr`` in the first aperture and the
    centroid moves less than ``max_shift`` pixels; otherwise they stay where registration put them
    (flag ``forced_position``).
    """
    pixscale = frame.meta.pixscale
    radii = np.array([a.radius_pix(fwhm_pix, pixscale) for a in apertures])
    r_in, r_out = (a.radius_pix(fwhm_pix, pixscale) for a in annulus)
    r_out = max(r_out, r_in + 3.0)
    ny, nx = frame.data.shape
    error_map, gain = (frame.err, None) if frame.err is not None else (pre.rms, frame.meta.gain)

    off_frame = ~((x >= 0) & (x <= nx - 1) & (y >= 0) & (y <= ny - 1)) | ~np.isfinite(x) | ~np.isfinite(y)
    px, py = np.where(off_frame, 0.0, x), np.where(off_frame, 0.0, y)
    first, first_err, _ = sep.sum_circle(pre.subtracted, px, py, radii[0], err=error_map, mask=pre.bad, gain=gain)
    with np.errstate(divide="ignore", invalid="ignore"):
        bright = (first / first_err >= recentre_snr) & ~off_frame
    cx, cy = recentre(pre.subtracted, px, py, fwhm_pix)
    moved = np.hypot(cx - px, cy - py)
    take = bright & np.isfinite(moved) & (moved < max_shift)
    px, py = np.where(take, cx, px), np.where(take, cy, py)

    local, local_rms, n_annulus = annulus_background(pre.subtracted, pre.mask, px, py, r_in, r_out)
    flux = np.empty((len(px), len(radii)))
    flux_err = np.empty_like(flux)
    star_flags = np.zeros(flux.shape, dtype=np.int64)
    tree = cKDTree(np.column_stack([frame_sources["x"], frame_sources["y"]])) if len(frame_sources) else None
    for k, radius in enumerate(radii):
        total, total_err, sep_flags = sep.sum_circle(
            pre.subtracted, px, py, radius, err=error_map, mask=pre.bad, gain=gain
        )
        _, _, saturated = sep.sum_circle(pre.subtracted, px, py, radius, mask=pre.saturated)
        area = np.pi * radius**2
        background = np.nan_to_num(local, nan=0.0)
        background_var = np.where(used := n_annulus > 0, (np.pi / 2) * local_rms**2 / np.maximum(n_annulus, 1), 0.0)
        flux[:, k] = total - area * background
        flux_err[:, k] = np.sqrt(total_err**2 + area**2 * np.nan_to_num(background_var))
        bits = np.zeros(len(px), dtype=np.int64)
        bits |= np.where(saturated & sep.APER_HASMASKED, flags.value("saturated"), 0)
        bits |= np.where(sep_flags & sep.APER_HASMASKED, flags.value("bad_pixel"), 0)
        bits |= np.where(sep_flags & sep.APER_TRUNC, flags.value("near_edge"), 0)
        bits |= np.where(~used | np.isnan(local), flags.value("bad_background"), 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            bits |= np.where(~(flux[:, k] / flux_err[:, k] >= min_snr), flags.value("low_snr"), 0)
        if tree is not None:
            # A detection other than the star itself (which sits within ~half a FWHM) inside the aperture.
            distance, _ = tree.query(np.column_stack([px, py]), k=min(4, tree.n), distance_upper_bound=radius)
            distance = distance.reshape(len(px), -1)
            blended = (np.isfinite(distance) & (distance > max(1.5, 0.5 * fwhm_pix))).any(axis=1)
            bits |= np.where(blended, flags.value("blended"), 0)
        star_flags[:, k] = bits
    edge = (px - r_out < 0) | (px + r_out > nx - 1) | (py - r_out < 0) | (py + r_out > ny - 1)
    star_flags |= np.where(edge, flags.value("near_edge"), 0)[:, None]
    star_flags |= np.where(~take, flags.value("forced_position"), 0)[:, None]
    star_flags[off_frame] = flags.value("off_frame")
    flux[off_frame] = np.nan
    flux_err[off_frame] = np.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        positive = flux > 0
        inst_mag = np.where(positive, -2.5 * np.log10(np.where(positive, flux, 1.0) / frame.meta.exptime), np.nan)
        inst_err = np.where(positive, MAG_PER_LN * flux_err / np.where(positive, flux, 1.0), np.nan)
    return Photometry(
        x=np.where(off_frame, x, px), y=np.where(off_frame, y, py), radii=radii, flux=flux, flux_err=flux_err,
        inst_mag=inst_mag, inst_err=inst_err, background=local, flags=star_flags,
    )  # fmt: skip


ENSEMBLE_BLOCKING = flags.value(
    "saturated", "bad_pixel", "near_edge", "off_frame", "low_snr", "blended", "bad_background"
)


@dataclass(frozen=True)
class Ensemble:
    """The frame's offset from the reference magnitudes: ``inst_mag - ref_mag`` averaged over stars."""

    offset: float
    offset_err: float
    n_used: int
    used: np.ndarray


def ensemble_offset(
    inst_mag: np.ndarray, inst_err: np.ndarray, ref_mag: np.ndarray, star_flags: np.ndarray
) -> Ensemble:
    """Weighted, sigma-clipped mean of ``inst_mag - ref_mag`` over clean comparison stars.

    Outliers (variables, cosmic rays, blends the flags missed) are clipped at 3 sigma around the median
    and the weights are inverse variances; the error is inflated by the reduced chi2 when above 1.
    """
    delta = inst_mag - ref_mag
    usable = np.isfinite(delta) & np.isfinite(inst_err) & (inst_err > 0) & ((star_flags & ENSEMBLE_BLOCKING) == 0)
    used = usable.copy()
    for _ in range(5):
        if used.sum() < 2:
            break
        median = np.median(delta[used])
        spread = 1.4826 * np.median(np.abs(delta[used] - median))
        tolerance = np.maximum(3 * spread, 3 * inst_err)
        clipped = usable & (np.abs(delta - median) <= tolerance)
        if np.array_equal(clipped, used):
            break
        used = clipped
    n_used = int(used.sum())
    if n_used == 0:
        return Ensemble(np.nan, np.nan, 0, used)
    weight = 1.0 / inst_err[used] ** 2
    offset = float(np.sum(weight * delta[used]) / np.sum(weight))
    error = float(np.sqrt(1.0 / np.sum(weight)))
    if n_used > 1:
        chi2 = float(np.sum(weight * (delta[used] - offset) ** 2) / (n_used - 1))
        error *= np.sqrt(max(chi2, 1.0))
    return Ensemble(offset, error, n_used, used)
