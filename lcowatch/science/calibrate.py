"""Photometric zero point (and colour term) from reference stars: pure numerics, no I/O.

Model, for every reference star *k* (all magnitudes in mag)::

    cat_mag[k] = zp + inst_mag[k] + c * color[k]          with   inst_mag = -2.5 log10(flux / exptime)

so ``zp`` is the magnitude of a source giving 1 e-/s (BANZAI frames are in electrons). The fit is a
weighted least-squares fit with weights ``1 / (inst_err**2 + cat_err**2 + sigma_int**2)``, where the
*intrinsic scatter* ``sigma_int`` (mag) is solved for so that the reduced chi-square of the used stars is 1
(it is 0 when the quoted errors already explain the scatter). Outliers (variables, blends, saturated or
mismatched stars) are removed by iterative sigma clipping on the normalised residuals; the first
rejection is made around a robust start (median / Theil-Sen slope with a MAD width), so even a large
fraction of gross outliers cannot pull the first fit.

Decisions (documented here because callers rely on them):

* **Too few stars**: :func:`fit_zeropoint` raises :class:`TooFewStars` (a :class:`ValueError`) when fewer
  than :data:`MIN_STARS` usable stars are given. Clipping never takes the used set below that number.
* **No colour term**: when the colour term is neither fixed nor fitted, ``ZeroPoint.color_term`` is
  ``0.0`` and ``ZeroPoint.color_term_err`` is ``nan``; ``ZeroPoint.color_mode`` says which of
  ``"fitted"``, ``"fixed"`` or ``"none"`` applied. A fixed colour term has ``color_term_err == 0``.
* **Unusable inputs**: a star with a non-finite magnitude, a non-finite or negative error, or (when the
  colour enters the model) a non-finite colour is excluded before the fit and is never "used".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from astropy.table import Table
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "MIN_STARS",
    "TooFewStars",
    "ZeroPoint",
    "apply_zeropoint",
    "fit_zeropoint",
    "instrumental_mag",
    "solve_colours",
]

#: Fewest usable stars for a zero point (with a fitted colour term, ``min_stars_color`` applies as well).
MIN_STARS = 3

MAG_PER_LN = 2.5 / np.log(10.0)  # 1.0857: d(mag) = 1.0857 * d(flux) / flux
_MAD_TO_STD = 1.4826
_VAR_FLOOR = 1e-3**2  # mag**2; keeps weights finite when every quoted error is 0
_THEIL_SEN_MAX_STARS = 200  # bound the O(n**2) pairwise slopes of the robust start


class TooFewStars(ValueError):
    """Fewer usable reference stars than a zero point needs."""


@dataclass(frozen=True)
class ZeroPoint:
    """Result of :func:`fit_zeropoint`.

    Attributes
    ----------
    zp : float
        Zero point (mag): the catalog magnitude of a source of 1 e-/s at colour 0.
    zp_err : float
        Formal 1-sigma error of ``zp`` (mag), with the intrinsic scatter in the weights.
    color_term : float
        Colour coefficient ``c`` (mag per mag of colour); 0.0 when not used.
    color_term_err : float
        Its 1-sigma error; 0.0 when fixed, ``nan`` when no colour term is used.
    n_used : int
        Number of stars in the final fit.
    scatter : float
        Robust standard deviation (1.4826 * MAD, mag) of the residuals of the used stars.
    intrinsic_scatter : float
        The extra scatter ``sigma_int`` (mag) added in quadrature to every star's error.
    used : numpy.ndarray of bool
        Mask over the inputs: True for the stars in the final fit.
    n_input : int
        Number of input stars (usable or not).
    color_mode : {"fitted", "fixed", "none"}
        How the colour term was obtained.
    zp_color_cov : float
        Covariance of ``zp`` and ``color_term`` (mag**2 per mag of colour); 0.0 unless fitted.
    n_iter : int
        Clipping iterations run.
    """

    zp: float
    zp_err: float
    color_term: float
    color_term_err: float
    n_used: int
    scatter: float
    intrinsic_scatter: float = 0.0
    used: NDArray[np.bool_] = field(default_factory=lambda: np.zeros(0, bool), repr=False, compare=False)
    n_input: int = 0
    color_mode: Literal["fitted", "fixed", "none"] = "none"
    zp_color_cov: float = 0.0
    n_iter: int = 0


def instrumental_mag(
    flux: ArrayLike, flux_err: ArrayLike, exptime: float
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Instrumental magnitude ``-2.5 log10(flux / exptime)`` and its error.

    Parameters
    ----------
    flux : array_like
        Flux (electrons, i.e. counts with GAIN 1).
    flux_err : array_like
        1-sigma flux error (electrons).
    exptime : float
        Exposure time (s); must be positive.

    Returns
    -------
    mag, err : numpy.ndarray
        Instrumental magnitude (mag, for e-/s) and its error ``1.0857 * flux_err / flux`` (mag).
        Both are NaN where ``flux <= 0`` or the input is not finite.
    """
    if not np.isfinite(exptime) or exptime <= 0:
        raise ValueError(f"exptime must be a positive number of seconds, got {exptime!r}")
    f = np.asarray(flux, dtype=float)
    fe = np.asarray(flux_err, dtype=float)
    good = np.isfinite(f) & (f > 0)
    safe = np.where(good, f, 1.0)
    with np.errstate(invalid="ignore"):
        mag = np.where(good, -2.5 * np.log10(safe / exptime), np.nan)
        err = np.where(good & np.isfinite(fe) & (fe >= 0), MAG_PER_LN * fe / safe, np.nan)
    return mag, err


def fit_zeropoint(
    inst_mag: ArrayLike,
    inst_err: ArrayLike,
    cat_mag: ArrayLike,
    cat_err: ArrayLike,
    color: ArrayLike | None = None,
    color_err: ArrayLike | None = None,
    *,
    color_term: float | None = None,
    min_stars_color: int = 10,
    min_color_span: float = 0.3,
    clip_sigma: float = 3.0,
    max_iter: int = 10,
) -> ZeroPoint:
    """Fit ``cat_mag = zp + inst_mag + c * color`` with outlier rejection.

    Parameters
    ----------
    inst_mag, inst_err : array_like
        Instrumental magnitudes ``-2.5 log10(flux / exptime)`` and their errors (mag).
    cat_mag, cat_err : array_like
        Catalog magnitudes in the frame's standard band and their errors (mag).
    color, color_err : array_like, optional
        Catalog colour of each star (mag, e.g. ``r - i``) and its error. ``color_err`` is accepted for
        symmetry but not used in the weights: the colour error times ``c`` (|c| ~ 0.1) is small next to
        the magnitude errors and is absorbed by the intrinsic scatter.
    color_term : float, optional
        A fixed colour coefficient (e.g. from the configuration). When given, it is applied (``color``
        is then required unless it is 0) and not fitted; ``color_term_err`` is 0.
    min_stars_color : int
        Fewest stars with a finite colour needed to fit ``c``.
    min_color_span : float
        Smallest colour range (mag, 5th to 95th percentile of the usable stars) needed to fit ``c``.
    clip_sigma : float
        Rejection threshold on ``|residual| / sqrt(inst_err**2 + cat_err**2 + sigma_int**2)``.
    max_iter : int
        Most clipping iterations.

    Returns
    -------
    ZeroPoint
        The fit; see :class:`ZeroPoint`.

    Raises
    ------
    TooFewStars
        Fewer than :data:`MIN_STARS` usable stars.
    ValueError
        Inputs of different lengths, or a non-zero fixed colour term without colours.
    """
    m_inst = np.asarray(inst_mag, dtype=float).ravel()
    e_inst = np.asarray(inst_err, dtype=float).ravel()
    m_cat = np.asarray(cat_mag, dtype=float).ravel()
    e_cat = np.asarray(cat_err, dtype=float).ravel()
    n_input = m_inst.size
    arrays = [e_inst, m_cat, e_cat]
    col = None
    if color is not None:
        col = np.asarray(color, dtype=float).ravel()
        arrays.append(col)
    if color_err is not None:
        arrays.append(np.asarray(color_err, dtype=float).ravel())
    if any(a.size != n_input for a in arrays):
        raise ValueError("inst_mag, inst_err, cat_mag, cat_err (and color, color_err) must have one length")
    if clip_sigma <= 0:
        raise ValueError(f"clip_sigma must be positive, got {clip_sigma}")

    base = (
        np.isfinite(m_inst)
        & np.isfinite(m_cat)
        & np.isfinite(e_inst)
        & np.isfinite(e_cat)
        & (e_inst >= 0)
        & (e_cat >= 0)
    )
    var = e_inst**2 + e_cat**2
    y = m_cat - m_inst  # what the zero point (and colour term) must explain

    mode, base, y = _colour_model(base, y, col, color_term, min_stars_color, min_color_span)
    n_ok = int(base.sum())
    if n_ok < MIN_STARS:
        raise TooFewStars(f"only {n_ok} usable reference star(s) of {n_input}; a zero point needs {MIN_STARS}")
    x = np.where(base, col, 0.0) if mode == "fitted" and col is not None else None
    used = _robust_start(x, y, var, base, clip_sigma)
    fit, used, n_iter = _clipped_fit(x, y, var, base, used, clip_sigma, max_iter)

    params, cov, sig_int = fit
    zp = float(params[0])
    zp_err = float(np.sqrt(cov[0, 0]))
    if mode == "fitted":
        c, c_err, cov_zc = float(params[1]), float(np.sqrt(cov[1, 1])), float(cov[0, 1])
    elif mode == "fixed":
        c, c_err, cov_zc = float(color_term), 0.0, 0.0  # type: ignore[arg-type]
    else:
        c, c_err, cov_zc = 0.0, float("nan"), 0.0
    resid = y[used] - params[0] - (params[1] * x[used] if x is not None else 0.0)
    scatter = _MAD_TO_STD * float(np.median(np.abs(resid - np.median(resid))))
    return ZeroPoint(
        zp=zp,
        zp_err=zp_err,
        color_term=c,
        color_term_err=c_err,
        n_used=int(used.sum()),
        scatter=scatter,
        intrinsic_scatter=float(sig_int),
        used=used,
        n_input=n_input,
        color_mode=mode,
        zp_color_cov=cov_zc,
        n_iter=n_iter,
    )


