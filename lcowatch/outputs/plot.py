"""Light-curve plots: one panel per filter, magnitude against time, flagged points marked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.table import Table

# matplotlib (half a second to import) is imported by the functions that draw, so that commands which do
# not plot never pay for it. Its object interface draws with Agg and keeps no global state: no display,
# safe in the daemon's threads.

PLOTS_DIR = "plots"  # under state_dir


def plot_lightcurve(table: Table, path: Path, *, title: str, aperture: str | None = None) -> int:
    """Write a PNG of the light curve in ``table`` (see :func:`lcowatch.outputs.export.lightcurve_table`).

    Uses the calibrated magnitude where a filter has one, the differential magnitude otherwise; points
    with any flag are drawn hollow. Only ``aperture`` (default: the first listed) is shown. Returns the
    number of points plotted.
    """
    if len(table) and aperture is None:
        aperture = str(table["aperture"][0])
    rows = table[table["aperture"] == aperture] if len(table) else table
    filters = sorted(set(rows["filter"])) if len(rows) else []
    panels = max(len(filters), 1)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 2.6 * panels + 0.6))
    axes = figure.subplots(panels, 1, squeeze=False)
    plotted = 0
    for axis, filter in zip(axes[:, 0], filters, strict=False):
        subset = rows[rows["filter"] == filter]
        calibrated = ~np.ma.getmaskarray(subset["mag"])
        column, error, label = (
            ("mag", "mag_err", f"{subset['band'][0]} (calibrated)")
            if calibrated.any()
            else ("diff_mag", "diff_mag_err", "differential")
        )
        mag = np.ma.filled(subset[column].astype(float), np.nan)
        err = np.ma.filled(subset[error].astype(float), np.nan)
        mjd = np.asarray(subset["mjd"], dtype=float)
        flagged = np.asarray(subset["flags"]) != 0
        for chosen, style in (
            (~flagged, {"fmt": "o", "color": "C0"}),
            (flagged, {"fmt": "o", "mfc": "none", "color": "C3"}),
        ):
            if chosen.any():
                axis.errorbar(mjd[chosen], mag[chosen], yerr=err[chosen], ms=4, lw=0.8, capsize=0, **style)
        plotted += int(np.isfinite(mag).sum())
        axis.invert_yaxis()
        axis.ticklabel_format(axis="x", useOffset=False, style="plain")
        axis.set_ylabel(f"{filter}: {label}")
        axis.grid(alpha=0.3)
    if not filters:
        axes[0, 0].text(0.5, 0.5, "no points yet", ha="center", va="center", transform=axes[0, 0].transAxes)
    axes[-1, 0].set_xlabel("MJD (UTC, mid-exposure)")
    axes[0, 0].set_title(f"{title}  (aperture {aperture}; hollow red: flagged)" if aperture else title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return plotted


DIAGNOSTICS_DIR = "diagnostics"  # under state_dir
PREVIEW_PIXELS = 1200  # longest side of a preview; larger frames are shown binned


def plot_frame_preview(
    data: np.ndarray,
    path: Path,
    *,
    title: str,
    target_xy: tuple[float, float] | None,
    star_xy: np.ndarray,
    radius: float,
) -> None:
    """A PNG of a frame (zscale), with the target's aperture (red) and the comparison stars' (green).

    Positions are 0-based pixels of ``data``; frames larger than :data:`PREVIEW_PIXELS` are binned by an
    integer factor for the picture.
    """
    from astropy.visualization import ZScaleInterval

    step = max(1, int(np.ceil(max(data.shape) / PREVIEW_PIXELS)))
    view = data[::step, ::step]
    low, high = ZScaleInterval().get_limits(view[np.isfinite(view)])
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle

    figure = Figure(figsize=(8, 8 * view.shape[0] / view.shape[1] + 0.4))
    axis = figure.subplots()
    axis.imshow(view, origin="lower", cmap="gray", vmin=low, vmax=high, interpolation="nearest")
    for (x, y), colour in [*((xy, "lime") for xy in star_xy), *([(target_xy, "red")] if target_xy else [])]:
        axis.add_patch(Circle((x / step, y / step), radius / step, fill=False, color=colour, lw=0.8))
    axis.set_title(title, fontsize=9)
    axis.set_axis_off()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def plot_subtraction(
    panels: list[tuple[str, np.ndarray]], path: Path, *, title: str, target_xy: tuple[float, float], radius: float
) -> None:
    """A PNG of image-subtraction cutouts side by side (each on its own zscale: frame, reference,
    difference), with the target's aperture circled; ``target_xy`` in 0-based pixels of the cutouts."""
    from astropy.visualization import ZScaleInterval
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle

    figure = Figure(figsize=(4 * len(panels), 4.4))
    for axis, (name, image) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        finite = image[np.isfinite(image)]
        low, high = ZScaleInterval().get_limits(finite) if finite.size else (0.0, 1.0)
        axis.imshow(image, origin="lower", cmap="gray", vmin=low, vmax=high, interpolation="nearest")
        axis.add_patch(Circle(target_xy, radius, fill=False, color="red", lw=0.8))
        axis.set_title(name, fontsize=9)
        axis.set_axis_off()
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
