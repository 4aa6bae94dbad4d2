"""The lcowatch command line. Exit codes: 0 success, 2 bad usage or config, 1 other failure."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import signal
import sys
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import IO, Any, cast

from lcowatch import __version__, log
from lcowatch.config import Config, load
from lcowatch.errors import ConfigError, Stop
from lcowatch.intake.discovery import find_files
from lcowatch.intake.quarantine import QUARANTINE_DIR, find_quarantined, quarantined_names, release
from lcowatch.log import get_logger
from lcowatch.outputs.export import lightcurve_table, named_check_star, update_result_file, write_aavso
from lcowatch.outputs.export import write_table as export_table
from lcowatch.outputs.plot import PLOTS_DIR, plot_lightcurve
from lcowatch.pipeline.batch import MEASURE, SURVEY, run_batch
from lcowatch.pipeline.executor import Executor, make_executor
from lcowatch.pipeline.reprocess import ReprocessError, reprocess
from lcowatch.pipeline.runner import Outcome, Pipeline, pin_template, recalibrate
from lcowatch.pipeline.subtraction import instrument_class
from lcowatch.science.frame import read_content
from lcowatch.science.refcat import CatalogFileError, FieldCatalogs, read_local_catalog, standard_band
from lcowatch.state.images import pin_reference, reference_images, target_pins
from lcowatch.state.ledger import Ledger, connect, path_text, transaction
from lcowatch.state.store import FRAME_COLUMNS, Store
from lcowatch.states import LEDGER_STATES, State

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
TARGET_HELP = "a target's name, as in the config's targets"
SHA256 = re.compile(r"[0-9a-f]{64}")
FINISHED_STATES = {State.DONE, State.REJECTED, State.QUARANTINED, State.IGNORED, State.SKIPPED}


class OutputError(Exception):
    """The file named by -o cannot be written."""


def _open_output(path: str | None) -> AbstractContextManager[IO[str]]:
    """The file named by -o, or stdout (left open)."""
    if not path:
        return nullcontext(sys.stdout)
    try:
        return open(path, "w", newline="")
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None


def _format_value(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.5f}" if abs(value) < 1e5 else f"{value:.6f}"
    return str(value)


def write_table(rows: list[dict[str, object]], columns: Sequence[str], fmt: str, out: IO[str]) -> None:
    """Rows as CSV or as an aligned text table."""
    if fmt == "csv":
        writer = csv.writer(out)
        writer.writerow(columns)
        writer.writerows([_format_value(row.get(c)) for c in columns] for row in rows)
        return
    cells = [list(columns)] + [[_format_value(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line in cells:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
        out.write("\n")


def cmd_check_config(args: argparse.Namespace, config: Config) -> int:
    # A catalog file is read as processing will read it: unusable columns are an error now, not a night of
    # uncalibrated points later.
    unusable = []
    for name, target in config.targets.items():
        if target.refcat is not None:
            try:
                read_local_catalog(target.refcat)
            except CatalogFileError as exc:
                unusable.append(f"targets.{name}.refcat: {exc}")
    if unusable:
        print("\n".join(f"config error: {problem}" for problem in unusable))
        return EXIT_USAGE
    print(f"{config.source}: valid ({len(config.targets)} target(s), watching {len(config.watch.paths)} path(s))")
    for k, folder in enumerate(config.watch.paths):
        if not folder.is_dir():  # valid (the daemon watches for it to appear), but often a typo
            print(f"warning: watch.paths[{k}]: {folder} is not a folder (yet); nothing arrives there until it is")
    if config.catalog.source == "file":
        for name, target in config.targets.items():
            if target.refcat is None:
                print(f"warning: targets.{name}: no refcat while catalog.source is file: its points stay uncalibrated")
    if config.source is not None and config.source.stat().st_mode & 0o002:
        print(f"warning: {config.source} is writable by every user: anyone could change what the daemon does")
    return EXIT_OK


def cmd_run(args: argparse.Namespace, config: Config) -> int:
    from lcowatch.intake.daemon import run  # the daemon's threads and signal handlers only when asked for

    return run(config)


class Progress:
    """A progress bar for a person at a terminal, one pass of a batch after the other (tqdm: files done,
    rate, time left, and the outcomes so far), kept at the bottom: log lines to the same terminal go
    through :meth:`beneath` and are written above it. Nothing is drawn when ``stream`` is not a terminal.
    ``totals``: the number of files of each pass, in the order they run."""

    def __init__(self, totals: dict[str, int], stream: IO[str], *, enabled: bool) -> None:
        from tqdm import tqdm  # only for a batch at a terminal

        self.totals = totals
        self.counts: dict[str, int] = {}
        self.pass_name = next(iter(totals))
        self.bar = tqdm(total=totals[self.pass_name], desc=self.pass_name, unit="file", file=stream,
                        disable=not enabled, dynamic_ncols=True)  # fmt: skip

    def update(self, pass_name: str, outcome: Outcome | None) -> None:
        if pass_name != self.pass_name:
            self.pass_name = pass_name
            self.bar.refresh()  # the pass's last count, which tqdm's rate limit may not have drawn
            self.bar.reset(total=self.totals[pass_name])
            self.bar.set_description_str(pass_name, refresh=False)
        if outcome is not None:
            self.counts[outcome.state] = self.counts.get(outcome.state, 0) + 1
            self.bar.set_postfix_str(", ".join(f"{n} {name}" for name, n in sorted(self.counts.items())), refresh=False)
        self.bar.update()

    def beneath(self, log_stream: IO[str]) -> IO[str]:
        """``log_stream``, or when both are the terminal a stream that writes above the progress bar."""
        if self.bar.disable or not log_stream.isatty():
            return log_stream
        return cast(IO[str], _AboveProgress(self.bar, log_stream))

    def close(self) -> None:
        self.bar.close()


class _AboveProgress:
    """A text stream whose whole lines are written above the progress bar (``tqdm.write``)."""

    def __init__(self, bar: Any, stream: IO[str]) -> None:
        self.bar, self.stream = bar, stream
        self.pending = ""

    def write(self, text: str) -> int:
        self.pending += text
        while "\n" in self.pending:
            line, self.pending = self.pending.split("\n", 1)
            self.bar.write(line, file=self.stream)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()


def _executor(args: argparse.Namespace, config: Config) -> Executor | None:
    """The executor the command line or the config asks for; None (said in the log) when a cluster cannot
    be reached."""
    try:
        return make_executor(config, workers=args.workers, scheduler=args.scheduler)
    except (OSError, TimeoutError) as exc:
        get_logger().error("cluster_unreachable", scheduler=args.scheduler or config.processing.scheduler,
                           error=str(exc))  # fmt: skip
        return None


def cmd_process(args: argparse.Namespace, config: Config) -> int:
    executor = _executor(args, config)
    if executor is None:
        return EXIT_FAILURE
    try:
        return _process_files(args, config, Pipeline(config, connect(config.state_dir), executor=executor))
    finally:
        executor.close()


def cmd_reprocess(args: argparse.Namespace, config: Config, *, first: Sequence[Path] = ()) -> int:
    if not _known_target(config, args.target):
        return EXIT_USAGE
    executor = _executor(args, config)
    if executor is None:
        return EXIT_FAILURE
    try:
        rebuilt = reprocess(config, args.target, executor, args.filter, first=first)
    except ReprocessError as exc:
        get_logger().error("reprocess_failed", target=args.target, reason=str(exc))
        return EXIT_FAILURE
    finally:
        executor.close()
    update_result_file(Store(connect(config.state_dir)), args.target, config.state_dir)
    unfinished = set(rebuilt) - set(FINISHED_STATES)
    return EXIT_FAILURE if unfinished else EXIT_OK


def _process_files(args: argparse.Namespace, config: Config, pipeline: Pipeline) -> int:
    pipeline.requeue_ignored()  # the config may have gained their target since
    files = pipeline.unseen(find_files(Path(p) for p in args.paths))
    missing = [p for p in args.paths if not Path(p).exists()]
    for path in missing:
        pipeline.log.error("path_not_found", path=str(path))
    # A FIFO or a device named on the command line: said, not read (find_files passes over them).
    unusable = [p for p in args.paths if Path(p).exists() and not (Path(p).is_dir() or Path(p).is_file())]
    for path in unusable:
        pipeline.log.error("not_a_regular_file", path=str(path))
    missing += unusable
    readable = sum(verdict is not None and verdict.kind == "ready" for _, verdict in files)
    progress = Progress({SURVEY: readable, MEASURE: len(files)}, sys.stderr, enabled=sys.stderr.isatty())
    log.configure(progress.beneath(sys.stdout), level=config.log_level)
    outcomes = run_batch(pipeline, files, report=progress.update)
    progress.close()
    pipeline.flush_results(force=True)
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome.state] = counts.get(outcome.state, 0) + 1
    pipeline.log.info("process_finished", files=len(outcomes), **counts)
    unfinished = any(o.state not in FINISHED_STATES for o in outcomes)
    return EXIT_FAILURE if unfinished or missing else EXIT_OK


def cmd_frames(args: argparse.Namespace, config: Config) -> int:
    if args.target is not None and args.target not in config.targets:
        print(f"lcowatch: unknown target {args.target!r}", file=sys.stderr)
        return EXIT_USAGE
    store = Store(connect(config.state_dir))
    with _open_output(args.output) as out:
        write_table(store.frames(args.target, args.state), FRAME_COLUMNS, args.format, out)
    return EXIT_OK


STATUS_COLUMNS = ["target", "filter", "frames", "rejected", "template", "last_mjd", "last_mag", "last_diff_mag",
                  "zp_median", "zp_recent"]  # fmt: skip


#: Files of these states are named by ``status`` (the rest are counted): they want a look.
NAMED_STATES = (State.PENDING, State.QUARANTINED)
NAMED_AT_MOST = 20


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    conn = connect(config.state_dir)
    ledger = Ledger(conn)
    counts = ledger.counts()
    rows = Store(conn).status()
    named = {
        str(state): [
            {"file": log.display_name(Path(path_text(r.path)).name), "attempts": r.attempts, "reason": r.error}
            for r in ledger.in_state(state)
        ]
        for state in NAMED_STATES
    }
    if args.json:
        json.dump({"files": counts, **named, "targets": rows}, sys.stdout, indent=2)
        print()
        return EXIT_OK
    print("files: " + ", ".join(f"{state} {n}" for state, n in counts.items()))
    for state, files in named.items():
        for entry in files[:NAMED_AT_MOST]:
            attempts = f" (attempts {entry['attempts']})" if state == State.PENDING else ""
            reason = f": {entry['reason']}" if entry["reason"] else ""
            print(f"  {state} {entry['file']}{attempts}{reason}")
        if len(files) > NAMED_AT_MOST:
            print(f"  ... and {len(files) - NAMED_AT_MOST} more {state} (lcowatch frames --state {state})")
    write_table(rows, STATUS_COLUMNS, "table", sys.stdout)
    return EXIT_OK


def _known_target(config: Config, target: str) -> bool:
    if target in config.targets:
        return True
    print(f"lcowatch: unknown target {target!r} (configured: {', '.join(config.targets)})", file=sys.stderr)
    return False


def cmd_export(args: argparse.Namespace, config: Config) -> int:
    if not _known_target(config, args.target):
        return EXIT_USAGE
    store = Store(connect(config.state_dir))
    table = lightcurve_table(store, args.target, args.filter)
    if not len(table) and args.filter is not None:
        measured = sorted({str(f) for f in lightcurve_table(store, args.target)["filter"]})
        print(
            f"lcowatch: {args.target} has no points in filter {args.filter!r}"
            f" (it has points in: {', '.join(measured) or 'none yet'})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.format == "aavso":
        return _export_aavso(args, config, store, table)
    with _open_output(args.output) as out:
        export_table(table, out, args.format)
    return EXIT_OK


def _export_aavso(args: argparse.Namespace, config: Config, store: Store, table: Any) -> int:
    """An AAVSO report, written only when it holds an observation (a header alone would be submitted as
    an empty report)."""
    if not config.aavso_obscode:
        print("lcowatch: set aavso_obscode in the config (your AAVSO observer code) for an AAVSO report",
              file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    report = io.StringIO()
    written = write_aavso(
        table, report, target=config.targets[args.target].aavso_name or args.target, obscode=config.aavso_obscode,
        check=named_check_star(config, store, args.target, table), include_flagged=args.include_flagged,
    )  # fmt: skip
    if not written:
        print(f"lcowatch: {args.target} has no calibrated observation to report"
              f"{'' if args.include_flagged else ' (flagged points are left out without --include-flagged)'}",
              file=sys.stderr)  # fmt: skip
        return EXIT_FAILURE
    with _open_output(args.output) as out:
        out.write(report.getvalue())
    get_logger().info("aavso_export", target=args.target, observations=written)
    return EXIT_OK


def cmd_plot(args: argparse.Namespace, config: Config) -> int:
    if not _known_target(config, args.target):
        return EXIT_USAGE
    path = Path(args.output) if args.output else config.state_dir / PLOTS_DIR / f"{args.target}.png"
    table = lightcurve_table(Store(connect(config.state_dir)), args.target, args.filter)
    points = plot_lightcurve(table, path, title=args.target)
    print(f"{path} ({points} points)")
    return EXIT_OK


def cmd_template(args: argparse.Namespace, config: Config) -> int:
    if not _known_target(config, args.target):
        return EXIT_USAGE
    store = Store(connect(config.state_dir))
    if args.set:
        try:
            template = pin_template(config, store.conn, args.set, args.target)
        except (LookupError, ValueError) as exc:
            print(f"lcowatch: {exc.args[0]}", file=sys.stderr)
            return EXIT_FAILURE
        record = Ledger(store.conn).get(template.sha256)
        if record is not None and record.state == State.REJECTED:
            print(f"lcowatch: warning: {template.file} was rejected ({record.error}); pinned as asked",
                  file=sys.stderr)  # fmt: skip
    elif args.unpin:
        store.unpin_template(args.target, args.filter)
    rows = store.template_history(args.target, args.filter)
    for row in rows:
        row["state"] = "current" if row.pop("active") else ("pinned" if row["pinned"] else "replaced")
    columns = ["filter", "state", "file", "mjd", "score", "fwhm", "background_rms", "nstars", "reason"]
    write_table(rows, columns, "table", sys.stdout)
    return EXIT_OK


def cmd_reference(args: argparse.Namespace, config: Config) -> int:
    if not _known_target(config, args.target):
        return EXIT_USAGE
    if args.rebuild or args.set:
        if config.targets[args.target].method != "difference":
            print(f"lcowatch: {args.target} has method: aperture; it uses no reference image", file=sys.stderr)
            return EXIT_USAGE
        # The reference images come from the frames as the pipeline meets them: building them again is
        # measuring the target again, beside the live light curve, and swapping it in.
        rebuilt = _set_reference(args, config) if args.set else _rebuild_reference(args, config)
        if rebuilt != EXIT_OK:
            return rebuilt
    rows = [row for row in reference_images(connect(config.state_dir), args.target)
            if args.filter is None or row["filter"] == args.filter]  # fmt: skip
    if not rows and config.targets[args.target].method != "difference":
        print(f"lcowatch: {args.target} has method: aperture; it uses no reference image", file=sys.stderr)
        return EXIT_USAGE
    columns = [
        "filter",
        "instrument_class",
        "file",
        "mjd",
        "frames",
        "fwhm_pix",
        "nx",
        "ny",
        "transient_total",
        "transient_total_err",
        "reason",
    ]
    write_table(rows, columns, "table", sys.stdout)
    return EXIT_OK


def _rebuild_reference(args: argparse.Namespace, config: Config) -> int:
    """The rules choose the reference images again (pins set by hand are dropped), and the target is
    measured against them."""
    pinned = target_pins(connect(config.state_dir), args.target)
    return _with_pins(args, config, {key: [] for key in pinned if args.filter in (None, key[0])}, first=[])


def _set_reference(args: argparse.Namespace, config: Config) -> int:
    """The frames named become the reference image of their filter and camera (the first the base, the
    others averaged in), and the target's points of that filter are measured against it."""
    store = Store(connect(config.state_dir))
    try:
        frames = list(
            {row["sha256"]: row for row in (store.processed_frame(n, args.target) for n in args.set)}.values()
        )
    except (LookupError, ValueError) as exc:
        print(f"lcowatch: {exc}", file=sys.stderr)
        return EXIT_USAGE
    kinds = {(frame["filter"], instrument_class(frame["instrument"])) for frame in frames}
    if len(kinds) > 1:
        print("lcowatch: the frames of a reference image must share one filter and camera", file=sys.stderr)
        return EXIT_USAGE
    ((filter, camera),) = kinds
    if args.filter is not None and args.filter != filter:
        print(f"lcowatch: the frames named are of filter {filter}, not {args.filter}", file=sys.stderr)
        return EXIT_USAGE
    args.filter = filter
    pins = {(filter, camera): [frame["sha256"] for frame in frames]}
    return _with_pins(args, config, pins, first=[Path(path_text(frame["path"])) for frame in frames])