ColourMode = Literal["fitted", "fixed", "none"]


def _colour_model(
    base: NDArray[np.bool_],
    y: NDArray[np.float64],
    col: NDArray[np.float64] | None,
    color_term: float | None,
    min_stars_color: int,
    min_color_span: float,
) -> tuple[ColourMode, NDArray[np.bool_], NDArray[np.float64]]:
    """How the colour enters the fit: a fixed term (taken out of ``y``), fitted (enough stars over a wide
    enough range of colour), or none. Returns the mode, the usable stars and ``y``."""
    if color_term is not None:
        if not np.isfinite(color_term):
            raise ValueError(f"fixed color_term must be finite, got {color_term!r}")
        if color_term != 0.0 and col is None:
            raise ValueError("a non-zero fixed color_term needs the stars' colours")
        if col is not None and color_term != 0.0:
            return "fixed", base & np.isfinite(col), y - color_term * np.where(np.isfinite(col), col, 0.0)
        return "fixed", base, y
    if col is not None:
        with_col = base & np.isfinite(col)
        if with_col.sum() >= max(min_stars_color, MIN_STARS + 1):
            lo, hi = np.percentile(col[with_col], [5.0, 95.0])
            if hi - lo >= min_color_span:
                return "fitted", with_col, y
    return "none", base, y


def _robust_start(
    x: NDArray[np.float64] | None,
    y: NDArray[np.float64],
    var: NDArray[np.float64],
    base: NDArray[np.bool_],
    clip_sigma: float,
) -> NDArray[np.bool_]:
    """The stars a first fit uses: within ``clip_sigma`` of the median (and Theil-Sen slope), the width
    from the MAD."""
    idx = np.flatnonzero(base)
    c0 = _theil_sen_slope(x[idx], y[idx]) if x is not None else 0.0
    r0 = y[idx] - (c0 * x[idx] if x is not None else 0.0)
    zp0 = float(np.median(r0))
    rob = _MAD_TO_STD * float(np.median(np.abs(r0 - zp0)))
    sig0_sq = max(rob**2 - float(np.median(var[idx])), 0.0)
    resid0 = y - zp0 - (c0 * x if x is not None else 0.0)
    with np.errstate(invalid="ignore"):
        used = base & (np.abs(resid0) <= clip_sigma * np.sqrt(np.maximum(var + sig0_sq, _VAR_FLOOR)))
    n_par = 2 if x is not None else 1
    return used if used.sum() >= MIN_STARS + n_par - 1 else base.copy()


