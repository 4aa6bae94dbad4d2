"""Where frames are read and measured: in this process (:class:`SerialExecutor`, the default), or on a Dask
cluster (:class:`DaskExecutor`: a ``LocalCluster`` of ``processing.workers`` processes, or an existing
scheduler).

Either way the pipeline in this process stays the single writer and takes frames in their turn (observation
time): each frame's stages, its rows and its ``done`` mark are exactly as in serial processing. A cluster
reads, preprocesses and measures the image quality of the next frames ahead of their turn, keeps each
frame's pixels where they were read, and runs the stages' pixel work (aperture sums) there, so a frame's
numbers do not depend on where it was measured. A worker lost mid-frame costs a recomputation on another
worker (Dask keeps the task graph), never a second write.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Protocol, TypeVar

import numpy as np

from lcowatch.config import Config
from lcowatch.errors import RetryLater
from lcowatch.log import get_logger
from lcowatch.pipeline.pixels import FrameSurvey, Pixels, PixelSite, Prepared, load_pixels, prepared, survey_frame
from lcowatch.science.frame import Frame, read_frame, warm_up
from lcowatch.science.quality import ImageQuality

if TYPE_CHECKING:
    from distributed import Client, Future

P = ParamSpec("P")
T = TypeVar("T")

#: A worker resource: a worker reads one frame ahead at a time (``dask worker --resources frames=1``).
LOAD_SLOT = "frames"
#: Seconds to reach an existing scheduler before giving up.
CONNECT_TIMEOUT = 10.0


class Executor(Protocol):
    #: How many files beyond the one in hand are worth reading ahead.
    ahead: int

    def prefetch(self, files: Sequence[Path], start: int) -> None:
        """Start reading files ahead of their turn (where that helps): ``files[start:]`` come next, in order."""

    def open(self, path: Path, content: bytes, sha256: str) -> tuple[Frame, PixelSite]:
        """A frame's header side and its pixels' site; raises what ``read_frame`` raises."""
        ...

    def survey(self, paths: Sequence[Path]) -> Iterator[FrameSurvey | None]:
        """Pass 1 of a batch (:func:`lcowatch.pipeline.pixels.survey_frame`) of each file, as each is done."""
        ...

    def close(self) -> None: ...


class SerialExecutor:
    """Everything in this process, each frame when its turn comes."""

    ahead = 0

    def __init__(self, config: Config) -> None:
        self.config = config

    def prefetch(self, files: Sequence[Path], start: int) -> None:
        pass

    def open(self, path: Path, content: bytes, sha256: str) -> tuple[Frame, PixelSite]:
        frame = read_frame(path, content, sha256, self.config)
        return frame, Pixels(frame, self.config.quality)

    def survey(self, paths: Sequence[Path]) -> Iterator[FrameSurvey | None]:
        return (survey_frame(path, self.config) for path in paths)

    def close(self) -> None:
        pass


class RemotePixels:
    """A frame's pixels held by a Dask worker; calls run there and return their (small) results."""

    def __init__(self, client: Client, future: Future, ready: Prepared) -> None:
        self._client = client
        self._future = future
        self._prepared = ready

    def preprocess(self) -> None:
        pass  # done on the worker ahead of the frame's turn

    def image_quality(self) -> tuple[np.ndarray, ImageQuality]:
        return self._prepared.sources, self._prepared.image_quality

    def run(self, fn: Callable[Concatenate[Pixels, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        result: T = self._client.submit(fn, self._future, *args, pure=False, priority=1, **kwargs).result()
        return result


class DaskExecutor:
    """Frames read and measured on a Dask cluster, ``ahead`` of them at a time beyond the one in hand."""

    def __init__(self, config: Config, *, workers: int, scheduler: str | None) -> None:
        import dask
        from distributed import Client, LocalCluster

        self.config = config
        self.log = get_logger()
        if scheduler:
            self.client = Client(scheduler, timeout=CONNECT_TIMEOUT)
            self._cluster: Any = None
        else:
            # Dask's nanny sets MALLOC_TRIM_THRESHOLD_, which turns off glibc's adaptive mmap threshold: every
            # full-frame array is then mapped afresh and page-faulted, and a worker measures a 4k frame 30 %
            # slower than this process does.
            with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
                self._cluster = LocalCluster(
                    n_workers=workers, threads_per_worker=2, resources={LOAD_SLOT: 1}, processes=True,
                    silence_logs=logging.WARNING, dashboard_address=":0" if _has_dashboard() else None,
                )  # fmt: skip
            self.client = Client(self._cluster)
        self.client.run(_warm_worker)  # on every worker at once, not in its first frames
        found = self.client.scheduler_info(n_workers=-1)["workers"].values()
        self.ahead = max(1, len(found))
        # Workers with a load slot read one frame at a time and keep a thread free for the aperture sums of
        # the frame in hand, which would otherwise wait behind the next frame's read.
        slots = bool(found) and all(LOAD_SLOT in w.get("resources", {}) for w in found)
        self._load_slot = {LOAD_SLOT: 1} if slots else None
        self._pending: dict[Path, Future] = {}
        self.log.info("cluster_ready", scheduler=self.client.scheduler_info()["address"], workers=len(found),
                      load_slots=slots, dashboard=self.client.dashboard_link if _has_dashboard() else None)  # fmt: skip

    def prefetch(self, files: Sequence[Path], start: int) -> None:
        wanted = list(files[start : start + self.ahead + 1])
        # A file that never reached open() (already done, quarantined unread) is dropped from the window.
        self._pending = {path: future for path, future in self._pending.items() if path in wanted}
        for path in wanted:
            if path not in self._pending:
                self._pending[path] = self._load(path)

    def open(self, path: Path, content: bytes, sha256: str) -> tuple[Frame, PixelSite]:
        del content  # the worker reads the file itself: it must see the same file system
        future = self._pending.pop(path, None)
        ready = self._prepared(future) if future is not None else None
        if ready is None or ready.frame.sha256 != sha256:  # not read ahead, or changed since
            future = self._load(path)
            ready = self._prepared(future)
            if ready.frame.sha256 != sha256:
                raise RetryLater(f"{path.name} changed while it was read", step="read")
        assert future is not None
        return ready.frame, RemotePixels(self.client, future, ready)

    def survey(self, paths: Sequence[Path]) -> Iterator[FrameSurvey | None]:
        from distributed import as_completed

        futures = self.client.map(survey_frame, paths, config=self.config, pure=False, resources=self._load_slot)
        for future in as_completed(futures):
            try:
                yield future.result()
            except Exception as exc:  # a lost worker: the file keeps its place, and pass 2 reads it again
                self.log.warning("survey_failed", reason=f"{type(exc).__name__}: {exc}")
                yield None

    def _load(self, path: Path) -> Future:
        return self.client.submit(load_pixels, path, self.config, pure=False, resources=self._load_slot)

    def _prepared(self, future: Future) -> Prepared:
        try:
            result: Prepared = self.client.submit(prepared, future, pure=False).result()
        except FileNotFoundError as exc:
            raise RetryLater(f"a worker cannot read the file: {exc} (workers must share the file system)") from exc
        return result

    def close(self) -> None:
        self._pending.clear()
        self.client.close()
        if self._cluster is not None:
            self._cluster.close()


def _warm_worker() -> None:
    """Run on each worker at start: unpickling this function imports this module, and with it everything a
    frame's reading and measuring needs (astropy, sep, scipy); then the IERS tables are loaded."""
    warm_up()


def _has_dashboard() -> bool:
    try:
        import bokeh  # noqa: F401
    except ImportError:
        return False
    return True


def make_executor(config: Config, *, workers: int | None = None, scheduler: str | None = None) -> Executor:
    """The executor for a run: command-line choices over ``processing.workers`` / ``processing.scheduler``."""
    scheduler = scheduler or (None if workers else config.processing.scheduler)
    workers = workers or config.processing.workers
    if scheduler is None and workers == 1:
        return SerialExecutor(config)
    return DaskExecutor(config, workers=workers, scheduler=scheduler)
