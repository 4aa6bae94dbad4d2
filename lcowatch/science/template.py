"""Templates and the target's reference pixel frame (the old step 3, and 3.5 done without a person).

**The reference pixel frame.** A target's first template defines it: the comparison stars and the target
live in its pixels, fixed once. Every later template (another filter, another telescope, a sharper frame)
is registered to it by star matching, so a frame's positions come from chained registrations
(frame <- template <- reference) and never from a header WCS, whose error differs from frame to frame
(0.5-5" for a solved BANZAI frame, arcminutes for a failed one). The reference frame's header WCS is used
only to place the target from its RA/Dec and to cross-match the catalog, after a correction fitted on the
matched catalog stars.

**Templates.** Per target and filter, the best frame so far, scored by a weighted sum of log FWHM, log
background RMS and log star count (higher is better); a frame replaces the template when it beats it by
``template.min_improvement``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from scipy.spatial import cKDTree

from lcowatch.config import TemplateConfig
from lcowatch.science.frame import celestial_wcs
from lcowatch.science.quality import Quality
from lcowatch.science.register import (
    IDENTITY,
    MIN_MATCHES,
    REFINE_SNR,
    Affine,
    apply_affine,
    invert,
    match_positions,
    usable_stars,
)


def wcs_from_text(header: str | None) -> WCS | None:
    """The celestial WCS of a stored header text (None for none)."""
    return celestial_wcs(fits.Header.fromstring(header)) if header else None


def template_score(quality: Quality, config: TemplateConfig) -> float:
    """Higher is better: sharp, dark, deep frames. Undefined (-inf) without a measured FWHM."""
    if not (np.isfinite(quality.fwhm_arcsec) and quality.fwhm_arcsec > 0 and quality.nstars > 0):
        return -math.inf
    weights = config.weights
    return (
        -weights.fwhm * math.log(quality.fwhm_arcsec)
        - weights.background * math.log(max(quality.background_rms, 1e-3))
        + weights.nstars * math.log(quality.nstars)
    )


@dataclass
class Template:
    """A template in memory: its frame's sources and where it sits in the target's reference frame.

    ``from_reference`` maps 0-based reference pixels to this template's pixels (identity for the template
    that defines the reference frame). ``wcs_header`` is the frame's solved header WCS, if any: only a
    first guess for registration.
    """

    id: int | None
    target: str
    filter: str
    sha256: str
    file: str
    score: float
    pinned: bool
    shape: tuple[int, int]
    wcs_header: str | None
    sources: np.ndarray
    from_reference: Affine = field(default_factory=IDENTITY.copy)

    @cached_property
    def wcs(self) -> WCS | None:
        return wcs_from_text(self.wcs_header)


@dataclass
class Reference:
    """A target's reference pixel frame: the frame that defines it and the target's place in it.

    ``wcs_header`` is that frame's header WCS (None for a target placed by pixels on a frame without a
    solved one); ``sky_fix`` corrects it (header-WCS pixels -> true reference pixels), fitted on matched
    catalog stars, None until a catalog was had. ``target_xy`` are reference pixels (0-based);
    ``target_origin`` says where they came from: ``config`` (pixels given), ``wcs`` (RA/Dec through the
    uncorrected header WCS), ``catalog`` (through the corrected one) or ``centroids`` (the S/N-weighted
    centroids of the target's bright epochs).
    """

    target: str
    sha256: str
    file: str
    shape: tuple[int, int]
    pixscale: float
    wcs_header: str | None
    sky_fix: Affine | None
    target_xy: np.ndarray
    target_origin: str

    @cached_property
    def wcs(self) -> WCS | None:
        return wcs_from_text(self.wcs_header)

    def pixels_of(self, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
        """Reference pixels (N, 2) of sky positions (deg), through the corrected header WCS."""
        assert self.wcs is not None, "a reference without a WCS has no sky positions"
        x, y = self.wcs.world_to_pixel(SkyCoord(ra, dec, unit="deg"))
        xy = np.column_stack([np.asarray(x, dtype=float), np.asarray(y, dtype=float)])
        return apply_affine(self.sky_fix, xy) if self.sky_fix is not None else xy

    def sky_of(self, xy: np.ndarray) -> SkyCoord:
        """Sky positions of reference pixels (N, 2), through the corrected header WCS."""
        assert self.wcs is not None, "a reference without a WCS has no sky positions"
        header_xy = apply_affine(invert(self.sky_fix), xy) if self.sky_fix is not None else xy
        return self.wcs.pixel_to_world(header_xy[:, 0], header_xy[:, 1])

    @property
    def target_placed_by_wcs(self) -> bool:
        """The target's position may carry the header WCS's error (up to a few arcseconds)."""
        return self.target_origin == "wcs"


#: the largest error of a solved BANZAI WCS at any point of the frame, with some margin (arcsec)
SOLVED_WCS_ERROR_ARCSEC = 8.0
#: The target's centroid joins its reference position from epochs at least this bright.
TARGET_CENTROID_SNR = 30.0
MATCH_ARCSEC = 2.0  # catalog-to-star pairs once the common shift is known


#: A neighbour within 4 FWHM with less than this fraction of a star's flux (3.3 mag fainter) leaves it
#: isolated. Faint detections lie near most stars: counting every one left a 0.4 m series without a star
#: of S/N 300 whose nearest neighbour had 2.6 % of its flux. Each frame's crowding test
#: (``photometry.CROWDING_LIMIT``) still flags a star whose neighbours' modelled light passes 0.5 %.
ISOLATION_FLUX_RATIO = 0.05


def choose_field_stars(
    sources: np.ndarray,
    target_xy: np.ndarray,
    shape: tuple[int, int],
    fwhm_pix: float,
    limit: int,
    linearity_limit: float | None,
) -> np.ndarray:
    """Indices of the brightest isolated, linear, unsaturated stars, away from the target and the edges.

    ``linearity_limit`` is the peak (electrons above the background) above which a star is no longer
    measured linearly.
    """
    ny, nx = shape
    margin = 6 * fwhm_pix
    xy = np.column_stack([sources["x"], sources["y"]])
    good = (
        ~sources["saturated"]
        & ~sources["sharp"]
        & (sources["sep_flag"] == 0)
        & (sources["snr"] >= 20)
        & (xy[:, 0] > margin) & (xy[:, 0] < nx - 1 - margin)
        & (xy[:, 1] > margin) & (xy[:, 1] < ny - 1 - margin)
        & (np.hypot(*(xy - target_xy).T) > 4 * fwhm_pix)
    )  # fmt: skip
    if linearity_limit is not None:
        good &= sources["peak"] < linearity_limit
    if len(xy) > 1:
        # Isolated from any neighbour that could move its flux with the seeing: much fainter ones (a faint
        # detection 3 FWHM off a bright star) leave it a good comparison star.
        flux = np.maximum(sources["flux"], 0.0)
        for star, near in enumerate(cKDTree(xy).query_ball_point(xy, 4 * fwhm_pix)):
            good[star] &= not any(flux[other] >= ISOLATION_FLUX_RATIO * flux[star] for other in near if other != star)
    index = np.flatnonzero(good)
    return index[np.argsort(-sources["flux"][index])][:limit]


def weighted_centroid(xy: np.ndarray, snr: np.ndarray) -> np.ndarray:
    """S/N-squared weighted mean of centroids (N, 2), after dropping those over a pixel from the median."""
    median = np.median(xy, axis=0)
    near = np.hypot(*(xy - median).T) <= 1.0
    weights = snr[near] ** 2
    return (xy[near] * weights[:, None]).sum(axis=0) / weights.sum()


def fit_sky_fix(reference: Reference, sources: np.ndarray, catalog: Table) -> Affine | None:
    """Correction of the reference frame's header WCS from catalog stars matched to its detections.

    The catalog, projected through the header WCS, is matched to the reference frame's stars (a common
    shift of up to :data:`SOLVED_WCS_ERROR_ARCSEC` found first by voting), and an affine map from
    header-WCS pixels to true pixels is fitted on the pairs. None when too few stars match.
    """
    if reference.wcs is None or len(catalog) == 0:
        return None
    order = np.argsort(np.asarray(catalog["mag"], dtype=float))
    uncorrected = replace(reference, sky_fix=None)
    catalog_xy = uncorrected.pixels_of(np.asarray(catalog["ra"])[order], np.asarray(catalog["dec"])[order])
    star_xy = usable_stars(sources, REFINE_SNR)
    matrix, catalog_index, _ = match_positions(
        catalog_xy, star_xy, MATCH_ARCSEC / reference.pixscale,
        max_offset=SOLVED_WCS_ERROR_ARCSEC / reference.pixscale,
    )  # fmt: skip
    return matrix if len(catalog_index) >= MIN_MATCHES else None
