"""A batch (``lcowatch process``, ``lcowatch reprocess``) in two passes, so that each template is the best
frame of the whole batch, not the best one so far.

**Pass 1, the survey**, measures the image quality of every file (on the cluster when there is one) on a
central :data:`SURVEY_SIZE` square, which ranks frames as well as the whole image does at a fraction of its
cost. Per target, filter and instrument, the best-scoring frame that passes quality control *leads*. The
leaders are measured first, best first, so the best becomes the filter's template and every other frame
of the filter is measured against it; another instrument's leader is the template its frames register to
(a sparse 0.4 m frame shares only a handful of stars with a 1 m template). A target without a reference
pixel frame gets its best frame with a solved WCS as that frame. A filter whose stored template is pinned,
or would be beaten by less than ``template.min_improvement``, has no leader but the best frame of a camera
without a template. For a ``difference`` target the leaders also become its reference images, so only
frames outside the transient's window may lead (see :func:`_may_lead`).

**Pass 2** measures the leaders, then every other file in observation-time order, each through the same
stages and the same one-transaction write as any frame: the survey only chooses the order. A file the
survey could not read (corrupt, not FITS, of no target) simply keeps its place; pass 2 says why it fails.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from lcowatch.config import Config, TargetConfig
from lcowatch.intake.readiness import Verdict
from lcowatch.pipeline.pixels import FrameSurvey
from lcowatch.pipeline.runner import Outcome, Pipeline
from lcowatch.science.quality import InstrumentHistory, judge_quality
from lcowatch.science.template import template_score
from lcowatch.state.store import Store

#: The passes, as ``run_batch`` reports them.
SURVEY, MEASURE = "survey", "measure"

Report = Callable[[str, Outcome | None], None]


def batch_leaders(config: Config, store: Store, surveys: Iterable[FrameSurvey]) -> list[Path]:
    """The files to measure first, target by target (see the module's text)."""
    groups: dict[tuple[str, str, str | None], list[FrameSurvey]] = defaultdict(list)
    # In path order, whatever order a cluster finished them in: ties fall the same way as in serial runs.
    for survey in sorted(surveys, key=lambda s: str(s.path)):
        if _may_lead(config.targets[survey.target], survey):
            groups[survey.target, survey.filter, survey.instrument].append(survey)
    judged: dict[str, list[tuple[bool, float, FrameSurvey]]] = defaultdict(list)  # (good, score, frame)
    leaders: dict[str, list[tuple[float, FrameSurvey]]] = defaultdict(list)
    for (target, filter, instrument), group in groups.items():
        marks = [(*_judge(config, survey, group), survey) for survey in group]
        judged[target].extend(marks)
        current = store.current_template(target, filter)
        good = [(score, survey) for ok, score, survey in marks if ok]
        if not good or (current is not None and current.pinned):
            continue
        score, best = max(good, key=lambda pair: pair[0])
        new_instrument = not store.instrument_templates(target, instrument, limit=1)
        if current is None or new_instrument or score > current.score + config.template.min_improvement:
            leaders[target].append((score, best))
    first: list[Path] = []
    for target in judged:
        order = [survey.path for _, survey in sorted(leaders[target], key=lambda pair: -pair[0])]
        solved = [(ok, score, survey) for ok, score, survey in judged[target] if survey.wcs_usable]
        if store.reference(target) is None and solved:
            # The reference pixel frame needs a solved WCS to place the target: the best such frame (a
            # flagged one when there is no other, as for any first template) founds it.
            order.insert(0, max(solved, key=lambda mark: mark[:2])[2].path)
        first.extend(dict.fromkeys(order))
    return first


def _may_lead(target: TargetConfig, survey: FrameSurvey) -> bool:
    """Whether a frame may be measured ahead of its time. A ``difference`` target's first frame measured
    becomes its reference image, which must hold no transient light: only frames outside the transient's
    window may lead, and without a window none (the earliest frames stand in for "before the transient")."""
    if target.method != "difference":
        return True
    window = target.reference_window()
    return window is not None and not window[0] <= survey.mjd <= window[1]


def _judge(config: Config, survey: FrameSurvey, group: list[FrameSurvey]) -> tuple[bool, float]:
    """Whether quality control would pass the frame, and its template score. It is judged against the
    frames of the same filter and instrument in the batch, not the store's (which a ``reprocess --filter``
    lacks): the same frames lead either way."""
    quality = judge_quality(survey.image_quality, survey.pixscale, config.quality, _batch_history(group))
    score = template_score(quality, config.template)
    return quality.flags == 0 and math.isfinite(score), score


def _batch_history(group: list[FrameSurvey]) -> InstrumentHistory:
    """The medians of a group of one instrument's frames, as its stored history would give them."""
    fwhm = [s.image_quality.fwhm_pix * s.pixscale for s in group]
    nstars = [s.image_quality.nstars for s in group]
    return InstrumentHistory(float(np.nanmedian(fwhm)), float(np.median(nstars)), len(group))


def run_batch(
    pipeline: Pipeline, files: Sequence[tuple[Path, Verdict | None]], *, report: Report | None = None,
    first: Sequence[Path] = (),
) -> list[Outcome]:  # fmt: skip
    """Survey the readable ``files`` (in observation-time order, each with its readiness verdict, as
    :meth:`Pipeline.unseen` gives them), then process every file, leaders first; frames that waited for a
    template get their turn at the end. Returns the outcomes of pass 2.

    ``report(pass, outcome)`` is called after each file of each pass (``"survey"`` with None, ``"measure"``
    with the file's outcome). Files in ``first`` (a reference image's frames set by hand) go before the
    leaders.
    """
    note = report or (lambda _pass, _outcome: None)
    readable = [path for path, verdict in files if verdict is not None and verdict.kind == "ready"]
    surveys = []
    if len(readable) > 1:
        for survey in pipeline.executor.survey(readable):
            if survey is not None:
                surveys.append(survey)
            note(SURVEY, None)
    verdicts = dict(files)
    chosen = [path for path in first if path in verdicts] + batch_leaders(pipeline.config, pipeline.store, surveys)
    leaders = dict.fromkeys(chosen)
    ordered = [(path, verdicts[path]) for path in leaders] + [(p, v) for p, v in files if p not in leaders]
    readable = [path for path, verdict in ordered if verdict is not None and verdict.kind == "ready"]
    outcomes = []
    readable_done = 0
    for path, verdict in ordered:
        pipeline.executor.prefetch(readable, readable_done)  # this file first, when it is readable
        outcomes.append(pipeline.process_unwatched(path, verdict))
        readable_done += verdict is not None and verdict.kind == "ready"
        note(MEASURE, outcomes[-1])
    while waiting := pipeline.take_requeued():
        outcomes.extend(pipeline.process_unwatched(path) for path in waiting if path.exists())
    return outcomes
