#!/usr/bin/env python
"""Throughput of ``lcowatch process`` on a Dask cluster against serial processing, on 4096x4096 frames.

A plain script (no test runner). It reuses ``pipeline_speed.py``'s simulated Sinistro frames (same seed, so
the frames are shared when that benchmark has made them), seeds a state with the template frame, and times
the same frames through:

Each run is a batch as ``lcowatch process`` runs it: the survey (pass 1), then the frames (pass 2).

1. serial processing (``--workers 1``: everything in this process);
2. a LocalCluster of 1 worker: the executor's overhead per frame (pixels read on the worker, aperture sums
   run there, results sent back), against serial;
3. a LocalCluster of 2 workers: the throughput ratio against serial.

The cluster's start-up is timed apart and left out of the per-frame figures. From the per-frame figures it
prints a paper estimate of 1,000,000 frames on 128 cores.

Run ``python benchmarks/scaleout.py`` (8 frames of 4096x4096) or ``--quick`` (6 frames of 2048x2048).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from pipeline_speed import Setup, make_config, prepare_frames, quiet_logs, seed_state

from lcowatch.pipeline.batch import SURVEY, run_batch
from lcowatch.pipeline.executor import DaskExecutor, make_executor
from lcowatch.pipeline.runner import Pipeline
from lcowatch.state.ledger import connect

ESTIMATE_FRAMES = 1_000_000
ESTIMATE_CORES = 128


def timed_run(
    config_dir: Path, seed: Path, paths: list[Path], refcat: Path, workers: int
) -> tuple[float, float, float, float]:
    """(cluster start-up s, wall s for the frames, of which the survey (pass 1), this process's CPU s for
    them) for ``workers`` (0: serial)."""
    state = config_dir / f"state-{workers}"
    shutil.rmtree(state, ignore_errors=True)
    shutil.copytree(seed, state)
    config = make_config(state, paths[0].parent, refcat)
    started = time.perf_counter()
    executor = DaskExecutor(config, workers=workers, scheduler=None) if workers else make_executor(config)
    startup = time.perf_counter() - started
    try:
        pipeline = Pipeline(config, connect(state), executor=executor)
        files = pipeline.unseen(paths)
        started, cpu = time.perf_counter(), time.process_time()
        surveyed: list[float] = []

        def note(pass_name: str, _outcome: object) -> None:
            if pass_name == SURVEY:
                surveyed.append(time.perf_counter() - started)

        for outcome in run_batch(pipeline, files, report=note):  # both passes, as lcowatch process runs them
            if outcome.state != "done":
                raise SystemExit(f"{outcome.path.name} ended {outcome.state}: {outcome.reason}")
        return startup, time.perf_counter() - started, max(surveyed, default=0.0), time.process_time() - cpu
    finally:
        executor.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--quick", action="store_true", help="6 frames of 2048x2048")
    parser.add_argument("--workdir", type=Path, help="keep the simulated frames here (reused when they match)")
    args = parser.parse_args()
    setup = (
        Setup(frames=7, size=2048, stars=750, seed=3) if args.quick else Setup(frames=9, size=4096, stars=3000, seed=3)
    )
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lcowatch-scaleout-"))
    quiet_logs()
    paths, refcat, _, _ = prepare_frames(setup, workdir)
    seed = workdir / "seed"
    seed_state(make_config(seed, paths[0].parent, refcat), paths[0])
    frames = paths[1:]
    rows = []
    for label, workers in (("serial", 0), ("Dask, 1 worker", 1), ("Dask, 2 workers", 2)):
        startup, wall, survey, cpu = timed_run(workdir, seed, frames, refcat, workers)
        rows.append((wall / len(frames), cpu / len(frames)))
        print(f"{label:16s} start-up {startup:5.2f} s   {wall / len(frames):5.3f} s/frame "
              f"(survey {survey / len(frames):5.3f}, measure {(wall - survey) / len(frames):5.3f})   "
              f"{len(frames) / wall:5.2f} frames/s   this process {cpu / len(frames):5.3f} CPU s/frame")  # fmt: skip
    (serial, _), (one, writer), (two, _) = rows
    print(f"\n{len(frames)} frames of {setup.size}x{setup.size}")
    print(f"executor overhead per frame (1 worker - serial): {one - serial:+.3f} s ({(one / serial - 1) * 100:+.0f} %)")
    print(f"throughput ratio, 2 workers / serial: {serial / two:.2f}x (target >= 1.8x on 2 cores)")
    # The cluster's share of a frame is the 1-worker wall time less what this process did; this process, the
    # single writer, takes frames one at a time, so its share bounds the whole cluster.
    workers_hours = ESTIMATE_FRAMES * (one - writer) / ESTIMATE_CORES / 3600
    writer_hours = ESTIMATE_FRAMES * writer / 3600
    print(f"single writer: {writer:.3f} CPU s/frame; workers: {one - writer:.3f} s/frame")
    print(
        f"paper estimate, {ESTIMATE_FRAMES:,} frames on {ESTIMATE_CORES} cores: workers {workers_hours:.1f} h, "
        f"single writer {writer_hours:.1f} h -> {max(workers_hours, writer_hours):.1f} h"
    )


if __name__ == "__main__":
    main()
