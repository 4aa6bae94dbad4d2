"""Error classes, named by what the daemon does next with the file that raised them.

A frame that fails quality control is *not* an error: it is a normal outcome recorded with flags.
"""

from __future__ import annotations


class LcowatchError(Exception):
    """Base class; ``step`` names the pipeline step that raised it."""

    def __init__(self, message: str, *, step: str | None = None) -> None:
        super().__init__(message)
        self.step = step


class RetryLater(LcowatchError):
    """A transient condition (catalog unreachable, disk full): back off, count no attempt, write nothing."""


class Quarantine(LcowatchError):
    """Poison input (not FITS, truncated, missing keywords, too large): move the file aside at once."""


class Reject(LcowatchError):
    """The frame is readable but cannot give a point (e.g. it cannot be registered): record it as rejected."""


class Stop(LcowatchError):
    """Fatal for the daemon (state folder unwritable, ledger corrupt): exit non-zero and let systemd restart."""


class ConfigError(LcowatchError):
    """The configuration is invalid; ``problems`` lists every bad key with its reason."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems
