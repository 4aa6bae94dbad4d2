"""The background and its noise map, measured on simulated frames of known sky."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lcowatch.config import parse
from lcowatch.science.frame import read_content, read_frame
from lcowatch.science.preprocess import preprocess
from lcowatch.simulation.simulate import FrameSpec, make_field, write_frame

FIELD = make_field("BTEST", 30.0, -10.0, nstars=200, radius_arcmin=3.0, seed=8)
CONFIG = parse(
    {"watch": {"paths": ["in"]}, "state_dir": "s", "targets": {"BTEST": {"ra": 30.0, "dec": -10.0}}}, Path("/")
)


class TestBackground:
    """The background follows a sloping sky to a small fraction of the noise and the RMS map is the pixel
    noise, on frames of even and odd sides (the mesh is measured on a sample of the pixels)."""

    @pytest.mark.parametrize("shape", [(512, 512), (383, 385)])
    def test_sky_removed_and_noise_mapped(self, tmp_path: Path, shape: tuple[int, int]) -> None:
        path = tmp_path / "frame.fits"
        spec = FrameSpec(shape=shape, sky=400.0, sky_gradient=0.2, read_noise=7.0, n_cosmics=0, seed=3)
        truth = write_frame(path, FIELD, spec)
        content, sha = read_content(path)
        frame = read_frame(path, content, sha, CONFIG)
        pre = preprocess(frame)
        assert pre.subtracted.shape == pre.rms.shape == shape and pre.rms.flags["C_CONTIGUOUS"]
        rows, cols = np.indices(shape)
        clear = ~pre.mask
        for x, y, flux in zip(truth.x, truth.y, truth.flux, strict=True):
            if flux > 100.0:
                clear &= np.hypot(cols - x, rows - y) > 4 * truth.fwhm_pix
        noise = np.sqrt(spec.sky + spec.read_noise**2)
        assert clear.sum() > 0.2 * clear.size
        # Each third across the slope (the sky changes by 20 % = 4.5 sigma over the frame) is flat after.
        for third in np.array_split(np.arange(shape[1]), 3):
            sky_left = pre.subtracted[:, third][clear[:, third]]
            assert abs(np.median(sky_left)) < 0.05 * noise
        assert np.median(pre.rms[clear]) == pytest.approx(noise, rel=0.03)
        assert np.std(pre.subtracted[clear]) == pytest.approx(noise, rel=0.03)
