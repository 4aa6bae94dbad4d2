#!/usr/bin/env python
"""How quickly ``lcowatch run`` turns a dropped file into a row, and how it copes with a backlog.

A plain script (no test runner). It runs the daemon as a real subprocess (``python -m lcowatch run``) on
temporary folders with simulated 256x256 LCO frames (fpack) of one field, calibrated against a local
reference catalog (no network), and measures:

1. drop-to-row latency for single frames: a frame is written under a temporary name in the watched
   folder and renamed into place; the clock stops when its row is in the ``frames`` table. Frames are
   dropped one at a time (the next after the previous row). Reported: median and 95th percentile, with
   ``watch.quiet_seconds`` (the floor of the latency: a file must be unchanged that long).
2. a backlog: N frames moved into the watched folder at once (one folder rename) while the daemon runs;
   reported: time to the first row, to the last row, frames per second, and the daemon's resident memory
   (VmRSS sampled as the backlog drains, and the peak VmHWM) from /proc.

Run ``python benchmarks/daemon_latency.py`` (20 single frames, a backlog of 1,000) or ``--quick``
(5 single frames, a backlog of 100). ``--workdir`` keeps the simulated frames for another run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from lcowatch.simulation.simulate import FrameSpec, lco_filename, make_field, write_frame, write_refcat

TARGET, RA, DEC = "BENCHFIELD", 150.0, 2.0


def simulate(folder: Path, count: int, start: int = 0) -> list[Path]:
    """``count`` fpack frames (cached in ``folder``), observation times 1 minute apart."""
    folder.mkdir(parents=True, exist_ok=True)
    field = make_field(TARGET, RA, DEC, nstars=120, seed=1, box_arcmin=1.8, n_bright=1, min_sep_arcsec=3.0)
    refcat = folder / "refcat.csv"
    if not refcat.exists():
        write_refcat(field, refcat)
    paths = []
    for i in range(start, start + count):
        spec = FrameSpec(filter="rp", mjd_start=61000.2 + i / 1440.0, shape=(256, 256), seed=i, frame_number=i % 10000)
        path = folder / f"{i:06d}" / lco_filename(spec, "fz")
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_name(path.name + ".part")
            write_frame(tmp, field, spec, compress="fz")
            os.replace(tmp, path)
        paths.append(path)
    return paths


def write_config(folder: Path, refcat: Path, quiet_seconds: float) -> Path:
    (folder / "in").mkdir(parents=True, exist_ok=True)
    document = {
        "watch": {"paths": ["in"], "quiet_seconds": quiet_seconds},
        "state_dir": "state",
        "catalog": {"source": "file"},
        "targets": {TARGET: {"ra": RA, "dec": DEC, "refcat": str(refcat)}},
        "log_level": "info",
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


class Daemon:
    def __init__(self, config: Path) -> None:
        self.config = config
        self.log = open(config.parent / "daemon.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lcowatch", "run", "--config", str(config)],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=config.parent,
        )  # fmt: skip
        self.db = config.parent / "state" / "lcowatch.sqlite"
        wait(lambda: self.db.exists() and self.rows() >= 0, 60, "the daemon to start")

    def rows(self) -> int:
        return len(self.shas())

    def shas(self) -> set[str]:
        try:
            conn = sqlite3.connect(self.db, timeout=30)
            try:
                return {row[0] for row in conn.execute("SELECT sha256 FROM frames")}
            finally:
                conn.close()
        except sqlite3.OperationalError:
            return set()

    def memory(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) in MB."""
        values = {}
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = int(rest.split()[0]) // 1024
        return values["VmRSS"], values["VmHWM"]

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(120)
        self.log.close()
        return code


def wait(condition, timeout: float, what: str, interval: float = 0.01):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(interval)
    return value


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency(workdir: Path, frames: list[Path], refcat: Path, quiet_seconds: float, warmup: Path) -> list[float]:
    run = workdir / "latency"
    shutil.rmtree(run, ignore_errors=True)
    config = write_config(run, refcat, quiet_seconds)
    daemon = Daemon(config)
    seconds = []
    try:
        for i, frame in enumerate([warmup, *frames]):  # the first frame makes the template: not counted
            target = run / "in" / frame.name
            tmp = run / "in" / (frame.name + ".part")
            shutil.copyfile(frame, tmp)
            sha = sha256(tmp)
            started = time.monotonic()
            os.replace(tmp, target)
            wait(lambda sha=sha: sha in daemon.shas(), 120, f"the row of {frame.name}", interval=0.005)
            if i:
                seconds.append(time.monotonic() - started)
    finally:
        daemon.stop()
    return seconds


