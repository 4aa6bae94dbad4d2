#!/usr/bin/env python
"""How soon ``lcowatch run`` is up under systemd with a backlog of ``.fits.gz`` frames and gzip bombs waiting.

A plain script (no test runner). It writes one simulated 4096x4096 Sinistro frame as ``.fits.gz`` and
hard-links it under N names into a watched folder (the readiness check inflates every one of them, as it
would N different frames; only the first is measured, the rest are the same content), adds two gzip
bombs (a header claiming 10^12 pixels; and a valid primary HDU followed by HDUs of zeros, each within the
frame bound, a gigabyte in all), then starts the daemon as a real subprocess with a fake systemd notify
socket (``WATCHDOG_USEC`` of 2 s: a ping a second while it is healthy) and reports:

- seconds from launch to READY=1 (the shipped unit allows 120 s, ``TimeoutStartSec``);
- seconds to the end of the start-up checks (the ``backlog_checked`` log event) and until every file is
  finished in the ledger;
- the longest gap between watchdog pings until then (the unit's ``WatchdogSec`` is 60 s);
- the daemon's peak resident memory (VmHWM).

Run ``python benchmarks/startup_backlog.py`` (200 links) or ``--links 50``. ``--workdir`` keeps the frame.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import yaml
from astropy.io import fits

from lcowatch.simulation.simulate import FrameSpec, lco_filename, make_field, write_frame, write_refcat

TARGET, RA, DEC = "BENCHFIELD", 150.0, 2.0
WATCHDOG_USEC = 2_000_000


def make_frame(folder: Path) -> tuple[Path, Path]:
    """One 4k ``.fits.gz`` frame and the field's catalog (cached in ``folder``)."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = FrameSpec(filter="rp", mjd_start=61000.2, shape=(4096, 4096), pixscale=0.389, seed=1, frame_number=1)
    path, refcat = folder / lco_filename(spec, "gz"), folder / "refcat.csv"
    if not path.exists() or not refcat.exists():
        field = make_field(TARGET, RA, DEC, nstars=3000, box_arcmin=4096 * 0.389 / 60.0, seed=5, min_sep_arcsec=15.0)
        write_refcat(field, refcat)
        tmp = path.with_name(path.name + ".part")
        write_frame(tmp, field, spec, compress="gz")
        os.replace(tmp, path)
    return path, refcat


