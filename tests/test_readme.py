"""The README matches the code: every command it lists exists with the options it names (and every command
is listed), and the columns it documents for ``status`` and ``export`` are those of a real run."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest

from lcowatch.cli import main
from simulated import Campaign

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _command_table() -> list[tuple[str, str]]:
    """(command, the rest of its row) for each row of the README's command table."""
    rows = re.findall(r"^\| `lcowatch ([a-z-]+)([^`]*)` \| (.*) \|$", README, flags=re.M)
    return [(command, usage + " " + what) for command, usage, what in rows]


def _help(command: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main([*command, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def _backticked(text: str) -> list[str]:
    return [name.strip() for quoted in re.findall(r"`([^`]*)`", text) for name in quoted.split(",")]


class TestReadme:
    """What the README says a user can type, and what they get back, is what the code does."""

    def test_every_command_and_option_it_names_exists(self, capsys: pytest.CaptureFixture[str]) -> None:
        table = _command_table()
        assert len(table) >= 14
        for command, row in table:
            text = _help([command], capsys)
            for option in re.findall(r"(?<![\w-])(--[a-z][a-z-]*|-o)(?![\w-])", row):
                assert option in text, f"README names {option} for {command}; its --help does not"
        listed = set(re.findall(r"^    ([a-z][a-z-]*) ", _help([], capsys), flags=re.M))
        assert listed == {command for command, _ in table}, "commands the README's table and the CLI differ"

    def test_status_columns(self, campaign: Campaign, capsys: pytest.CaptureFixture[str]) -> None:
        row = next(what for command, what in _command_table() if command == "status")
        documented = ["target", "filter", *_backticked(row.split("per target and filter:")[1])]
        capsys.readouterr()
        assert main(["status", "--config", str(campaign.config), "--json"]) == 0
        assert list(json.loads(capsys.readouterr().out)["targets"][0]) == documented

    def test_export_columns(self, campaign: Campaign, capsys: pytest.CaptureFixture[str]) -> None:
        sentence = re.search(r"The light curve has the columns (`[^`]*`)", README)
        assert sentence is not None
        capsys.readouterr()
        assert main(["export", "--config", str(campaign.config), "SN2026A", "--format", "csv"]) == 0
        header = next(csv.reader(io.StringIO(capsys.readouterr().out)))
        assert header == _backticked(sentence.group(1))