def _with_pins(
    args: argparse.Namespace, config: Config, pins: dict[tuple[str, str], list[str]], *, first: list[Path]
) -> int:  # fmt: skip
    """Reprocess the target (``args.filter``) with the reference pins of each (filter, camera) in ``pins``
    replaced (an empty list: the rules choose); the old pins come back unless the light curve was rebuilt."""
    conn = connect(config.state_dir)
    before = target_pins(conn, args.target)

    def set_pins(wanted: dict[tuple[str, str], list[str]]) -> None:
        with transaction(conn):
            for (filter, camera), shas in wanted.items():
                pin_reference(conn, args.target, filter, camera, shas)

    set_pins(pins)
    code = EXIT_FAILURE
    try:
        code = cmd_reprocess(args, config, first=first)
    finally:
        if code != EXIT_OK:  # the light curve was not rebuilt: the references stay as they were
            set_pins({key: before.get(key, []) for key in pins})
    return code


def cmd_recalibrate(args: argparse.Namespace, config: Config) -> int:
    if not _known_target(config, args.target):
        return EXIT_USAGE
    conn = connect(config.state_dir)
    examined, calibrated = recalibrate(config, conn, args.target)
    get_logger().info("recalibrated", target=args.target, frames=examined, calibrated=calibrated)
    update_result_file(Store(conn), args.target, config.state_dir)
    return EXIT_OK if calibrated == examined else EXIT_FAILURE


