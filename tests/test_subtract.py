"""Image subtraction: reference resampling, PSF-matched difference, forced photometry, limits.

Every scene is simulated with known truth: Gaussian stars integrated exactly over pixels, an exponential
host galaxy (``render_galaxy``) seen through the same PSF, sky, Poisson and read noise; the reference
lives on its own pixel grid (1% larger pixels, sub-pixel shift, small rotation) and is brought onto the
science cutout by ``resample_reference``.
"""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import sep
from astropy.stats import sigma_clipped_stats
from photutils.aperture import CircularAnnulus
from scipy import ndimage
from scipy.signal import fftconvolve
from scipy.special import erf

from lcowatch.science.subtract import (
    MIN_SKY_PIXELS,
    Difference,
    _sky_pixels,
    compiled_code_cache,
    forced_photometry,
    limiting_flux,
    resample_reference,
    subtract,
)
from lcowatch.simulation.simulate import FrameSpec, _MoffatRenderer, _render_stars, render_galaxy

N = 256
READ_NOISE = 8.0
HOST_XY = (128.0, 131.0)
SN_XY = (131.3, 133.6)  # 4 px = 1.6" (0.389"/px) from the nucleus
RADII = (4.0, 7.0)


def _stars(shape: tuple[int, int], x: np.ndarray, y: np.ndarray, flux: np.ndarray, fwhm: float) -> np.ndarray:
    """Gaussian stars integrated exactly over pixels."""
    sigma = fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    edges_x = np.arange(shape[1] + 1) - 0.5
    edges_y = np.arange(shape[0] + 1) - 0.5
    image = np.zeros(shape)
    for xi, yi, fi in zip(x, y, flux, strict=True):
        px = np.diff(erf((edges_x - xi) / (sigma * math.sqrt(2.0)))) / 2.0
        py = np.diff(erf((edges_y - yi) / (sigma * math.sqrt(2.0)))) / 2.0
        image += fi * np.outer(py, px)
    return image


def _host(shape: tuple[int, int], x: float, y: float, scale: float, theta: float, fwhm: float) -> np.ndarray:
    galaxy = render_galaxy(shape, x, y, 2e5, 4.0 * scale, ellipticity=0.3, theta=theta)
    return ndimage.gaussian_filter(galaxy, fwhm / 2.3548, mode="constant")


@dataclass
class Scene:
    """Noiseless science and reference models and the geometry between them."""

    science: np.ndarray
    sn_only: np.ndarray
    reference: np.ndarray
    frame_from_reference: np.ndarray


def _affine(scale: float, angle: float, tx: float, ty: float) -> np.ndarray:
    c, s = scale * math.cos(angle), scale * math.sin(angle)
    return np.array([[c, -s, tx], [s, c, ty], [0.0, 0.0, 1.0]])


def _scene(
    fwhm_sci: float,
    fwhm_ref: float,
    sn_flux: float,
    *,
    host: bool = True,
    misalign: float = 0.0,
    sn_xy: tuple[float, float] = SN_XY,
) -> Scene:
    rng = np.random.default_rng(7)
    n = 45
    x, y = rng.uniform(12, N - 12, n), rng.uniform(12, N - 12, n)
    flux = 10 ** rng.uniform(3.7, 5.2, n)
    affine = _affine(1.01, 0.004, 0.37, -0.21)  # reference pixels are 1% larger
    ref_xy = np.linalg.solve(affine, np.vstack([x, y, np.ones(n)]))
    hx, hy, _ = np.linalg.solve(affine, [*HOST_XY, 1.0])
    science = _stars((N, N), x, y, flux, fwhm_sci) + 150.0
    # The reference is a stack of four frames: four times the flux and the sky, half the relative noise.
    reference = _stars((N, N), ref_xy[0], ref_xy[1], 4.0 * flux, fwhm_ref / 1.01) + 600.0
    if host:
        science += _host((N, N), *HOST_XY, 1.0, 0.5, fwhm_sci)
        reference += 4.0 * _host((N, N), hx, hy, 1 / 1.01, 0.5 - 0.004, fwhm_ref / 1.01)
    sn_only = _stars((N, N), np.array([sn_xy[0]]), np.array([sn_xy[1]]), np.array([sn_flux]), fwhm_sci)
    # The reference's geometry as the pipeline believes it: rotated by `misalign` pixels at the cutout's
    # corners when it is wrong (a uniform shift would be absorbed by the kernel, correctly).
    believed = _affine(1.01, 0.004 + misalign / (N / math.sqrt(2.0)), 0.37, -0.21)
    return Scene(science + sn_only, sn_only, reference, believed)


