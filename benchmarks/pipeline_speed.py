#!/usr/bin/env python
"""How fast lcowatch turns a 4096x4096 Sinistro frame into a light-curve point, against a plain baseline.

A plain script (no test runner). It simulates LCO Sinistro frames (fpack ``.fits.fz``, about 3,000 stars,
FWHM ~2", pointing offsets of tens of pixels, a reference catalog for the field), then measures:

1. the read+decompress floor: astropy open + ``.data`` of the SCI plane of the ``.fits.fz`` file, nothing else;
2. lcowatch's own read (``lcowatch.science.frame.read_content`` + ``read_frame``, the functions ``process_path``
   calls before the stages), called by this script on every file before processing it;
3. every frame through ``Pipeline.process_path`` (the daemon's code path), one worker, in this process, fresh
   state_dir: seconds per stage (``Outcome.seconds``) and wall clock per frame; the first frame becomes the
   template and is reported apart from the medians of the rest;
4. a plain baseline in this process on the same files: astropy read, sep background + extraction, photutils
   apertures with a sigma-clipped annulus median (``ApertureStats``) at every detected position;
5. throughput with 1 and 2 worker processes sharing one state_dir (SQLite WAL), template already made;
6. a scale check: seconds per frame when the target already has 10,000 frames in its light curve vs none;
7. the command itself: ``lcowatch --version`` in a fresh process, and ``lcowatch process`` on one frame
   against all of them (fresh state each), whose difference gives the marginal cost of a frame with the
   start-up and the first frame's one-time costs cancelled out;
8. optionally (``--profile``) a cProfile of one non-template frame's ``process_path``.

Run ``python benchmarks/pipeline_speed.py`` (full: 6 frames of 4096x4096) or ``--quick`` (3 frames of
2048x2048, under a minute). See benchmarks/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import multiprocessing as mp
import os
import platform
import pstats
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from lcowatch import log
from lcowatch.config import Config, parse
from lcowatch.pipeline.pixels import SURVEY_SIZE, survey_frame
from lcowatch.pipeline.runner import Outcome, Pipeline
from lcowatch.science.frame import bjd_tdb, read_content, read_frame, site_location
from lcowatch.simulation.simulate import FrameSpec, lco_filename, make_field, write_frame, write_refcat
from lcowatch.state.ledger import LEDGER_NAME, connect

TARGET = "BENCH1"
RA, DEC = 150.0, 2.0
FILTER = "rp"
PIXSCALE = 0.389  # Sinistro, arcsec per pixel
FIELD_SEED = 7
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
SCALE_FRAMES = 10_000  # frames (each with one point per aperture) already in the light curve for the scale check

# Targets from issue 16 (one worker, 2 cores); the scaling and scale targets from issue 7.
TARGET_SECONDS = 1.0
TARGET_FLOOR_RATIO = 4.5
TARGET_RSS_MB = 600.0
TARGET_BASELINE_RATIO = 0.6
TARGET_2W_RATIO = 1.8
TARGET_SCALE_RATIO = 1.1  # "does not grow": within 10 %

STEP_ORDER = ["read", "preprocess", "quality", "template", "register", "photometry", "differential", "calibrate"]


# --------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def max_rss_mb() -> float:
    """Peak resident set size of this process so far, MB.

    Linux's VmHWM where there is one: ``ru_maxrss`` survives execve, so a spawned worker reported its parent's
    peak at the fork (717 MB for both workers, the benchmark process's peak after its baseline, when the
    workers themselves peaked at about 540 MB).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0**2 if sys.platform == "darwin" else peak / 1024.0  # bytes on macOS, KiB elsewhere


def quiet_logs() -> None:
    """Render lcowatch's log events as the daemon does (JSON, level info), but into /dev/null."""
    log.configure(open(os.devnull, "w"), level="info", json=True)  # noqa: SIM115 - kept open for the run


def _busy_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat; (0, 0) where there is none."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields[:8]) - idle, sum(fields[:8])


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class OtherLoad:
    """How many cores other processes kept busy while a section ran (machine-wide busy time minus this
    process and its finished children). Above ~0.2 the section's figures are inflated by the neighbours."""

    def __init__(self) -> None:
        self.sections: list[tuple[str, float]] = []
        self._start: tuple[float, float, int] | None = None

    def start(self) -> None:
        busy, _ = _busy_jiffies()
        self._start = (time.monotonic(), _own_cpu(), busy)

    def stop(self, name: str) -> float:
        assert self._start is not None
        wall0, own0, busy0 = self._start
        busy, _ = _busy_jiffies()
        wall = time.monotonic() - wall0
        tick = os.sysconf("SC_CLK_TCK")
        other = max(0.0, ((busy - busy0) / tick - (_own_cpu() - own0)) / max(wall, 1e-9))
        self.sections.append((name, other))
        print(f"  [other processes kept {other:.2f} of {os.cpu_count()} cores busy during this section]")
        return other