def cmd_refstars(args: argparse.Namespace, config: Config) -> int:
    if not _known_target(config, args.target):
        return EXIT_USAGE
    try:
        band = standard_band(args.filter)
    except ValueError as exc:
        print(f"lcowatch: {exc}", file=sys.stderr)
        return EXIT_USAGE
    table = FieldCatalogs(config).get(args.target, band, args.radius, refresh=args.refresh)
    if table is None:
        print(f"lcowatch: no reference catalog could be had for {args.target} in {band}", file=sys.stderr)
        return EXIT_FAILURE
    with _open_output(args.output) as out:
        export_table(table, out, args.format)
    return EXIT_OK


def cmd_retry(args: argparse.Namespace, config: Config) -> int:
    from lcowatch.intake.daemon import running_daemon  # not the daemon's machinery, only its lock

    ledger = Ledger(connect(config.state_dir))
    wanted = args.file
    if SHA256.fullmatch(wanted):
        record = ledger.get(wanted)
        if record is None:
            print(f"lcowatch: no file with sha256 {wanted} in the ledger", file=sys.stderr)
            return EXIT_USAGE
        quarantined = next(
            (
                p for p in quarantined_names(Path(record.path).name, record.sha256, config.state_dir)
                if p.is_file() and read_content(p)[1] == record.sha256
            ),
            None,
        )  # fmt: skip
        wanted = str(quarantined) if quarantined is not None else record.path
    quarantined = find_quarantined(wanted, config.state_dir)
    if quarantined is not None:
        try:
            destination, sha256 = release(quarantined, config.watch.paths[0])
        except FileExistsError as exc:
            print(f"lcowatch: {exc}", file=sys.stderr)
            return EXIT_FAILURE
    elif Path(wanted).is_file():
        destination, sha256 = Path(wanted), read_content(Path(wanted))[1]
    else:
        print(f"lcowatch: {wanted} is neither in {config.state_dir / QUARANTINE_DIR} nor a file", file=sys.stderr)
        return EXIT_USAGE
    if sha256 is not None:
        ledger.reset(sha256)
    pid = running_daemon(config.state_dir)
    if pid is not None:
        os.kill(pid, signal.SIGHUP)  # its reload rescans the folders: the file is taken up now
        print(f"{destination}: pending again; the running daemon (PID {pid}) is looking at it now")
    else:
        print(f"{destination}: pending again; the daemon (or `lcowatch process`) will work on it")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from lcowatch.simulation.demo import run_demo  # the simulator is only needed here

    return run_demo(Path(args.workdir) if args.workdir else None)


