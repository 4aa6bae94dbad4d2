"""The sd_notify client against real AF_UNIX datagram sockets (a path, and the abstract namespace)."""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from lcowatch.intake.notify import Notifier, socket_address


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound to a short path (AF_UNIX paths are limited to about 107 bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="lcwn"))
    path = folder / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    yield sock, str(path)
    sock.close()
    path.unlink(missing_ok=True)
    folder.rmdir()


def test_messages_arrive_as_datagrams_on_a_path_socket(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    with Notifier({"NOTIFY_SOCKET": path}) as notifier:
        assert notifier.enabled
        assert notifier.ready("3 queued")
        assert notifier.status("2 queued")
        assert notifier.stopping()
    ready = sock.recv(4096).decode().split("\n")
    assert ready[0] == "READY=1" and "STATUS=3 queued" in ready and f"MAINPID={os.getpid()}" in ready
    assert sock.recv(4096) == b"STATUS=2 queued"
    assert sock.recv(4096) == b"STOPPING=1"


def test_abstract_namespace_socket() -> None:
    name = f"lcowatch-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2.0)
    try:
        with Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "2000000"}) as notifier:
            assert notifier.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
    finally:
        sock.close()


def test_watchdog_period_from_the_environment() -> None:
    assert Notifier({"WATCHDOG_USEC": "3000000"}).watchdog_interval == pytest.approx(1.5)
    assert Notifier({}).watchdog_interval is None
    assert Notifier({"WATCHDOG_USEC": "nonsense"}).watchdog_interval is None
    # meant for another process: no watchdog here
    other = Notifier({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid() + 1)})
    assert other.watchdog_interval is None
    mine = Notifier({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())})
    assert mine.watchdog_interval == pytest.approx(1.5)


def test_no_watchdog_ping_without_a_watchdog(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    with Notifier({"NOTIFY_SOCKET": path}) as notifier:
        assert not notifier.watchdog()
    sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        sock.recv(4096)


def test_without_systemd_everything_is_a_no_op() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert not notifier.ready() and not notifier.status("x") and not notifier.watchdog()
    assert not notifier.stopping()


def test_a_vanished_socket_does_not_raise(tmp_path: Path) -> None:
    with Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")}) as notifier:
        assert notifier.enabled
        assert not notifier.ready()
        assert not notifier.status("still fine")


def test_socket_address_forms() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@abstract") == "\0abstract"
    assert socket_address("") is None
    assert socket_address("vsock:2:1234") is None