def _observe(scene: Scene, seed: int, fwhm_sci: float, fwhm_ref: float) -> Difference:
    rng = np.random.default_rng(seed)
    sci = rng.poisson(scene.science) + rng.normal(0, READ_NOISE, scene.science.shape)
    ref = rng.poisson(scene.reference) + rng.normal(0, READ_NOISE, scene.reference.shape)
    ref_var = scene.reference + READ_NOISE**2
    ref_cut, ref_cut_var = resample_reference(ref, ref_var, scene.frame_from_reference, (N, N), (0, 0))
    return subtract(
        sci,
        scene.science + READ_NOISE**2,
        ref_cut,
        ref_cut_var,
        fwhm_science=fwhm_sci,
        fwhm_reference=fwhm_ref,
        exclude_xy=[SN_XY],
    )


def _truth(scene: Scene) -> np.ndarray:
    """The point source's flux in each aperture on the science frame (what the aperture zero points expect)."""
    return np.array([sep.sum_circle(scene.sn_only, [SN_XY[0]], [SN_XY[1]], r, subpix=0)[0][0] for r in RADII])


def _plain(image: np.ndarray, xy: tuple[float, float], radius: float) -> float:
    """Aperture flux less the sigma-clipped median of an annulus: plain aperture photometry."""
    ring = CircularAnnulus(xy, 20.0, 30.0).to_mask(method="center").get_values(image)
    total = sep.sum_circle(np.nan_to_num(image), [xy[0]], [xy[1]], radius, subpix=0)[0][0]
    return float(total - sigma_clipped_stats(ring)[1] * math.pi * radius**2)


SEEING = [pytest.param(5.0, 3.5, id="science-broader"), pytest.param(3.5, 5.0, id="science-sharper")]


class TestResampleReference:
    """Resampling onto the frame conserves a star's flux and marks what the reference does not cover."""

    def test_flux_conserved_under_scale_change_and_rotation(self) -> None:
        affine = _affine(1.05, math.radians(20.0), 30.3, -10.7)
        star_ref = np.array([100.2, 90.6, 1.0])
        reference = _stars((200, 200), star_ref[:1], star_ref[1:2], np.array([1e5]), 4.0)
        fx, fy, _ = affine @ star_ref
        image, variance = resample_reference(reference, reference + 1.0, affine, (120, 120), (60, 60))
        measured = sep.sum_circle(np.nan_to_num(image), [fx - 60], [fy - 60], 20.0, subpix=0)[0][0]
        assert measured == pytest.approx(1e5, rel=0.005)
        assert np.all(np.isfinite(variance[40:80, 40:80]))

    def test_uncovered_pixels_are_nan(self) -> None:
        affine = _affine(1.0, 0.0, 50.0, 0.0)  # the reference starts at frame column 50
        image, variance = resample_reference(np.ones((64, 64)), np.ones((64, 64)), affine, (32, 32), (40, 10))
        assert np.all(np.isnan(image[:, :9])) and np.all(np.isnan(variance[:, :9]))
        assert np.allclose(image[:, 12:], 1.0)


class TestPointSourceOnHost:
    """A point source on a host galaxy is measured within its errors at any flux, whichever PSF is broader."""

    @pytest.mark.parametrize(("fwhm_sci", "fwhm_ref"), SEEING)
    def test_flux_within_three_sigma_down_to_snr_5(self, fwhm_sci: float, fwhm_ref: float) -> None:
        blank = _observe(_scene(fwhm_sci, fwhm_ref, 0.0), 1, fwhm_sci, fwhm_ref)
        snr5 = limiting_flux(blank, *SN_XY, RADII[0])
        for total in (snr5 / 0.6, 3e3, 3e4):  # an aperture of 4 px holds ~60% of the flux
            scene = _scene(fwhm_sci, fwhm_ref, total)
            flux, err = forced_photometry(_observe(scene, 2, fwhm_sci, fwhm_ref), *SN_XY, RADII)
            assert np.all(np.abs(flux - _truth(scene)) < 3.0 * err), (total, flux, _truth(scene), err)

    def test_absent_source_measures_zero_on_average(self) -> None:
        scene = _scene(5.0, 3.5, 0.0)
        pulls = [forced_photometry(_observe(scene, s, 5.0, 3.5), *SN_XY, RADII[:1]) for s in range(10)]
        z = np.array([f[0] / e[0] for f, e in pulls])
        assert np.all(np.abs(z) < 3.5)
        assert abs(z.mean()) < 3.0 / math.sqrt(z.size)


