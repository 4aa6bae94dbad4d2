"""Shared fixtures: real LCO files, configs written to disk, a runner for the CLI."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

# CI clones the project next to a copy of shared/, so the real files sit beside the project root.
REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lco-real"
ROME_FRAME = "lsc1m005-fl15-20170614-0130-e91_cropped.fits.gz"
SBIG_FRAME = "banzai_test_frame.fits.fz"

REAL_TARGETS: dict[str, dict[str, Any]] = {
    "ROME02": {"ra": "17:58:32.7", "dec": "-27:58:18", "object_names": ["ROME-FIELD-02"]},
    "NY65": {"ra": 195.78, "dec": 36.23, "object_names": ["2010 NY65"]},
}


@pytest.fixture(scope="session", autouse=True)
def code_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The session's own cache of compiled code (``XDG_CACHE_HOME``, which the daemons it starts inherit):
    sfft compiles once per configuration for the whole suite, and never from a user's stale cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        patch.delenv("CACHE_DIRECTORY", raising=False)  # systemd's, which would come first
        yield Path(os.environ["XDG_CACHE_HOME"])


class NetworkAccessError(RuntimeError):
    """Raised by the socket guard; not an OSError, so neither urllib3 nor requests can swallow it."""


#: Hosts a test may reach: this machine (a Dask cluster of the test's own on 127.0.0.1).
LOOPBACK = {"127.0.0.1", "::1", "localhost"}


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test: a connection or name lookup beyond this machine fails loudly (local sockets still work)."""
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_create_connection, real_getaddrinfo = socket.create_connection, socket.getaddrinfo

    def local(address: Any) -> bool:
        return isinstance(address, tuple) and address[0] in LOOPBACK

    def guarded(real: Any, *, is_local: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            if is_local(*args):
                return real(*args, **kwargs)
            raise NetworkAccessError(f"test tried to use the network: {args!r}")

        return call

    on_socket = guarded(real_connect, is_local=lambda sock, address: sock.family == socket.AF_UNIX or local(address))
    on_socket_ex = guarded(
        real_connect_ex, is_local=lambda sock, address: sock.family == socket.AF_UNIX or local(address)
    )
    monkeypatch.setattr(socket.socket, "connect", on_socket)
    monkeypatch.setattr(socket.socket, "connect_ex", on_socket_ex)
    monkeypatch.setattr(socket, "create_connection", guarded(real_create_connection, is_local=lambda a, *r: local(a)))
    monkeypatch.setattr(socket, "getaddrinfo", guarded(real_getaddrinfo, is_local=lambda host, *r: host in LOOPBACK))


@pytest.fixture
def real_data() -> Path:
    if not REAL_DATA.is_dir():
        pytest.skip(f"real LCO files not found at {REAL_DATA}")
    return REAL_DATA


def write_config(folder: Path, targets: dict[str, dict[str, Any]], **sections: Any) -> Path:
    """Write a config YAML with watch folder ``folder/in`` and state ``folder/state``; return its path.

    The catalog source is local files unless a section says otherwise: tests never reach VizieR.
    """
    (folder / "in").mkdir(parents=True, exist_ok=True)
    document = {"watch": {"paths": ["in"]}, "state_dir": "state", "catalog": {"source": "file"}, "targets": targets}
    document |= sections
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture
def real_config(tmp_path: Path) -> Path:
    return write_config(tmp_path, REAL_TARGETS)


@pytest.fixture(scope="session")
def campaign(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A simulated campaign (see ``simulated.build_campaign``), processed once for the whole session."""
    from simulated import build_campaign

    return build_campaign(tmp_path_factory.mktemp("campaign"))


@pytest.fixture(scope="session")
def hazards(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The campaign with the hazards of real data (see ``simulated.build_hazard_campaign``), processed once."""
    from simulated import build_hazard_campaign

    return build_hazard_campaign(tmp_path_factory.mktemp("hazards"))


@pytest.fixture(scope="session")
def constant(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Constant fields under a dark and a bright sky (see ``simulated.build_constant_campaign``)."""
    from simulated import build_constant_campaign

    return build_constant_campaign(tmp_path_factory.mktemp("constant"))
