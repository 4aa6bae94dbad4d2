"""``lcowatch demo``: a newcomer's first run, with nothing to download and nothing to configure.

It simulates nights of LCO frames of a variable star, and a week of a supernova on its host galaxy
(measured by image subtraction), with reference catalogs; starts the daemon on a temporary watched
folder; drops the frames in as an archive sync would (written under a temporary name, then renamed);
waits until every frame is in the ledger; stops the daemon with SIGTERM and prints where the light
curves and plots are, with how well they match the simulated truth.
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
from lcowatch.simulation.simulate import (
    FrameTruth,
    make_field,
    make_supernova_field,
    simulate_series,
    write_refcat,
)
from lcowatch.state.ledger import Ledger, connect, count_finished
from lcowatch.state.store import Store
from lcowatch.states import State

TARGET = "DEMO-VAR"
SUPERNOVA = "DEMO-SN"
SN_RA, SN_DEC = 60.0, -20.0
WAIT_LIMIT = 600.0  # seconds for the daemon to work through the night


def _write_config(folder: Path) -> Path:
    document = {
        "watch": {"paths": ["incoming"], "quiet_seconds": 0.3, "rescan_seconds": 30},
        "state_dir": "state",
        "catalog": {"source": "file"},
        "targets": {
            TARGET: {"ra": 150.0, "dec": 2.0, "refcat": "demo-stars.csv"},
            # Its reference image comes from the nights before the explosion (MJD 61003).
            SUPERNOVA: {
                "ra": SN_RA,
                "dec": SN_DEC,
                "refcat": "demo-sn-stars.csv",
                "method": "difference",
                "reference_before": "2025-11-24",
            },
        },
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
    say(f"simulated {len(series)} frames of {TARGET} ({nights} nights, filters rp and gp, 1024x1024)")
    # Three nights before the explosion (for its reference image), a rise, a peak and a fade.
    supernova = make_supernova_field(SUPERNOVA, SN_RA, SN_DEC, seed=12, peak_mjd=61006.0, rise_days=3.0,
                                     fade_rate=0.3, host_mag_r=16.5, host_offset_arcsec=1.5)  # fmt: skip
    write_refcat(supernova, folder / "demo-sn-stars.csv")
    sn_series = simulate_series(supernova, staging, nights=8, frames_per_night=1, filters=("rp",),
                                shape=(512, 512), seed=8, exptime=120.0, first_frame_number=500)  # fmt: skip
    say(f"simulated {len(sn_series)} frames of {SUPERNOVA}, a supernova 1.5\" from its host's nucleus (8 nights)")
    series = sorted(series + sn_series, key=lambda item: item[2].mjd_mid)
    truth: dict[str, FrameTruth] = {path.name: frame_truth for path, _, frame_truth in series}

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
    say("")
    say(
        f"processed {len(series)} frames in {elapsed:.0f} s: "
        + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    )
    for name in (TARGET, SUPERNOVA):
        table = lightcurve_table(store, name)
        plot_lightcurve(table, state_dir / PLOTS_DIR / f"{name}.png", title=f"{name} (lcowatch demo)")
        first = table[(table["aperture"] == table["aperture"][0]) & ~table["mag"].mask] if len(table) else table
        errors = np.array([row["mag"] - truth[row["file"]].mag[0] for row in first]) if len(first) else np.array([])
        if errors.size:
            say(f"{name}: calibrated points: {errors.size}; |mag - truth|: median {np.median(np.abs(errors)):.4f}, "
                f"max {np.max(np.abs(errors)):.4f} mag")  # fmt: skip
    plot_path = state_dir / PLOTS_DIR / f"{TARGET}.png"
    say(f"light curve: {state_dir / RESULTS_DIR / f'{TARGET}.ecsv'} (and {SUPERNOVA}.ecsv beside it)")
    say(f"plot:        {plot_path}")
    say("look further:")
    # This installation's command, so that it works without the virtual environment activated.
    script = Path(sys.executable).parent / "lcowatch"
    on_path = shutil.which("lcowatch") == str(script)
    lcowatch = "lcowatch" if on_path else str(script) if script.exists() else f"{sys.executable} -m lcowatch"
    for command in ("status", "frames", f"export {TARGET}", f"template {TARGET}", f"reference {SUPERNOVA}",
                    f"plot {SUPERNOVA}"):  # fmt: skip
        say(f"  {lcowatch} {command} --config {config}")
    return 0 if counts.get(State.DONE, 0) > 0 else 1