def _add_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], name: str, *, help: str, **options: Any
) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` opens with the line the command list shows for it."""
    return commands.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".", **options)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _add_cluster_options(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--workers", type=_positive_int, metavar="N",
                       help="frames at once, on a local Dask cluster (default: processing.workers)")  # fmt: skip
    where.add_argument("--scheduler", metavar="ADDR",
                       help="an existing Dask cluster, tcp://host:8786 (default: processing.scheduler)")  # fmt: skip


def _add_rebuild_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """``reprocess`` and ``reference``: a target's light curve built again, and what it is built against."""
    again = _add_command(
        commands, "reprocess", parents=[common],
        help="measure a target's frames again under the current config; the new light curve replaces the old at once",
    )  # fmt: skip
    again.add_argument("target", metavar="TARGET", help=TARGET_HELP)
    again.add_argument("--filter", metavar="F", help="only this filter's frames (the others' points are kept)")
    _add_cluster_options(again)
    again.set_defaults(handler=cmd_reprocess, writes_table=False)

    reference = _add_command(
        commands, "reference", parents=[common],
        help="a difference target's reference images (to change them: reference_before/after, then --rebuild)",
    )  # fmt: skip
    reference.add_argument("target", metavar="TARGET", help=TARGET_HELP)
    reference.add_argument("--filter", help="only this filter")
    changes = reference.add_mutually_exclusive_group()
    changes.add_argument(
        "--set", nargs="+", metavar="FILE",
        help="make these processed frames (names or sha256; one filter and camera) the reference image, the "
        "first as its base, and measure the target's points of that filter against it again",
    )  # fmt: skip
    changes.add_argument(
        "--rebuild", action="store_true",
        help="let the rules choose them again under the current config (reference_before/after, "
        "subtraction.reference_frames; frames set by hand are dropped) and measure the target's points "
        "against them again, swapped in at once as reprocess does",
    )  # fmt: skip
    _add_cluster_options(reference)
    reference.set_defaults(handler=cmd_reference, writes_table=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lcowatch", description=__doc__)
    parser.add_argument("--version", action="version", version=f"lcowatch {__version__}")
    config_help = "config file (default: $LCOWATCH_CONFIG, else /etc/lcowatch/config.yaml)"
    parser.add_argument("--config", help=config_help)  # before the command too: lcowatch --config X status
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a command without its own --config keeps the one given before it.
    common.add_argument("--config", help=config_help, default=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = _add_command(commands, "demo", help="simulate a night of LCO frames and run the pipeline on them")
    demo.add_argument("--workdir", metavar="DIR", help="where to put everything (default: a new temporary folder)")
    demo.set_defaults(handler=cmd_demo, writes_table=False, needs_config=False)

    check = _add_command(commands, "check-config", parents=[common], help="validate the config, list every error")
    check.set_defaults(handler=cmd_check_config, writes_table=False)

    run = _add_command(commands, "run", parents=[common], help="the daemon: watch the folders, process new frames")
    run.set_defaults(handler=cmd_run, writes_table=False)

    process = _add_command(commands, "process", parents=[common], help="process files or folders now")
    process.add_argument("paths", nargs="+", metavar="PATH")
    _add_cluster_options(process)
    process.set_defaults(handler=cmd_process, writes_table=False)

    frames = _add_command(
        commands,
        "frames",
        parents=[common],
        help="every file the ledger knows, its state, quality and reasons, in time order",
    )
    frames.add_argument("--state", choices=[str(s) for s in LEDGER_STATES], help="only files in this state")
    frames.add_argument("target", nargs="?", metavar="TARGET", help="only this target's files")
    frames.add_argument("--format", choices=["table", "csv"], default="table")
    frames.add_argument("-o", "--output", metavar="FILE")
    frames.set_defaults(handler=cmd_frames, writes_table=True)

    status = _add_command(commands, "status", parents=[common], help="ledger counts and per-target summary")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=cmd_status, writes_table=True)

    export = _add_command(commands, "export", parents=[common], help="a target's light curve")
    export.add_argument("target", metavar="TARGET", help=TARGET_HELP)
    export.add_argument("--filter", metavar="F", help="only this filter")
    export.add_argument("--format", choices=["csv", "ecsv", "aavso"], default="csv")
    export.add_argument("-o", "--output", metavar="FILE")
    export.add_argument(
        "--include-flagged", action="store_true", help="aavso: keep points whose flags make them doubtful"
    )
    export.set_defaults(handler=cmd_export, writes_table=True)

    template = _add_command(commands, "template", parents=[common], help="a target's templates and their history")
    template.add_argument("target", metavar="TARGET", help=TARGET_HELP)
    template.add_argument("--filter", metavar="F")
    choice = template.add_mutually_exclusive_group()
    choice.add_argument("--set", metavar="FILE", help="pin this processed frame (name or sha256) as the template")
    choice.add_argument("--unpin", action="store_true", help="let better frames replace the template again")
    template.set_defaults(handler=cmd_template, writes_table=True)

    _add_rebuild_commands(commands, common)

    recal = _add_command(commands, "recalibrate", parents=[common], help="calibrate stored points again (no images)")
    recal.add_argument("target", metavar="TARGET", help=TARGET_HELP)
    recal.set_defaults(handler=cmd_recalibrate, writes_table=False)

    refstars = _add_command(commands, "refstars", parents=[common], help="a target's reference stars")
    refstars.add_argument("target", metavar="TARGET", help=TARGET_HELP)
    refstars.add_argument("--filter", default="rp", help="LCO filter or band (default rp)")
    refstars.add_argument(
        "--radius", type=float, metavar="ARCMIN", help="search radius (default: catalog.radius_arcmin, else 10)"
    )
    refstars.add_argument("--refresh", action="store_true", help="ask the catalog again, ignoring the cache")
    refstars.add_argument("--format", choices=["csv", "ecsv"], default="csv")
    refstars.add_argument("-o", "--output", metavar="FILE")
    refstars.set_defaults(handler=cmd_refstars, writes_table=True)

    retry = _add_command(commands, "retry", parents=[common], help="put a quarantined or rejected file back in line")
    retry.add_argument(
        "file", metavar="FILE", help="the quarantined file (path or name), a file to redo, or a file's sha256"
    )
    retry.set_defaults(handler=cmd_retry, writes_table=False)

    plot = _add_command(commands, "plot", parents=[common], help="a PNG of a target's light curve")
    plot.add_argument("target", metavar="TARGET", help=TARGET_HELP)
    plot.add_argument("--filter", metavar="F")
    plot.add_argument("-o", "--output", metavar="FILE.png", help="default: state_dir/plots/TARGET.png")
    plot.set_defaults(handler=cmd_plot, writes_table=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not getattr(args, "needs_config", True):
        log.configure(sys.stdout)
        return int(args.handler(args))
    log_stream = sys.stderr if args.writes_table else sys.stdout
    try:
        config = load(args.config)
    except ConfigError as exc:
        # check-config's answer is the list itself; other commands report it as the reason they stop.
        stream = sys.stdout if args.command == "check-config" else sys.stderr
        for problem in exc.problems:
            print(f"config error: {problem}", file=stream)
        return EXIT_USAGE
    log.configure(log_stream, level=config.log_level)
    try:
        return int(args.handler(args, config))
    except (Stop, OutputError) as exc:  # e.g. a state folder written by a newer lcowatch; -o /missing/x.csv
        print(f"lcowatch: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except BrokenPipeError:
        # The reader (e.g. `| head`) has gone: stop quietly, and keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
