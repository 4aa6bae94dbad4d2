"""Quality (the old step 2): detect sources, measure seeing, shape and depth, and give a verdict.

The source list kept per frame is the old ``xys``: 0-based pixel positions and sep measurements.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import sep
from scipy.spatial import cKDTree

from lcowatch import flags
from lcowatch.config import QualityConfig
from lcowatch.science.frame import Frame
from lcowatch.science.preprocess import Preprocessed

SOURCE_DTYPE = np.dtype(
    [
        ("x", "f8"),  # 0-based pixel column of the centroid
        ("y", "f8"),  # 0-based pixel row
        ("flux", "f8"),  # electrons above background, isophotal
        ("peak", "f4"),  # electrons above background
        ("a", "f4"),  # semi-major RMS size, pixels
        ("b", "f4"),
        ("theta", "f4"),  # radians, counter-clockwise from +x
        ("npix", "i4"),
        ("snr", "f4"),
        ("fwhm", "f4"),  # pixels; NaN unless the source was used to measure the frame's FWHM
        ("saturated", "?"),
        ("sharp", "?"),  # narrower than the PSF: cosmic ray or hot pixel
        ("sep_flag", "i2"),
    ]
)

MIN_STAR_SNR = 10.0  # a detection counts as a star above this S/N
FWHM_STAR_SNR = 30.0  # stars used to measure the FWHM
MAX_FWHM_STARS = 300
PRECISE_FWHM_SNR = 100.0
MIN_PRECISE_FWHM_STARS = 10
SHARP_FRACTION = 0.5  # a ring/peak ratio (_ring_to_peak) under this fraction of bright stars' marks a hit
#: ...within these bounds: hits of 1-2 pixels stay under about 0.2, stars of FWHM 1.3 px are at 0.19 or more
SHARP_CUT_RANGE = (0.12, 0.3)
CENTROID_ITERATIONS = 5
#: sep's buffer of pixels above the threshold, tried in turn: its default holds a 4k Sinistro field; a
#: crowded bulge field overflows it and gets ten times as much (which costs 126 MB of peak memory on a
#: 4k frame, so it is not the first try).
EXTRACT_PIXSTACKS = (300_000, 3_000_000)


@dataclass
class Quality:
    """Frame-level quality measurements.

    ``background`` and ``background_rms`` in electrons per pixel; ``fwhm_pix`` in pixels and
    ``fwhm_arcsec`` in arcseconds (NaN when no star could be measured); ``ellipticity`` is 1 - b/a.
    """

    background: float
    background_rms: float
    fwhm_pix: float
    fwhm_arcsec: float
    ellipticity: float
    nstars: int
    verdict: str
    reasons: list[str] = field(default_factory=list)
    flags: int = 0  # frame flags (lcowatch.flags.FRAME_FLAGS) of the failed gates

    @property
    def measurable(self) -> bool:
        """Photometry needs a FWHM: apertures are multiples of it."""
        return bool(np.isfinite(self.fwhm_pix))


#: sep's default detection filter. A plain convolution with it, thresholded at ``detect_sigma`` times the
#: filtered image's own noise (this fraction of the pixel noise): sep's matched filter, its default with a
#: noise map, costs 2.3x as much on a 4k frame, and deblends and cleans against the pixel-noise threshold,
#: so on a 1 m frame at 3" seeing it found 69 % of the stars of S/N over 25 clear of brighter neighbours (93 %
#: with the convolution), and the missed stars' light raised their neighbours' background annuli.
DETECTION_KERNEL = np.array([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=np.float32)
FILTERED_NOISE = float(np.sqrt(np.sum(DETECTION_KERNEL**2)) / np.sum(DETECTION_KERNEL))


def _extract(pre: Preprocessed, config: QualityConfig) -> np.ndarray:
    def extract(pixstack: int) -> np.ndarray:
        sep.set_extract_pixstack(pixstack)
        sep.set_sub_object_limit(4096)
        return sep.extract(
            pre.subtracted, thresh=config.detect_sigma * FILTERED_NOISE, err=pre.rms, mask=pre.bad,
            minarea=config.min_area, filter_kernel=DETECTION_KERNEL, filter_type="conv", deblend_cont=0.005,
        )  # fmt: skip

    for pixstack in EXTRACT_PIXSTACKS[:-1]:
        try:
            return extract(pixstack)
        except Exception as exc:  # sep raises a bare Exception
            if "pixel buffer full" not in str(exc):
                raise
    return extract(EXTRACT_PIXSTACKS[-1])


def detect_sources(pre: Preprocessed, config: QualityConfig) -> np.ndarray:
    """Detect sources on the background-subtracted image; returns an array of :data:`SOURCE_DTYPE`.

    Saturated pixels are not masked during detection (their stars are found, then marked saturated).
    """
    objects = _extract(pre, config)
    sources = np.zeros(len(objects), dtype=SOURCE_DTYPE)
    for name in ("x", "y", "flux", "peak", "a", "b", "theta", "npix"):
        sources[name] = objects[name]
    sources["sep_flag"] = objects["flag"]
    noise = np.sqrt(np.maximum(objects["flux"], 0) + objects["npix"] * pre.background_rms**2)
    sources["snr"] = np.where(noise > 0, objects["flux"] / noise, 0.0)
    sources["saturated"] = pre.saturated[objects["ypeak"], objects["xpeak"]]
    sources["fwhm"] = np.nan
    ratio = _ring_to_peak(pre.subtracted, pre.bad, objects["x"], objects["y"])
    bright = (sources["snr"] >= FWHM_STAR_SNR) & ~sources["saturated"] & np.isfinite(ratio)
    if bright.sum() >= 3:
        # Stars have the highest ratios; cosmic rays can outnumber bright stars, so the reference is a high
        # percentile rather than the median, and the cut is kept between a 1-2 pixel hit's ratio and an
        # undersampled star's, whatever sets that percentile (blends, galaxies, hits in a cloudy frame).
        cut = np.clip(SHARP_FRACTION * np.percentile(ratio[bright], 95), *SHARP_CUT_RANGE)
        sources["sharp"] = ratio < cut  # NaN (undecided) is not sharp
    return sources


def _ring_to_peak(image: np.ndarray, bad: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Mean of the good pixels around each source's peak over the peak's value; the peak is the brightest
    good pixel of the 3x3 box at the centroid (0-based ``x``, ``y``), not of the isophote, where a faint broad
    star's brightest pixel can be a noise spike off its centre.

    About 0.4 for a star of FWHM 2 px, nearly 1 for a broad one, below 0.15 for a hit of one or two pixels.
    Unlike peak over isophotal flux, it does not rise for faint stars (whose isophotes hold only their cores:
    peak/flux called 10 % of the S/N 10-14 stars of a 3" frame sharp), and it needs no FWHM yet. NaN where it
    cannot be judged: within 2 pixels of the frame's edge, fewer than 4 good ring pixels (a bad column's
    zeros pulled the ring of the stars beside it down), or a peak not above the background.
    """
    ny, nx = image.shape
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    cx, cy = np.clip(np.rint(x).astype(int), 2, nx - 3), np.clip(np.rint(y).astype(int), 2, ny - 3)
    inside = (cx == np.rint(x)) & (cy == np.rint(y))
    box = np.array([np.where(bad[cy + dy, cx + dx], -np.inf, image[cy + dy, cx + dx]) for dy, dx in offsets])
    brightest = np.argmax(box, axis=0)
    px = cx + np.array([dx for _, dx in offsets])[brightest]
    py = cy + np.array([dy for dy, _ in offsets])[brightest]
    ring = [(image[py + dy, px + dx], ~bad[py + dy, px + dx]) for dy, dx in offsets if dy or dx]
    good = sum(ok.astype(int) for _, ok in ring)
    ring_sum = sum(np.where(ok, value, 0.0) for value, ok in ring)
    peak = np.where(bad[py, px], np.nan, image[py, px])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = ring_sum / np.maximum(good, 1) / peak
    return np.where(inside & (good >= 4) & (peak > 0), ratio, np.nan)


