"""Runs ``lcowatch run`` with one fault-injection stage in front of the real ones (test helper).

Usage: ``python daemon_driver.py CONFIG STAGE`` where STAGE is one of:

- ``sleep:SECONDS``: every frame takes that long (a frame in hand for signals, stalls, budgets);
- ``transient:N``: the first N frames processed raise RetryLater (catalog unreachable);
- ``bug``: every frame raises a plain exception (a bug: attempts are counted);
- ``fatal``: the first frame raises Stop.
"""

from __future__ import annotations

import sys
import time

from lcowatch import log
from lcowatch.config import load
from lcowatch.errors import RetryLater, Stop
from lcowatch.intake.daemon import run
from lcowatch.pipeline.stages import FrameWork, Stage, default_stages


class Sleep:
    name = "sleep"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, work: FrameWork) -> None:
        time.sleep(self.seconds)


class Transient:
    name = "catalog"

    def __init__(self, times: int) -> None:
        self.left = times

    def __call__(self, work: FrameWork) -> None:
        if self.left > 0:
            self.left -= 1
            raise RetryLater("catalog unreachable (injected)")


class Bug:
    name = "buggy"

    def __call__(self, work: FrameWork) -> None:
        raise ZeroDivisionError("injected bug")


class Fatal:
    name = "fatal"

    def __call__(self, work: FrameWork) -> None:
        raise Stop("state folder unwritable (injected)")


def fault(spec: str) -> Stage:
    kind, _, argument = spec.partition(":")
    if kind == "sleep":
        return Sleep(float(argument))
    if kind == "transient":
        return Transient(int(argument))
    if kind == "bug":
        return Bug()
    if kind == "fatal":
        return Fatal()
    raise SystemExit(f"unknown stage {spec!r}")


def main() -> int:
    config = load(sys.argv[1])
    log.configure(sys.stdout, level=config.log_level)
    return run(config, stages=[fault(sys.argv[2]), *default_stages(config)])


if __name__ == "__main__":
    raise SystemExit(main())
