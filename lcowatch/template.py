"""Templates (the old step 3): per target and filter, the best frame so far, and the field it defines.

A frame is scored by a weighted sum of log FWHM, log background RMS and log star count (higher is
better); it replaces the template when it beats it by ``template.min_improvement``. Only frames with a
solved WCS can become templates, because the template carries the sky positions: the target's pixel
position and the field's comparison stars come from it. The field stars are fixed in the sky once per
target, and their reference magnitudes once per target and filter, so a new template moves nothing in a
light curve: it only changes how positions are found.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.wcs import WCS
from scipy.spatial import cKDTree

from lcowatch.config import TargetConfig, TemplateConfig
from lcowatch.frame import celestial_wcs
from lcowatch.quality import Quality


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
    """A template in memory: its frame's sources, WCS and the positions that follow from them.

    ``target_xy`` and ``field_xy`` are 0-based template pixel positions of the target and of the field
    stars ``field_ids``.
    """

    id: int | None
    target: str
    filter: str
    sha256: str
    file: str
    score: float
    pinned: bool
    shape: tuple[int, int]
    wcs_header: str
    sources: np.ndarray
    _field_xy: np.ndarray | None = field(default=None, repr=False)

    @cached_property
    def wcs(self) -> WCS:
        wcs = celestial_wcs(fits.Header.fromstring(self.wcs_header))
        assert wcs is not None, "templates always carry a solved WCS"
        return wcs

    def target_xy(self, target: TargetConfig) -> np.ndarray:
        if target.ra is None or target.dec is None:
            assert target.x is not None and target.y is not None
            return np.array([target.x, target.y])
        x, y = self.wcs.world_to_pixel(SkyCoord(target.ra, target.dec, unit="deg"))
        return np.array([float(x), float(y)])

    @property
    def pixscale(self) -> float:
        """Arcseconds per template pixel."""
        return float(np.sqrt(abs(np.linalg.det(self.wcs.pixel_scale_matrix))) * 3600.0)

    def field_pixels(self, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
        """Template pixels of the field stars, computed once per template (the field only grows)."""
        if self._field_xy is None or len(self._field_xy) != len(ra):
            self._field_xy = self.pixels_of(ra, dec)
        return self._field_xy

    def sky_of(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """RA, Dec (deg) of template pixel positions (N, 2)."""
        sky = self.wcs.pixel_to_world(xy[:, 0], xy[:, 1])
        return np.asarray(sky.ra.deg), np.asarray(sky.dec.deg)

    def pixels_of(self, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
        """Template pixel positions (N, 2) of sky positions in degrees."""
        x, y = self.wcs.world_to_pixel(SkyCoord(ra, dec, unit="deg"))
        return np.column_stack([np.asarray(x, dtype=float), np.asarray(y, dtype=float)])


def choose_field_stars(
    sources: np.ndarray, target_xy: np.ndarray, shape: tuple[int, int], fwhm_pix: float, limit: int
) -> np.ndarray:
    """Indices of the brightest isolated, unsaturated stars, away from the target and the edges."""
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
    if len(xy) > 1:
        distance, _ = cKDTree(xy).query(xy, k=2)
        good &= distance[:, 1] > 4 * fwhm_pix
    index = np.flatnonzero(good)
    return index[np.argsort(-sources["flux"][index])][:limit]
