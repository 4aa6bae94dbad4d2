"""Seconds per 512x512 subtraction, and accuracy, for the PSF-matching candidates.

A simulated cutout: 80 Gaussian stars, an exponential host of 2e5 e- with a 1e4 e- point source 1.6" from
its nucleus, science FWHM 5 px, reference FWHM 3.5 px on a grid 1% coarser and shifted by a fraction of a
pixel (brought onto the cutout by ``resample_reference``), sky, Poisson and read noise.

- sfft (lcowatch.science.subtract.subtract): point-source flux error in sigmas, residual RMS at stars.
- properimage (ZOGY, ``properimage.operations.subtract``), when installed: its D image is normalised to
  unit noise, so the RMS of D at the stars is its residual figure and D at the source its S/N.

Usage: ``python benchmarks/subtraction_speed.py [--repeat N] [--threads N]``.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
from scipy import ndimage
from scipy.special import erf

from lcowatch.science.subtract import forced_photometry, resample_reference, subtract
from lcowatch.simulation.simulate import render_galaxy

N = 512
SN_XY = (259.3, 261.6)


def _stars(x: np.ndarray, y: np.ndarray, flux: np.ndarray, fwhm: float) -> np.ndarray:
    sigma = fwhm / 2.3548
    edges = np.arange(N + 1) - 0.5
    image = np.zeros((N, N))
    for xi, yi, fi in zip(x, y, flux, strict=True):
        px = np.diff(erf((edges - xi) / (sigma * math.sqrt(2.0)))) / 2.0
        py = np.diff(erf((edges - yi) / (sigma * math.sqrt(2.0)))) / 2.0
        image += fi * np.outer(py, px)
    return image


def _images(seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    x, y = rng.uniform(12, N - 12, 80), rng.uniform(12, N - 12, 80)
    flux = 10 ** rng.uniform(3.7, 5.2, 80)
    affine = np.array([[1.01, 0.0, 0.37], [0.0, 1.01, -0.21], [0.0, 0.0, 1.0]])
    rx, ry, _ = np.linalg.solve(affine, np.vstack([x, y, np.ones(x.size)]))
    hx, hy, _ = np.linalg.solve(affine, [256.0, 259.0, 1.0])
    host_sci = ndimage.gaussian_filter(render_galaxy((N, N), 256.0, 259.0, 2e5, 4.0, ellipticity=0.3), 5.0 / 2.3548)
    host_ref = ndimage.gaussian_filter(render_galaxy((N, N), hx, hy, 8e5, 4.0 / 1.01, ellipticity=0.3), 3.5 / 2.3548)
    sn = _stars(np.array([SN_XY[0]]), np.array([SN_XY[1]]), np.array([1e4]), 5.0)
    science = _stars(x, y, flux, 5.0) + host_sci + sn + 150.0
    reference = _stars(rx, ry, 4.0 * flux, 3.5 / 1.01) + host_ref + 600.0
    sci = rng.poisson(science) + rng.normal(0, 8, science.shape)
    ref = rng.poisson(reference) + rng.normal(0, 8, reference.shape)
    ref_cut, ref_var = resample_reference(ref, reference + 64.0, affine, (N, N), (0, 0))
    return sci, science + 64.0, ref_cut, ref_var, sn, np.column_stack([x, y])


def _sfft(images: tuple[np.ndarray, ...], repeat: int, threads: int) -> None:
    sci, sci_var, ref, ref_var, sn, _ = images
    subtract(sci, sci_var, ref, ref_var, fwhm_science=5.0, fwhm_reference=3.5, exclude_xy=[SN_XY], threads=threads)
    start = time.perf_counter()
    for _ in range(repeat):
        diff = subtract(
            sci, sci_var, ref, ref_var, fwhm_science=5.0, fwhm_reference=3.5, exclude_xy=[SN_XY], threads=threads
        )
    seconds = (time.perf_counter() - start) / repeat
    flux, err = forced_photometry(diff, *SN_XY, [5.0])
    truth = float(np.sum(sn[(np.hypot(*np.mgrid[0:N, 0:N][::-1] - np.array(SN_XY)[:, None, None]) < 5.0)]))
    print(
        f"sfft         {seconds:6.3f} s/subtraction  flux error {(flux[0] - truth) / err[0]:+.2f} sigma "
        f"(r=5 px, err {err[0]:.0f} e-)  residual RMS {diff.residual_rms:.2f}  stars {diff.nstars}"
    )


def _properimage(images: tuple[np.ndarray, ...], repeat: int) -> None:
    try:
        from properimage import operations, single_image
    except ImportError as exc:
        print(f"properimage  not installed ({exc})")
        return
    sci, _, ref, _, _, stars = images
    finite = np.isfinite(ref)
    ref_filled = np.where(finite, ref, np.nanmedian(ref))
    start = time.perf_counter()
    for _ in range(repeat):
        with (
            single_image.SingleImage(sci, mask=~finite) as new,
            single_image.SingleImage(ref_filled, mask=~finite) as r,
        ):
            d = operations.subtract(ref=r, new=new, align=False, fitted_psf=True)[0]
    seconds = (time.perf_counter() - start) / repeat
    d = np.real(d)
    at_stars = [
        d[round(y) - 2 : round(y) + 3, round(x) - 2 : round(x) + 3]
        for x, y in stars
        if 10 < x < N - 10 and 10 < y < N - 10
    ]
    rms = float(np.sqrt(np.nanmean(np.square(at_stars)) / np.nanvar(d[20:-20, 20:-20])))
    peak = d[round(SN_XY[1]), round(SN_XY[0])] / np.nanstd(d[20:-20, 20:-20])
    print(f"properimage  {seconds:6.3f} s/subtraction  D at source {peak:.1f} sigma  residual RMS {rms:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    images = _images(1)
    _sfft(images, args.repeat, args.threads)
    _properimage(images, args.repeat)


if __name__ == "__main__":
    main()
