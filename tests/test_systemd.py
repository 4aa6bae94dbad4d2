"""The shipped systemd unit: sandboxed, able to start without its watched folders, documented."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
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

    @pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
    def test_verify_is_clean(self, tmp_path: Path) -> None:
        """``systemd-analyze verify`` finds nothing in the unit but the one thing a test machine lacks: the
        installed command (ExecStart points at /opt/lcowatch), which this copy replaces by /bin/true."""
        unit = tmp_path / UNIT.name
        unit.write_text(re.sub(r"(?m)^ExecStart=\S+", "ExecStart=/bin/true", UNIT.read_text()))
        result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False)
        problems = [line for line in (result.stdout + result.stderr).splitlines() if UNIT.name in line]
        assert result.returncode == 0 and not problems, result.stdout + result.stderr

    def test_its_memory_rules_let_compiled_code_run(self) -> None:
        """Image subtraction runs code numba compiles at run time: under ``MemoryDenyWriteExecute=`` (applied
        here as systemd applies it on Linux >= 6.3, ``prctl(PR_SET_MDWE)``) ``import numba`` fails."""
        deny = any(value.lower() in {"yes", "true", "on", "1"} for value in _settings("MemoryDenyWriteExecute"))
        script = (
            "import ctypes, sys\n"
            f"if {deny} and ctypes.CDLL(None).prctl(65, 1, 0, 0, 0) != 0: sys.exit(3)\n"
            "import numba\n"
            "assert numba.njit(lambda x: x + 1)(1) == 2\n"
        )
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
        if result.returncode == 3:
            pytest.skip("this kernel cannot deny write-execute memory (PR_SET_MDWE)")
        assert result.returncode == 0, result.stderr

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
