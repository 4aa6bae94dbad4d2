"""Where a frame's pixels live: the work on the image alone (preprocessing, detection, image quality,
aperture sums), done where the frame was read (this process, or a Dask worker) and asked for by the stages.

The stages never touch pixels directly; they ask a :class:`PixelSite`. In this process that is the
:class:`Pixels` themselves; on a cluster (:mod:`lcowatch.pipeline.executor`) a handle whose calls run on the
worker that holds the frame, so only positions and measurements cross the network, and the same stages give
the same numbers either way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Concatenate, ParamSpec, Protocol, TypeVar

import numpy as np

from lcowatch.config import Config, QualityConfig
from lcowatch.science.frame import Frame, read_content, read_frame
from lcowatch.science.preprocess import Preprocessed, preprocess
from lcowatch.science.quality import ImageQuality, detect_sources, measure_image_quality

P = ParamSpec("P")
T = TypeVar("T")


class Pixels:
    """A frame's pixels and what is measured on them alone; each step is done once, when first asked for."""

    def __init__(self, frame: Frame, quality_config: QualityConfig) -> None:
        self.frame = frame
        self._quality_config = quality_config
        self._pre: Preprocessed | None = None
        self._measured: tuple[np.ndarray, ImageQuality] | None = None

    @property
    def pre(self) -> Preprocessed:
        """Masks and background (:func:`lcowatch.science.preprocess.preprocess`)."""
        if self._pre is None:
            self._pre = preprocess(self.frame)
        return self._pre

    @property
    def sources(self) -> np.ndarray:
        return self.image_quality()[0]

    def preprocess(self) -> None:
        self.pre  # noqa: B018 -- computed on first use

    def image_quality(self) -> tuple[np.ndarray, ImageQuality]:
        """The detected sources (centroids refined) and what they tell of the frame's quality."""
        if self._measured is None:
            sources = detect_sources(self.pre, self._quality_config)
            self._measured = sources, measure_image_quality(self.pre, sources)
        return self._measured

    def run(self, fn: Callable[Concatenate[Pixels, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(pixels, *args)``, here."""
        return fn(self, *args, **kwargs)


class PixelSite(Protocol):
    """What the stages may ask of a frame's pixels, wherever they are."""

    def preprocess(self) -> None: ...

    def image_quality(self) -> tuple[np.ndarray, ImageQuality]: ...

    def run(self, fn: Callable[Concatenate[Pixels, P], T], *args: P.args, **kwargs: P.kwargs) -> T: ...


@dataclass(frozen=True)
class Prepared:
    """A frame prepared away from the pipeline: its header side (``frame`` without pixel arrays), sources and
    image quality; small enough to send."""

    frame: Frame
    sources: np.ndarray
    image_quality: ImageQuality


def load_pixels(path: Path, config: Config) -> Pixels:
    """Read, preprocess and measure a frame (on a worker, ahead of its turn). Raises what
    :func:`lcowatch.science.frame.read_frame` raises for a file that cannot be a frame."""
    content, sha256 = read_content(path)
    pixels = Pixels(read_frame(path, content, sha256, config), config.quality)
    pixels.image_quality()
    return pixels


def prepared(pixels: Pixels) -> Prepared:
    """The part of loaded pixels the pipeline needs to hold."""
    frame = replace(pixels.frame, data=np.empty((0, 0), np.float32), bpm=None)
    sources, image_quality = pixels.image_quality()
    return Prepared(frame, sources, image_quality)


def image_of(pixels: Pixels) -> np.ndarray:
    """The frame's image (electrons), for a diagnostic plot."""
    return pixels.frame.data


#: Side (pixels) of the central square the survey measures.
SURVEY_SIZE = 1024


@dataclass(frozen=True)
class FrameSurvey:
    """What pass 1 learns of a frame: who it is and its image quality (``nstars`` scaled to the whole
    frame from the surveyed square)."""

    path: Path
    target: str
    filter: str
    instrument: str | None
    pixscale: float
    mjd: float
    wcs_usable: bool
    image_quality: ImageQuality


def survey_frame(path: Path, config: Config) -> FrameSurvey | None:
    """Pass 1 of a batch for one file, wherever it runs (:mod:`lcowatch.pipeline.batch`); None for a file
    that is not a readable frame of a target."""
    try:
        return _survey(path, config)
    except Exception:  # the survey only orders the batch: pass 2 meets the same failure and records it
        return None


def _survey(path: Path, config: Config) -> FrameSurvey | None:
    # No sha256: the survey only ranks frames, and pass 2 hashes each file when it records it.
    square = read_frame(path, path.read_bytes(), "", config, central=SURVEY_SIZE)
    meta = square.meta
    if meta.target is None:
        return None
    pre = preprocess(square)
    measured = measure_image_quality(pre, detect_sources(pre, config.quality))
    measured = replace(measured, nstars=round(measured.nstars * meta.shape[0] * meta.shape[1] / square.data.size))
    return FrameSurvey(
        path, meta.target, meta.filter, meta.instrument, meta.pixscale, meta.mjd_mid, meta.wcs_usable, measured
    )