def wait_for_quiet(max_wait: float, threshold: float = 0.2) -> None:
    """Wait (up to ``max_wait`` s) until other processes use less than ``threshold`` cores over 2 s."""
    if max_wait <= 0:
        return
    deadline = time.monotonic() + max_wait
    while True:
        busy0, _ = _busy_jiffies()
        own0 = _own_cpu()
        time.sleep(2.0)
        busy1, _ = _busy_jiffies()
        other = ((busy1 - busy0) / os.sysconf("SC_CLK_TCK") - (_own_cpu() - own0)) / 2.0
        if other < threshold:
            return
        if time.monotonic() > deadline:
            print(f"  (machine still busy: {other:.2f} cores used by other processes; going on anyway)")
            return
        print(f"  (waiting for the machine to be quiet: {other:.2f} cores used by other processes)", flush=True)
        time.sleep(8.0)


def fmt_s(value: float) -> str:
    return f"{value:.3f}" if np.isfinite(value) else "-"


def print_table(rows: list[list[str]], header: list[str], indent: str = "  ", align: str | None = None) -> None:
    """A text table; ``align`` has one letter per column, ``l`` or ``r`` (default: first left, others right)."""
    cells = [header, *rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    align = align or "l" + "r" * (len(header) - 1)
    for k, row in enumerate(cells):
        print(
            indent
            + "  ".join(
                cell.ljust(w) if a == "l" else cell.rjust(w) for cell, w, a in zip(row, widths, align, strict=True)
            ).rstrip()
        )
        if k == 0:
            print(indent + "  ".join("-" * w for w in widths))


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def ordered_steps(names: set[str]) -> list[str]:
    known = [s for s in STEP_ORDER if s in names]
    return known + sorted(names - set(STEP_ORDER) - {"store"}) + (["store"] if "store" in names else [])


# --------------------------------------------------------------------------------------------------------
# Simulated frames
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    frames: int
    size: int
    stars: int
    seed: int

    def as_dict(self) -> dict[str, int]:
        return {
            "frames": self.frames,
            "size": self.size,
            "stars": self.stars,
            "seed": self.seed,
            "version": MANIFEST_VERSION,
        }


def make_bench_field(setup: Setup) -> Any:
    # The stars fill a square the size of the frame; the target is kept clear of neighbours.
    return make_field(
        TARGET,
        RA,
        DEC,
        nstars=setup.stars,
        box_arcmin=setup.size * PIXSCALE / 60.0,
        seed=FIELD_SEED,
        min_sep_arcsec=15.0,
    )


def frame_specs(setup: Setup) -> list[FrameSpec]:
    """Time-ordered frames; the first has the best seeing, so it stays the template throughout."""
    rng = np.random.default_rng(setup.seed)
    area = (setup.size / 4096.0) ** 2
    specs = []
    for i in range(setup.frames):
        dx, dy = (float(v) for v in np.clip(rng.normal(0.0, 25.0, 2), -60.0, 60.0))
        specs.append(
            FrameSpec(
                filter=FILTER,
                mjd_start=61000.2 + i * 0.0015,
                exptime=60.0,
                shape=(setup.size, setup.size),
                pixscale=PIXSCALE,
                fwhm_arcsec=1.9 if i == 0 else float(rng.uniform(1.95, 2.15)),
                sky=float(rng.uniform(280.0, 320.0)),
                offset_pix=(dx, dy),
                rotation_deg=float(rng.uniform(-0.3, 0.3)),
                n_cosmics=int(100 * area),
                bad_columns=(int(setup.size * 0.3),),
                airmass=round(1.2 + 0.01 * i, 3),
                frame_number=11 + i,
                seed=setup.seed * 1000 + i,
            )
        )
    return specs


def _render(args: tuple[Setup, FrameSpec, str]) -> tuple[str, int, float]:
    setup, spec, path = args
    started = time.perf_counter()
    truth = write_frame(path, make_bench_field(setup), spec, compress="fz")
    return path, int(truth.on_frame(spec.shape).sum()), time.perf_counter() - started


def prepare_frames(setup: Setup, workdir: Path) -> tuple[list[Path], Path, list[int], list[FrameSpec]]:
    """Write the frames and the reference catalog, or reuse them when ``workdir`` holds the same set."""
    incoming = workdir / "frames"
    refcat = workdir / "refcat.csv"
    manifest_path = workdir / MANIFEST
    specs = frame_specs(setup)
    paths = [incoming / lco_filename(spec, "fz") for spec in specs]
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("setup") == setup.as_dict() and all(p.exists() for p in paths) and refcat.exists():
            print(f"reusing {len(paths)} frames in {incoming}")
            return paths, refcat, manifest["on_frame"], specs
    shutil.rmtree(incoming, ignore_errors=True)
    incoming.mkdir(parents=True)
    write_refcat(make_bench_field(setup), refcat)
    started = time.perf_counter()
    # Two processes (this machine has 2 cores); all of it is over before any timing starts.
    with ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("spawn")) as pool:
        done = list(pool.map(_render, [(setup, spec, str(p)) for spec, p in zip(specs, paths, strict=True)]))
    on_frame = [n for _, n, _ in done]
    print(
        f"simulated {len(paths)} frames in {time.perf_counter() - started:.1f} s "
        f"({median([s for *_, s in done]):.1f} s each, 2 processes)"
    )
    manifest_path.write_text(json.dumps({"setup": setup.as_dict(), "on_frame": on_frame}, indent=1))
    return paths, refcat, on_frame, specs


# --------------------------------------------------------------------------------------------------------
# lcowatch runs
# --------------------------------------------------------------------------------------------------------