class TestHonestErrors:
    """Over noise realisations the errors describe the scatter: (measured - true) / err has unit spread."""

    @pytest.mark.parametrize(("fwhm_sci", "fwhm_ref"), SEEING)
    def test_pull_spread(self, fwhm_sci: float, fwhm_ref: float) -> None:
        scene = _scene(fwhm_sci, fwhm_ref, 5e3)
        truth = _truth(scene)[0]
        pulls = []
        for seed in range(24):
            flux, err = forced_photometry(_observe(scene, 100 + seed, fwhm_sci, fwhm_ref), *SN_XY, RADII[:1])
            pulls.append((flux[0] - truth) / err[0])
        assert 0.8 <= np.std(pulls) <= 1.25
        assert abs(np.mean(pulls)) < 3.0 / math.sqrt(len(pulls))


class TestBlankSky:
    """Without a host, the difference flux is the frame's aperture flux minus the scaled reference's."""

    def test_matches_plain_aperture_photometry(self) -> None:
        isolated = (184.0, 214.0)  # 40 px from the nearest star
        scene = _scene(5.0, 3.5, 2e4, host=False, sn_xy=isolated)
        rng = np.random.default_rng(3)
        sci = rng.poisson(scene.science) + rng.normal(0, READ_NOISE, scene.science.shape)
        ref_cut, ref_var = resample_reference(
            scene.reference, scene.reference + READ_NOISE**2, scene.frame_from_reference, (N, N), (0, 0)
        )
        diff = subtract(sci, scene.science + READ_NOISE**2, ref_cut, ref_var, fwhm_science=5.0, fwhm_reference=3.5)
        radius = 12.0  # holds all of either PSF, so the two images' apertures compare directly
        flux, err = forced_photometry(diff, *isolated, [radius])
        expected = _plain(sci.astype(float), isolated, radius) - diff.scale * _plain(ref_cut, isolated, radius)
        assert abs(flux[0] - expected) < 3.0 * err[0]
        assert diff.scale == pytest.approx(0.25, rel=0.01)


class TestHostUnderMoffatWings:
    """Stars and host with Moffat (beta = 3) wings, the science broader: the kernel keeps the flux scale (1 %
    low, the light beyond its 2.5 FWHM stamps) and the host leaves nothing at an empty place on it. The
    stamps' sky was once each star's annulus median, which rose with the wings: the scale came out 2.6 %
    low, and 930 e- of the host (5 sigma) was left in 7 px (now 140 e-, 0.8 sigma)."""

    def test_no_host_light_left_and_the_scale_holds(self) -> None:
        rng = np.random.default_rng(7)
        x, y = rng.uniform(12, N - 12, 45), rng.uniform(12, N - 12, 45)
        flux = 10 ** rng.uniform(3.7, 5.2, 45)
        galaxy = render_galaxy((N, N), *HOST_XY, 2e5, 4.0, ellipticity=0.3, theta=0.5)
        models = []
        for fwhm, gain in ((5.0, 1.0), (3.5, 4.0)):  # the reference is four frames stacked
            spec = FrameSpec(filter="rp", fwhm_arcsec=fwhm, pixscale=1.0)  # the simulator's Moffat, beta = 3
            psf = _MoffatRenderer(fwhm, spec.moffat_beta, 0.0, 0.0).stamps(np.zeros(1), np.zeros(1))[0]
            host = fftconvolve(galaxy, psf, mode="same")  # the stamp sums to 1
            models.append(gain * (_render_stars(x, y, flux, spec, (N, N))[0] + host + 150.0))
        science_model, reference_model = models
        fluxes, errors, scales = [], [], []
        for seed in range(4):
            noise = np.random.default_rng(seed)
            sci = noise.poisson(science_model) + noise.normal(0, READ_NOISE, (N, N))
            ref = noise.poisson(reference_model) + noise.normal(0, READ_NOISE, (N, N))
            diff = subtract(
                sci, science_model + READ_NOISE**2, ref, reference_model + READ_NOISE**2,
                fwhm_science=5.0, fwhm_reference=3.5, exclude_xy=[SN_XY],
            )  # fmt: skip
            flux_here, err_here = forced_photometry(diff, *SN_XY, RADII)
            fluxes.append(flux_here)
            errors.append(err_here)
            scales.append(diff.scale)
        assert np.mean(scales) == pytest.approx(0.25, rel=0.016)
        mean_error = np.mean(errors, axis=0) / math.sqrt(len(fluxes))
        assert np.all(np.abs(np.mean(fluxes, axis=0)) < 3.0 * mean_error), (np.mean(fluxes, axis=0), mean_error)


