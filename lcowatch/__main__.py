"""``python -m lcowatch`` and the ``lcowatch`` command.

The CLI imports the science stack (about two seconds): what must hold from the first moment is set here,
before that.
"""

import signal
import sys


def entry() -> int:
    if sys.argv[1:] == ["--version"]:
        from lcowatch import __version__

        print(f"lcowatch {__version__}")
        return 0
    if "run" in sys.argv[1:]:
        # systemd may ask for a reload (SIGHUP) while the daemon is still importing; the config is read
        # at start anyway, and the daemon installs its own handler before it reads anything else.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from lcowatch.cli import main

    return main()


if __name__ == "__main__":
    raise SystemExit(entry())
