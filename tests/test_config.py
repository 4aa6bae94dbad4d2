from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from lcowatch.cli import main
from lcowatch.config import load, parse
from lcowatch.errors import ConfigError

MINIMAL = {"watch": {"paths": ["in"]}, "state_dir": "state", "targets": {"SN1": {"ra": 150.1, "dec": 2.2}}}


class TestParse:
    """A config is validated as a whole: every problem is reported at once, each naming its key."""

    def test_every_bad_key_is_named(self) -> None:
        raw = {
            "watch": {"paths": ["in"], "pol": True},
            "state_dir": "state",
            "targets": {"SN1": {"ra": "abc", "dec": 2}, "SN2": {"ra": 10.0, "dec": 95.0}},
            "catalog": {"source": "simbad"},
            "colour": 1,
            "source": "x",
        }
        with pytest.raises(ConfigError) as caught:
            parse(raw, Path("/tmp"))
        problems = caught.value.problems
        assert "watch.pol: unknown key (did you mean 'poll'?)" in problems
        assert "targets.SN1.ra: not a coordinate" in problems
        assert any(p.startswith("targets.SN2.dec: not a coordinate") for p in problems)
        assert any(p.startswith("catalog.source:") for p in problems)
        assert "colour: unknown key" in problems
        assert "source: unknown key" in problems
        assert len(problems) == 6

    def test_missing_required_sections(self) -> None:
        with pytest.raises(ConfigError) as caught:
            parse({"targets": {"SN1": {"ra": 1, "dec": 2}}}, Path("/tmp"))
        assert set(caught.value.problems) == {
            "watch: required key is missing",
            "state_dir: required key is missing",
        }

    def test_sexagesimal_coordinates_are_hours_and_degrees(self) -> None:
        raw = MINIMAL | {"targets": {"SN1": {"ra": "10:00:29.6", "dec": "-02:14:04"}}}
        target = parse(raw, Path("/tmp")).targets["SN1"]
        assert target.ra == pytest.approx(150.12333, abs=1e-5)
        assert target.dec == pytest.approx(-2.23444, abs=1e-5)

    def test_missing_reference_catalog_file_is_named(self, tmp_path: Path) -> None:
        raw = MINIMAL | {"targets": {"SN1": {"ra": 1.0, "dec": 2.0, "refcat": "nowhere.csv"}}}
        with pytest.raises(ConfigError) as caught:
            parse(raw, tmp_path)
        assert caught.value.problems == [f"targets.SN1.refcat: no such file: {tmp_path / 'nowhere.csv'}"]

    def test_target_needs_a_position(self) -> None:
        with pytest.raises(ConfigError) as caught:
            parse(MINIMAL | {"targets": {"SN1": {"ra": 150.0}}}, Path("/tmp"))
        assert caught.value.problems == ["targets.SN1: give both ra and dec"]

    def test_relative_paths_resolve_against_the_config_folder(self, tmp_path: Path) -> None:
        raw = MINIMAL | {"targets": {"SN1": {"ra": 1.0, "dec": 2.0, "refcat": "cats/sn1.csv"}}}
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
        (tmp_path / "cats").mkdir()
        (tmp_path / "cats" / "sn1.csv").write_text("ra,dec,g\n1,2,15\n")
        config = load(tmp_path / "c.yaml")
        assert config.state_dir == tmp_path / "state"
        assert config.watch.paths == [tmp_path / "in"]
        assert config.targets["SN1"].refcat == tmp_path / "cats" / "sn1.csv"

    def test_objects_match_by_name_or_alias_ignoring_case_and_spaces(self) -> None:
        raw = MINIMAL | {"targets": {"SN1": {"ra": 1.0, "dec": 2.0, "object_names": ["AT 2026abc"]}}}
        config = parse(raw, Path("/tmp"))
        assert config.target_for_object("sn1") == "SN1"
        assert config.target_for_object("AT2026ABC") == "SN1"
        assert config.target_for_object("SN2") is None