def _log_parabola_peak(cutouts: np.ndarray, centre: int) -> np.ndarray:
    """Peak of each star from a log-parabola through the 3 pixels around the brightest one, per axis."""
    c = centre
    core = np.maximum(cutouts[:, c - 1 : c + 2, c - 1 : c + 2], 1e-9)
    logs = np.log(core)
    peak_log = logs[:, 1, 1].copy()
    for left, right in ((logs[:, 1, 0], logs[:, 1, 2]), (logs[:, 0, 1], logs[:, 2, 1])):
        curvature = left - 2 * logs[:, 1, 1] + right
        with np.errstate(divide="ignore", invalid="ignore"):
            shift = np.where(curvature < 0, 0.5 * (left - right) / curvature, 0.0)
        peak_log -= 0.25 * (left - right) * np.clip(shift, -0.5, 0.5)
    return np.exp(peak_log)


def measure_fwhm(pre: Preprocessed, sources: np.ndarray, half_size: int) -> np.ndarray:
    """FWHM in pixels of isolated, unsaturated, unmasked bright stars, from the area above half maximum.

    The half-maximum area does not assume a profile (Gaussian or Moffat alike): FWHM = 2 sqrt(A / pi),
    counted within ``half_size`` pixels of the star over the cutout's own edge level, so neither a
    neighbour nor a background mesh bent by the star's wings moves it. Writes ``sources['fwhm']`` for
    the stars used and returns the per-star values.
    """
    ny, nx = pre.subtracted.shape
    x = np.rint(sources["x"]).astype(int)
    y = np.rint(sources["y"]).astype(int)
    inside = (x >= half_size) & (x < nx - half_size) & (y >= half_size) & (y < ny - half_size)
    candidate = (
        inside
        & ~sources["saturated"]
        & ~sources["sharp"]
        & (sources["snr"] >= FWHM_STAR_SNR)
        & (sources["sep_flag"] == 0)
    )
    if len(sources) > 1:
        distance, _ = cKDTree(np.column_stack([sources["x"], sources["y"]])).query(
            np.column_stack([sources["x"], sources["y"]]), k=2
        )
        candidate &= distance[:, 1] > 1.5 * half_size
    # Noise at the half-maximum contour adds more pixels outside than it takes inside: prefer bright stars.
    bright = candidate & (sources["snr"] >= PRECISE_FWHM_SNR)
    index = np.flatnonzero(bright if bright.sum() >= MIN_PRECISE_FWHM_STARS else candidate)
    index = index[np.argsort(-sources["flux"][index])][:MAX_FWHM_STARS]
    if index.size == 0:
        return np.empty(0)
    dy, dx = np.mgrid[-half_size : half_size + 1, -half_size : half_size + 1]
    radius = np.hypot(dx, dy)
    rows, cols = y[index, None, None] + dy, x[index, None, None] + dx
    cutouts = pre.subtracted[rows, cols]
    clean = ~pre.mask[rows, cols].any(axis=(1, 2))
    cutouts, index = cutouts[clean], index[clean]
    if index.size == 0:
        return np.empty(0)
    edge = np.median(cutouts[:, radius > half_size - 1.5], axis=1)
    cutouts = cutouts - edge[:, None, None]
    peak = _log_parabola_peak(cutouts, half_size)
    area = ((cutouts > 0.5 * peak[:, None, None]) & (radius <= half_size - 1.5)).sum(axis=(1, 2))
    fwhm = np.where(area > 0, 2.0 * np.sqrt(area / np.pi), np.nan)
    sources["fwhm"][index] = fwhm
    return fwhm


