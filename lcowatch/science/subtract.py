"""Image subtraction on a cutout: reference resampling, PSF matching, forced photometry, limits.

Conventions: pixel coordinates are 0-based and refer to pixel centres; ``x`` is the column and ``y`` the
row, images are indexed ``image[y, x]``; pixel values are electrons (GAIN = 1).

PSF matching is done by sfft (Hu et al. 2022, ApJ 936, 157; PyPI ``sfft``, NumPy backend): a
delta-function (pixel) basis kernel, spatially constant on the cutout, solved by least squares in
Fourier space on isolated, unsaturated stars. lcowatch writes only the glue: the choice of the fitting
stars, the background, the variance and the quality figure.

Candidates compared (``benchmarks/subtraction_speed.py``; 512x512 cutout, 80 Gaussian stars, an
exponential host of 2e5 e- with a 1e4 e- point source 1.6" from its nucleus, science FWHM 5 px, a 4x
deeper reference of FWHM 3.5 px on a 1% coarser, shifted grid; 2 cores, shared with other work):

========================  ==============================  =====================  ====================
library                   point-source flux (r = 5 px)    residual RMS at stars  s per subtraction
========================  ==============================  =====================  ====================
sfft 1.7.3 (NumPy)        -0.96 sigma (err 297 e-)        1.00                   0.27 (1 thread)
properimage 0.7.2 (ZOGY)  not calibrated (D in S/N units) 6.3                    42
========================  ==============================  =====================  ====================

sfft is chosen: 150 times faster, a flexible kernel that also absorbs a uniform misalignment, and a
difference on the science flux scale with a known kernel, so aperture photometry and its errors follow
directly. properimage (ZOGY) leaves large residuals at stars here (its PSF model is a fitted Gaussian
per image) and needs a build workaround (its dependency tinynpydb only builds with
``--no-build-isolation`` and ``wheel``). On 256x256 sfft's fit takes about 0.1 s (half-widths 8-12 px);
its time grows with the pixel count times the kernel size (half-width 1.5 FWHM, rounded up to even pixels).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import itertools
import math
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import sep
from scipy import ndimage

__all__ = [
    "MIN_STARS",
    "Difference",
    "forced_photometry",
    "limiting_flux",
    "resample_reference",
    "subtract",
]


def _convolve(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """``scipy.signal.fftconvolve(image, kernel, mode="same")``, imported here: scipy.signal brings
    scipy.stats with it, 0.4 s of start-up that only difference targets should pay."""
    from scipy.signal import fftconvolve

    return fftconvolve(image, kernel, mode="same")


#: A pixel the kernel brings this much of a contaminated (invalid) pixel to is undefined in the difference.
CONTAMINATION_SPREAD = 0.001
#: Fewer fitting stars than this and the kernel is not constrained: :func:`subtract` raises ValueError.
MIN_STARS = 5
#: Fitting stars: detected at least this many sigma above the sky (flux S/N), at most this many used.
STAR_MIN_SNR = 30.0
MAX_STARS = 60
#: The neighbourhood of an excluded position (the target) kept out of the fit, in units of the larger FWHM.
EXCLUDE_RADIUS_FWHM = 4.0
#: The kernel is fitted on disks of this radius around the fitting stars, in units of the larger FWHM.
STAMP_RADIUS_FWHM = 2.5
#: Sky pixels (for the stamps' sky) are at least this far from every detected source, in units of the FWHM.
SKY_CLEARANCE_FWHM = 2.0
#: Fewer sky pixels than this (after narrowing the clearance) and :func:`subtract` raises ValueError.
MIN_SKY_PIXELS = 1000
#: A plane (the stamps' sky, the difference's sky) is fitted to at most about this many pixels.
MAX_PLANE_PIXELS = 20_000


@dataclass(frozen=True)
class Difference:
    """A PSF-matched difference image on the science frame's flux scale.

    Attributes
    ----------
    image : numpy.ndarray
        Science minus the matched reference, electrons on the science frame's flux scale; NaN where
        either image does not cover or the kernel reaches a masked pixel.
    variance : numpy.ndarray
        Per-pixel variance, electrons**2: the unconvolved image's variance plus the convolved one's
        variance convolved with the squared kernel.
    scale : float
        Photometric ratio science / reference (the reference's flux times ``scale`` is the science flux).
    residual_rms : float
        RMS of ``image / sqrt(variance)`` within one FWHM of the fitting stars (bright, unsaturated,
        isolated); about 1 for a good subtraction, NaN when there is no such star.
    convolved : {"reference", "science"}
        Which input the kernel convolved: the reference when the science PSF is the broader one, else the
        science (then the difference has the reference's PSF; :func:`forced_photometry` corrects for it).
    kernel : numpy.ndarray
        The matching kernel normalised to a sum of 1, ``[row, col]``, centred; applied to ``convolved``.
    variance_direct, variance_convolved : numpy.ndarray
        The unconvolved input's variance and the convolved input's variance before convolution, both on
        the difference's flux scale, electrons**2 (for exact aperture errors of correlated noise).
    psf_science, psf_difference : numpy.ndarray
        Empirical PSF stamps (sum 1, centred) of the science frame and of the difference image.
    nstars : int
        Number of stars the kernel was fitted on.
    """

    image: np.ndarray
    variance: np.ndarray
    scale: float
    residual_rms: float
    convolved: Literal["reference", "science"]
    kernel: np.ndarray
    variance_direct: np.ndarray
    variance_convolved: np.ndarray
    psf_science: np.ndarray
    psf_difference: np.ndarray
    nstars: int


def resample_reference(
    reference: np.ndarray,
    reference_var: np.ndarray,
    frame_from_reference: np.ndarray,
    shape: tuple[int, int],
    origin: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Resample the reference and its variance onto a cutout of the science frame, conserving flux.

    Parameters
    ----------
    reference, reference_var : numpy.ndarray
        Reference image (electrons per reference pixel) and its variance (electrons**2); NaN pixels are
        treated as not covering.
    frame_from_reference : numpy.ndarray
        3x3 affine matrix mapping a reference pixel ``(x, y, 1)`` to a frame pixel ``(x, y, 1)``.
    shape : tuple of int
        ``(ny, nx)`` of the cutout.
    origin : tuple of int
        Frame pixel ``(x0, y0)`` of the cutout's pixel ``(0, 0)``.

    Returns
    -------
    image, variance : numpy.ndarray
        Electrons per frame pixel and electrons**2, NaN where the reference does not cover. The image is
        a cubic spline interpolation of the surface brightness times the frame pixel's area in reference
        pixels (``1 / |det|``), so a star's total flux is unchanged when the pixel scales differ. The
        variance is linearly interpolated and scaled by the same factor squared: the interpolated pixels
        are correlated, but the variance of a sum over an aperture is then about right.
    """
    inverse = np.linalg.inv(np.asarray(frame_from_reference, dtype=float))
    x0, y0 = origin
    # affine_transform works in (row, col): ref[y, x] = matrix @ cutout[r, c] + offset.
    matrix = np.array([[inverse[1, 1], inverse[1, 0]], [inverse[0, 1], inverse[0, 0]]])
    offset = np.array(
        [
            inverse[1, 0] * x0 + inverse[1, 1] * y0 + inverse[1, 2],
            inverse[0, 0] * x0 + inverse[0, 1] * y0 + inverse[0, 2],
        ]
    )
    area = abs(np.linalg.det(inverse[:2, :2]))
    bad = ~(np.isfinite(reference) & np.isfinite(reference_var))
    # The cubic spline reaches 2 pixels; a filled bad pixel must not ring into covered output.
    bad_grown = ndimage.binary_dilation(bad, iterations=2)
    filled = np.where(bad, np.nanmedian(reference), reference)
    kwargs = {"matrix": matrix, "offset": offset, "output_shape": shape}
    image = ndimage.affine_transform(filled, order=3, mode="nearest", **kwargs) * area
    variance = ndimage.affine_transform(np.where(bad, 0.0, reference_var), order=1, mode="nearest", **kwargs)
    covered = ndimage.affine_transform((~bad_grown).astype(float), order=1, mode="constant", cval=0.0, **kwargs)
    outside = covered < 1.0 - 1e-6
    image[outside] = np.nan
    variance = variance * area**2
    variance[outside] = np.nan
    return image, variance


def _sky(image: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """A smooth sky map (sep, 32-pixel boxes) for star selection and the kernel fit only."""
    data = np.ascontiguousarray(np.where(valid, image, 0.0), dtype=np.float64)
    return np.asarray(sep.Background(data, mask=~valid, bw=32, bh=32, fw=3, fh=3).back())


def _disks(shape: tuple[int, ...], x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
    """Boolean image, True within ``radius`` pixels of any of the positions."""
    out = np.zeros(shape, dtype=bool)
    r = math.ceil(radius)
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    for xi, yi in zip(np.rint(x).astype(int), np.rint(y).astype(int), strict=True):
        rows, cols = yi + dy, xi + dx
        keep = (dx**2 + dy**2 <= radius**2) & (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
        out[rows[keep], cols[keep]] = True
    return out


def _select_stars(
    sky_subtracted: np.ndarray,
    variance: np.ndarray,
    valid: np.ndarray,
    fwhm: float,
    exclude_xy: Sequence[tuple[float, float]],
    margin: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bright, unblended, isolated stars whose neighbourhood is fully valid, brightest first; and the pixels
    of every source detected (True)."""
    err = np.sqrt(np.where(valid, variance, np.inf))
    objects, segments = sep.extract(sky_subtracted, 5.0, err=err, mask=~valid, minarea=5, segmentation_map=True)
    x, y, flux = objects["x"], objects["y"], objects["flux"]
    snr = flux / np.sqrt(sep.sum_circle(np.where(valid, variance, 0.0), x, y, 1.5 * fwhm)[0].clip(1e-9))
    isolated = np.ones(x.size, dtype=bool)
    for i in range(x.size):
        near = np.hypot(x - x[i], y - y[i]) < 3.0 * fwhm
        isolated[i] = np.count_nonzero(near) == 1
    ny, nx = sky_subtracted.shape
    inside = (x > margin) & (x < nx - 1 - margin) & (y > margin) & (y < ny - 1 - margin)
    far = np.ones(x.size, dtype=bool)
    for ex, ey in exclude_xy:
        far &= np.hypot(x - ex, y - ey) > EXCLUDE_RADIUS_FWHM * fwhm + margin
    # A masked (saturated, bad) pixel anywhere near the star disqualifies it.
    clean = ~ndimage.binary_dilation(~valid, iterations=margin)[np.rint(y).astype(int), np.rint(x).astype(int)]
    keep = (objects["flag"] == 0) & (snr > STAR_MIN_SNR) & isolated & inside & far & clean
    order = np.argsort(-flux[keep])[:MAX_STARS]
    return x[keep][order], y[keep][order], segments > 0


def compiled_code_cache() -> Path:
    """Where sfft's compiled kernels are kept between runs: ``numba/`` in systemd's ``CacheDirectory=``, else
    in ``$XDG_CACHE_HOME/lcowatch`` (default ``~/.cache/lcowatch``)."""
    systemd = os.environ.get("CACHE_DIRECTORY", "").split(":")[0]
    root = Path(systemd) if systemd else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lcowatch"
    return root / "numba"


@functools.cache
def _private_cache_root() -> Path:
    """A cache folder of this process's own, removed when it exits."""
    folder = tempfile.mkdtemp(prefix="lcowatch-numba-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return Path(folder)


def _use_numba_cache(folder: Path) -> None:
    from numba.core import config

    if os.environ.get("NUMBA_CACHE_DIR") != str(folder):
        os.environ["NUMBA_CACHE_DIR"] = str(folder)
        config.reload_config()


@contextlib.contextmanager
def _compiling_alone() -> Iterator[None]:
    """Point numba's on-disk cache at lcowatch's folder for these library versions and this Python, and hold
    its lock while compiling; where that folder cannot be written or locked (a read-only home, a file system
    without locks), use a folder of this process's own."""
    from importlib.metadata import version

    name = f"sfft-{version('sfft')}-numba-{version('numba')}-{sys.implementation.cache_tag}-{CACHE_LAYOUT}"
    folder = compiled_code_cache() / name
    with contextlib.ExitStack() as held:
        try:
            if not _number_functions_uniquely():
                raise OSError("numba's function count is out of reach: cached code could clash")
            folder.mkdir(parents=True, exist_ok=True)  # again each time: it may have been deleted meanwhile
            lock = held.enter_context(open(folder / "compiling.lock", "a"))
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        except OSError:
            folder = _private_cache_root() / name
        _use_numba_cache(folder)
        yield


#: Part of the cache folder's name: folders of earlier layouts hold code compiled with clashing names (see
#: :func:`_number_functions_uniquely`) and are left alone.
CACHE_LAYOUT = "u2"


@functools.cache
def _number_functions_uniquely() -> bool:
    """Start numba's count of compiled functions at a random number in this process.

    numba names each function it compiles with a per-process count, from 1, and cached code keeps the name
    of the process that compiled it. Two kernel sizes compiled first in two processes both had ``$1`` in
    their names, and one process loading both failed on every frame from then on (``RuntimeError: In
    'NRT_adapt_ndarray_to_python', 'descr' is NULL``): the names of their run-time environments clashed.
    """
    from numba.core.bytecode import FunctionIdentity

    if not isinstance(getattr(FunctionIdentity, "_unique_ids", None), itertools.count):
        return False  # another numba: then this process keeps its compiled code to itself
    FunctionIdentity._unique_ids = itertools.count(1 + secrets.randbelow(2**48))
    return True


@functools.lru_cache(maxsize=4)
def _sfft_config(ny: int, nx: int, half_width: int, threads: int) -> tuple[dict, ...]:
    """sfft's compiled configuration for one image size and kernel size (costly: kept per process, and
    its compiled code on disk).

    sfft compiles closures over the sizes; numba keys their cache entries by the closed-over values but
    names the data files by a counter, so two processes compiling other sizes at once could each write
    ``...py311.1.nbc`` for their own and later load the other's code; and code of two sizes compiled by two
    processes could carry the same function names (see :func:`_number_functions_uniquely`). Either was seen
    as ``RuntimeError: In 'NRT_adapt_ndarray_to_python', 'descr' is NULL`` on every frame. One process
    compiles at a time: a restart loads its code in 0.1 s instead of 15 s, and a new size costs about 6 s
    (the functions that do not depend on it are shared).
    """
    from sfft.sfftcore.SFFTConfigure import SingleSFFTConfigure

    with _compiling_alone():
        # Kernel and photometric ratio constant on a cutout; a constant background term (ours is fitted later).
        return tuple(
            SingleSFFTConfigure.SSC(
                NX=nx,
                NY=ny,
                KerHW=half_width,
                KerPolyOrder=0,
                BGPolyOrder=0,
                ConstPhotRatio=True,
                BACKEND_4SUBTRACT="Numpy",
                NUM_CPU_THREADS_4SUBTRACT=threads,
                VERBOSE_LEVEL=0,
            )
        )


def _sfft(
    convolved: np.ndarray,
    direct: np.ndarray,
    convolved_fit: np.ndarray,
    direct_fit: np.ndarray,
    contaminated: np.ndarray,
    half_width: int,
    threads: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Solve ``direct_fit ~ kernel * convolved_fit + b`` (zero outside the fitting stars); apply to the images.

    Returns the difference (without the constant ``b``), the kernel ``[row, col]`` (its sum is the flux
    ratio direct / convolved) and the pixels the kernel carried a contaminated pixel to.

    Only sfft's solution is asked for. Its ``GSS`` would also build the whole difference and the spread of
    the contamination mask, each an FFT pass of its own (two thirds of its time), with a periodic
    convolution that wraps the cutout's edges into each other; both come from the kernel here instead.
    """
    from sfft.sfftcore.SFFTSubtract import ElementalSFFTSubtract
    from sfft.utils.SFFTSolutionReader import Realize_MatchingKernel

    config = _sfft_config(*convolved.shape, half_width, threads)
    # sfft indexes images [x, y] (FITS data transposed).
    solution = ElementalSFFTSubtract.ESS(
        PixA_I=np.ascontiguousarray(convolved_fit.T),
        PixA_J=np.ascontiguousarray(direct_fit.T),
        SFFTConfig=config,
        SFFTSolution=None,
        Subtract=False,
        BACKEND_4SUBTRACT="Numpy",
        NUM_CPU_THREADS_4SUBTRACT=threads,
        VERBOSE_LEVEL=0,
    )[0]
    p = config[0]
    centre = np.array([[convolved.shape[1] / 2.0, convolved.shape[0] / 2.0]])
    kernel = Realize_MatchingKernel(centre).FromArray(solution, p["N0"], p["N1"], p["L0"], p["L1"], p["DK"], p["Fpq"])
    kernel = np.asarray(kernel[0]).T
    difference = direct - _convolve(convolved, kernel)
    # sfft's own rule: a pixel is contaminated where the kernel brings it more than 0.001 of a bad pixel.
    spread = _convolve(contaminated.astype(float), kernel) > CONTAMINATION_SPREAD
    return difference, kernel, spread


def _psf_stamp(sky_subtracted: np.ndarray, x: np.ndarray, y: np.ndarray, half: int) -> np.ndarray:
    """Median of the stars' stamps, each shifted to the stamp's centre and normalised to a sum of 1."""
    stamps = []
    for xi, yi in zip(x, y, strict=True):
        cx, cy = round(xi), round(yi)
        stamp = sky_subtracted[cy - half : cy + half + 1, cx - half : cx + half + 1]
        if stamp.shape != (2 * half + 1, 2 * half + 1):
            continue
        shifted = ndimage.shift(stamp, (cy - yi, cx - xi), order=3, mode="nearest")
        stamps.append(shifted / shifted.sum())
    psf = np.median(stamps, axis=0)
    return np.asarray(psf / psf.sum())


def _sky_pixels(allowed: np.ndarray, sources: np.ndarray, fwhm: float) -> np.ndarray:
    """Allowed pixels clear of every detected source by SKY_CLEARANCE_FWHM, or by half as much, or a quarter,
    as needed for MIN_SKY_PIXELS of them (the wings below the detection isophote are what the clearance
    leaves out).

    Raises
    ------
    ValueError
        Fewer than MIN_SKY_PIXELS even then (a cutout that sources fill).
    """
    distance = ndimage.distance_transform_edt(~sources)
    for clearance in (SKY_CLEARANCE_FWHM, SKY_CLEARANCE_FWHM / 2, SKY_CLEARANCE_FWHM / 4):
        sky = allowed & (distance > clearance * fwhm)
        if np.count_nonzero(sky) >= MIN_SKY_PIXELS:
            return sky
    raise ValueError(f"{np.count_nonzero(sky)} sky pixels on the cutout, {MIN_SKY_PIXELS} needed")


def _background_plane(image: np.ndarray, sky: np.ndarray) -> np.ndarray:
    """A plane fitted to an image's pixels where ``sky``, with 3-sigma clipping (a sky, or the sky difference)."""
    rows, cols = np.nonzero(sky & np.isfinite(image))
    # An evenly spread subset is plenty for three parameters, and the clipped fit costs in proportion.
    step = max(1, rows.size // MAX_PLANE_PIXELS)
    rows, cols = rows[::step], cols[::step]
    values = image[rows, cols]
    design = np.column_stack([np.ones(values.size), cols, rows]).astype(float)
    keep = np.ones(values.size, dtype=bool)
    for _ in range(5):
        coeffs = np.linalg.lstsq(design[keep], values[keep], rcond=None)[0]
        residual = values - design @ coeffs
        spread = 1.4826 * np.median(np.abs(residual[keep]))
        keep_new = np.abs(residual) < 3.0 * spread
        if np.array_equal(keep_new, keep) or np.count_nonzero(keep_new) < 3:  # a plane needs three pixels
            break
        keep = keep_new
    ny, nx = image.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    return np.asarray(coeffs[0] + coeffs[1] * xx + coeffs[2] * yy)


def subtract(
    science: np.ndarray,
    science_var: np.ndarray,
    reference: np.ndarray,
    reference_var: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    fwhm_science: float,
    fwhm_reference: float,
    exclude_xy: Sequence[tuple[float, float]] = (),
    threads: int = 1,
) -> Difference:
    """PSF-matched difference of a science cutout and the reference resampled onto it.

    The broader-PSF image is the direct one and the kernel convolves the other: the reference when the
    science seeing is worse (the usual case; the difference then has the science PSF and flux scale),
    else the science, whose difference is divided by the kernel's sum to stay on the science flux scale
    (its PSF is then the reference's, which :func:`forced_photometry` corrects for): no deconvolution.

    Parameters
    ----------
    science, science_var : numpy.ndarray
        Science cutout (electrons, sky included) and its variance (electrons**2).
    reference, reference_var : numpy.ndarray
        The reference on the same pixel grid (see :func:`resample_reference`), NaN where it does not
        cover.
    mask : numpy.ndarray of bool, optional
        True at pixels to ignore (saturated, bad, cosmic rays) in either image.
    fwhm_science, fwhm_reference : float
        PSF FWHM of each image, pixels. The kernel half-width is 1.5 times the larger, rounded up to an even
        number of pixels.
    exclude_xy : sequence of (x, y)
        Positions (the target) whose neighbourhood, ``EXCLUDE_RADIUS_FWHM`` FWHM, stays out of the fit.
    threads : int
        CPU threads for sfft's FFTs.

    Returns
    -------
    Difference

    Raises
    ------
    ValueError
        Fewer than :data:`MIN_STARS` bright, isolated, unsaturated stars on the cutout, or fewer than
        :data:`MIN_SKY_PIXELS` pixels clear of sources.
    """
    valid = np.isfinite(science) & np.isfinite(science_var) & np.isfinite(reference) & np.isfinite(reference_var)
    if mask is not None:
        valid &= ~mask
    fwhm = max(fwhm_science, fwhm_reference)
    # 1.5 FWHM, rounded up to an even number: sfft compiles code for each size (6 s each), and a night's
    # seeing would otherwise ask for several. Twice the FWHM (sfft's examples) left the kernel more free
    # pixels than the match needs: a supernova's median error at S/N > 20 was 0.014 over three scenes, 0.012
    # at 1.5 FWHM.
    half_width = 2 * math.ceil(0.75 * fwhm)
    science_fit = np.where(valid, science - _sky(science, valid), 0.0)
    xs, ys, sources = _select_stars(science_fit, science_var, valid, fwhm, exclude_xy, half_width + math.ceil(fwhm))
    if xs.size < MIN_STARS:
        raise ValueError(f"{xs.size} stars fit for PSF matching on the cutout, {MIN_STARS} needed")
    excluded = np.array(list(exclude_xy), dtype=float).reshape(-1, 2)
    target = _disks(valid.shape, excluded[:, 0], excluded[:, 1], EXCLUDE_RADIUS_FWHM * fwhm)
    # Outside the stars' stamps the fit sees zeros in both images, which pins sfft's constant background to
    # 0: the stamps must be sky-free to the noise. Their sky is a plane fitted to the same source-free pixels
    # in both images. Each star's own annulus median was not: it rises with the star's wings, its
    # neighbours' light and the noise, more in the broader image, and made the kernel's sum up to 5 % low
    # under Moffat wings, which left 2 % of a host's light in the difference.
    sky = _sky_pixels(valid & ~target, sources, fwhm)
    stamps = valid & _disks(valid.shape, xs, ys, STAMP_RADIUS_FWHM * fwhm)
    science_stamps = np.where(stamps, science - _background_plane(science, sky), 0.0)
    reference_stamps = np.where(stamps, reference - _background_plane(reference, sky), 0.0)
    conv_science = fwhm_science < fwhm_reference
    # The fit sees sky-subtracted stars; the difference itself is of the images with one constant sky
    # each removed, so a host galaxy is not split between a sky map and the stars differently per image.
    sci = np.where(valid, science - np.median(science[valid]), 0.0)
    ref = np.where(valid, reference - np.median(reference[valid]), 0.0)
    if conv_science:
        raw, kernel, contam = _sfft(sci, ref, science_stamps, reference_stamps, ~valid, half_width, threads)
        scale = 1.0 / float(kernel.sum())
        image = -raw * scale  # (kernel * science - reference) on the science flux scale
        var_direct = np.where(valid, reference_var, 0.0) * scale**2
        var_convolved = np.where(valid, science_var, 0.0)
    else:
        image, kernel, contam = _sfft(ref, sci, reference_stamps, science_stamps, ~valid, half_width, threads)
        scale = float(kernel.sum())
        var_direct = np.where(valid, science_var, 0.0)
        var_convolved = np.where(valid, reference_var, 0.0) * scale**2
    kernel = kernel / kernel.sum()
    variance = var_direct + np.clip(_convolve(var_convolved, kernel**2), 0.0, None)
    undefined = ~valid | contam
    image[undefined] = np.nan
    variance[undefined] = np.nan
    # The sky difference is fitted on every defined pixel but the target's: the sources are subtracted
    # already, and choosing 'sky' pixels by thresholding the noisy difference would bias the plane low (the
    # stamps' sky pixels are chosen by the detections, not by their own values).
    image -= _background_plane(image, ~target)
    psf_science = _psf_stamp(science_fit, xs, ys, half_width + math.ceil(2.0 * fwhm))
    psf_difference = _convolve(psf_science, kernel) if conv_science else psf_science
    core = _disks(valid.shape, xs, ys, fwhm) & np.isfinite(image)
    z = image[core] / np.sqrt(variance[core])
    return Difference(
        image=image,
        variance=variance,
        scale=scale,
        residual_rms=float(np.sqrt(np.mean(z**2))) if z.size else math.nan,
        convolved="science" if conv_science else "reference",
        kernel=kernel,
        variance_direct=var_direct,
        variance_convolved=var_convolved,
        psf_science=psf_science,
        psf_difference=np.asarray(psf_difference / psf_difference.sum()),
        nstars=int(xs.size),
    )


def _window(array: np.ndarray, row0: int, col0: int, size: tuple[int, int]) -> np.ndarray:
    """``array[row0 : row0 + ny, col0 : col0 + nx]``, NaN where the window leaves the array."""
    out = np.full(size, np.nan)
    r0, c0 = max(row0, 0), max(col0, 0)
    r1, c1 = min(row0 + size[0], array.shape[0]), min(col0 + size[1], array.shape[1])
    if r1 > r0 and c1 > c0:
        out[r0 - row0 : r1 - row0, c0 - col0 : c1 - col0] = array[r0:r1, c0:c1]
    return out


def encircled_energy(psf: np.ndarray, radius: float) -> float:
    """Fraction of a centred PSF stamp within ``radius`` pixels of its centre (exact overlaps)."""
    centre = (psf.shape[0] - 1) / 2.0
    return float(sep.sum_circle(np.ascontiguousarray(psf), [centre], [centre], radius, subpix=0)[0][0])


def forced_photometry(
    difference: Difference,
    x: float,
    y: float,
    radii: Sequence[float],
    *,
    annulus: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Flux in circular apertures at a fixed position on the difference image.

    Parameters
    ----------
    difference : Difference
        The output of :func:`subtract`.
    x, y : float
        Aperture centre, cutout pixels (0-based; ``x`` the column, ``y`` the row). Not recentred.
    radii : sequence of float
        Aperture radii, pixels: the pipeline's apertures, so the frame's per-aperture zero points apply.
    annulus : (float, float), optional
        Inner and outer radius, pixels, of an annulus whose median is subtracted as a local background.
        None by default: the difference has no background left.

    Returns
    -------
    flux, flux_err : numpy.ndarray
        Electrons on the science flux scale, one per radius (exact pixel overlaps). The errors account for
        the correlated noise of the convolved image (``variance_convolved`` through the kernel), not just
        the per-pixel ``variance``. When the science was convolved both are multiplied by the ratio of the
        science PSF's encircled energy to the difference PSF's, so they refer to the science PSF as the
        frame's aperture zero points do. NaN when the aperture touches an undefined pixel.
    """
    from photutils.aperture import CircularAnnulus, CircularAperture

    kernel_flipped = difference.kernel[::-1, ::-1]
    half = difference.kernel.shape[0] // 2
    background, background_var = 0.0, 0.0
    if annulus is not None:
        ring = CircularAnnulus((x, y), *annulus).to_mask(method="center").get_values(difference.image)
        ring = ring[np.isfinite(ring)]
        background = float(np.median(ring))
        background_var = (1.2533 * 1.4826 * float(np.median(np.abs(ring - background)))) ** 2 / ring.size
    fluxes, errors = [], []
    for radius in radii:
        aperture = CircularAperture((x, y), radius).to_mask(method="exact")
        weights = aperture.data
        box = aperture.bbox
        ny, nx = weights.shape
        values = _window(difference.image, box.iymin, box.ixmin, (ny, nx))
        direct = _window(difference.variance_direct, box.iymin, box.ixmin, (ny, nx))
        flux = float(np.sum(weights * values)) - background * float(weights.sum())
        var = float(np.sum(weights**2 * direct)) + background_var * float(weights.sum()) ** 2
        # Each convolved pixel reaches the aperture through the kernel: its weight is (weights x kernel).
        reach = _convolve(np.pad(weights, half), kernel_flipped)
        convolved = _window(difference.variance_convolved, box.iymin - half, box.ixmin - half, reach.shape)
        var += float(np.sum(reach**2 * np.nan_to_num(convolved, nan=0.0)))
        correction = 1.0
        if difference.convolved == "science":
            correction = encircled_energy(difference.psf_science, radius) / encircled_energy(
                difference.psf_difference, radius
            )
        fluxes.append(flux * correction)
        errors.append(math.sqrt(var) * correction)
    return np.array(fluxes), np.array(errors)


def limiting_flux(difference: Difference, x: float, y: float, radius: float, *, nsigma: float = 5.0) -> float:
    """The ``nsigma`` limiting flux at a position: ``nsigma`` times the forced flux error, electrons.

    Parameters
    ----------
    difference : Difference
        The output of :func:`subtract`.
    x, y : float
        Position, cutout pixels (0-based).
    radius : float
        Aperture radius, pixels (the pipeline's first aperture).
    nsigma : float
        Detection threshold in sigmas.

    Returns
    -------
    float
        Electrons on the science flux scale; with the aperture's zero point it gives ``limit_mag``.
    """
    return nsigma * float(forced_photometry(difference, x, y, [radius])[1][0])