def config_raw(state_dir: Path, incoming: Path, refcat: Path) -> dict[str, Any]:
    return {
        "watch": {"paths": [str(incoming)]},
        "state_dir": str(state_dir),
        "catalog": {"source": "file"},
        "targets": {TARGET: {"ra": RA, "dec": DEC, "refcat": str(refcat)}},
    }


def make_config(state_dir: Path, incoming: Path, refcat: Path) -> Config:
    return parse(config_raw(state_dir, incoming, refcat), state_dir.parent)


@dataclass
class FrameRun:
    path: Path
    state: str
    reason: str | None
    wall: float
    seconds: dict[str, float]
    cpu: float = float("nan")
    sys: float = float("nan")  # of which kernel time (page faults of fresh full-frame arrays, file reads)

    @property
    def stages(self) -> float:
        return sum(self.seconds.values())


def process(pipeline: Pipeline, path: Path) -> FrameRun:
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    outcome: Outcome = pipeline.process_path(path)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return FrameRun(path, outcome.state, outcome.reason, wall, dict(outcome.seconds), user + system, system)


def run_pipeline(config: Config, paths: Sequence[Path]) -> list[FrameRun]:
    conn = connect(config.state_dir)
    try:
        pipeline = Pipeline(config, conn)
        return [process(pipeline, p) for p in paths]
    finally:
        conn.close()


def seed_state(config: Config, template_path: Path) -> FrameRun:
    """A state_dir holding the template frame only (processed, untimed), copied for later runs."""
    shutil.rmtree(config.state_dir, ignore_errors=True)
    run = run_pipeline(config, [template_path])[0]
    if run.state != "done":
        raise SystemExit(f"template frame ended {run.state}: {run.reason}")
    return run


def copy_state(seed: Path, destination: Path) -> None:
    shutil.rmtree(destination, ignore_errors=True)
    shutil.copytree(seed, destination)


def check_done(runs: Sequence[FrameRun], what: str) -> None:
    bad = [r for r in runs if r.state != "done"]
    for r in bad:
        print(f"  WARNING ({what}): {r.path.name} ended {r.state}: {r.reason}")


# --------------------------------------------------------------------------------------------------------
# Floors and baseline
# --------------------------------------------------------------------------------------------------------


def time_floor(path: Path, planes: Sequence[str]) -> float:
    started = time.perf_counter()
    with fits.open(path) as hdul:
        for name in planes:
            data = hdul[name].data
            assert data is not None and data.ndim == 2
    return time.perf_counter() - started


@dataclass
class ReadTiming:
    content: float  # read bytes + sha256
    decode: float  # read_frame: FITS open, decompress SCI/BPM, header, metadata, BJD
    bjd: float  # one BJD_TDB computation alone (part of decode)


def time_lcowatch_read(path: Path, config: Config) -> ReadTiming:
    started = time.perf_counter()
    content, sha = read_content(path)
    read = time.perf_counter()
    frame = read_frame(path, content, sha, config)
    decoded = time.perf_counter()
    target = config.targets[TARGET]
    assert target.ra is not None and target.dec is not None
    bjd_tdb(frame.meta.mjd_mid, target.ra, target.dec, site_location(frame.header))
    bjd = time.perf_counter() - decoded
    return ReadTiming(read - started, decoded - read, bjd)


@dataclass
class BaselineRun:
    read: float
    extract: float
    photometry: float
    positions: int

    @property
    def total(self) -> float:
        return self.read + self.extract + self.photometry


