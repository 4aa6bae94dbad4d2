"""The shipped systemd unit: sandboxed, able to start without its watched folders, documented."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "lcowatch.service"


def _settings(name: str) -> list[str]:
    return re.findall(rf"^{name}=(.*)$", UNIT.read_text(), re.M)


class TestUnit:
    """The unit exposes little (systemd-analyze's exposure at most 2.0), a missing watched folder does not
    stop the start, and its documentation link names a file the install puts there."""

    @pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
    def test_exposure_is_at_most_two(self) -> None:
        result = subprocess.run(
            ["systemd-analyze", "security", "--offline=true", str(UNIT)], capture_output=True, text=True, check=False
        )
        exposure = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout + result.stderr)
        assert exposure is not None, result.stdout + result.stderr
        assert float(exposure.group(1)) <= 2.0

    def test_watched_folders_may_be_missing(self) -> None:
        (paths,) = _settings("ReadWritePaths")
        state, *watched = paths.split()
        assert state == "/var/lib/lcowatch" and watched and all(path.startswith("-") for path in watched)

    def test_documentation_is_installed_where_it_points(self) -> None:
        (link,) = _settings("Documentation")
        # The README installs the venv at /opt/lcowatch; the wheel carries the README as a data file.
        assert link == "file:///opt/lcowatch/share/doc/lcowatch/README.md"
        assert "python3 -m venv /opt/lcowatch" in (ROOT / "README.md").read_text()
        data_files = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
        assert data_files["share/doc/lcowatch"] == ["README.md"]