def _clipped_fit(
    x: NDArray[np.float64] | None,
    y: NDArray[np.float64],
    var: NDArray[np.float64],
    base: NDArray[np.bool_],
    used: NDArray[np.bool_],
    clip_sigma: float,
    max_iter: int,
) -> tuple[tuple[NDArray[np.float64], NDArray[np.float64], float], NDArray[np.bool_], int]:
    """Fit with intrinsic scatter, clip at ``clip_sigma``, refit, until the star set is stable.

    The clipping width takes the intrinsic scatter from the median squared residual, not from the
    chi-square: blends read bright, one-sidedly, and a chi-square inflated by them would keep them in
    (on a crowded field, five of eighteen stars 0.05-0.25 mag bright moved the zero point by 0.03). A
    median is a noisier measure of width than a chi-square, hence the margin: without it, normal stars
    clipped when it fell short made the colour term's errors 20 % too small.
    """
    n_par = 2 if x is not None else 1
    fit = _fit_with_intrinsic(x, y, var, used)
    n_iter = 0
    for n_iter in range(1, max_iter + 1):  # noqa: B007 - n_iter is reported
        params = fit[0]
        model = params[0] + (params[1] * x if x is not None else 0.0)
        width = MEDIAN_WIDTH_MARGIN * _median_intrinsic((y - model)[used], var[used])
        with np.errstate(invalid="ignore"):
            z = (y - model) / np.sqrt(np.maximum(var + width**2, _VAR_FLOOR))
            new_used = base & (np.abs(z) <= clip_sigma)
        if new_used.sum() < max(MIN_STARS, n_par + 1):
            break  # clipping may not leave fewer stars than a fit needs: keep the previous set
        if np.array_equal(new_used, used):
            break
        used = new_used
        fit = _fit_with_intrinsic(x, y, var, used)
    return fit, used, n_iter


#: The clipping width is this times the median-based intrinsic scatter (see :func:`_clipped_fit`).
MEDIAN_WIDTH_MARGIN = 1.25
#: The median of a chi-square variable of one degree of freedom.
_MEDIAN_CHI2_1 = 0.4549


def _median_intrinsic(resid: NDArray[np.float64], var: NDArray[np.float64]) -> float:
    """The intrinsic scatter (mag) that brings the median of ``resid**2 / (var + s**2)`` to that of a
    chi-square of one degree of freedom; 0 when the quoted errors already do."""

    def median_z2(sig: float) -> float:
        return float(np.median(resid**2 / np.maximum(var + sig * sig, _VAR_FLOOR)))

    if not resid.size or median_z2(0.0) <= _MEDIAN_CHI2_1:
        return 0.0
    lo, hi = 0.0, float(np.max(np.abs(resid))) + 1e-3
    while hi - lo > 1e-5:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if median_z2(mid) > _MEDIAN_CHI2_1 else (lo, mid)
    return 0.5 * (lo + hi)


