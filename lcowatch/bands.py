"""LCO filters and the standard photometric bands they are calibrated to (one table for all modules)."""

from __future__ import annotations

#: LCO filter name -> standard band. ``w`` (a wide clear filter) has no standard band: it is calibrated
#: to r, and its points are flagged ``nonstandard_band``.
BAND_OF_FILTER: dict[str, str] = {
    "up": "u",
    "gp": "g",
    "rp": "r",
    "ip": "i",
    "zs": "z",
    "B": "B",
    "V": "V",
    "R": "R",
    "I": "I",
    "w": "r",
}

#: Filters whose magnitudes are on a standard system.
STANDARD_FILTERS = frozenset(BAND_OF_FILTER) - {"w"}
