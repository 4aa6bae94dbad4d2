"""Registration: the transform from template pixels to frame pixels, found by matching stars.

The header WCS is used only as a first guess, and only when both frames have a solved astrometry
(WCSERR == 0). Otherwise the stars are matched by asterisms (astroalign's triangle invariants), which
needs no WCS and copes with any shift, rotation and a change of pixel scale between instruments.
Transforms are affine: ``frame_xy = A @ template_xy + t``, 0-based pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.wcs import WCS
from scipy.spatial import cKDTree

from lcowatch.errors import Reject
from lcowatch.states import Step

CONTROL_STARS = 40  # brightest unsaturated stars per side for asterism matching: bounded work and memory
REFINE_STARS = 400  # template stars used to refine and measure the residual
REFINE_SNR = 20.0
MATCH_RADIUS = 2.0  # pixels, for the refinement once a first transform is known
GUESS_RADIUS = 8.0  # pixels: the WCS guess is right to a few pixels when both frames are solved
MIN_MATCHES = 6
MAX_RMS = 1.0  # pixels
CLIP_SIGMA = 3.0


Affine = np.ndarray  # 2x3 [A | t]: xy_out = A @ xy_in + t, 0-based pixels


def apply_affine(matrix: Affine, xy: np.ndarray) -> np.ndarray:
    """Map an (N, 2) array of positions through a 2x3 affine matrix."""
    return np.asarray(xy) @ matrix[:, :2].T + matrix[:, 2]


def compose(outer: Affine, inner: Affine) -> Affine:
    """The affine map that applies ``inner`` first, then ``outer``."""
    return np.column_stack([outer[:, :2] @ inner[:, :2], outer[:, :2] @ inner[:, 2] + outer[:, 2]])


def invert(matrix: Affine) -> Affine:
    linear = np.linalg.inv(matrix[:, :2])
    return np.column_stack([linear, -linear @ matrix[:, 2]])


@dataclass(frozen=True)
class Registration:
    """Affine map from template pixels to frame pixels (0-based).

    ``rms`` is the residual of the matched stars in frame pixels; ``method`` says how the first
    transform was found (``identity``, ``wcs`` or ``asterism``).
    """

    matrix: np.ndarray  # 2x3: [A | t]
    n_matched: int
    rms: float
    method: str

    def apply(self, xy: np.ndarray) -> np.ndarray:
        """Map an (N, 2) array of template pixel positions into the frame."""
        return apply_affine(self.matrix, xy)

    @property
    def scale(self) -> float:
        """Frame pixels per template pixel (geometric mean over the axes)."""
        return float(np.sqrt(abs(np.linalg.det(self.matrix[:, :2]))))

    @property
    def rotation_deg(self) -> float:
        return float(np.degrees(np.arctan2(self.matrix[1, 0], self.matrix[0, 0])))


IDENTITY = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


def usable_stars(sources: np.ndarray, min_snr: float = 0.0) -> np.ndarray:
    """Positions (N, 2) of unsaturated, non-sharp sources with at least ``min_snr``, brightest first.

    Saturated stars are left out: their clipped peaks and fluxes differ from frame to frame, so lists
    ordered with them do not correspond.
    """
    keep = ~sources["saturated"] & ~sources["sharp"] & (sources["sep_flag"] < 8) & (sources["snr"] >= min_snr)
    chosen = sources[keep]
    order = np.argsort(-chosen["flux"])
    return np.column_stack([chosen["x"][order], chosen["y"][order]])


def fit_affine(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares 2x3 affine matrix taking ``src`` (N, 2) onto ``dst`` (N, 2)."""
    design = np.column_stack([src, np.ones(len(src))])
    solution, *_ = np.linalg.lstsq(design, dst, rcond=None)
    return solution.T


