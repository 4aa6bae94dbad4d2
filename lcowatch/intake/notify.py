"""The systemd notification protocol (sd_notify), by hand: one datagram per message to ``$NOTIFY_SOCKET``.

``NOTIFY_SOCKET`` is a file-system path, or an abstract socket name written with a leading ``@``. Without
it (not run by systemd) every call is a no-op. Sending never raises: systemd being gone must not stop the
work. ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``, when set, naming this process) turn the watchdog on; the
daemon pings at half that period, and only while its work makes progress.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from lcowatch.log import get_logger


def socket_address(value: str) -> str | None:
    """The ``sendto`` address for a ``NOTIFY_SOCKET`` value: a path, or ``\\0name`` for ``@name``."""
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # other transports (vsock:...) are not used by lcowatch


class Notifier:
    """Sends sd_notify messages; every method is a no-op when systemd is not listening."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = socket_address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_seconds = _watchdog_seconds(env)
        self._socket: socket.socket | None = None
        self._warned = False
        if self.address is not None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half the systemd period), or None when there is no watchdog."""
        return self.watchdog_seconds / 2.0 if self.watchdog_seconds else None

    def send(self, *fields: str) -> bool:
        """Send ``fields`` (``KEY=value`` lines) in one datagram; True when it was sent."""
        if self._socket is None or self.address is None:
            return False
        message = "\n".join(fields).encode()
        try:
            self._socket.sendto(message, self.address)
        except OSError as exc:
            if not self._warned:  # say it once: a socket that went away stays away
                get_logger().warning("sd_notify_failed", error=str(exc), address=self.address.lstrip("\0"))
                self._warned = True
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []), f"MAINPID={os.getpid()}")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1") if self.watchdog_seconds else False

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _watchdog_seconds(env: Mapping[str, str]) -> float | None:
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # the watchdog is meant for another process
    return usec / 1e6 if usec > 0 else None
