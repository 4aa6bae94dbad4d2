"""Registration by star patterns, without any WCS, on the real 0.4 m frame and on simulated frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from conftest import REAL_TARGETS, SBIG_FRAME
from lcowatch.config import parse
from lcowatch.errors import Reject
from lcowatch.science.frame import Frame, read_content, read_frame
from lcowatch.science.preprocess import preprocess
from lcowatch.science.quality import detect_sources, measure_quality
from lcowatch.science.register import register

CONFIG = parse({"watch": {"paths": ["in"]}, "state_dir": "s", "targets": REAL_TARGETS}, Path("/"))


def _sources(frame: Frame) -> np.ndarray:
    pre = preprocess(frame)
    sources = detect_sources(pre, CONFIG.quality)
    measure_quality(frame, pre, sources, CONFIG.quality)
    return sources


def _warped(frame: Frame, matrix: np.ndarray) -> Frame:
    """The frame resampled so that a template pixel p lands at A p + t (0-based x, y)."""
    inverse = np.linalg.inv(matrix[:, :2])
    offset = -inverse @ matrix[:, 2]
    # ndimage works in (row, col): swap the axes of the inverse map.
    swap = np.array([[0, 1], [1, 0]])
    data = ndimage.affine_transform(
        frame.data,
        swap @ inverse @ swap,
        offset=swap @ offset,
        order=3,
        mode="constant",
        cval=float(np.median(frame.data)),
    )
    return Frame(frame.path, "warped", frame.meta, data.astype(np.float32), frame.header, None, None, None)


def _rotation(degrees: float, shift: tuple[float, float], scale: float = 1.0) -> np.ndarray:
    angle = np.radians(degrees)
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return np.column_stack([rotation, shift])


class TestRealFrameAgainstItself:
    """The trailed, WCS-less 0.4 m frame registers to a shifted and rotated copy of itself."""

    @pytest.mark.parametrize(
        ("degrees", "shift"), [(0.0, (37.3, -21.6)), (3.0, (-120.5, 64.2)), (-11.0, (15.0, 250.0))]
    )
    def test_recovers_the_applied_transform(self, real_data: Path, degrees: float, shift: tuple[float, float]) -> None:
        path = real_data / SBIG_FRAME
        content, sha = read_content(path)
        frame = read_frame(path, content, sha, CONFIG)
        applied = _rotation(degrees, shift)
        template_sources = _sources(frame)
        result = register(template_sources, _sources(_warped(frame, applied)))
        assert result.method == "asterism"
        assert result.rotation_deg == pytest.approx(degrees, abs=0.05)
        assert result.scale == pytest.approx(1.0, abs=2e-3)
        probe = np.array([[200.0, 300.0], [1200.0, 800.0], [760.0, 510.0]])
        assert np.abs(result.apply(probe) - probe @ applied[:, :2].T - applied[:, 2]).max() < 0.5
        assert result.n_matched >= 15

    def test_unrelated_star_lists_are_rejected(self, real_data: Path) -> None:
        path = real_data / SBIG_FRAME
        content, sha = read_content(path)
        sources = _sources(read_frame(path, content, sha, CONFIG))
        rng = np.random.default_rng(1)
        scrambled = sources.copy()
        scrambled["x"] = rng.uniform(0, 1500, len(sources))
        scrambled["y"] = rng.uniform(0, 1000, len(sources))
        with pytest.raises(Reject, match="registration failed"):
            register(sources, scrambled)


class TestAcrossPixelScales:
    """A frame from an instrument of another pixel scale (here 0.75x) registers to the template."""

    def test_scale_change(self, real_data: Path) -> None:
        path = real_data / SBIG_FRAME
        content, sha = read_content(path)
        frame = read_frame(path, content, sha, CONFIG)
        applied = _rotation(1.5, (140.0, 90.0), scale=0.75)
        # Trailed stars, resampled: their centroids are good to about a pixel, not a tenth.
        result = register(_sources(frame), _sources(_warped(frame, applied)), max_rms=2.0)
        assert result.scale == pytest.approx(0.75, rel=0.01)
        assert result.rotation_deg == pytest.approx(1.5, abs=0.1)
