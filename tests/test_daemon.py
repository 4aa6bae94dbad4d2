"""The daemon as a real subprocess: real folders, real SQLite, real signals, simulated LCO frames.

Every wait polls a condition with a generous timeout; quiet periods are short (0.3 s).
The kill -9 loop runs ``LCOWATCH_KILL_LOOPS`` (default 30; raise it for a longer soak) restarts over
``LCOWATCH_KILL_FRAMES`` (default 40) frames, from the seed ``LCOWATCH_KILL_SEED``.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import itertools
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from astropy.io import fits
from astropy.table import Table
from daemon_support import (
    TARGET,
    Daemon,
    FrameFactory,
    LedgerView,
    SimFrame,
    assert_exactly_once,
    drop,
    sha256_of,
    wait_for,
)

from lcowatch.intake.readiness import FITS_BLOCK
from lcowatch.intake.watcher import PathSink, Watcher


@pytest.fixture(scope="session")
def factory(tmp_path_factory: pytest.TempPathFactory) -> FrameFactory:
    return FrameFactory(tmp_path_factory.mktemp("frames"))


@pytest.fixture
def daemons() -> Iterator[Callable[..., Daemon]]:
    """Make daemons that are killed at the end of the test whatever happens."""
    made: list[Daemon] = []

    def make(config: Path, **kwargs: object) -> Daemon:
        daemon = Daemon(config, **kwargs)  # type: ignore[arg-type]
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.cleanup()


def _done(ledger: LedgerView, n: int) -> Callable[[], bool]:
    return lambda: ledger.count("done") >= n


def _quarantined_names(state: Path) -> set[str]:
    folder = state / "quarantine"
    return {p.name for p in folder.iterdir() if not p.name.endswith(".reason.json")} if folder.is_dir() else set()


# ---------------------------------------------------------------------------------------------------------
# arrival


def test_backlog_at_start_in_time_order_then_live_frames(
    tmp_path: Path, factory: FrameFactory, daemons: Callable[..., Daemon]
) -> None:
    """Files dropped while the daemon was stopped are processed at start, earliest observation first
    (their names sort the other way); frames arriving later are processed too; the state is private."""
    config = factory.config(tmp_path)
    watch, state = tmp_path / "in", tmp_path / "state"
    backlog = [factory.frame(i, number=100 - i) for i in range(8)]
    for frame in reversed(backlog):
        drop(frame, watch, how="copy")
    old = time.time() - 3600
    for path in watch.iterdir():
        os.utime(path, (old, old))
    ledger = LedgerView(state)
    daemon = daemons(config).start()
    wait_for(_done(ledger, 8), what="the backlog")
    wait_for(lambda: len(daemon.find("frame_processed")) == 8, what="the log of the backlog")
    processed = [e["file"] for e in daemon.find("frame_processed")]
    assert processed == [f.name for f in sorted(backlog, key=lambda f: f.mjd)]
    assert stat.S_IMODE(state.stat().st_mode) == 0o700

    live = [factory.frame(i) for i in range(8, 11)]
    drop(live[0], watch, how="rename")
    drop(live[1], watch, how="copy")
    (watch / "night2").mkdir()
    drop(live[2], watch / "night2", how="rename")
    wait_for(_done(ledger, 11), what="the live frames")
    assert daemon.stop() == 0
    assert_exactly_once(ledger, backlog + live)
    # The result file is a view brought up to date whenever the queue empties.
    results = Table.read(state / "results" / f"{TARGET}.ecsv", format="ascii.ecsv")
    assert set(results["file"]) == {f.name for f in backlog + live}
    assert daemon.find("daemon_stopped")
    assert "Traceback" not in daemon.stderr()


def test_same_content_new_name_adds_nothing_new_content_old_name_is_a_new_frame(
    tmp_path: Path, factory: FrameFactory, daemons: Callable[..., Daemon]
) -> None:
    config = factory.config(tmp_path)
    watch, ledger = tmp_path / "in", LedgerView(tmp_path / "state")
    first, second = factory.frame(20, "fz"), factory.frame(21, "fz")
    daemon = daemons(config).start()
    drop(first, watch)
    wait_for(_done(ledger, 1))
    drop(first, watch, name="copy-of-first.fits.fz")
    daemon.wait_event("already_seen", file="copy-of-first.fits.fz")
    assert ledger.states() == {sha256_of(first.path): "done"}
    drop(second, watch, name=first.name)  # new content under the old name
    wait_for(_done(ledger, 2))
    assert daemon.stop() == 0
    assert_exactly_once(ledger, [first, second])


def _slow_write(content: bytes, path: Path, boundaries: list[int], pause: float) -> None:
    with open(path, "wb") as handle:
        start = 0
        for end in [*boundaries, len(content)]:
            handle.write(content[start:end])
            handle.flush()
            start = end
            time.sleep(pause)


def _hdu_ends(path: Path) -> set[int]:
    with fits.open(path) as hdul:
        infos = [hdu.fileinfo() for hdu in hdul]
    return {info["datLoc"] + -(-info["datSpan"] // FITS_BLOCK) * FITS_BLOCK for info in infos}


@pytest.mark.parametrize("poll", [False, True], ids=["inotify", "polling"])
def test_slow_writer_part_rename_and_moves_each_processed_once(
    tmp_path: Path, factory: FrameFactory, daemons: Callable[..., Daemon], poll: bool
) -> None:
    """Never read half-written: a reader of a partial file would add a ledger row for its content."""
    config = factory.config(tmp_path, watch={"poll": poll, "poll_interval": 0.2})
    watch, ledger = tmp_path / "in", LedgerView(tmp_path / "state")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    slow, part, moved, folder_a, folder_b = (factory.frame(i) for i in (30, 31, 32, 33, 34))
    daemon = daemons(config).start()

    # A slow writer of a plain FITS file, pausing longer than the quiet period: at block boundaries
    # inside the data and at odd sizes, never where an HDU ends (a whole FITS file by itself).
    plain = factory.frame(30, None)
    slow = plain
    ends = _hdu_ends(plain.path)
    size = len(plain.content)
    boundaries = sorted(
        {b for b in (FITS_BLOCK * 3, FITS_BLOCK * 30, size // 3, FITS_BLOCK * 150, size - 1000) if b not in ends}
    )
    writer = threading.Thread(target=_slow_write, args=(plain.content, watch / plain.name, boundaries, 0.6))
    writer.start()
    # A .part file written slowly, then renamed into place.
    _slow_write(part.content, watch / (part.name + ".part"), [len(part.content) // 2], 0.6)
    os.replace(watch / (part.name + ".part"), watch / part.name)
    # Moved in from another folder; and a whole folder of frames moved in.
    drop(moved, outside)
    os.replace(outside / moved.name, watch / moved.name)
    batch = outside / "batch"
    batch.mkdir()
    drop(folder_a, batch)
    drop(folder_b, batch)
    os.replace(batch, watch / "batch")
    writer.join()

    frames = [slow, part, moved, folder_a, folder_b]
    wait_for(_done(ledger, len(frames)), what="every frame")
    assert daemon.stop() == 0
    assert_exactly_once(ledger, frames)
    assert not _quarantined_names(tmp_path / "state")


def test_a_writer_pausing_at_an_hdu_boundary_gives_one_point_from_the_whole_file(
    tmp_path: Path, factory: FrameFactory, daemons: Callable[..., Daemon]
) -> None:
    """A file that stops at the end of its SCI HDU is a whole FITS file and is measured; when the rest
    arrives, the whole file's measurement replaces the part's, in one transaction: one point per exposure."""
    config = factory.config(tmp_path)
    watch, ledger = tmp_path / "in", LedgerView(tmp_path / "state")
    frame = factory.frame(36, "fz")
    content = frame.content
    sci_end = sorted(_hdu_ends(frame.path))[1]
    assert 0 < sci_end < len(content)
    part = content[:sci_end]
    daemon = daemons(config).start()
    with open(watch / frame.name, "wb") as handle:
        handle.write(part)
        handle.flush()
        wait_for(_done(ledger, 1), what="the part to be measured")
        handle.write(content[sci_end:])
    wait_for(lambda: ledger.file(sha256_of(frame.path)) is not None and _done(ledger, 1)(), what="the whole file")
    daemon.wait_event("frame_replaced")
    assert daemon.stop() == 0
    replaced = ledger.file(hashlib.sha256(part).hexdigest())
    assert replaced is not None and replaced["state"] == "ignored"
    assert "replaced by a later version of the same file" in replaced["error"]
    assert ledger.query("SELECT DISTINCT sha256 FROM points") == [(sha256_of(frame.path),)]
    results = Table.read(tmp_path / "state" / "results" / f"{TARGET}.ecsv", format="ascii.ecsv")
    assert list(results["file"]).count(frame.name) == len(set(results["aperture"]))


def test_bad_files_are_quarantined_while_good_files_process(
    tmp_path: Path, factory: FrameFactory, daemons: Callable[..., Daemon]
) -> None:
    config = factory.config(tmp_path, watch={"incomplete_after": 2.0})
    watch, state, ledger = tmp_path / "in", tmp_path / "state", LedgerView(tmp_path / "state")
    good = [factory.frame(i) for i in (40, 41, 42)]
    plain = factory.frame(43, None).content
    fz = factory.frame(44, "fz").content
    bomb = fits.Header()
    bomb["SIMPLE"], bomb["BITPIX"], bomb["NAXIS"], bomb["NAXIS1"], bomb["NAXIS2"] = True, -32, 2, 10**6, 10**6
    no_exptime = tmp_path / "no-exptime.fits"
    with fits.open(factory.frame(45, None).path) as hdul:
        del hdul["SCI"].header["EXPTIME"]
        hdul.writeto(no_exptime)
    hostile = factory.frame(46, "fz", object_name="../../../escaped")
    secret = tmp_path / "secret.fits"
    secret.write_bytes(factory.frame(47, None).content)

    daemon = daemons(config).start()
    bad = {
        "empty.fits": b"",
        "truncated.fits": plain[: len(plain) // 2],
        "truncated-at-block.fits.fz": fz[: FITS_BLOCK * 20],
        "not-fits.fits": b"SIMPLE? no: a text file that only has the right name\n" * 100,
        "header-bomb.fits": bomb.tostring().encode(),
    }
    drop(good[0], watch)
    for name, content in bad.items():
        (watch / name).write_bytes(content)
    drop(good[1], watch)
    shutil.copyfile(no_exptime, watch / no_exptime.name)
    drop(hostile, watch)
    (watch / "outside-link.fits").symlink_to(secret)
    drop(good[2], watch)

    expected_quarantine = {*bad, no_exptime.name}
    wait_for(lambda: _quarantined_names(state) >= expected_quarantine, what="the quarantine")
    wait_for(_done(ledger, 3), what="the good frames")
    wait_for(lambda: ledger.count("ignored") == 1, what="the hostile OBJECT")
    assert daemon.running()
    assert daemon.stop() == 0

    for name in expected_quarantine:
        note = json.loads((state / "quarantine" / f"{name}.reason.json").read_text())
        assert note["reason"] and note["file"] == name and note["versions"]["lcowatch"]
        assert not (watch / name).exists()
    reasons = {name: json.loads((state / "quarantine" / f"{name}.reason.json").read_text())["reason"] for name in bad}
    assert reasons["empty.fits"].startswith("incomplete: empty file")
    assert reasons["truncated.fits"].startswith("incomplete")
    assert reasons["truncated-at-block.fits.fz"].startswith("incomplete")
    assert "not a FITS file" in reasons["not-fits.fits"]
    assert "max_pixels" in reasons["header-bomb.fits"]
    assert ledger.count("quarantined") == len(expected_quarantine)
    assert ledger.count("done") == 3 and ledger.count("pending") == 0
    # the OBJECT was never used as a path; the symlink to a file outside the watch was not followed
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["config.yaml", "daemon.err", "daemon.log", "in", "no-exptime.fits", "secret.fits", "state"]
    )
    assert sha256_of(secret) not in ledger.states()
    assert daemon.find("symlink_outside_watch_ignored", file="outside-link.fits")


# ---------------------------------------------------------------------------------------------------------
# signals, systemd, configuration


@pytest.mark.slow
def test_sigterm_during_a_burst_exits_0_within_the_budget_and_the_rest_follows(
    tmp_path: Path, factory: FrameFactory, daemons: Callable[..., Daemon]
) -> None:
    budget = 10.0
    config = factory.config(tmp_path, daemon={"stop_timeout": budget})
    watch, ledger = tmp_path / "in", LedgerView(tmp_path / "state")
    burst = [factory.frame(i) for i in range(50, 90)]
    daemon = daemons(config).start()
    for frame in burst:
        drop(frame, watch)
    wait_for(_done(ledger, 3), what="the first frames")
    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(budget + 10) == 0
    assert time.monotonic() - started < budget
    done = ledger.count("done")
    assert done < len(burst), "the burst was over before the signal: nothing tested"
    assert ledger.count("pending") == 0  # the frame in hand was finished, not dropped

    daemon.start()
    wait_for(_done(ledger, len(burst)), what="the rest of the burst")
    assert daemon.stop() == 0
    assert_exactly_once(ledger, burst)


@pytest.mark.slow
def test_workers_on_a_local_cluster_exactly_once_under_kill_9(
    tmp_path: Path, factory: FrameFactory, daemons: Callable[..., Daemon]
) -> None:
    """``processing.workers: 2``: the daemon measures frames on a LocalCluster of two processes; killed -9
    mid-burst and started again, every frame still ends with exactly one set of rows."""
    config = factory.config(tmp_path, processing={"workers": 2})
    watch, ledger = tmp_path / "in", LedgerView(tmp_path / "state")
    burst = [factory.frame(i) for i in range(100, 130)]
    daemon = daemons(config).start()
    for frame in burst:
        drop(frame, watch)
    assert daemon.wait_event("cluster_ready")["workers"] == 2
    wait_for(_done(ledger, 5), what="the first frames")
    daemon.kill9()
    assert ledger.count("done") < len(burst), "the burst was over before the kill: nothing tested"

    daemon.start()
    wait_for(_done(ledger, len(burst)), what="the rest of the burst")
    assert daemon.stop() == 0
    assert_exactly_once(ledger, burst)


class Datagrams:
    """A fake systemd: a datagram socket that records every message with its arrival time."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="lcwd"))  # AF_UNIX paths must be short
        self.path = self.folder / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def first(self, field: str) -> int:
        return next(i for i, (_, m) in enumerate(self.messages) if field in m.split("\n"))

    def times(self, field: str) -> list[float]:
        return [t for t, m in self.messages if field in m.split("\n")]