def wcs_guess(template_wcs: WCS, frame_wcs: WCS, template_shape: tuple[int, int]) -> np.ndarray:
    """Affine approximation of template pixel -> sky -> frame pixel, on a 5x5 grid."""
    ny, nx = template_shape
    gx, gy = np.meshgrid(np.linspace(0, nx - 1, 5), np.linspace(0, ny - 1, 5))
    grid = np.column_stack([gx.ravel(), gy.ravel()])
    sky = template_wcs.pixel_to_world(grid[:, 0], grid[:, 1])
    fx, fy = frame_wcs.world_to_pixel(sky)
    return fit_affine(grid, np.column_stack([fx, fy]))


def _asterism_guess(template_xy: np.ndarray, frame_xy: np.ndarray) -> np.ndarray:
    import astroalign  # imports scikit-image: only paid for when a frame needs it

    try:
        transform, _ = astroalign.find_transform(template_xy[:CONTROL_STARS], frame_xy[:CONTROL_STARS])
    except (astroalign.MaxIterError, ValueError, TypeError) as exc:
        raise Reject(f"registration failed: no asterism match ({exc})", step=Step.REGISTER) from None
    return np.asarray(transform.params[:2, :], dtype=float)


def _match(matrix: np.ndarray, template_xy: np.ndarray, tree: cKDTree, radius: float) -> tuple[np.ndarray, np.ndarray]:
    predicted = apply_affine(matrix, template_xy)
    distance, index = tree.query(predicted, distance_upper_bound=radius)
    found = np.isfinite(distance)
    # One frame star may answer to one template star only: keep the closest claim.
    order = np.argsort(distance[found])
    chosen_t = np.flatnonzero(found)[order]
    _, first = np.unique(index[found][order], return_index=True)
    keep = np.sort(chosen_t[first])
    return keep, index[keep]


def _refine(
    matrix: np.ndarray, template_xy: np.ndarray, frame_xy: np.ndarray, radius: float
) -> tuple[np.ndarray, int, float]:
    tree = cKDTree(frame_xy)
    n_matched, rms = 0, np.inf
    for _ in range(4):
        t_index, f_index = _match(matrix, template_xy, tree, radius)
        if len(t_index) < MIN_MATCHES:
            return matrix, len(t_index), np.inf
        src, dst = template_xy[t_index], frame_xy[f_index]
        for _ in range(3):
            matrix = fit_affine(src, dst)
            residual = np.hypot(*(src @ matrix[:, :2].T + matrix[:, 2] - dst).T)
            limit = max(CLIP_SIGMA * 1.4826 * np.median(residual), 0.05)
            keep = residual <= limit
            if keep.all() or keep.sum() < MIN_MATCHES:
                break
            src, dst = src[keep], dst[keep]
        n_matched = len(src)
        rms = float(np.sqrt(np.mean(np.sum((src @ matrix[:, :2].T + matrix[:, 2] - dst) ** 2, axis=1))))
        radius = max(MATCH_RADIUS, 4 * rms)
    return matrix, n_matched, rms