def baseline_frame(path: Path) -> BaselineRun:
    """What a plain script does: astropy, sep background + extraction, photutils with an annulus median."""
    import sep
    from astropy.stats import SigmaClip
    from photutils.aperture import ApertureStats, CircularAnnulus, CircularAperture, aperture_photometry

    started = time.perf_counter()
    with fits.open(path) as hdul:
        header = hdul["SCI"].header
        data = np.asarray(hdul["SCI"].data, dtype=np.float32)  # native byte order for sep
    read = time.perf_counter()
    background = sep.Background(data)
    subtracted = data - background
    sep.set_extract_pixstack(3_000_000)
    objects = sep.extract(subtracted, 5.0, err=background.globalrms, minarea=5)
    extracted = time.perf_counter()
    fwhm = float(header["L1FWHM"]) / float(header["PIXSCALE"])
    positions = np.column_stack([objects["x"], objects["y"]])
    apertures = [CircularAperture(positions, r=k * fwhm) for k in (1.0, 1.5, 2.5)]
    annulus = CircularAnnulus(positions, r_in=4.0 * fwhm, r_out=7.0 * fwhm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # all-masked annuli at the edges
        local = ApertureStats(data, annulus, sigma_clip=SigmaClip(sigma=3.0, maxiters=3)).median
        table = aperture_photometry(data, apertures)
        fluxes = [np.asarray(table[f"aperture_sum_{k}"]) - local * ap.area for k, ap in enumerate(apertures)]
    assert len(fluxes[0]) == len(positions)
    return BaselineRun(read - started, extracted - read, time.perf_counter() - extracted, len(positions))


# --------------------------------------------------------------------------------------------------------
# Throughput: worker processes
# --------------------------------------------------------------------------------------------------------


def _throughput_worker(
    raw: dict[str, Any], warm_raw: dict[str, Any], base: str, paths: list[str], barrier: Any, results: Any
) -> None:
    quiet_logs()
    # Warm-up, untimed: the worker's first frame through a scratch copy of the seed state, so one-time costs
    # (imports inside functions, astropy's IERS table parse for BJD_TDB) are paid before the clock starts,
    # as a long-running daemon pays them once.
    warm_config = parse(warm_raw, Path(base))
    warm = run_pipeline(warm_config, [Path(paths[0])])[0]
    config = parse(raw, Path(base))
    conn = connect(config.state_dir)
    pipeline = Pipeline(config, conn)
    barrier.wait(timeout=300)
    start = time.monotonic()
    runs = [process(pipeline, Path(p)) for p in paths]
    end = time.monotonic()
    conn.close()
    results.put({
        "start": start, "end": end, "rss_mb": max_rss_mb(), "warm": warm.wall,
        "runs": [(r.path.name, r.state, r.reason, r.wall, r.seconds) for r in runs],
    })  # fmt: skip


@dataclass
class Throughput:
    workers: int
    frames: int
    seconds: float
    rss_mb: list[float]
    per_frame: list[float]
    steps: list[dict[str, float]]
    warm: list[float]

    @property
    def fps(self) -> float:
        return self.frames / self.seconds


def run_throughput(
    workers: int, paths: Sequence[Path], seed_dir: Path, workdir: Path, incoming: Path, refcat: Path
) -> Throughput:
    """``workers`` spawned processes, each its own Pipeline and connection on one shared state_dir (a fresh copy
    of the seed state); frames dealt round-robin. The clock starts when every worker is warm and ready."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(workers)
    results = ctx.Queue()
    state = workdir / f"tp{workers}-state"
    copy_state(seed_dir, state)
    raw = config_raw(state, incoming, refcat)
    shares = [[str(p) for p in paths[w::workers]] for w in range(workers)]
    procs = []
    for w, share in enumerate(shares):
        warm_state = workdir / f"tp{workers}-warm{w}-state"
        copy_state(seed_dir, warm_state)
        warm_raw = config_raw(warm_state, incoming, refcat)
        worker_args = (raw, warm_raw, str(workdir), share, barrier, results)
        procs.append(ctx.Process(target=_throughput_worker, args=worker_args))
    for proc in procs:
        proc.start()
    got = [results.get(timeout=1800) for _ in procs]
    for proc in procs:
        proc.join()
        if proc.exitcode != 0:
            raise SystemExit(f"throughput worker failed with exit code {proc.exitcode}")
    seconds = max(g["end"] for g in got) - min(g["start"] for g in got)
    runs = [run for g in got for run in g["runs"]]
    for name, end_state, reason, *_ in runs:
        if end_state != "done":
            print(f"  WARNING (throughput): {name} ended {end_state}: {reason}")
    return Throughput(
        workers,
        len(runs),
        seconds,
        [g["rss_mb"] for g in got],
        [r[3] for r in runs],
        [r[4] for r in runs],
        [g["warm"] for g in got],
    )


# --------------------------------------------------------------------------------------------------------
# Scale: a light curve that already holds many points
# --------------------------------------------------------------------------------------------------------


def add_history(state_dir: Path, template_sha: str, n_frames: int) -> dict[str, int]:
    """Insert ``n_frames`` earlier frames of the target into files, frames and points (one row per aperture),
    copying the template frame's rows (so the schema of the day is followed) with new keys and times."""
    conn = sqlite3.connect(state_dir / LEDGER_NAME)
    counts: dict[str, int] = {}
    try:
        conn.execute("BEGIN")
        for table in ("files", "frames", "points"):
            cursor = conn.execute(f"SELECT * FROM {table} WHERE sha256 = ?", (template_sha,))
            columns = [d[0] for d in cursor.description]
            rows = cursor.fetchall()
            if not rows:
                raise SystemExit(f"scale check: the template has no row in {table}")
            index = {c: i for i, c in enumerate(columns)}
            mjd = rows[0][index["mjd"]] if "mjd" in index else 61000.0
            new_rows = []
            for i in range(n_frames):
                sha = hashlib.sha256(f"history {i}".encode()).hexdigest()
                name = f"history-{i:05d}-e91.fits.fz"
                changes = {"sha256": sha, "file": name, "path": f"/nowhere/{name}", "mjd": mjd - (n_frames - i) * 0.01}
                for row in rows:
                    values = list(row)
                    for key, value in changes.items():
                        if key in index:
                            values[index[key]] = value
                    new_rows.append(values)
            placeholders = ", ".join("?" * len(columns))
            conn.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({placeholders})", new_rows)
            counts[table] = len(new_rows)
        conn.execute("COMMIT")
    finally:
        conn.close()
    return counts


# --------------------------------------------------------------------------------------------------------
# The command: start-up, and the marginal cost of a frame with start-up cancelled out
# --------------------------------------------------------------------------------------------------------


def time_command(args: Sequence[str]) -> float:
    """Wall seconds of ``python -m lcowatch ARGS`` in a fresh process; it must exit 0."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lcowatch", *args], check=True, capture_output=True)
    return time.perf_counter() - started


def time_process_command(workdir: Path, refcat: Path, paths: Sequence[Path], label: str) -> float:
    """Wall seconds of ``lcowatch process`` on ``paths`` (copied into their own folder) with a fresh state."""
    folder = workdir / f"command-{label}"
    shutil.rmtree(folder, ignore_errors=True)
    incoming = folder / "in"
    incoming.mkdir(parents=True)
    for path in paths:
        os.link(path, incoming / path.name)
    config = folder / "config.yaml"
    config.write_text(json.dumps(config_raw(folder / "state", incoming, refcat)))  # JSON is YAML
    return time_command(["process", "--config", str(config), str(incoming)])


# --------------------------------------------------------------------------------------------------------
# Profile
# --------------------------------------------------------------------------------------------------------


def short_location(filename: str, line: int, func: str) -> str:
    if filename == "~":
        return func
    parts = Path(filename).parts
    for anchor in ("site-packages", "lib", "lcowatch"):
        if anchor in parts:
            k = len(parts) - 1 - parts[::-1].index(anchor)
            rest = parts[k + 1 :] if anchor != "lcowatch" else parts[k:]
            return f"{'/'.join(rest)}:{line}({func})"
    return f"{Path(filename).name}:{line}({func})"


def print_profile(profiler: cProfile.Profile, top: int) -> None:
    stats = pstats.Stats(profiler, stream=io.StringIO())
    entries = stats.stats  # type: ignore[attr-defined]
    total = max((ct for (_, _, _, ct, _) in entries.values()), default=0.0)
    print(f"  total {total:.3f} s under process_path")

    def show(title: str, key: Callable[[Any], float], keep: Callable[[tuple[str, int, str]], bool]) -> None:
        print(f"\n  {title}")
        chosen = sorted(((loc, v) for loc, v in entries.items() if keep(loc)), key=key, reverse=True)[:top]
        rows = [[f"{v[3]:.3f}", f"{v[2]:.3f}", f"{v[1]}", short_location(*loc)] for loc, v in chosen]
        print_table(rows, ["cumtime", "tottime", "ncalls", "function"], indent="    ", align="rrrl")

    show(f"top {top} by own time (tottime)", lambda item: item[1][2], lambda loc: True)
    show(
        f"top {top} lcowatch functions by cumulative time", lambda item: item[1][3], lambda loc: "/lcowatch/" in loc[0]
    )


# --------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------


@dataclass
class Summary:
    rows: list[list[str]] = field(default_factory=list)

    def add(self, what: str, value: str, target: str = "", ok: bool | None = None) -> None:
        self.rows.append([what, value, target, "" if ok is None else ("yes" if ok else "NO")])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="3 frames of 2048x2048 (750 stars): under a minute")
    parser.add_argument("--frames", type=int, help="number of frames (default 6; --quick 3); the first is the template")
    parser.add_argument("--size", type=int, help="frame side in pixels (default 4096; --quick 2048)")
    parser.add_argument("--stars", type=int, help="stars on the frame (default 3000, --quick 750: same density)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the observing conditions and noise")
    parser.add_argument("--workdir", type=Path, help="keep frames and state here (frames are reused when they match)")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--no-throughput", action="store_true")
    parser.add_argument("--no-scale", action="store_true")
    parser.add_argument("--no-command", action="store_true", help="skip timing the lcowatch command itself")
    parser.add_argument("--profile", action="store_true", help="also cProfile one non-template frame's process_path")
    parser.add_argument("--top", type=int, default=15, help="rows of the profile (default 15)")
    parser.add_argument(
        "--wait-idle",
        type=float,
        help="before each timed section wait up to this many seconds for "
        "other processes to leave the CPUs alone (default 120; --quick 0)",
    )
    args = parser.parse_args(argv)

    quick = args.quick
    setup = Setup(
        frames=args.frames or (3 if quick else 6),
        size=args.size or (2048 if quick else 4096),
        stars=args.stars or (750 if quick else 3000),
        seed=args.seed,
    )
    if args.wait_idle is None:
        args.wait_idle = 0.0 if quick else 120.0
    if setup.frames < 2:
        parser.error("--frames must be at least 2 (a template and one frame)")
    quiet_logs()
    print("lcowatch pipeline speed benchmark")
    mode = "QUICK (smaller and fewer frames: figures are NOT comparable to the 4096x4096 targets)" if quick else "full"
    print(f"mode: {mode}")
    print(
        f"frames: {setup.frames} x {setup.size}x{setup.size} fpack (.fits.fz, RICE, SCI+BPM+ERR), "
        f"{setup.stars} stars in a square of the frame's size, FWHM 1.9-2.15\", offsets of tens of px; "
        f"frame 1 is the template"
    )
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"numpy {np.__version__}"
    )

    own_tmp = None
    if args.workdir is not None:
        workdir = args.workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        own_tmp = tempfile.TemporaryDirectory(prefix="lcowatch-bench-")
        workdir = Path(own_tmp.name)
    print(f"workdir: {workdir}")
    print("load average at start: " + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    try:
        return run(args, setup, workdir)
    finally:
        if own_tmp is not None:
            own_tmp.cleanup()


def run(args: argparse.Namespace, setup: Setup, workdir: Path) -> int:
    summary = Summary()
    load = OtherLoad()

    def begin(title: str) -> None:
        section(title)
        wait_for_quiet(args.wait_idle)
        load.start()

    paths, refcat, on_frame, _ = prepare_frames(setup, workdir)
    incoming = paths[0].parent
    print(f"stars on each frame: {', '.join(str(n) for n in on_frame)}; reference catalog {refcat.name}")
    rest = paths[1:]

    # ---- floors and lcowatch's read, before any processing
    begin("read floor and lcowatch's read (per file, before processing; files are in the page cache)")
    floor = [time_floor(p, ["SCI"]) for p in paths]
    floor_all = [time_floor(p, ["SCI", "BPM", "ERR"]) for p in paths]
    config = make_config(workdir / "state", incoming, refcat)
    reads = [time_lcowatch_read(p, config) for p in paths]
    print_table(
        [
            [p.name, fmt_s(f), fmt_s(fa), fmt_s(r.content), fmt_s(r.decode), fmt_s(r.bjd)]
            for p, f, fa, r in zip(paths, floor, floor_all, reads, strict=True)
        ],
        ["file", "floor SCI", "astropy SCI+BPM+ERR", "read+sha256", "read_frame", "(of which BJD)"],
    )
    floor_med = median(floor)
    read_med = median([r.content + r.decode for r in reads])
    print(f"  floor (astropy open + SCI .data): median {floor_med:.3f} s; all three planes {median(floor_all):.3f} s")
    print(f"  lcowatch read (read_content + read_frame): median {read_med:.3f} s = {read_med / floor_med:.1f}x floor")
    cold = reads[0].decode - median([r.decode for r in reads[1:]])
    print(
        f"  the first read_frame of the process took {cold:.2f} s more than the others: a one-time cost "
        "(astropy parses its IERS tables for the first BJD_TDB)"
    )
    load.stop("read")

    # ---- pass 1 of a batch (process, reprocess): the survey of each frame's image quality
    begin("pass 1 of a batch: survey_frame per file (read, and quality on the central square)")
    surveys = []
    for p in paths:
        started = time.perf_counter()
        surveyed = survey_frame(p, config)
        surveys.append(time.perf_counter() - started)
        assert surveyed is not None, f"{p.name} could not be surveyed"
    survey_med = median(surveys[1:])
    print(f"  survey: median {survey_med:.3f} s per frame ({SURVEY_SIZE} px square), paid once per frame of a batch")
    summary.add("batch pass 1 (survey), median per frame", f"{survey_med:.3f} s")
    load.stop("survey")

    # ---- lcowatch, in process, one worker, fresh state
    begin("lcowatch: Pipeline.process_path, one worker, in this process, fresh state_dir")
    shutil.rmtree(config.state_dir, ignore_errors=True)
    runs = run_pipeline(config, paths)
    rss_lcowatch = max_rss_mb()
    check_done(runs, "in-process run")
    steps = ordered_steps({name for r in runs for name in r.seconds})
    rows = []
    for k, (r, rd) in enumerate(zip(runs, reads, strict=True)):
        role = "template" if k == 0 else "frame"
        rows.append(
            [
                r.path.name,
                role,
                r.state,
                fmt_s(r.wall),
                fmt_s(r.cpu),
                fmt_s(r.sys),
                fmt_s(rd.content + rd.decode),
                fmt_s(r.wall - r.stages),
                *(fmt_s(r.seconds.get(s, float("nan"))) for s in steps),
            ]
        )
    print_table(rows, ["file", "role", "state", "end-to-end", "cpu", "sys", "read*", "wall-stages", *steps])
    print("  read* = read_content + read_frame timed separately before processing (process_path repeats it);")
    print("  wall-stages = end-to-end minus the stages' own seconds: read, hash, ledger bookkeeping, logging;")
    print("  cpu = CPU seconds of this process during process_path (less sensitive to busy neighbours), of which")
    print("  sys = kernel time: mostly page faults of freshly allocated full-frame arrays.")

    done_rest = [r for r in runs[1:] if r.state == "done"] or runs[1:]
    e2e = median([r.wall for r in done_rest])
    template_wall = runs[0].wall
    print("\n  median seconds per step over the non-template frames:")
    step_rows = [
        ["read (read_content + read_frame)", fmt_s(median([r.content + r.decode for r in reads[1:]]))],
        ["  of which read bytes + sha256", fmt_s(median([r.content for r in reads[1:]]))],
        ["  of which read_frame (decompress SCI/BPM, header, BJD)", fmt_s(median([r.decode for r in reads[1:]]))],
    ]
    step_rows += [[s, fmt_s(median([r.seconds[s] for r in done_rest if s in r.seconds]))] for s in steps]
    step_rows.append(["wall - stages (read, hash, ledger, log)", fmt_s(median([r.wall - r.stages for r in done_rest]))])
    step_rows.append(["end to end (wall clock around process_path)", fmt_s(e2e)])
    step_rows.append(["end to end, CPU seconds", fmt_s(median([r.cpu for r in done_rest]))])
    step_rows.append(["  of which kernel (sys) seconds", fmt_s(median([r.sys for r in done_rest]))])
    print_table(step_rows, ["step", "seconds"], indent="    ")
    print(f"  template frame (first, includes one-time costs): {template_wall:.3f} s")
    print(f"  peak RSS of this process after the run (VmHWM): {rss_lcowatch:.0f} MB")
    load.stop("lcowatch")

    summary.add("read+decompress floor: astropy open + SCI .data", f"{floor_med:.3f} s")
    summary.add("lcowatch read: read_content + read_frame", f"{read_med:.3f} s")
    summary.add("lcowatch end to end, template frame", f"{template_wall:.3f} s")
    summary.add(
        "lcowatch end to end, median other frames",
        f"{e2e:.3f} s",
        f"<= {TARGET_SECONDS:g} s",
        e2e <= TARGET_SECONDS if not args.quick else None,
    )
    summary.add("  CPU seconds, median other frames", f"{median([r.cpu for r in done_rest]):.3f} s")
    summary.add("    of which kernel (sys)", f"{median([r.sys for r in done_rest]):.3f} s")
    summary.add(
        "  end to end / floor",
        f"{e2e / floor_med:.1f}x",
        f"<= {TARGET_FLOOR_RATIO:g}x",
        e2e / floor_med <= TARGET_FLOOR_RATIO if not args.quick else None,
    )
    for s in steps:
        summary.add(f"  step {s} (median)", f"{median([r.seconds[s] for r in done_rest if s in r.seconds]):.3f} s")
    summary.add(
        "peak RSS, in-process run (VmHWM)",
        f"{rss_lcowatch:.0f} MB",
        f"<= {TARGET_RSS_MB:.0f} MB",
        rss_lcowatch <= TARGET_RSS_MB if not args.quick else None,
    )

    # ---- baseline
    if not args.no_baseline:
        begin("plain baseline, same process, same files: astropy + sep + photutils ApertureStats annulus median")
        base = [baseline_frame(p) for p in paths]
        print_table(
            [
                [p.name, fmt_s(b.read), fmt_s(b.extract), fmt_s(b.photometry), fmt_s(b.total), str(b.positions)]
                for p, b in zip(paths, base, strict=True)
            ],
            ["file", "astropy read", "sep bkg+extract", "photutils 3 ap + annulus", "total", "positions"],
        )
        base_med = median([b.total for b in base[1:]])
        sep_floor = median([b.read + b.extract for b in base[1:]])
        print(
            f"  baseline median (frames 2..): {base_med:.3f} s; read + sep background + extract alone {sep_floor:.3f} s"
        )
        print(
            f"  lcowatch / baseline: {e2e / base_med:.2f}x (lcowatch measures the target and up to "
            f"{config.photometry.max_field_stars} field stars; the baseline every detection)"
        )
        summary.add("baseline s/frame (astropy+sep+photutils)", f"{base_med:.3f} s")
        summary.add("  baseline read + sep bkg + extract alone", f"{sep_floor:.3f} s")
        summary.add("  lcowatch end to end / (read + sep bkg + extract)", f"{e2e / sep_floor:.2f}x")
        ratio = e2e / base_med
        summary.add("  lcowatch / baseline", f"{ratio:.2f}x", f"< {TARGET_BASELINE_RATIO:g}x",
                    ratio < TARGET_BASELINE_RATIO if not args.quick else None)  # fmt: skip
        print(f"  peak RSS of this process after the baseline: {max_rss_mb():.0f} MB")
        load.stop("baseline")

    # ---- seed state for the multi-process and scale runs: the template frame only
    seed_dir = workdir / "seed-state"
    seed_config = make_config(seed_dir, incoming, refcat)
    seed_run = None
    if not (args.no_throughput and args.no_scale and not args.profile):
        seed_run = seed_state(seed_config, paths[0])

    # ---- throughput
    if not args.no_throughput:
        begin("throughput: worker processes (spawned), one shared state_dir (SQLite WAL), template already made")
        tp_paths = rest[: len(rest) - len(rest) % 2]  # an even count, so two workers get equal shares
        if len(tp_paths) < 2:
            print("  skipped: needs at least 3 frames")
        else:
            print(
                f"  {len(tp_paths)} non-template frames; each run starts from a copy of a state_dir holding only "
                f"the template; frames dealt round-robin; clock from the moment all workers are ready"
            )
            results: dict[int, Throughput] = {}
            for workers in (1, 2):
                results[workers] = tp = run_throughput(workers, tp_paths, seed_dir, workdir, incoming, refcat)
                print(
                    f"  {workers} worker(s): {tp.frames} frames in {tp.seconds:.2f} s = {tp.fps:.3f} frames/s; "
                    f"median {median(tp.per_frame):.3f} s per frame; peak RSS per worker "
                    f"{', '.join(f'{m:.0f}' for m in tp.rss_mb)} MB; warm-up frame "
                    f"{', '.join(f'{w:.2f}' for w in tp.warm)} s (untimed, first frame of a fresh process)"
                )
            tp_steps = ordered_steps({n for tp in results.values() for sec in tp.steps for n in sec})
            print_table(
                [
                    [
                        f"{w} worker(s)",
                        fmt_s(median(tp.per_frame)),
                        *(fmt_s(median([sec.get(s, float("nan")) for sec in tp.steps])) for s in tp_steps),
                    ]
                    for w, tp in results.items()
                ],
                ["median per frame", "end-to-end", *tp_steps],
            )
            ratio = results[2].fps / results[1].fps
            print(f"  2 workers / 1 worker: {ratio:.2f}x")
            load.stop("throughput")
            summary.add("throughput, 1 worker", f"{results[1].fps:.3f} frames/s")
            summary.add("throughput, 2 workers", f"{results[2].fps:.3f} frames/s")
            summary.add(
                "  2 workers / 1 worker",
                f"{ratio:.2f}x",
                f">= {TARGET_2W_RATIO:g}x",
                ratio >= TARGET_2W_RATIO if not args.quick else None,
            )
            worker_rss = max(results[1].rss_mb + results[2].rss_mb)
            summary.add(
                "peak RSS per worker process (VmHWM)",
                f"{worker_rss:.0f} MB",
                f"<= {TARGET_RSS_MB:.0f} MB",
                worker_rss <= TARGET_RSS_MB if not args.quick else None,
            )

    # ---- the command
    if not args.no_command:
        begin("the command: lcowatch --version, and lcowatch process on 1 frame vs all (start-up cancelled out)")
        startup = median([time_command(["--version"]) for _ in range(3)])
        one = time_process_command(workdir, refcat, paths[:1], "one")
        every = time_process_command(workdir, refcat, paths, "all")
        marginal = (every - one) / (len(paths) - 1)
        print(f"  lcowatch --version: {startup:.2f} s (median of 3)")
        print(f"  lcowatch process: 1 frame {one:.2f} s, {len(paths)} frames {every:.2f} s")
        print(f"  marginal cost of a frame: {marginal:.3f} s; fixed cost of a run: {one - marginal:.2f} s")
        load.stop("command")
        summary.add("lcowatch --version (fresh process)", f"{startup:.2f} s", "< 1 s", startup < 1.0)
        summary.add("lcowatch process, marginal s/frame", f"{marginal:.3f} s")
        summary.add("  fixed cost of a process run", f"{one - marginal:.2f} s")

    # ---- scale
    if not args.no_scale:
        assert seed_run is not None
        begin(f"scale: a target with {SCALE_FRAMES:,} frames already in its light curve vs an empty one")
        sc_paths = rest[: min(3, len(rest))]
        empty_dir, full_dir = workdir / "scale-empty-state", workdir / "scale-full-state"
        copy_state(seed_dir, empty_dir)
        copy_state(seed_dir, full_dir)
        template_sha = hashlib.sha256(paths[0].read_bytes()).hexdigest()
        started = time.perf_counter()
        counts = add_history(full_dir, template_sha, SCALE_FRAMES)
        print(
            f"  inserted rows by SQL in {time.perf_counter() - started:.1f} s: "
            + ", ".join(f"{t} {n:,}" for t, n in counts.items())
            + " (copies of the template's rows, earlier times; sources and photometry rows are left out:"
            " they are only touched by the new frame's own key)"
        )
        scale: dict[str, list[FrameRun]] = {}
        for label, state in (("empty", empty_dir), ("10k", full_dir)):
            scale[label] = run_pipeline(make_config(state, incoming, refcat), sc_paths)
            check_done(scale[label], f"scale {label}")
        sc_steps = ordered_steps({n for rs in scale.values() for r in rs for n in r.seconds})
        rows = []
        for label, rs in scale.items():
            rows.append(
                [
                    label,
                    fmt_s(median([r.wall for r in rs])),
                    *(fmt_s(median([r.seconds.get(s, float("nan")) for r in rs])) for s in sc_steps),
                ]
            )
        print_table(rows, ["light curve", "end-to-end", *sc_steps])
        e_empty, e_full = (median([r.wall for r in scale[k]]) for k in ("empty", "10k"))
        s_empty, s_full = (median([r.seconds.get("store", 0.0) for r in scale[k]]) for k in ("empty", "10k"))
        print(
            f"  {len(sc_paths)} frames each; end to end {e_full / e_empty:.2f}x; store step {s_empty:.3f} -> "
            f"{s_full:.3f} s"
        )
        load.stop("scale")
        summary.add("scale: s/frame, empty light curve", f"{e_empty:.3f} s")
        summary.add(f"scale: s/frame, {SCALE_FRAMES:,} frames stored", f"{e_full:.3f} s")
        summary.add(
            "  with history / empty",
            f"{e_full / e_empty:.2f}x",
            f"<= {TARGET_SCALE_RATIO:g}x",
            e_full / e_empty <= TARGET_SCALE_RATIO,
        )
        summary.add("  store step, empty -> with history", f"{s_empty:.3f} -> {s_full:.3f} s")

    # ---- profile
    if args.profile:
        begin(f"profile: cProfile of process_path on one non-template frame ({rest[0].name})")
        state = workdir / "profile-state"
        copy_state(seed_dir, state)
        conn = connect(state)
        pipeline = Pipeline(make_config(state, incoming, refcat), conn)
        profiler = cProfile.Profile()
        profiler.enable()
        outcome = pipeline.process_path(rest[0])
        profiler.disable()
        conn.close()
        print(f"  outcome: {outcome.state}; stage seconds under the profiler: {outcome.seconds}")
        print_profile(profiler, args.top)
        load.stop("profile")

    # ---- summary
    section("summary" + (" (QUICK mode: smaller frames, targets not judged)" if args.quick else ""))
    print(
        f"  {setup.frames} frames of {setup.size}x{setup.size}, {setup.stars} stars; medians over the "
        f"non-template frames unless said"
    )
    busiest = max(load.sections, key=lambda item: item[1], default=("-", 0.0))
    summary.add(
        "other processes' CPU use, busiest section", f"{busiest[1]:.2f} cores ({busiest[0]})", "< 0.2", busiest[1] < 0.2
    )
    print_table(summary.rows, ["figure", "value", "target", "met"])
    print("load average at end: " + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