@pytest.fixture
def datagrams() -> Iterator[Datagrams]:
    listener = Datagrams()
    yield listener
    listener.close()


def test_notify_socket_receives_ready_watchdog_and_stopping_in_order(
    tmp_path: Path, factory: FrameFactory, daemons: Callable[..., Daemon], datagrams: Datagrams
) -> None:
    config = factory.config(tmp_path)
    ledger = LedgerView(tmp_path / "state")
    env = {"NOTIFY_SOCKET": str(datagrams.path), "WATCHDOG_USEC": "400000"}
    daemon = daemons(config, env=env).start()
    for frame in factory.frames(2, start=100):
        drop(frame, tmp_path / "in")
    wait_for(_done(ledger, 2))
    wait_for(lambda: len(datagrams.times("WATCHDOG=1")) >= 2, what="watchdog pings")
    assert daemon.stop() == 0
    wait_for(lambda: datagrams.times("STOPPING=1"), what="STOPPING=1")
    ready, ping, stopping = (datagrams.first(f) for f in ("READY=1", "WATCHDOG=1", "STOPPING=1"))
    assert ready < ping < stopping
    assert not any("WATCHDOG=1" in m for _, m in datagrams.messages[stopping:])
    assert f"MAINPID={daemon.pid}" in datagrams.messages[ready][1].split("\n")
    statuses = [m for _, m in datagrams.messages if m.startswith("STATUS=")]
    assert any("queued" in m for m in statuses)


