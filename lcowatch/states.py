"""Names that cross layers: a file's state in the ledger, how one run of the pipeline ended, and the step
where a frame stopped. They are ``StrEnum``: stored and logged as their plain text."""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    """A file's state in the ledger, or how one run ended (the last three are never stored)."""

    PENDING = "pending"  # seen, not finished; ``attempts`` counts the starts
    DONE = "done"
    REJECTED = "rejected"  # a normal outcome: the frame cannot give a point (reasons recorded)
    IGNORED = "ignored"  # OBJECT matches no target
    QUARANTINED = "quarantined"  # unreadable, or failed too often: moved aside with its reason
    FAILED = "failed"  # this attempt raised; the file stays pending and is tried again later
    SKIPPED = "skipped"  # already finished under this content
    RETRY = "retry"  # a transient condition (catalog down, disk full): back off, nothing counted


#: The states a file can have in the ledger.
LEDGER_STATES = (State.PENDING, State.DONE, State.REJECTED, State.IGNORED, State.QUARANTINED)
#: Ledger states that end a file's processing.
TERMINAL_STATES = frozenset(LEDGER_STATES) - {State.PENDING}


class Step(StrEnum):
    """Where a file stopped: the pipeline's stages in order, and the steps around them."""

    READINESS = "readiness"
    READ = "read"
    PREPROCESS = "preprocess"
    QUALITY = "quality"
    TEMPLATE = "template"
    REGISTER = "register"
    PHOTOMETRY = "photometry"
    SUBTRACT = "subtract"
    DIFFERENTIAL = "differential"
    CATALOG = "refcat"
    CALIBRATE = "calibrate"
    STORE = "store"