def backlog(workdir: Path, frames: list[Path], refcat: Path, quiet_seconds: float) -> dict[str, object]:
    run = workdir / "backlog"
    shutil.rmtree(run, ignore_errors=True)
    config = write_config(run, refcat, quiet_seconds)
    staging = run / "staging"
    staging.mkdir()
    for frame in frames:
        os.link(frame, staging / frame.name) if _same_device(frame, staging) else shutil.copyfile(
            frame, staging / frame.name
        )
    daemon = Daemon(config)
    time.sleep(1.0)
    idle_rss, _ = daemon.memory()
    samples: list[tuple[int, int]] = []
    started = time.monotonic()
    os.replace(staging, run / "in" / "night")
    first = wait(lambda: daemon.rows() > 0 and time.monotonic(), 300, "the first row")
    marks = [int(len(frames) * f) for f in (0.1, 0.25, 0.5, 0.75, 1.0)]
    for mark in marks:
        wait(lambda mark=mark: daemon.rows() >= mark, 3600, f"{mark} rows", interval=0.05)
        samples.append((mark, daemon.memory()[0]))
    finished = time.monotonic()
    _, peak = daemon.memory()
    code = daemon.stop()
    return {
        "first_row_s": first - started,
        "all_rows_s": finished - started,
        "frames_per_s": len(frames) / (finished - started),
        "idle_rss_mb": idle_rss,
        "rss_mb_at": samples,
        "peak_mb": peak,
        "exit_code": code,
    }


def _same_device(a: Path, b: Path) -> bool:
    return a.stat().st_dev == b.stat().st_dev


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 single frames and a backlog of 100")
    parser.add_argument("--singles", type=int, help="single frames for the latency (default 20; quick 5)")
    parser.add_argument("--frames", type=int, help="frames in the backlog (default 1000; quick 100)")
    parser.add_argument("--quiet-seconds", type=float, default=2.0, help="watch.quiet_seconds (default 2.0)")
    parser.add_argument("--workdir", type=Path, help="keep simulated frames here (default: a temporary folder)")
    args = parser.parse_args()
    singles = args.singles or (5 if args.quick else 20)
    count = args.frames or (100 if args.quick else 1000)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lcowatch-bench-"))
    print(f"lcowatch daemon benchmark: python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.2f}; workdir {workdir}")  # fmt: skip

    started = time.monotonic()
    frames = simulate(workdir / "frames", count + singles + 1)
    refcat = workdir / "frames" / "refcat.csv"
    print(f"simulated {len(frames)} frames of 256x256 (fpack) in {time.monotonic() - started:.1f} s")

    seconds = latency(workdir, frames[count + 1 :], refcat, args.quiet_seconds, warmup=frames[count])
    print(f"\n1. drop-to-row latency, {len(seconds)} single frames, quiet_seconds {args.quiet_seconds:g}:")
    print(f"   median {statistics.median(seconds):.3f} s   p95 {percentile(seconds, 95):.3f} s   "
          f"min {min(seconds):.3f} s   max {max(seconds):.3f} s")  # fmt: skip
    print(f"   (minus the quiet period: median {statistics.median(seconds) - args.quiet_seconds:.3f} s)")

    result = backlog(workdir, frames[:count], refcat, args.quiet_seconds)
    print(f"\n2. backlog of {count} frames moved in at once:")
    print(f"   first row after {result['first_row_s']:.2f} s, all rows after {result['all_rows_s']:.1f} s: "
          f"{result['frames_per_s']:.1f} frames/s")  # fmt: skip
    rss = ", ".join(f"{n}: {mb} MB" for n, mb in result["rss_mb_at"])  # type: ignore[attr-defined]
    print(f"   daemon memory: idle {result['idle_rss_mb']} MB; RSS by rows done {rss}; peak (VmHWM) "
          f"{result['peak_mb']} MB; exit code {result['exit_code']}")  # fmt: skip
    print(f"   load average at the end {os.getloadavg()[0]:.2f}")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
