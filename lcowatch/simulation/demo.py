"""``lcowatch demo``: a newcomer's first run, with nothing to download and nothing to configure.

It simulates nights of LCO frames of a variable star with a reference catalog, starts the daemon on a
temporary watched folder, drops the frames in as an archive sync would (written under a temporary name,
then renamed), waits until every frame is in the ledger, stops the daemon with SIGTERM and prints where
the light curve and its plot are, with how well it matches the simulated truth.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import numpy as np
import yaml

from lcowatch.outputs.export import RESULTS_DIR, lightcurve_table
from lcowatch.outputs.plot import PLOTS_DIR, plot_lightcurve
from lcowatch.simulation.simulate import FrameTruth, make_field, simulate_series, write_refcat
from lcowatch.state.ledger import Ledger, connect, count_finished
from lcowatch.state.store import Store
from lcowatch.states import State

TARGET = "DEMO-VAR"
WAIT_LIMIT = 600.0  # seconds for the daemon to work through the night


def _write_config(folder: Path) -> Path:
    document = {
        "watch": {"paths": ["incoming"], "quiet_seconds": 0.3, "rescan_seconds": 30},
        "state_dir": "state",
        "catalog": {"source": "file"},
        "targets": {TARGET: {"ra": 150.0, "dec": 2.0, "refcat": "demo-stars.csv"}},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def run_demo(
    workdir: Path | None = None, *, nights: int = 2, frames_per_night: int = 6, out: IO[str] = sys.stdout
) -> int:
    """Run the demo in ``workdir`` (a new temporary folder by default); return an exit code."""
    folder = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="lcowatch-demo-"))
    folder.mkdir(parents=True, exist_ok=True)
    say = lambda text: print(text, file=out, flush=True)  # noqa: E731
    say(f"lcowatch demo in {folder}")
    field = make_field(TARGET, 150.0, 2.0, nstars=1000, radius_arcmin=4.0, seed=2026, min_sep_arcsec=15.0)
    write_refcat(field, folder / "demo-stars.csv")
    config = _write_config(folder)
    staging = folder / "staging"
    series = simulate_series(field, staging, nights=nights, frames_per_night=frames_per_night, filters=("rp", "gp"),
                             shape=(1024, 1024), seed=7)  # fmt: skip
    truth: dict[str, FrameTruth] = {path.name: frame_truth for path, _, frame_truth in series}
    say(f"simulated {len(series)} frames of {TARGET} ({nights} nights, filters rp and gp, 1024x1024)")

    incoming, state_dir = folder / "incoming", folder / "state"
    incoming.mkdir(exist_ok=True)
    log_path = folder / "daemon.log"
    started = time.monotonic()
    with open(log_path, "w") as daemon_log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "lcowatch", "run", "--config", str(config)],
            stdout=daemon_log,
            stderr=subprocess.STDOUT,
        )
        try:
            for path, _, _ in series:
                part = incoming / f".{path.name}.part"
                shutil.copyfile(path, part)
                os.replace(part, incoming / path.name)  # arrives whole, as an archive sync would deliver it
                time.sleep(0.05)
            say(f"dropped {len(series)} frames into {incoming}; the daemon (log: {log_path}) is working on them")
            while count_finished(state_dir) < len(series):
                if daemon.poll() is not None:
                    say(f"the daemon stopped unexpectedly (exit {daemon.returncode}); see {log_path}")
                    return 1
                if time.monotonic() - started > WAIT_LIMIT:
                    say(f"gave up waiting after {WAIT_LIMIT:.0f} s; see {log_path}")
                    return 1
                time.sleep(0.5)
        finally:
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                daemon.wait(timeout=60)
    elapsed = time.monotonic() - started

    store = Store(connect(state_dir))
    counts = Ledger(store.conn).counts()
    table = lightcurve_table(store, TARGET)
    plot_path = state_dir / PLOTS_DIR / f"{TARGET}.png"
    plot_lightcurve(table, plot_path, title=f"{TARGET} (lcowatch demo)")
    first = table[(table["aperture"] == table["aperture"][0]) & ~table["mag"].mask] if len(table) else table
    errors = np.array([row["mag"] - truth[row["file"]].mag[0] for row in first]) if len(first) else np.array([])

    say("")
    say(
        f"processed {len(series)} frames in {elapsed:.0f} s: "
        + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    )
    if errors.size:
        say(f"calibrated points: {errors.size}; |mag - truth|: median {np.median(np.abs(errors)):.4f}, "
            f"max {np.max(np.abs(errors)):.4f} mag")  # fmt: skip
    say(f"light curve: {state_dir / RESULTS_DIR / f'{TARGET}.ecsv'}")
    say(f"plot:        {plot_path}")
    say("look further:")
    for command in ("status", "frames", f"export {TARGET}", f"template {TARGET}", f"plot {TARGET}"):
        say(f"  lcowatch {command} --config {config}")
    return 0 if counts.get(State.DONE, 0) > 0 else 1