def _clipped_mean(values: np.ndarray) -> float:
    """Mean after a 3-sigma clip around the median: the half-maximum areas are whole pixels, and a mean
    over many stars resolves what a median would leave quantised."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan")
    median = np.median(values)
    spread = 1.4826 * np.median(np.abs(values - median))
    if spread > 0:
        values = values[np.abs(values - median) < 3 * spread]
    return float(np.mean(values))


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


def refine_centroids(pre: Preprocessed, sources: np.ndarray, fwhm_pix: float) -> None:
    """Replace isophotal centroids with windowed ones where they converge within a pixel.

    Isophotal centroids follow the noise at the isophote's edge; windowed ones are several times more
    precise, which registration and recentring feed on.
    """
    if not np.isfinite(fwhm_pix) or len(sources) == 0:
        return
    x, y = recentre(pre.subtracted, sources["x"], sources["y"], fwhm_pix)
    moved = np.hypot(x - sources["x"], y - sources["y"])
    take = np.isfinite(moved) & (moved < 1.0) & ~sources["saturated"]
    sources["x"] = np.where(take, x, sources["x"])
    sources["y"] = np.where(take, y, sources["y"])


@dataclass(frozen=True)
class InstrumentHistory:
    """Medians of earlier good frames of one target with one instrument, for the relative gates."""

    fwhm_arcsec: float
    nstars: float
    frames: int


MIN_HISTORY_FRAMES = 5  # frames of an instrument before its own medians set the gates


@dataclass(frozen=True)
class ImageQuality:
    """What the pixels alone tell of a frame's quality (see :class:`Quality` for units)."""

    background: float
    background_rms: float
    fwhm_pix: float
    ellipticity: float
    nstars: int


