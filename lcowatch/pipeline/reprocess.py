"""``lcowatch reprocess``: a target's whole light curve measured again from its images under the current
config (template choice, apertures, catalog), built beside the live one and swapped in atomically
(:mod:`lcowatch.state.rebuild`)."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from lcowatch.config import Config
from lcowatch.intake.quarantine import QUARANTINE_DIR
from lcowatch.log import get_logger
from lcowatch.pipeline.batch import run_batch
from lcowatch.pipeline.executor import Executor
from lcowatch.pipeline.runner import Pipeline
from lcowatch.science.refcat import CACHE_DIR
from lcowatch.state.images import pin_reference, reference_image, target_pins
from lcowatch.state.ledger import LEDGER_NAME, connect, transaction
from lcowatch.state.rebuild import TargetFile, measured_files, seed, swap_in

#: Under ``state_dir``: one scratch folder per target being rebuilt.
SCRATCH_DIR = "reprocess"
#: Rounds of "measure what arrived during the rebuild, try the swap again" before giving up.
MAX_ROUNDS = 5


class ReprocessError(Exception):
    """The rebuild cannot be done; the live light curve is unchanged."""


def reprocess(
    config: Config, target: str, executor: Executor, filter: str | None = None, *, first: Sequence[Path] = ()
) -> dict[str, int]:
    """Measure ``target``'s frames (of ``filter`` only, keeping the other filters' points and the target's
    reference frame and comparison stars) again into a scratch state and swap the result in; returns how many
    files ended in each state. The files ``first`` (the frames of a reference image set by hand) are
    measured before all others; the target's pinned reference frames are honoured.

    Raises
    ------
    ReprocessError
        An image is no longer where the ledger saw it, or frames kept arriving; nothing was changed.
    """
    log = get_logger().bind(target=target, filter=filter)
    live = connect(config.state_dir)
    scratch_dir = config.state_dir / SCRATCH_DIR / target
    shutil.rmtree(scratch_dir, ignore_errors=True)  # what a killed rebuild left
    scratch_dir.mkdir(parents=True, mode=0o700)
    # The rebuild reads the live catalog cache (no new queries for what is cached); what it quarantines
    # goes where every quarantined file goes.
    for shared in (CACHE_DIR, QUARANTINE_DIR):
        (config.state_dir / shared).mkdir(exist_ok=True)
        os.symlink(config.state_dir / shared, scratch_dir / shared)
    scratch = config.model_copy(update={"state_dir": scratch_dir, "targets": {target: config.targets[target]}})
    pipeline = Pipeline(scratch, connect(scratch_dir), executor=executor)
    if filter is not None:
        seed(live, scratch_dir / LEDGER_NAME, target, filter)
    with transaction(pipeline.store.conn):
        for (pinned_filter, camera), shas in target_pins(live, target).items():
            pin_reference(pipeline.store.conn, target, pinned_filter, camera, shas)
    outcomes: Counter[str] = Counter()
    todo = measured_files(live, target, filter)
    for _ in range(MAX_ROUNDS):
        _measure(pipeline, todo, outcomes, first)
        first = ()
        _check_pinned_references(pipeline, target)
        log.info("reprocess_measured", files=len(todo))
        arrived = set(swap_in(live, scratch_dir / LEDGER_NAME, target))
        if not arrived:
            break
        todo = [f for f in measured_files(live, target) if f.sha256 in arrived]  # of any filter: they are new
    else:
        raise ReprocessError(f"frames of {target} kept arriving during {MAX_ROUNDS} rounds; try again when quiet")
    shutil.rmtree(scratch_dir, ignore_errors=True)
    log.info("reprocess_swapped", files=sum(outcomes.values()), **outcomes)
    return dict(outcomes)


def _check_pinned_references(pipeline: Pipeline, target: str) -> None:
    """A reference image set by hand must have been made from its frames: without it every other frame of
    its filter and camera would be rejected, and the swap would empty that part of the light curve."""
    conn = pipeline.store.conn
    for filter, camera in target_pins(conn, target):
        if reference_image(conn, target, filter, camera) is None:
            raise ReprocessError(
                f"the frames set as the {filter} reference image of {target} ({camera}) could not be measured; "
                "see the log for why"
            )


def _measure(pipeline: Pipeline, files: list[TargetFile], outcomes: Counter[str], first: Sequence[Path]) -> None:
    gone = [str(f.path) for f in files if not f.path.is_file()]
    if gone:
        raise ReprocessError(f"{len(gone)} image(s) are no longer where they were seen, e.g. {gone[0]}")
    for outcome in run_batch(pipeline, pipeline.unseen(f.path for f in files), first=first):
        outcomes[outcome.state] += 1
