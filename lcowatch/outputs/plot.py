"""Light-curve plots (all filters on one time axis, magnitudes with their errors, limits as arrows, flagged
points hollow) and diagnostic pictures of frames."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from astropy.table import Table

# matplotlib (half a second to import) is imported by the functions that draw, so that commands which do
# not plot never pay for it. Its object interface draws with Agg and keeps no global state: no display,
# safe in the daemon's threads.

PLOTS_DIR = "plots"  # under state_dir
MJD_UNIX_EPOCH = 40587.0  # MJD of 1970-01-01, for the calendar axis


def plot_lightcurve(table: Table, path: Path, *, title: str, aperture: str | None = None) -> int:
    """Write a PNG of the light curve in ``table`` (see :func:`lightcurve_figure`); returns the number of
    points drawn (measurements and limits)."""
    figure, plotted = lightcurve_figure(table, title=title, aperture=aperture)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return plotted


def lightcurve_figure(table: Table, *, title: str, aperture: str | None = None) -> tuple[Any, int]:
    """The light curve in ``table`` (see :func:`lcowatch.outputs.export.lightcurve_table`) as a matplotlib
    Figure, and the number of points drawn (measurements and limits).

    One panel of calibrated magnitudes, every filter in its own colour on a shared time axis (MJD below,
    calendar dates above). A filter's uncalibrated points are put on its scale by the median ``mag -
    diff_mag`` of its calibrated ones and drawn as squares; a filter with no calibrated point at all gets a
    second panel of differential magnitudes. Non-detections are their 5 sigma limits, drawn as downward
    arrows; points with any flag are hollow. Only ``aperture`` (default: the first listed) is shown.
    """
    if len(table) and aperture is None:
        aperture = str(table["aperture"][0])
    rows = table[table["aperture"] == aperture] if len(table) else table
    filters = sorted(set(rows["filter"])) if len(rows) else []
    calibrated = {f: bool((~np.ma.getmaskarray(rows["mag"][rows["filter"] == f])).any()) for f in filters}
    panels = [("mag", "calibrated magnitude [mag]", [f for f in filters if calibrated[f]]),
              ("diff_mag", "differential magnitude [mag]", [f for f in filters if not calibrated[f]])]  # fmt: skip
    panels = [panel for panel in panels if panel[2]] or [("mag", "magnitude [mag]", [])]
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.4 * len(panels) + 0.8))
    axes = figure.subplots(len(panels), 1, squeeze=False, sharex=True)[:, 0]
    plotted = 0
    for axis, (column, label, chosen) in zip(axes, panels, strict=True):
        for k, filter in enumerate(chosen):
            plotted += _draw_filter(axis, rows[rows["filter"] == filter], column, filter, f"C{k % 10}")
        axis.invert_yaxis()
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        if chosen:
            axis.legend(fontsize=8, loc="best")
    if not filters:
        axes[0].text(0.5, 0.5, "no points yet", ha="center", va="center", transform=axes[0].transAxes)
    axes[-1].set_xlabel("MJD (UTC, mid-exposure)")
    axes[-1].ticklabel_format(axis="x", useOffset=False, style="plain")
    _calendar_axis(axes[0])
    axes[0].set_title(f"{title}  (aperture {aperture}; hollow: flagged; arrows: 5 sigma limits)" if aperture else title)
    figure.tight_layout()
    return figure, plotted


def _draw_filter(axis: Any, subset: Table, column: str, filter: str, colour: str) -> int:
    """One filter's points, limits and (on the calibrated panel) shifted uncalibrated points; returns how many."""
    mjd = np.asarray(subset["mjd"], dtype=float)
    mag = np.ma.filled(subset[column].astype(float), np.nan)
    err = np.ma.filled(subset[f"{column}_err"].astype(float), np.nan)
    flagged = np.asarray(subset["flags"]) != 0
    limit = np.ma.filled(subset["limit_mag"].astype(float), np.nan)
    diff = np.ma.filled(subset["diff_mag"].astype(float), np.nan)
    squares = np.zeros(len(mjd), dtype=bool)
    if column == "mag":
        offset = np.nanmedian(mag - diff) if np.isfinite(mag - diff).any() else np.nan
        squares = ~np.isfinite(mag) & np.isfinite(diff) & np.isfinite(offset)
        mag = np.where(squares, diff + offset, mag)
        err = np.where(squares, np.ma.filled(subset["diff_mag_err"].astype(float), np.nan), err)
    band = f"{filter} ({subset['band'][0]})" if column == "mag" and subset["band"][0] else filter
    labels = {False: band, True: f"{band}, uncalibrated"}
    for square in (False, True):
        for hollow in (False, True):
            pick = (squares == square) & (flagged == hollow) & np.isfinite(mag)
            if pick.any():
                axis.errorbar(
                    mjd[pick], mag[pick], yerr=err[pick], fmt="s" if square else "o", ms=4, lw=0.8, capsize=0,
                    color=colour, mfc="none" if hollow else colour, label=labels.pop(square, None),
                )  # fmt: skip
    limits = ~np.isfinite(mag) & np.isfinite(limit)
    # A limit: a bar at the 5 sigma magnitude with an arrow towards fainter (down on the inverted axis).
    for when, value in zip(mjd[limits], limit[limits], strict=True):
        axis.annotate("", xy=(when, value + 0.25), xytext=(when, value),
                      arrowprops={"arrowstyle": "-|>", "color": colour, "lw": 0.8})  # fmt: skip
    if limits.any():
        axis.plot(mjd[limits], limit[limits], "_", color=colour, ms=9, label=f"{band}: 5 sigma limit")
    return int(np.isfinite(mag).sum() + limits.sum())


def _calendar_axis(axis: Any) -> None:
    """Calendar dates along the top of the panel, from its MJD axis."""
    import matplotlib.dates as mdates

    top = axis.secondary_xaxis(
        "top", functions=(lambda mjd: mjd - MJD_UNIX_EPOCH + mdates.date2num(np.datetime64("1970-01-01")),
                          lambda num: num - mdates.date2num(np.datetime64("1970-01-01")) + MJD_UNIX_EPOCH),
    )  # fmt: skip
    locator = mdates.AutoDateLocator()
    top.xaxis.set_major_locator(locator)
    top.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    top.tick_params(labelsize=7)


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