def measure_image_quality(pre: Preprocessed, sources: np.ndarray) -> ImageQuality:
    """Measure FWHM, ellipticity and star count; ``sources`` get their FWHM and refined centroids."""
    bright = (sources["snr"] >= FWHM_STAR_SNR) & ~sources["saturated"] & ~sources["sharp"]
    typical_sigma = float(np.median(np.sqrt(sources["a"][bright] * sources["b"][bright]))) if bright.any() else 2.0
    # sep's thresholded moments understate the size; 2.5x their FWHM spans a star's half-maximum core.
    half_size = int(np.clip(np.ceil(2.5 * 2.355 * typical_sigma), 5, 40))
    per_star = measure_fwhm(pre, sources, half_size)
    fwhm_pix = _clipped_mean(per_star)
    refine_centroids(pre, sources, fwhm_pix)
    used = np.isfinite(sources["fwhm"])
    ellipticity = _clipped_mean(1.0 - sources["b"][used] / sources["a"][used]) if used.any() else float("nan")
    nstars = int(((sources["snr"] >= MIN_STAR_SNR) & ~sources["sharp"]).sum())
    return ImageQuality(pre.background_level, pre.background_rms, fwhm_pix, ellipticity, nstars)


def measure_quality(
    frame: Frame,
    pre: Preprocessed,
    sources: np.ndarray,
    config: QualityConfig,
    history: InstrumentHistory | None = None,
) -> Quality:
    """Measure the frame's quality and judge it (:func:`measure_image_quality`, then :func:`judge_quality`)."""
    return judge_quality(measure_image_quality(pre, sources), frame.meta.pixscale, config, history)


def judge_quality(
    measured: ImageQuality, pixscale: float, config: QualityConfig, history: InstrumentHistory | None = None
) -> Quality:
    """Judge a frame's measured quality; ``pixscale`` in arcsec per pixel.

    Seeing and star count are judged against the instrument's own medians for the target (``history``,
    once it has :data:`MIN_HISTORY_FRAMES` frames): a 0.4 m telescope's 4" is normal, a 1 m's is not.
    Each failed gate adds a reason and a frame flag (:data:`lcowatch.flags.FRAME_FLAGS`).
    """
    fwhm_pix, ellipticity, nstars = measured.fwhm_pix, measured.ellipticity, measured.nstars
    fwhm_arcsec = fwhm_pix * pixscale

    failed: list[tuple[str, str]] = []  # (frame flag, reason); no flag: the frame cannot be measured
    own = history if history is not None and history.frames >= MIN_HISTORY_FRAMES else None
    if not np.isfinite(fwhm_arcsec):
        failed.append(("", "fwhm unmeasurable: no isolated unsaturated star"))
    elif own is not None and fwhm_arcsec > config.max_fwhm_ratio * own.fwhm_arcsec:
        failed.append(("poor_seeing", f'fwhm {fwhm_arcsec:.2f}" > {config.max_fwhm_ratio:g} x the instrument\'s '
                                      f'median {own.fwhm_arcsec:.2f}"'))  # fmt: skip
    elif config.max_fwhm_arcsec is not None and fwhm_arcsec > config.max_fwhm_arcsec:
        failed.append(("poor_seeing", f'fwhm {fwhm_arcsec:.2f}" > {config.max_fwhm_arcsec:g}"'))
    if own is not None and nstars < config.min_nstars_ratio * own.nstars:
        failed.append(("few_stars", f"nstars {nstars} < {config.min_nstars_ratio:g} x the instrument's median "
                                    f"{own.nstars:.0f}"))  # fmt: skip
    elif own is None and nstars < config.min_nstars:
        failed.append(("few_stars", f"nstars {nstars} < {config.min_nstars}"))
    if np.isfinite(ellipticity) and ellipticity > config.max_ellipticity:
        failed.append(("elongated", f"ellipticity {ellipticity:.2f} > {config.max_ellipticity:g}"))
    if config.max_background is not None and measured.background > config.max_background:
        failed.append(("high_background", f"background {measured.background:.0f} e- > {config.max_background:g} e-"))
    return Quality(
        background=measured.background,
        background_rms=measured.background_rms,
        fwhm_pix=fwhm_pix,
        fwhm_arcsec=fwhm_arcsec,
        ellipticity=ellipticity,
        nstars=nstars,
        verdict="poor" if failed else "good",
        reasons=[reason for _, reason in failed],
        flags=flags.value(*(name for name, _ in failed if name)),
    )