def write_bombs(folder: Path) -> list[Path]:
    claims = fits.Header({"SIMPLE": True, "BITPIX": 8, "NAXIS": 2, "NAXIS1": 10**6, "NAXIS2": 10**6})
    header_bomb = folder / "claims-a-terapixel.fits.gz"
    header_bomb.write_bytes(gzip.compress(claims.tostring().encode() + bytes(2880 * 100)))
    chain_bomb = folder / "chain-of-zeros.fits.gz"
    with gzip.open(chain_bomb, "wb", compresslevel=1) as out:
        out.write(fits.PrimaryHDU().header.tostring().encode())
        # 200 MB each, within a frame's bound
        cards = {
            "XTENSION": "IMAGE",
            "BITPIX": -64,
            "NAXIS": 2,
            "NAXIS1": 5000,
            "NAXIS2": 5000,
            "PCOUNT": 0,
            "GCOUNT": 1,
        }
        extension = fits.Header(cards)
        block = bytes(8 << 20)
        for _ in range(5):
            out.write(extension.tostring().encode())
            padded = -(-5000 * 5000 * 8 // 2880) * 2880
            for _ in range(padded // len(block)):
                out.write(block)
            out.write(bytes(padded % len(block)))
    return [header_bomb, chain_bomb]


class Notifications:
    """A fake systemd: records (monotonic time, message) of every datagram."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="lcwb"))
        self.path = self.folder / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self.running = True
        self.thread = threading.Thread(target=self._receive, daemon=True)
        self.thread.start()

    def _receive(self) -> None:
        while self.running:
            try:
                self.messages.append((time.monotonic(), self.sock.recv(65536).decode()))
            except TimeoutError:
                continue

    def times(self, field: str) -> list[float]:
        return [t for t, m in self.messages if field in m.split("\n")]

    def close(self) -> None:
        self.running = False
        self.thread.join(5)
        self.sock.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def peak_memory_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def finished(state: Path, notes: Notifications, bombs: int) -> bool:
    """The bombs are in quarantine, the frame is measured, and the daemon says it has nothing left (the
    links are the frame's content again: known by their hash, they add no row)."""
    try:
        with sqlite3.connect(state / "lcowatch.sqlite", timeout=5) as conn:
            counts = dict(conn.execute("SELECT state, COUNT(*) FROM files GROUP BY state").fetchall())
    except sqlite3.OperationalError:
        return False
    statuses = [m for _, m in notes.messages if m.startswith("STATUS=")]
    idle = bool(statuses) and statuses[-1].startswith("STATUS=0 queued, 0 waiting") and "working on" not in statuses[-1]
    return counts.get("quarantined", 0) == bombs and counts.get("done", 0) == 1 and idle


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--links", type=int, default=200, help="names the 4k .fits.gz frame is linked under")
    parser.add_argument("--workdir", type=Path, help="keep the simulated frame here")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lcowatch-startup-"))
    frame, refcat = make_frame(work / "frame")
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    watch = run / "in"
    watch.mkdir(parents=True)
    for n in range(args.links):
        os.link(frame, watch / f"{n:04d}-{frame.name}")
    bombs = write_bombs(watch)
    config = run / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "watch": {"paths": ["in"], "quiet_seconds": 1.0},
                "state_dir": "state",
                "catalog": {"source": "file"},
                "targets": {TARGET: {"ra": RA, "dec": DEC, "refcat": str(refcat)}},
                "log_level": "info",
            }
        )
    )
    print(f"frame: {frame.stat().st_size / 1e6:.1f} MB .fits.gz, linked {args.links} times; bombs: "
          + ", ".join(f"{b.name} {b.stat().st_size / 1e6:.1f} MB" for b in bombs))  # fmt: skip
    notes = Notifications()
    env = {**os.environ, "NOTIFY_SOCKET": str(notes.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    started = time.monotonic()
    with open(run / "daemon.log", "wb") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "lcowatch", "run", "--config", str(config)], stdout=log,
                                  stderr=subprocess.STDOUT, env=env, cwd=run)  # fmt: skip
    try:
        while not finished(run / "state", notes, len(bombs)):
            if daemon.poll() is not None:
                raise SystemExit(f"the daemon exited ({daemon.returncode}); see {run / 'daemon.log'}")
            time.sleep(0.2)
        done_at = time.monotonic()
        peak = peak_memory_mb(daemon.pid)
    finally:
        daemon.terminate()
        daemon.wait(60)
        notes.close()
    events = [json.loads(line) for line in (run / "daemon.log").read_text().splitlines() if line.startswith("{")]
    checked = next((e for e in events if e["event"] == "backlog_checked"), None)
    launched_wall = next(e for e in events if e["event"] == "daemon_starting")["timestamp"]
    ready = notes.times("READY=1")[0] - started
    pings = [started, *(t for t in notes.times("WATCHDOG=1") if t <= done_at)]
    gap = max((b - a for a, b in itertools.pairwise(pings)), default=float("nan"))
    print(f"READY after {ready:.2f} s (TimeoutStartSec=120)")
    if checked is not None:
        seconds = (datetime.fromisoformat(checked["timestamp"]) - datetime.fromisoformat(launched_wall)).total_seconds()
        print(f"start-up checks done {seconds:.1f} s after daemon_starting")
    print(f"every file finished after {done_at - started:.1f} s")
    print(f"longest gap between watchdog pings: {gap:.2f} s (WatchdogSec=60; pings every {WATCHDOG_USEC / 2e6:g} s)")
    print(f"peak RSS: {peak:.0f} MB")
    quarantined = [e["file"] for e in events if e["event"] == "file_quarantined"]
    print(f"quarantined: {quarantined}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