def apply_zeropoint(
    inst_mag: ArrayLike,
    inst_err: ArrayLike,
    zp: ZeroPoint,
    color: ArrayLike | float | None = None,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Calibrated magnitude ``inst_mag + zp + c * color`` and its error.

    Parameters
    ----------
    inst_mag, inst_err : array_like
        Instrumental magnitudes and their photometric errors (mag).
    zp : ZeroPoint
        The frame's zero point.
    color : array_like or float, optional
        The source's colour (mag) in the zero point's colour index. Without it the colour term is not
        applied: the magnitude is that of a colour-0 source (off by ``c * color`` for other colours).

    Returns
    -------
    mag, err : numpy.ndarray
        Calibrated magnitude (mag) and its error (mag):
        ``sqrt(inst_err**2 + zp_err**2 + (color * c_err)**2 + 2 * color * cov(zp, c))``.
    """
    m = np.asarray(inst_mag, dtype=float)
    e = np.asarray(inst_err, dtype=float)
    var = e**2 + zp.zp_err**2
    mag = m + zp.zp
    if color is not None and zp.color_term != 0.0:
        cl = np.asarray(color, dtype=float)
        mag = mag + zp.color_term * cl
        c_err = 0.0 if not np.isfinite(zp.color_term_err) else zp.color_term_err
        var = var + (cl * c_err) ** 2 + 2.0 * cl * zp.zp_color_cov
    return mag, np.sqrt(np.maximum(var, 0.0))


# --------------------------------------------------------------------------------------------- internals


def _theil_sen_slope(x: NDArray[np.float64], y: NDArray[np.float64]) -> float:
    """Median of pairwise slopes over at most ``_THEIL_SEN_MAX_STARS`` stars (robust start for ``c``)."""
    if x.size > _THEIL_SEN_MAX_STARS:
        pick = np.linspace(0, x.size - 1, _THEIL_SEN_MAX_STARS).astype(int)
        x, y = x[pick], y[pick]
    i, j = np.triu_indices(x.size, k=1)
    dx = x[j] - x[i]
    ok = np.abs(dx) > 0.05  # mag; nearly equal colours give wild slopes
    if not ok.any():
        return 0.0
    return float(np.median((y[j] - y[i])[ok] / dx[ok]))


def _wls(
    x: NDArray[np.float64] | None, y: NDArray[np.float64], w: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64], float]:
    """Weighted least squares for ``y = a (+ b x)``: parameters, covariance, chi-square."""
    if x is None:
        sw = w.sum()
        a = float((w * y).sum() / sw)
        chi2 = float((w * (y - a) ** 2).sum())
        return np.array([a]), np.array([[1.0 / sw]]), chi2
    s, sx, sxx = w.sum(), (w * x).sum(), (w * x * x).sum()
    sy, sxy = (w * y).sum(), (w * x * y).sum()
    det = s * sxx - sx * sx
    if det <= 0 or not np.isfinite(det):
        raise TooFewStars("the colours of the used stars do not constrain a colour term")
    a = (sxx * sy - sx * sxy) / det
    b = (s * sxy - sx * sy) / det
    cov = np.array([[sxx, -sx], [-sx, s]]) / det
    chi2 = float((w * (y - a - b * x) ** 2).sum())
    return np.array([a, b]), cov, chi2


def _fit_with_intrinsic(
    x: NDArray[np.float64] | None, y: NDArray[np.float64], var: NDArray[np.float64], used: NDArray[np.bool_]
) -> tuple[NDArray[np.float64], NDArray[np.float64], float]:
    """WLS fit of the used stars, with ``sigma_int`` solved so that reduced chi-square is 1.

    The minimum chi-square decreases monotonically as ``sigma_int`` grows, so a bisection on
    ``sigma_int`` (mag) finds the root; ``sigma_int`` is 0 when the quoted errors already give a reduced
    chi-square of at most 1 (the errors are then *not* scaled down).
    """
    xs = x[used] if x is not None else None
    ys, vs = y[used], var[used]
    dof = ys.size - (1 if xs is None else 2)

    def fit(sig: float) -> tuple[NDArray[np.float64], NDArray[np.float64], float]:
        return _wls(xs, ys, 1.0 / np.maximum(vs + sig * sig, _VAR_FLOOR))

    p, cov, chi2 = fit(0.0)
    if dof <= 0 or chi2 <= dof:
        return p, cov, 0.0
    # Upper bracket: with sigma_int = 10 x the rms of an unweighted fit, chi2 < n / 100 < dof.
    _, _, rss = _wls(xs, ys, np.ones_like(ys))
    lo, hi = 0.0, max(10.0 * np.sqrt(rss / ys.size), 1e-3)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if fit(mid)[2] > dof:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-6:  # mag
            break
    sig = 0.5 * (lo + hi)
    p, cov, _ = fit(sig)
    return p, cov, sig


# --------------------------------------------------------------------------------------------- frames


@dataclass(frozen=True)
class Calibration:
    """One aperture's calibration of one frame.

    ``mag`` is the target's magnitude as a source of colour 0 (``inst_mag + zp``; the colour term is applied
    once the target's colour is known, see :func:`solve_colours`).
    """

    zeropoint: ZeroPoint
    mag: float
    mag_err: float


def calibrate_apertures(
    inst_mag: NDArray[np.float64],
    inst_err: NDArray[np.float64],
    usable: NDArray[np.bool_],
    catalog: Table,
    catalog_index: NDArray[np.int_],
    star_index: NDArray[np.int_],
    *,
    color_term: float | None = None,
) -> list[Calibration | None]:
    """Fit a zero point per aperture from matched comparison stars and calibrate the target.

    Parameters
    ----------
    inst_mag, inst_err : numpy.ndarray
        (N, K) instrumental magnitudes and errors of the target (row 0) and the field stars (rows 1..N-1).
    usable : numpy.ndarray
        (N - 1, K) which field stars may enter a fit (clean flags, finite values).
    catalog : astropy.table.Table
        Reference stars with ``mag``, ``mag_err``, ``color``, ``color_err`` in the frame's band.
    catalog_index, star_index : numpy.ndarray
        Matched pairs: ``catalog[catalog_index[j]]`` is field star ``star_index[j]`` (0-based among rows
        1..N-1).
    color_term : float, optional
        A fixed colour term (0 for none); fitted when None and the stars allow it.
    Returns
    -------
    list
        Per aperture a :class:`Calibration`, or None when fewer than 3 stars could be used.
    """
    cat_mag = np.asarray(catalog["mag"], dtype=float)[catalog_index]
    cat_err = np.nan_to_num(np.asarray(catalog["mag_err"], dtype=float)[catalog_index], nan=0.0)
    color = np.asarray(catalog["color"], dtype=float)[catalog_index]
    color_err = np.nan_to_num(np.asarray(catalog["color_err"], dtype=float)[catalog_index], nan=0.0)
    results: list[Calibration | None] = []
    for k in range(inst_mag.shape[1]):
        rows = star_index[usable[star_index, k]]
        keep = usable[star_index, k]
        # A fixed colour term needs the colours even when none is known: the fit then has no star to use.
        has_color = bool(np.isfinite(color[keep]).any()) or bool(color_term)
        try:
            zp = fit_zeropoint(
                inst_mag[1:, k][rows], inst_err[1:, k][rows], cat_mag[keep], cat_err[keep],
                color[keep] if has_color else None, color_err[keep] if has_color else None,
                color_term=color_term,
            )  # fmt: skip
        except TooFewStars:
            results.append(None)
            continue
        mag, mag_err = apply_zeropoint(inst_mag[0, k], inst_err[0, k], zp)
        results.append(Calibration(zp, float(mag), float(mag_err)))
    return results


#: Points of the target in other filters this close in time (days) give its colour: the same visit. A
#: variable of a few hours' period changes colour within a night; another site's frames of the same
#: night are hours away.
COLOR_WINDOW_DAYS = 0.125


def solve_colours(
    bands: list[str | None],
    mjd: NDArray[np.float64],
    mag0: NDArray[np.float64],
    mag_err: NDArray[np.float64],
    color_term: NDArray[np.float64],
    colour_of_band: Callable[[str], tuple[str, str]],
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The target's colour at each point, and its error, from its own magnitudes in the colour's two bands
    in the same visit.

    ``mag0`` are colour-0 magnitudes (``inst_mag + zp``) with errors ``mag_err``; a point's standard
    magnitude is ``mag0 + color_term * colour`` with the colour index of its band (``colour_of_band``, e.g.
    g - r for r; a band of None, a non-standard filter, neither has nor gives a colour). Magnitudes and
    colours depend on each other, so they are iterated, as lcogtsnpipe does; each point takes the nearest
    point in time of each band of its colour within :data:`COLOR_WINDOW_DAYS`. NaN where a band is missing.
    """
    colour = np.full(len(bands), np.nan)
    colour_err = np.full(len(bands), np.nan)
    band_array = np.array(bands)
    for _ in range(6):  # colour terms are ~0.1 mag/mag: the fixed point is reached to 1e-6 mag
        mags = mag0 + color_term * np.nan_to_num(colour)
        for i, band in enumerate(bands):
            if band is None:
                continue
            nearest = []
            for wanted in colour_of_band(band):
                candidates = np.flatnonzero((band_array == wanted) & (np.abs(mjd - mjd[i]) <= COLOR_WINDOW_DAYS))
                if len(candidates) == 0:
                    break
                nearest.append(candidates[np.argmin(np.abs(mjd[candidates] - mjd[i]))])
            else:
                colour[i] = mags[nearest[0]] - mags[nearest[1]]
                colour_err[i] = np.hypot(mag_err[nearest[0]], mag_err[nearest[1]])
    return colour, colour_err