class TestCatalogFiles:
    """A target's catalog file is checked with the rest: a missing one is reported beside the other errors,
    and one whose columns cannot be used is an error naming what is missing (check-config exits 2)."""

    def test_a_missing_file_is_told_beside_other_errors(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        raw = MINIMAL | {
            "watch": {"paths": ["in"], "pol": True},
            "targets": {"SN1": {"ra": 1.0, "dec": 2.0, "refcat": "nowhere.csv"}},
        }
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
        assert main(["check-config", "--config", str(tmp_path / "c.yaml")]) == 2
        out = capsys.readouterr().out
        assert "watch.pol: unknown key" in out and "targets.SN1.refcat: no such file" in out

    def test_unusable_columns_are_an_error(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        (tmp_path / "stars.csv").write_text("x,dec,g\n150.1,2.2,15.0\n150.2,2.3,16.0\n")
        raw = MINIMAL | {"targets": {"SN1": {"ra": 150.1, "dec": 2.2, "refcat": "stars.csv"}}}
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
        assert main(["check-config", "--config", str(tmp_path / "c.yaml")]) == 2
        out = capsys.readouterr().out
        assert "targets.SN1.refcat:" in out and "missing column" in out and "valid" not in out
        # The names other catalogs use are understood: VizieR's RAJ2000 and PS1's raMean.
        (tmp_path / "stars.csv").write_text("raMean,DEJ2000,g\n150.1,2.2,15.0\n150.2,2.3,16.0\n")
        assert main(["check-config", "--config", str(tmp_path / "c.yaml")]) == 0


class TestConfigsThatWouldFailLater:
    """What would harm the machine or fail quietly once running is caught by check-config: system or
    overlapping folders, target names that would escape state_dir as file names, two targets claiming one
    OBJECT, unquoted sexagesimal coordinates (explained) are errors; a target without a catalog and a
    config anyone may write are warnings."""

    def test_system_folders_overlaps_and_unsafe_names_are_named(self, tmp_path: Path) -> None:
        raw = {
            "watch": {"paths": ["/", "/etc/frames", str(tmp_path / "state" / "incoming"), str(tmp_path)]},
            "state_dir": str(tmp_path / "state"),
            "targets": {
                "../../../x": {"ra": 1.0, "dec": 2.0},
                "SN 2026abc": {"ra": 1.0, "dec": 2.0, "refcat": "missing.csv"},
                "a/b": {"ra": 1.0, "dec": 2.0},
            },
        }
        with pytest.raises(ConfigError) as caught:
            parse(raw, tmp_path)
        problems = caught.value.problems
        assert problems[0].startswith("targets.SN 2026abc.refcat: no such file")
        assert "system folder" in problems[1] and problems[1].startswith("watch.paths[0]")
        assert "system folder" in problems[2] and problems[2].startswith("watch.paths[1]")
        assert "inside state_dir" in problems[3] and "holds state_dir" in problems[4]
        assert [p.split(":")[0] for p in problems[5:]] == ["targets.../../../x", "targets.a/b"]
        for state in ("/", "/etc", "/usr/local/lcowatch", "/var"):
            with pytest.raises(ConfigError, match=r"state_dir: .* is a system folder"):
                parse(MINIMAL | {"state_dir": state}, tmp_path)

    def test_two_targets_may_not_claim_one_object(self) -> None:
        raw = MINIMAL | {
            "targets": {"SN1": {"ra": 1.0, "dec": 2.0}, "SN2": {"ra": 3.0, "dec": 4.0, "object_names": ["s n1"]}}
        }
        with pytest.raises(ConfigError) as caught:
            parse(raw, Path("/tmp"))
        assert caught.value.problems == [
            "targets.SN2: OBJECT 'sn1' is matched by targets.SN1 too; a frame can belong to one target only"
        ]

    def test_unquoted_sexagesimal_coordinates_are_explained(self, tmp_path: Path) -> None:
        path = tmp_path / "config.yaml"
        path.write_text("watch: {paths: [in]}\nstate_dir: state\ntargets:\n  SN1: {ra: 10:20:30, dec: -45:00:00}\n")
        with pytest.raises(ConfigError) as caught:
            load(path)
        assert all('quote sexagesimal values, e.g. ra: "10:20:30"' in p for p in caught.value.problems)
        assert caught.value.problems[0].startswith("targets.SN1.ra: not a coordinate: 37230 deg")

    def test_a_target_without_a_catalog_is_a_warning(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(MINIMAL | {"catalog": {"source": "file"}}))
        (tmp_path / "in").mkdir()
        assert main(["check-config", "--config", str(path)]) == 0
        assert "warning: targets.SN1: no refcat while catalog.source is file" in capsys.readouterr().out

    def test_a_config_anyone_may_write_is_a_warning(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(MINIMAL))
        (tmp_path / "in").mkdir()
        path.chmod(0o666)
        assert main(["check-config", "--config", str(path)]) == 0
        assert "is writable by every user" in capsys.readouterr().out


class TestConfigDiscovery:
    """--config wins over $LCOWATCH_CONFIG, which wins over /etc/lcowatch/config.yaml."""

    def test_environment_variable_is_used(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        (tmp_path / "env.yaml").write_text(yaml.safe_dump(MINIMAL))
        monkeypatch.setenv("LCOWATCH_CONFIG", str(tmp_path / "env.yaml"))
        assert load(None).source == tmp_path / "env.yaml"

    def test_explicit_path_wins(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        (tmp_path / "a.yaml").write_text(yaml.safe_dump(MINIMAL))
        monkeypatch.setenv("LCOWATCH_CONFIG", str(tmp_path / "missing.yaml"))
        assert load(tmp_path / "a.yaml").source == tmp_path / "a.yaml"


class TestCheckConfigCommand:
    """`lcowatch check-config` prints every error and exits 2; a valid config exits 0."""

    def test_invalid_config_exits_2_listing_every_error(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        bad = MINIMAL | {"targets": {"SN1": {"ra": "x", "dec": "y"}}, "extra": 1}
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(bad))
        assert main(["check-config", "--config", str(tmp_path / "c.yaml")]) == 2
        out = capsys.readouterr().out
        assert "targets.SN1.ra: not a coordinate" in out
        assert "targets.SN1.dec: not a coordinate" in out
        assert "extra: unknown key" in out

    def test_valid_config_exits_0(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(MINIMAL))
        assert main(["check-config", "--config", str(tmp_path / "c.yaml")]) == 0
        assert "valid" in capsys.readouterr().out

    def test_unreadable_yaml_exits_2(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        (tmp_path / "c.yaml").write_text("watch: [unclosed\n")
        assert main(["check-config", "--config", str(tmp_path / "c.yaml")]) == 2
        assert "not valid YAML" in capsys.readouterr().out

    def test_a_key_given_twice_is_an_error_naming_both_lines(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        text = yaml.safe_dump(MINIMAL, sort_keys=False) + "targets:\n  SN2:\n    ra: 10.0\n    dec: 5.0\n"
        (tmp_path / "c.yaml").write_text(text)
        first = 1 + next(i for i, line in enumerate(text.splitlines()) if line.startswith("targets:"))
        second = 1 + max(i for i, line in enumerate(text.splitlines()) if line.startswith("targets:"))
        assert main(["check-config", "--config", str(tmp_path / "c.yaml")]) == 2
        assert f"key 'targets' appears twice in one block (lines {first} and {second})" in capsys.readouterr().out

    def test_a_misspelt_key_gets_a_suggestion(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        bad = MINIMAL | {"quality": {"max_fwhm_ratoi": 2.0}, "targets": {"SN1": {"ra": 1.0, "dec": 2.0, "refcta": "a"}}}
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(bad))
        assert main(["check-config", "--config", str(tmp_path / "c.yaml")]) == 2
        out = capsys.readouterr().out
        assert "quality.max_fwhm_ratoi: unknown key (did you mean 'max_fwhm_ratio'?)" in out
        assert "targets.SN1.refcta: unknown key (did you mean 'refcat'?)" in out

    def test_a_missing_watch_folder_is_a_warning(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(MINIMAL | {"watch": {"paths": ["inbox"]}}))
        assert main(["check-config", "--config", str(tmp_path / "c.yaml")]) == 0
        assert f"warning: watch.paths[0]: {tmp_path / 'inbox'} is not a folder (yet)" in capsys.readouterr().out
        (tmp_path / "inbox").mkdir()
        assert main(["check-config", "--config", str(tmp_path / "c.yaml")]) == 0
        assert "warning" not in capsys.readouterr().out

    def test_missing_file_exits_2(self, tmp_path: Path) -> None:
        assert main(["check-config", "--config", str(tmp_path / "none.yaml")]) == 2


class TestExampleConfig:
    """config.example.yaml documents every key and is itself a valid config."""

    def test_example_is_valid_and_complete(self) -> None:
        from lcowatch.config import Config

        path = Path(__file__).resolve().parents[1] / "config.example.yaml"
        config = load(path)
        text = path.read_text()

        def names(model: type, prefix: str = "") -> list[str]:
            found = []
            for name, field in model.model_fields.items():
                if field.exclude:
                    continue
                found.append(name)
                inner = getattr(field.annotation, "model_fields", None)
                if inner is not None:
                    found += names(field.annotation, f"{prefix}{name}.")
            return found

        missing = [name for name in names(Config) if not re.search(rf"(^|[\s{{,#]){name}:", text, re.MULTILINE)]
        assert missing == []
        assert config.catalog.source == "vizier"