class TestSkyPixels:
    """The stamps' sky keeps 2 FWHM clear of every detected source, narrows that rather than run short of
    pixels, and gives up (ValueError) when sources fill the cutout."""

    @staticmethod
    def _rows(every: int) -> np.ndarray:
        sources = np.zeros((100, 100), dtype=bool)
        sources[::every, :] = True
        return sources

    def test_clearance_narrows_as_needed(self) -> None:
        allowed = np.ones((100, 100), dtype=bool)
        for every, clearance in ((20, 8.0), (10, 4.0), (6, 2.0)):  # FWHM 4: 2, 1 and 0.5 FWHM
            sources = self._rows(every)
            sky = _sky_pixels(allowed, sources, 4.0)
            assert np.count_nonzero(sky) >= MIN_SKY_PIXELS
            # The widest clearance that leaves enough, and every pixel beyond it.
            assert np.array_equal(sky, ndimage.distance_transform_edt(~sources) > clearance)

    def test_a_cutout_full_of_sources_raises(self) -> None:
        with pytest.raises(ValueError, match="sky pixels"):
            _sky_pixels(np.ones((100, 100), dtype=bool), self._rows(2), 4.0)


class TestResidualRms:
    """The residual RMS at bright stars is about 1 for a good subtraction and far above 1 when misaligned."""

    def test_good_and_misaligned(self) -> None:
        good = _observe(_scene(5.0, 3.5, 1e4), 5, 5.0, 3.5)
        bad = _observe(_scene(5.0, 3.5, 1e4, misalign=2.0), 5, 5.0, 3.5)
        assert good.nstars >= 10
        assert 0.8 < good.residual_rms < 1.4
        assert bad.residual_rms > 4.0


class TestCompiledCode:
    """sfft's compiled code is kept on disk: a new process (a restarted daemon) loads it instead of compiling
    for 6-15 s."""

    def test_a_new_process_loads_it(self) -> None:
        _observe(_scene(5.0, 3.5, 1e4), 5, 5.0, 3.5)  # kernel half-width 1.5 FWHM, to even pixels: 8 px
        (folder,) = compiled_code_cache().glob("sfft-*")
        assert any(folder.rglob("*.nbi"))
        script = (
            "from lcowatch.science.subtract import _sfft_config\n"
            f"compiled = _sfft_config({N}, {N}, 8, 1)[1].values()\n"
            "print(sum(sum(f.stats.cache_hits.values()) for f in compiled),"
            " sum(sum(f.stats.cache_misses.values()) for f in compiled))"
        )
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
        hits, misses = map(int, result.stdout.split())
        assert hits > 10 and misses == 0, result.stdout

    def test_processes_name_their_code_apart(self) -> None:
        """Code compiled by two processes (two kernel sizes) can be loaded by a third side by side: numba names
        compiled functions by a count, and each process starts it at a random number of its own. Counts from
        1 in every process gave two sizes the same names, and the third process failed on every frame."""
        script = (
            "import numba\n"
            "from lcowatch.science.subtract import _compiling_alone\n"
            "with _compiling_alone():\n"
            "    f = numba.njit(lambda x: x + 1)\n"
            "    f(1)\n"
            "print(f.overloads[f.signatures[0]].fndesc.env_name)\n"
        )
        names = {
            subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
            for _ in range(2)
        }
        assert len(names) == 2, names