def register(
    template_sources: np.ndarray,
    frame_sources: np.ndarray,
    *,
    guess: np.ndarray | None = None,
    guess_error: float = GUESS_RADIUS,
    max_rms: float = MAX_RMS,
) -> Registration:
    """Find the template -> frame transform; raise :class:`Reject` when the frame cannot be registered.

    ``guess`` is an optional 2x3 first transform (from the WCS); it is tried first, corrected by the common
    shift of the stars within ``guess_error`` pixels (the two WCSs' errors together), and dropped when too
    few stars agree with it. ``max_rms`` (pixels) bounds the accepted residual; broad or trailed stars
    centroid less precisely, so callers scale it with the seeing.
    """
    template_xy = usable_stars(template_sources)
    frame_xy = usable_stars(frame_sources)
    if len(template_xy) < MIN_MATCHES or len(frame_xy) < MIN_MATCHES:
        raise Reject(
            f"registration failed: too few stars (template {len(template_xy)}, frame {len(frame_xy)})",
            step=Step.REGISTER,
        )
    # Faint stars' centroids would only add noise to the fit and to the residual it reports.
    precise_xy = usable_stars(template_sources, REFINE_SNR)
    refine_xy = (precise_xy if len(precise_xy) >= 2 * MIN_MATCHES else template_xy)[:REFINE_STARS]
    attempts: list[tuple[str, np.ndarray | None]] = [("wcs", guess), ("asterism", None)]
    best = (IDENTITY, 0, np.inf, "none")
    for method, first in attempts:
        if first is None and method == "wcs":
            continue
        radius = GUESS_RADIUS if method == "wcs" else 3 * MATCH_RADIUS
        if first is not None:
            start = first.copy()
            if guess_error > GUESS_RADIUS:
                start[:, 2] += _offset_vote(apply_affine(first, template_xy), frame_xy, guess_error, MATCH_RADIUS)
        else:
            start = _asterism_guess(template_xy, frame_xy)
        matrix, n_matched, rms = _refine(start, refine_xy, frame_xy, radius)
        if n_matched >= MIN_MATCHES and rms <= max_rms:
            return Registration(matrix, n_matched, rms, method)
        if n_matched > best[1]:
            best = (matrix, n_matched, rms, method)
    raise Reject(
        f"registration failed: {best[1]} matched stars, rms {best[2]:.2f} px (need >= {MIN_MATCHES}, <= {max_rms:.2f})",
        step=Step.REGISTER,
    )


VOTE_STARS = 150  # brightest of each list that vote for the offset between them


def _offset_vote(source_xy: np.ndarray, target_xy: np.ndarray, max_offset: float, bin_size: float) -> np.ndarray:
    """The most common shift between two lists (brightest first), searched up to ``max_offset`` pixels.

    Every pair of the brightest stars votes for its offset; the true shift collects a vote from every
    star present in both lists, a wrong one only chance coincidences.
    """
    offsets = (target_xy[None, :VOTE_STARS, :] - source_xy[:VOTE_STARS, None, :]).reshape(-1, 2)
    offsets = offsets[np.all(np.abs(offsets) <= max_offset, axis=1)]
    if len(offsets) == 0:
        return np.zeros(2)
    cells = np.floor(offsets / bin_size).astype(int)
    # Votes on a cell edge split; count each cell with its upper neighbours (2x2 blocks).
    keys, counts = np.unique(cells, axis=0, return_counts=True)
    votes = dict(zip(map(tuple, keys), counts, strict=True))
    best = max(votes, key=lambda k: sum(votes.get((k[0] + i, k[1] + j), 0) for i in (0, 1) for j in (0, 1)))
    lower = np.array(best) * bin_size
    inside = np.all((offsets >= lower) & (offsets < lower + 2 * bin_size), axis=1)
    return np.median(offsets[inside], axis=0)


def match_positions(
    source_xy: np.ndarray, target_xy: np.ndarray, radius: float, *, max_offset: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pair two position lists that agree to within ``radius`` pixels after a small affine correction.

    Used to identify catalog stars among measured ones: both are projected through a WCS that may be off
    by a few arcseconds. With ``max_offset`` (pixels) a common shift up to that size is found first by
    voting. Lists should be ordered brightest first. Returns (matrix, source_index, target_index):
    ``matrix`` maps source positions onto target positions; empty indices when fewer than the minimum
    number of pairs agree.
    """
    empty = np.empty(0, dtype=int)
    if len(source_xy) < MIN_MATCHES or len(target_xy) < MIN_MATCHES:
        return IDENTITY, empty, empty
    start = IDENTITY.copy()
    if max_offset > radius:
        start[:, 2] = _offset_vote(source_xy, target_xy, max_offset, radius)
    matrix, n_matched, rms = _refine(start, source_xy, target_xy, radius)
    if n_matched < MIN_MATCHES:
        return IDENTITY, empty, empty
    source_index, target_index = _match(matrix, source_xy, cKDTree(target_xy), max(MATCH_RADIUS, 3 * rms))
    return matrix, source_index, target_index