def test_ready_comes_once_the_backlog_is_tracked_and_its_checks_keep_the_watchdog_fed(
    tmp_path: Path, factory: FrameFactory, daemons: Callable[..., Daemon], datagrams: Datagrams
) -> None:
    """A backlog of .fits.gz frames and a gzip bomb waiting at start: READY comes once the start-up scan has
    tracked them, before any is checked (a check inflates the whole gzip stream: 210 4k frames once took
    130 s, past systemd's start timeout); the checks follow in slices with the watchdog fed, the bomb is
    quarantined, and the backlog is worked through in observation-time order."""
    config = factory.config(tmp_path)
    watch = tmp_path / "in"
    frames = [factory.frame(i, "gz", number=400 - i) for i in range(300, 324)]
    for frame in frames:
        drop(frame, watch, how="copy")
    with gzip.open(watch / "bomb.fits.gz", "wb", compresslevel=1) as bomb:
        bomb.write("".join(str(card) for card in fits.Header({"SIMPLE": True, "BITPIX": 8}).cards).encode())
        bomb.write(b" " * (64 << 20))  # no END card, ever: 64 MB of blanks in 64 kB
    old = time.time() - 3600
    for path in watch.iterdir():
        os.utime(path, (old, old))
    env = {"NOTIFY_SOCKET": str(datagrams.path), "WATCHDOG_USEC": "1000000"}
    daemon = daemons(config, env=env).start()
    ledger = LedgerView(tmp_path / "state")
    wait_for(_done(ledger, len(frames)), what="the backlog")
    wait_for(lambda: ledger.count("quarantined") == 1, what="the bomb in quarantine")
    assert daemon.stop() == 0
    events = [e["event"] for e in daemon.events()]
    assert "file_ready" in events and "file_ready" not in events[: events.index("daemon_ready")]
    assert events.index("backlog_checked") > max(i for i, e in enumerate(events) if e == "file_ready")
    processed = [e["file"] for e in daemon.find("frame_processed")]
    assert processed == [f.name for f in sorted(frames, key=lambda f: f.mjd)]
    pings = datagrams.times("WATCHDOG=1")
    assert len(pings) >= 2
    assert max(b - a for a, b in itertools.pairwise(pings)) < 3.0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MB file system of its own (tmpfs), to be filled up; skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {made.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` to the last byte; returns the file that holds the space."""
    filler = folder / "filler"
    with open(filler, "wb") as handle, pytest.raises(OSError) as full:
        while True:
            handle.write(b"\0" * 65536)
            handle.flush()
    assert full.value.errno == errno.ENOSPC
    return filler


def test_a_full_disk_at_start_is_waited_out_not_exited(
    tmp_path: Path, factory: FrameFactory, daemons: Callable[..., Daemon], datagrams: Datagrams, small_disk: Path
) -> None:
    """A state folder on a full disk at start: the daemon says it is up and waiting (READY, STATUS, watchdog
    pings), backs off instead of exiting into a restart loop, and starts work once there is space."""
    state = small_disk / "state"
    config = factory.config(tmp_path, state_dir=str(state))
    state.mkdir(mode=0o700)
    filler = _fill(small_disk)
    frame = factory.frame(64, "fz")
    drop(frame, tmp_path / "in")
    env = {"NOTIFY_SOCKET": str(datagrams.path), "WATCHDOG_USEC": "400000"}
    daemon = daemons(config, env=env).start(wait_ready=False)
    daemon.wait_event("start_waiting_for_disk_space")
    wait_for(lambda: len(daemon.find("start_waiting_for_disk_space")) >= 2, what="a second try")
    assert daemon.running()
    wait_for(lambda: datagrams.times("READY=1") and datagrams.times("WATCHDOG=1"), what="READY and pings")
    assert any("waiting for disk space" in m for _, m in datagrams.messages)
    filler.unlink()
    daemon.wait_event("daemon_ready")
    ledger = LedgerView(state)
    wait_for(_done(ledger, 1), what="the frame, once there is space")
    assert daemon.stop() == 0
    assert_exactly_once(ledger, [frame])


@pytest.mark.slow
def test_watchdog_pings_stop_while_a_frame_is_stuck(
    tmp_path: Path, factory: FrameFactory, daemons: Callable[..., Daemon], datagrams: Datagrams
) -> None:
    config = factory.config(tmp_path, daemon={"stall_seconds": 0.5})
    ledger = LedgerView(tmp_path / "state")
    env = {"NOTIFY_SOCKET": str(datagrams.path), "WATCHDOG_USEC": "200000"}
    daemon = daemons(config, env=env, driver_stage="sleep:3").start()
    drop(factory.frame(110), tmp_path / "in")
    wait_for(_done(ledger, 1), what="the slow frame")
    done_at = time.monotonic()
    wait_for(lambda: len([t for t in datagrams.times("WATCHDOG=1") if t > done_at]) >= 2, what="pings again")
    assert daemon.stop() == 0
    pings = datagrams.times("WATCHDOG=1")
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) > 1.5, "the pings should pause while the frame is stuck"
    assert len(pings[gaps.index(max(gaps)) + 1 :]) >= 2, "and come back once it is done"
    assert daemon.find("worker_stalled")


def test_sighup_reloads_the_config_and_keeps_the_old_one_when_it_is_bad(
    tmp_path: Path, factory: FrameFactory, daemons: Callable[..., Daemon]
) -> None:
    config = factory.config(tmp_path)
    watch, ledger = tmp_path / "in", LedgerView(tmp_path / "state")
    good_document = yaml.safe_load(config.read_text())
    daemon = daemons(config).start()
    drop(factory.frame(120, object_name="OTHER"), watch)
    wait_for(lambda: ledger.count("ignored") == 1, what="a frame of an unknown target")

    config.write_text(yaml.safe_dump({**good_document, "colour": "blue"}))
    daemon.signal(signal.SIGHUP)
    failed = daemon.wait_event("config_reload_failed")
    assert any("colour" in problem for problem in failed["problems"])
    drop(factory.frame(121), watch)  # the old config still works
    wait_for(_done(ledger, 1))

    targets = {**good_document["targets"], "OTHER": {"ra": 150.0, "dec": 2.0, "object_names": ["OTHER"]}}
    config.write_text(yaml.safe_dump({**good_document, "targets": targets}))
    daemon.signal(signal.SIGHUP)
    daemon.wait_event("config_reloaded")
    # The frame ignored before the target was configured is taken up again, at once.
    daemon.wait_event("ignored_frame_requeued", file=factory.frame(120, object_name="OTHER").name)
    drop(factory.frame(122, object_name="OTHER"), watch)
    wait_for(_done(ledger, 3), what="the frames of the new target, the earlier one too")
    assert ledger.count("ignored") == 0
    assert daemon.stop() == 0


@pytest.mark.slow
def test_a_second_signal_exits_at_once(tmp_path: Path, factory: FrameFactory, daemons: Callable[..., Daemon]) -> None:
    config = factory.config(tmp_path, daemon={"stop_timeout": 60.0})
    ledger = LedgerView(tmp_path / "state")
    frame = factory.frame(130)
    daemon = daemons(config, driver_stage="sleep:60").start()
    drop(frame, tmp_path / "in")
    daemon.wait_event("file_processing")
    daemon.signal(signal.SIGTERM)
    daemon.wait_event("daemon_stopping")
    started = time.monotonic()
    daemon.signal(signal.SIGINT)
    assert daemon.wait_exit(10) == 128 + signal.SIGINT
    assert time.monotonic() - started < 5
    assert ledger.file(sha256_of(frame.path))["state"] == "pending"  # type: ignore[index]

    restarted = daemons(config).start()  # the plain daemon finishes it
    wait_for(_done(ledger, 1))
    assert restarted.stop() == 0


@pytest.mark.slow
def test_stop_budget_exceeded_exits_0_and_the_frame_is_redone_without_blame(
    tmp_path: Path, factory: FrameFactory, daemons: Callable[..., Daemon]
) -> None:
    budget = 1.0
    config = factory.config(tmp_path, daemon={"stop_timeout": budget})
    ledger = LedgerView(tmp_path / "state")
    frame = factory.frame(131)
    daemon = daemons(config, driver_stage="sleep:60").start()
    drop(frame, tmp_path / "in")
    daemon.wait_event("file_processing")
    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(budget + 10) == 0
    assert time.monotonic() - started < budget + 3
    assert daemon.find("stop_budget_exceeded")
    assert ledger.file(sha256_of(frame.path))["attempts"] == 0  # type: ignore[index]

    restarted = daemons(config).start()
    wait_for(_done(ledger, 1))
    assert restarted.stop() == 0
    assert ledger.file(sha256_of(frame.path))["attempts"] == 1  # type: ignore[index]


def test_transient_errors_back_off_without_counting_attempts(
    tmp_path: Path, factory: FrameFactory, daemons: Callable[..., Daemon]
) -> None:
    config = factory.config(tmp_path, daemon={"retry_seconds": 0.3, "max_retry_seconds": 0.6})
    ledger = LedgerView(tmp_path / "state")
    frame = factory.frame(140)
    daemon = daemons(config, driver_stage="transient:3").start()
    drop(frame, tmp_path / "in")
    wait_for(_done(ledger, 1))
    assert daemon.stop() == 0
    assert [e["seconds"] for e in daemon.find("backing_off")] == [0.3, 0.6, 0.6]
    assert ledger.file(sha256_of(frame.path))["attempts"] == 1  # type: ignore[index]


def test_a_frame_that_keeps_failing_is_quarantined_after_max_attempts(
    tmp_path: Path, factory: FrameFactory, daemons: Callable[..., Daemon]
) -> None:
    config = factory.config(tmp_path, daemon={"retry_seconds": 0.2}, processing={"max_attempts": 2})
    state, ledger = tmp_path / "state", LedgerView(tmp_path / "state")
    frame = factory.frame(141)
    daemon = daemons(config, driver_stage="bug").start()
    drop(frame, tmp_path / "in")
    wait_for(lambda: ledger.count("quarantined") == 1, what="the quarantine")
    assert daemon.running()
    assert daemon.stop() == 0
    note = json.loads((state / "quarantine" / f"{frame.name}.reason.json").read_text())
    assert "gave up after 2 attempts" in note["reason"] and "ZeroDivisionError" in note["reason"]


def test_fatal_errors_exit_non_zero(tmp_path: Path, factory: FrameFactory, daemons: Callable[..., Daemon]) -> None:
    # A state folder that cannot be created.
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    broken = tmp_path / "broken"
    broken.mkdir()
    daemon = daemons(factory.config(broken, state_dir=str(blocker / "state")))
    daemon.start(wait_ready=False)
    assert daemon.wait_exit() == 1
    assert daemon.find("daemon_fatal")

    # Stop raised by a stage: exit 1, and the frame is not blamed (its attempt is given back).
    config = factory.config(tmp_path)
    frame = factory.frame(142)
    daemon = daemons(config, driver_stage="fatal").start()
    drop(frame, tmp_path / "in")
    assert daemon.wait_exit() == 1
    assert daemon.find("daemon_fatal")
    record = LedgerView(tmp_path / "state").file(sha256_of(frame.path))
    assert record is not None and record["state"] == "pending" and record["attempts"] == 0


# ---------------------------------------------------------------------------------------------------------
# crashes


def _deliver(frame: SimFrame, twin: SimFrame | None, watch: Path, how: str) -> None:
    """Deliver a frame as a transfer tool would: renamed in, copied, written in chunks, paused at the end
    of its SCI HDU for longer than the quiet period (a whole FITS file, then more), or in two encodings."""
    content = frame.content
    if how == "chunks":
        _slow_write(content, watch / frame.name, [len(content) // 3, 2 * len(content) // 3], 0.05)
    elif how == "pause":
        # A gzip stream has no HDU boundary to stop at: it is whole or not.
        cut = sorted(_hdu_ends(frame.path))[1] if frame.name.endswith(".fz") else len(content) // 2
        _slow_write(content, watch / frame.name, [cut], 1.0)
    elif how == "twice":
        assert twin is not None
        drop(frame, watch, how="rename")
        drop(twin, watch, how="copy")
    else:
        drop(frame, watch, how=how)


@pytest.mark.slow
def test_kill_9_at_random_moments_while_frames_arrive(
    tmp_path: Path, factory: FrameFactory, daemons: Callable[..., Daemon]
) -> None:
    """kill -9 at random moments (start-up, scanning, processing, quarantine) while frames arrive every way
    :func:`_deliver` knows, among files that are not FITS: every exposure ends with exactly one set of rows,
    every file is accounted for (in its folder, or in quarantine with its reason), nothing stays pending."""
    loops = int(os.environ.get("LCOWATCH_KILL_LOOPS", "30"))
    count = int(os.environ.get("LCOWATCH_KILL_FRAMES", "40"))
    seed = int(os.environ.get("LCOWATCH_KILL_SEED", "20260113"))
    rng = random.Random(seed)
    # Many kills may land on the same frame; attempts are not what this test is about.
    config = factory.config(tmp_path, processing={"max_attempts": loops + 5})
    watch, state, ledger = tmp_path / "in", tmp_path / "state", LedgerView(tmp_path / "state")
    frames = [factory.frame(i, "fz" if i % 2 else "gz") for i in range(200, 200 + count)]
    ways = [rng.choice(["rename", "copy", "chunks", "pause", "twice"]) for _ in frames]
    twins = {f.index: factory.frame(f.index, None) for f, how in zip(frames, ways, strict=True) if how == "twice"}
    junk = {rng.randrange(count): f"junk-{i}.fits" for i in range(count // 8)}

    pace = loops * 1.1 / count  # the frames arrive over most of the loop
    delays = [rng.uniform(0.3 * pace, 1.7 * pace) for _ in frames]

    def arrive() -> None:
        for number, (frame, delay, how) in enumerate(zip(frames, delays, ways, strict=True)):
            time.sleep(delay)
            _deliver(frame, twins.get(frame.index), watch, how)
            if number in junk:
                (watch / junk[number]).write_bytes(f"not a FITS file: {junk[number]} ".encode() * 200)

    def exposures_done() -> int:
        return len(
            ledger.query("SELECT DISTINCT f.date_obs FROM frames f JOIN files USING (sha256) WHERE state = 'done'")
        )

    arrival = threading.Thread(target=arrive)
    arrival.start()
    daemon = daemons(config)
    kills = []
    for _ in range(loops):
        # Some kills land anywhere from the launch on (start-up, scanning and checking are fair game); most
        # land while a frame is in hand, or just after.
        if rng.random() < 0.25:
            daemon.start(wait_ready=False)
            time.sleep(rng.uniform(0.05, 1.2))
        else:
            daemon.start()
            with contextlib.suppress(AssertionError):  # nothing left to process: kill it idle
                daemon.wait_event("file_processing", timeout=3.0)
            time.sleep(rng.uniform(0.0, 0.3))
        kills.append(exposures_done())
        daemon.kill9()
    arrival.join()
    daemon.start()
    seen = f"(seed {seed}, exposures done at each kill: {kills})"
    wait_for(lambda: exposures_done() == count, timeout=120, what=f"all {count} exposures {seen}")
    wait_for(lambda: ledger.count("quarantined") == len(junk), what=f"the junk in quarantine {seen}")
    assert daemon.stop() == 0

    assert ledger.count("pending") == 0, seen
    # One set of rows per exposure, from one file.
    per_exposure = ledger.query(
        "SELECT f.date_obs, COUNT(DISTINCT p.sha256), COUNT(*) FROM points p JOIN frames f USING (sha256) "
        "GROUP BY f.date_obs"
    )
    assert len(per_exposure) == count and {n for _, n, _ in per_exposure} == {1}, seen
    assert len({rows for _, _, rows in per_exposure}) == 1, seen
    # Every whole file is the exposure's point or recorded as another encoding of it; the part a paused
    # writer left was replaced (or never measured); every file is where it belongs.
    states = dict(ledger.query("SELECT sha256, state FROM files"))
    for frame, how in zip(frames, ways, strict=True):
        whole = [sha256_of(frame.path), *([sha256_of(twins[frame.index].path)] if how == "twice" else [])]
        assert sorted(states[sha] for sha in whole) == ["done", "ignored"][: len(whole)], (frame.name, how, seen)
        assert (watch / frame.name).read_bytes() == frame.content
    assert _quarantined_names(state) == set(junk.values())
    assert all((state / "quarantine" / f"{name}.reason.json").exists() for name in junk.values())
    assert all(e.get("event") != "frame_failed" for e in daemon.events(all_runs=True))


# ---------------------------------------------------------------------------------------------------------
# the observer


def test_a_dead_observer_is_noticed_and_replaced(tmp_path: Path) -> None:
    sink = PathSink()
    watcher = Watcher([tmp_path], sink, poll=False, poll_interval=0.2)
    watcher.start()
    try:
        (tmp_path / "one.fits").write_bytes(b"x")
        wait_for(lambda: tmp_path / "one.fits" in sink.drain()[0], what="the first event")
        assert watcher.alive() and not watcher.check()
        watcher._observer.stop()  # the observer thread dies
        watcher._observer.join(5)
        assert not watcher.alive()
        assert watcher.check()  # noticed and restarted
        assert watcher.alive() and watcher.restarts == 1
        (tmp_path / "two.fits").write_bytes(b"x")
        wait_for(lambda: tmp_path / "two.fits" in sink.drain()[0], what="an event after the restart")
        (tmp_path / "sub").mkdir()
        folders: set[Path] = set()
        wait_for(lambda: folders.update(sink.drain()[1]) or tmp_path / "sub" in folders, what="a new folder")
    finally:
        watcher.stop()


def test_a_failed_quarantine_loses_neither_the_ready_files_nor_the_other_bad_ones(
    tmp_path: Path, factory: FrameFactory
) -> None:
    """When the ledger cannot be written, quarantining a bad file fails; the good file that became ready in
    the same pass is queued all the same, and the bad files are looked at again, not dropped till a rescan."""
    from lcowatch.config import load
    from lcowatch.intake.admission import Admission
    from lcowatch.intake.queue import WorkQueue
    from lcowatch.log import get_logger
    from lcowatch.state.ledger import LEDGER_NAME, Ledger, connect

    config = load(factory.config(tmp_path))
    watch = tmp_path / "in"
    good = drop(factory.frame(66, "fz"), watch)
    bad = [watch / "a-not-fits.fits", watch / "b-not-fits.fits"]
    for path in bad:
        path.write_bytes(b"not a FITS file " * 200)
    old = time.time() - 3600  # quiet at first sight
    for path in [good, *bad]:
        os.utime(path, (old, old))
    connect(config.state_dir).close()
    read_only = sqlite3.connect(f"file:{config.state_dir / LEDGER_NAME}?mode=ro", uri=True)
    read_only.row_factory = sqlite3.Row
    admission = Admission(
        config, Ledger(read_only), PathSink(), WorkQueue(), get_logger(), on_quarantined=lambda: None,
        tick=lambda: None,
    )  # fmt: skip
    for path in [good, *bad]:
        assert admission.consider(path)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        admission.poll_readiness()
    read_only.close()
    assert good in admission.queue
    assert all(path in admission.tracker for path in bad)
    assert all(path.exists() for path in bad)  # nothing moved without its ledger row


def test_sim_frames_pass_quality(factory: FrameFactory, tmp_path: Path) -> None:
    """Guard for the other tests: the simulated frames are good frames of the configured target."""
    from lcowatch.config import load
    from lcowatch.pipeline.runner import Pipeline
    from lcowatch.state.ledger import connect

    config = load(factory.config(tmp_path))
    frame: SimFrame = factory.frame(0)
    shutil.copyfile(frame.path, tmp_path / "in" / frame.name)
    conn = connect(config.state_dir)
    try:
        outcome = Pipeline(config, conn).process_path(tmp_path / "in" / frame.name)
    finally:
        conn.close()
    assert outcome.state == "done", outcome.reason
    assert TARGET in config.targets


@pytest.mark.parametrize("note_written", [True, False])
def test_a_crash_between_quarantine_move_and_ledger_write_is_settled_at_start(
    tmp_path: Path, factory: FrameFactory, daemons: Callable[..., Daemon], note_written: bool
) -> None:
    """A file moved into quarantine under its hash-prefixed name (its own name was taken) whose ledger row
    was still pending when the daemon died is recorded as quarantined, with the reason of its note; a crash
    before the note was written gets one that says so."""
    from lcowatch.intake.quarantine import quarantine_file, reason_file
    from lcowatch.state.ledger import Ledger, connect

    config = factory.config(tmp_path)
    watch, state = tmp_path / "in", tmp_path / "state"
    frame = factory.frame(60, None)
    taken = state / "quarantine" / frame.name
    taken.parent.mkdir(parents=True)
    taken.write_bytes(b"another file of the same name")
    path, sha256 = drop(frame, watch), sha256_of(frame.path)
    conn = connect(state)
    Ledger(conn).record(sha256, path, len(frame.content), "pending")
    conn.close()
    moved = quarantine_file(path, state, sha256=sha256, reason="bad header", step="read")
    assert moved.name != frame.name  # the crash came before the ledger heard of the move
    if not note_written:
        reason_file(moved).unlink()
    reason, step = ("bad header", "read") if note_written else ("quarantined (settled after a crash)", None)

    daemon = daemons(config).start()
    daemon.wait_event("recovered_quarantine", sha256=sha256)
    assert LedgerView(state).file(sha256) == {
        "state": "quarantined", "attempts": 0, "step": step, "error": reason, "path": str(path)
    }  # fmt: skip
    note = json.loads(reason_file(moved).read_text())
    assert note["reason"] == reason and note["sha256"] == sha256 and note["original_path"] == str(path)
    assert daemon.stop() == 0


def test_a_pending_file_that_vanished_is_settled_at_start_and_worked_on_if_it_comes_back(
    tmp_path: Path, factory: FrameFactory, daemons: Callable[..., Daemon]
) -> None:
    """A file deleted while it was read (its row pending, the file gone) does not stay pending forever: it is
    recorded as vanished (a name that is not UTF-8 as well); the same content arriving again, under another
    name, is measured. A row another process finished meanwhile is left as it is."""
    from lcowatch.state.ledger import Ledger, connect

    config = factory.config(tmp_path)
    watch, state = tmp_path / "in", tmp_path / "state"
    frame = factory.frame(62, "fz")
    sha256, undecodable = sha256_of(frame.path), "f" * 64
    conn = connect(state)
    ledger_rows = Ledger(conn)
    ledger_rows.record(sha256, watch / frame.name, len(frame.content), "pending")
    ledger_rows.record(undecodable, watch / os.fsdecode(b"gone-\xff.fits"), 10, "pending")
    conn.close()
    ledger = LedgerView(state)

    daemon = daemons(config).start()
    for sha in (sha256, undecodable):
        daemon.wait_event("pending_file_vanished", sha256=sha)
        record = ledger.file(sha)
        assert record is not None and record["state"] == "ignored"
        assert record["error"].startswith("vanished before it was finished")
    drop(frame, watch, name="again-" + frame.name)
    wait_for(_done(ledger, 1), what="the file that came back")
    assert daemon.stop() == 0
    assert ledger.states() == {sha256: "done", undecodable: "ignored"}
    assert ledger.frame_rows() == {sha256: 1}


def test_frames_waiting_for_a_first_template_go_as_soon_as_there_is_one(
    tmp_path: Path, factory: FrameFactory, daemons: Callable[..., Daemon]
) -> None:
    """A frame without a solved WCS cannot start a target; it waits and is processed as soon as a frame
    with one has made the first template, not at the next rescan (an hour here)."""
    config = factory.config(tmp_path, watch={"rescan_seconds": 3600.0})
    watch, ledger = tmp_path / "in", LedgerView(tmp_path / "state")
    blind, solved = factory.frame(70, "fz", wcs_error=True), factory.frame(71, "fz")
    daemon = daemons(config).start()
    drop(blind, watch)
    wait_for(lambda: ledger.count("rejected") == 1, what="the frame without WCS to wait")
    drop(solved, watch)
    wait_for(_done(ledger, 2), timeout=30.0, what="both frames done")
    assert daemon.stop() == 0


def test_a_second_daemon_on_the_same_state_folder_exits_naming_the_first(
    tmp_path: Path, factory: FrameFactory, daemons: Callable[..., Daemon]
) -> None:
    """One daemon per state folder: a second ``run`` exits 1 at once and says which PID holds it; the first
    keeps running."""
    config = factory.config(tmp_path)
    first = daemons(config).start()
    second = daemons(config).start(wait_ready=False)
    assert second.wait_exit(timeout=30.0) == 1
    fatal = second.find("daemon_fatal")
    assert fatal and f"PID {first.pid}" in fatal[0]["reason"]
    assert first.running()
    drop(factory.frame(80, "fz"), tmp_path / "in")
    wait_for(_done(LedgerView(tmp_path / "state"), 1), what="the first daemon still at work")
    assert first.stop() == 0
    third = daemons(config).start()  # the lock goes with its holder
    assert third.stop() == 0


def test_a_storm_of_sighup_from_the_first_moment_neither_kills_nor_hangs_the_daemon(
    tmp_path: Path, factory: FrameFactory, daemons: Callable[..., Daemon]
) -> None:
    """SIGHUP every 5 ms for 3 s, from 0.3 s after exec (the interpreter's own start-up, before any of our
    code, cannot be covered) through the imports and start-up: the daemon stays up, processes, and still
    stops cleanly on SIGTERM."""
    config = factory.config(tmp_path)
    daemon = daemons(config).start(wait_ready=False)
    time.sleep(0.3)
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and daemon.running():
        daemon.signal(signal.SIGHUP)
        time.sleep(0.005)
    assert daemon.running(), daemon.output()
    daemon.wait_event("daemon_ready")
    drop(factory.frame(81, "fz"), tmp_path / "in")
    wait_for(_done(LedgerView(tmp_path / "state"), 1), what="a frame processed after the storm")
    assert daemon.stop(timeout=30.0) == 0


def test_a_deleted_ledger_stops_the_daemon_for_a_clean_restart(
    tmp_path: Path, factory: FrameFactory, daemons: Callable[..., Daemon]
) -> None:
    """Deleting the ledger under a running daemon is noticed within seconds: it exits 1 (systemd restarts
    it on a new ledger) instead of writing on into a file nobody can open again."""
    config = factory.config(tmp_path)
    daemon = daemons(config).start()
    for path in (tmp_path / "state").glob("lcowatch.sqlite*"):
        path.unlink()
    assert daemon.wait_exit(timeout=30.0) == 1
    assert "was deleted" in daemon.find("daemon_fatal")[0]["reason"]


def test_a_file_name_that_is_not_utf8_is_processed_and_the_daemon_keeps_going(
    tmp_path: Path, factory: FrameFactory, daemons: Callable[..., Daemon]
) -> None:
    """A name with bytes that are not UTF-8 (the file system allows them) is stored losslessly, processed,
    shown as \\xNN, and neither that start nor the next one fails."""
    config = factory.config(tmp_path)
    watch, ledger = tmp_path / "in", LedgerView(tmp_path / "state")
    odd = os.fsdecode(b"night-\xff\xfe-") + factory.frame(30).name
    drop(factory.frame(30), watch, how="copy", name=odd)
    daemon = daemons(config).start()
    wait_for(_done(ledger, 1), what="the oddly named frame")
    drop(factory.frame(31), watch, how="rename")
    wait_for(_done(ledger, 2), what="the next frame")
    assert daemon.find("frame_processed")[0]["file"] == "night-\\xff\\xfe-" + factory.frame(30).name
    assert daemon.stop() == 0
    daemon.start()  # the stored name does not stop a restart either
    assert daemon.stop() == 0
    assert os.fsencode(watch / odd) in {os.fsencode(p) for p in watch.iterdir()}


def test_a_watched_folder_moved_away_and_made_anew_is_watched_again_at_once(
    tmp_path: Path, factory: FrameFactory, daemons: Callable[..., Daemon]
) -> None:
    """A watched folder swapped for a new one (moved away, deleted, recreated) is watched again within
    seconds, not at the next reconcile scan (60 s here)."""
    config = factory.config(tmp_path)
    watch, ledger = tmp_path / "in", LedgerView(tmp_path / "state")
    daemon = daemons(config).start()
    watch.rename(tmp_path / "in.old")
    watch.mkdir()
    daemon.wait_event("watch_path_replaced", timeout=10.0)
    drop(factory.frame(40), watch, how="rename")
    wait_for(_done(ledger, 1), timeout=20.0, what="a frame in the new folder")
    assert daemon.stop() == 0


def test_a_watched_sub_folder_swapped_for_a_symlink_is_not_followed_out_of_the_watch(
    tmp_path: Path, factory: FrameFactory, daemons: Callable[..., Daemon]
) -> None:
    """A file queued in a watched sub-folder, whose folder is then swapped for a symlink to a folder outside
    the watch, is neither read nor moved: the whole path is resolved against the watch when the file is
    taken, not only its last part."""
    config = factory.config(tmp_path, watch={"quiet_seconds": 3.0})
    watch, state, ledger = tmp_path / "in", tmp_path / "state", LedgerView(tmp_path / "state")
    daemon = daemons(config).start()
    (watch / "night").mkdir()
    queued = drop(factory.frame(41), watch / "night")
    time.sleep(1.0)  # seen and waiting out its quiet period
    outside = tmp_path / "outside"
    (watch / "night").rename(outside)
    (watch / "night").symlink_to(outside, target_is_directory=True)
    daemon.wait_event("path_left_the_watch", file=queued.name, timeout=20.0)
    drop(factory.frame(42), watch)
    wait_for(_done(ledger, 1), timeout=30.0, what="a frame inside the watch")
    assert daemon.stop() == 0
    assert (outside / queued.name).is_file()
    assert sha256_of(outside / queued.name) not in ledger.states()
    assert not _quarantined_names(state)


def test_retry_reaches_a_running_daemon_at_once(
    tmp_path: Path, factory: FrameFactory, daemons: Callable[..., Daemon]
) -> None:
    """`lcowatch retry` of a rejected frame (it stays where it is: no file event) asks the running daemon to
    look again, so it is worked on now, not at the next reconcile scan (an hour here)."""
    config = factory.config(tmp_path, watch={"rescan_seconds": 3600.0})
    watch, ledger = tmp_path / "in", LedgerView(tmp_path / "state")
    blind = factory.frame(75, "fz", wcs_error=True)  # cannot start a target: rejected, waiting for a template
    daemon = daemons(config).start()
    drop(blind, watch)
    wait_for(lambda: ledger.count("rejected") == 1, what="the frame to be rejected")
    sha256 = sha256_of(blind.path)
    result = subprocess.run(
        [sys.executable, "-m", "lcowatch", "retry", "--config", str(config), sha256],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0 and f"(PID {daemon.proc.pid})" in result.stdout, result.stdout + result.stderr
    daemon.wait_event("config_reloaded", timeout=10.0)
    wait_for(lambda: len(daemon.find("frame_processed", file=blind.name)) == 2, timeout=20.0, what="a second look")
    assert ledger.count("rejected") == 1
    assert daemon.stop() == 0
