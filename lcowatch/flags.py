"""The one registry of quality-flag bits, used by logs, the store and every export.

Flags are an integer bit mask; :func:`decode` turns a mask into names, in bit order.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Flag:
    bit: int
    name: str
    description: str

    @property
    def value(self) -> int:
        return 1 << self.bit


FLAGS: tuple[Flag, ...] = (
    Flag(0, "saturated", "a pixel in the aperture is at or above the saturation level"),
    Flag(1, "bad_pixel", "a masked (BPM bad, cosmic ray, non-finite) pixel in the aperture could not be repaired"),
    Flag(2, "near_edge", "the aperture or its background annulus crosses the frame edge"),
    Flag(3, "off_frame", "the position falls outside the frame"),
    Flag(4, "low_snr", "signal-to-noise ratio below the configured minimum"),
    Flag(5, "blended", "another detected source lies within the aperture"),
    Flag(6, "forced_position", "the position was placed by registration, not recentroided"),
    Flag(7, "uncalibrated", "no zero point could be fitted: mag is empty"),
    Flag(8, "nonstandard_band", "the filter has no standard band; calibrated to a substitute band"),
    Flag(9, "few_comparisons", "fewer comparison stars than wanted in the differential ensemble"),
    Flag(10, "bad_background", "the background annulus had too few good pixels"),
    Flag(11, "cloudy", "comparison stars fainter than in the reference frame by more than quality.max_cloud_loss"),
    Flag(12, "nondetection", "signal-to-noise ratio below photometry.detection_snr: mag empty, limit_mag given"),
    Flag(
        13,
        "color_assumed",
        "the target's colour was not measured in the same visit: its median over other visits, else the "
        "comparison stars' median",
    ),
    Flag(14, "nonlinear", "a pixel in the aperture is above the linearity limit (MAXLIN, else 0.8 SATURATE)"),
    Flag(15, "poor_seeing", "FWHM above quality.max_fwhm_ratio times the instrument's median for the target"),
    Flag(16, "elongated", "star images more elongated than quality.max_ellipticity"),
    Flag(17, "few_stars", "fewer stars than quality.min_nstars_ratio times the instrument's median (or min_nstars)"),
    Flag(18, "high_background", "background above quality.max_background"),
    Flag(
        19,
        "repaired",
        "cosmic-ray or masked pixels in the aperture were replaced by their mirror image through the star",
    ),
    Flag(
        20,
        "bad_subtraction",
        "the difference image leaves residuals at bright stars above subtraction.max_residual times the noise",
    ),
    Flag(
        21,
        "is_reference",
        "this frame is the reference image: its difference flux is 0 by definition, or the transient's light "
        "in it as another camera's reference measures it",
    ),
    Flag(
        22,
        "crowded",
        "neighbours' wings put more than 0.5 % of the star's flux into its aperture (by a model of their "
        "measured fluxes), enough to change with the seeing",
    ),
    Flag(
        23,
        "reference_has_transient",
        "the reference image holds the transient's light and no other camera's reference free of it could "
        "measure it: the flux is relative to that light",
    ),
)

#: Flags of the whole frame, set by quality control; such a frame still gives points.
FRAME_FLAGS = ("poor_seeing", "elongated", "few_stars", "high_background")

BY_NAME: dict[str, Flag] = {flag.name: flag for flag in FLAGS}


def value(*names: str) -> int:
    """Bit mask for the given flag names."""
    mask = 0
    for name in names:
        mask |= BY_NAME[name].value
    return mask


def decode(mask: int) -> list[str]:
    """Names of the flags set in ``mask``, in bit order."""
    return [flag.name for flag in FLAGS if mask & flag.value]


def describe(mask: int) -> str:
    """Comma-separated flag names, empty for 0: the form used in logs and exports."""
    return ",".join(decode(mask))
