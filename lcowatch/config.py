"""The configuration: YAML, validated all at once, every problem named by its key.

Found by ``--config PATH``, else ``$LCOWATCH_CONFIG``, else ``/etc/lcowatch/config.yaml``. Relative paths
resolve against the folder of the config file. Unknown keys are errors.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from lcowatch.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/lcowatch/config.yaml")
APERTURE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(fwhm|arcsec|\")\s*$", re.IGNORECASE)


def _angle(value: Any, unit: str, low: float, high: float) -> float:
    if isinstance(value, bool):
        raise ValueError("not a coordinate")
    try:
        if isinstance(value, str):
            from astropy.coordinates import Angle  # a second to import: only for sexagesimal text

            degrees = float(Angle(value, unit=unit).degree)
        else:
            degrees = float(value)
    except (ValueError, TypeError) as exc:
        raise ValueError("not a coordinate") from exc
    if not low <= degrees <= high:
        # YAML 1.1 reads an unquoted 10:20:30 as the base-60 number 37230.
        hint = '; quote sexagesimal values, e.g. ra: "10:20:30"' if isinstance(value, int) else ""
        raise ValueError(f"not a coordinate: {degrees:g} deg is outside [{low:g}, {high:g}]{hint}")
    return degrees


# Sexagesimal right ascension is in hours, declination in degrees; plain numbers are degrees.
RightAscension = Annotated[float, BeforeValidator(lambda v: _angle(v, "hourangle", 0.0, 360.0))]
Declination = Annotated[float, BeforeValidator(lambda v: _angle(v, "deg", -90.0, 90.0))]


@dataclass(frozen=True)
class Aperture:
    """A radius in arcseconds or in multiples of the frame's FWHM."""

    value: float
    unit: str  # "fwhm" or "arcsec"

    @classmethod
    def parse(cls, text: str | float) -> Aperture:
        """Parse ``"1.5 fwhm"`` or ``"4 arcsec"`` (``4"`` too); a bare number is in FWHM."""
        if isinstance(text, int | float) and not isinstance(text, bool):
            return cls(float(text), "fwhm")
        match = APERTURE_PATTERN.match(str(text))
        if not match or float(match.group(1)) <= 0:
            raise ValueError(f"not an aperture: {text!r} (e.g. '1.5 fwhm' or '4 arcsec')")
        unit = match.group(2).lower()
        return cls(float(match.group(1)), "arcsec" if unit in ("arcsec", '"') else "fwhm")

    def radius_pix(self, fwhm_pix: float, pixscale: float) -> float:
        return self.value * fwhm_pix if self.unit == "fwhm" else self.value / pixscale

    def __str__(self) -> str:
        return f"{self.value:g} {self.unit}"


ApertureValue = Annotated[Aperture, BeforeValidator(lambda v: v if isinstance(v, Aperture) else Aperture.parse(v))]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WatchConfig(Section):
    paths: list[Path] = Field(min_length=1)
    poll: bool = False
    poll_interval: float = Field(2.0, gt=0, description="seconds between polls when poll is true")
    quiet_seconds: float = Field(2.0, ge=0, description="size and mtime unchanged this long: complete")
    incomplete_after: float = Field(3600.0, gt=0, description="never complete after this long: quarantine")
    rescan_seconds: float = Field(300.0, gt=0, description="period of the reconcile scan")


class TargetConfig(Section):
    ra: RightAscension | None = None
    dec: Declination | None = None
    x: float | None = Field(None, description="pixel x (0-based) on the pinned template, when no ra/dec")
    y: float | None = None
    object_names: list[str] = Field(default_factory=list)
    refcat: Path | None = None
    aavso_name: str | None = Field(None, description="the name AAVSO (VSX) knows the target by, for AAVSO exports")
    method: Literal["aperture", "difference"] = Field(
        "aperture", description="difference: subtract a reference image first (a target on a galaxy)"
    )
    reference_before: datetime | date | None = Field(
        None, description="difference: the reference image is taken from frames before this (UTC)"
    )
    reference_after: datetime | date | None = Field(
        None, description="difference: ... or from frames after this (UTC; e.g. once the transient faded)"
    )

    def reference_window(self) -> tuple[float, float] | None:
        """The MJD ranges a reference image may come from: frames with MJD < first or > second; None: any."""
        if self.reference_before is None and self.reference_after is None:
            return None
        return (_mjd(self.reference_before) if self.reference_before is not None else -math.inf,
                _mjd(self.reference_after) if self.reference_after is not None else math.inf)  # fmt: skip

    @model_validator(mode="after")
    def _has_position(self) -> TargetConfig:
        if (self.ra is None) != (self.dec is None):
            raise ValueError("give both ra and dec")
        if (self.x is None) != (self.y is None):
            raise ValueError("give both x and y")
        if self.ra is None and self.x is None:
            raise ValueError("needs a position: ra/dec, or x/y on a pinned template")
        return self


def _mjd(when: datetime | date) -> float:
    moment = when if isinstance(when, datetime) else datetime(when.year, when.month, when.day, tzinfo=UTC)
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return (moment - MJD_ZERO).total_seconds() / 86400.0


MJD_ZERO = datetime(1858, 11, 17, tzinfo=UTC)


class SubtractionConfig(Section):
    """Image subtraction for targets with ``method: difference``."""

    cutout: int = Field(256, ge=64, le=2048, description="side of the square cutout around the target (pixels)")
    max_residual: float = Field(
        3.0, gt=0, description="flag bad_subtraction above this RMS of the difference/sigma at bright stars"
    )
    reference_frames: int = Field(
        5, ge=1, description="good frames averaged into a reference image (its noise enters every point)"
    )


class CatalogConfig(Section):
    source: Literal["vizier", "file"] = "vizier"
    timeout: float = Field(30.0, gt=0, description="seconds per query")
    retries: int = Field(2, ge=0)
    radius_arcmin: float | None = Field(None, gt=0, description="default: the frame's half diagonal")
    preference: dict[str, list[str]] | None = Field(
        None, description="per standard band, catalog keys in order (refcat2, ps1, apass, sdss, gaia_synth)"
    )
    color_terms: dict[str, float] = Field(
        default_factory=dict,
        description="fixed colour terms by 'INSTRUMENT:filter' or 'filter' (mag per mag of the band's colour)",
    )
    fit_color_terms: bool = Field(
        False, description="fit a colour term per frame where no fixed one is given (else none is applied)"
    )
    match_radius_arcsec: float = Field(3.0, gt=0, description="catalog to measured star matching radius")
    retry_after: float = Field(600.0, gt=0, description="seconds before an unreachable catalog is asked again")


class QualityConfig(Section):
    """Frame quality gates. They flag points (poor_seeing, few_stars, ...) rather than drop frames: only a
    frame that cannot be measured or registered gives no point."""

    max_fwhm_ratio: float = Field(
        2.0, gt=1, description="flag poor_seeing above this times the instrument's median FWHM for the target"
    )
    max_fwhm_arcsec: float | None = Field(None, gt=0, description="also flag poor_seeing above this (arcsec)")
    min_nstars_ratio: float = Field(
        0.3, gt=0, le=1, description="flag few_stars below this times the instrument's median star count"
    )
    min_nstars: int = Field(25, ge=0, description="flag few_stars below this until an instrument has a history")
    max_ellipticity: float = Field(0.35, gt=0, le=1, description="flag elongated above this (1 - b/a)")
    max_background: float | None = Field(None, gt=0, description="flag high_background above this (e-/pixel)")
    max_cloud_loss: float = Field(
        0.5, gt=0, description="mag of light lost against the reference frame before points are flagged cloudy"
    )
    detect_sigma: float = Field(
        5.0, gt=0, description="detection threshold, in sigmas of the noise of the image smoothed by a 3x3 kernel"
    )
    min_area: int = Field(5, ge=1, description="pixels")


class PreprocessConfig(Section):
    saturation: float | None = Field(
        None, gt=0, description="critical value in electrons; default: the header's MAXLIN or SATURATE"
    )


class TemplateWeights(Section):
    fwhm: float = Field(1.0, ge=0)
    background: float = Field(0.5, ge=0)
    nstars: float = Field(0.5, ge=0)


class TemplateConfig(Section):
    weights: TemplateWeights = TemplateWeights()
    min_improvement: float = Field(
        0.1, ge=0, description="score gain (natural-log units, ~10%) a frame needs to replace the template"
    )


class PhotometryConfig(Section):
    apertures: list[ApertureValue] = Field(
        default_factory=lambda: [Aperture(1.0, "fwhm"), Aperture(1.5, "fwhm"), Aperture(2.5, "fwhm")],
        min_length=1,
        description="radii, e.g. '1.5 fwhm' or '4 arcsec'; the first is the light curve's default",
    )
    annulus: tuple[ApertureValue, ApertureValue] = (Aperture(4.0, "fwhm"), Aperture(7.0, "fwhm"))
    min_snr: float = Field(3.0, gt=0, description="below this a measurement is flagged low_snr")
    detection_snr: float = Field(
        3.0, gt=0, description="below this the target is not detected: mag empty, limit_mag (5 sigma) given"
    )
    recentre_snr: float = Field(10.0, gt=0, description="S/N above which positions are recentroided")
    max_field_stars: int = Field(300, ge=3, description="comparison stars kept per target (no catalog)")


class ProcessingConfig(Section):
    workers: int = Field(1, ge=1, description="frames at once, on a local Dask cluster (1: all in this process)")
    scheduler: str | None = Field(None, description="tcp://host:port of an existing Dask cluster to run frames on")
    max_attempts: int = Field(3, ge=1)
    max_pixels: int = Field(50_000_000, gt=0, description="a larger image is quarantined")
    results_interval: float = Field(
        10.0, ge=0, description="seconds between rewrites of a target's result file during a burst"
    )


class DaemonConfig(Section):
    """How ``lcowatch run`` behaves (stopping, backing off, the systemd watchdog)."""

    stop_timeout: float = Field(
        30.0, gt=0, description="seconds to finish the frame in hand after SIGTERM/SIGINT; then exit anyway"
    )
    stall_seconds: float = Field(
        600.0, gt=0, description="a frame in hand longer than this counts as stuck: systemd watchdog pings stop"
    )
    retry_seconds: float = Field(
        30.0, gt=0, description="first back-off after a transient error (doubling); failed files are retried after it"
    )
    max_retry_seconds: float = Field(600.0, gt=0, description="longest back-off after transient errors")


class Config(Section):
    watch: WatchConfig
    state_dir: Path
    catalog: CatalogConfig = CatalogConfig()
    targets: dict[str, TargetConfig] = Field(min_length=1)
    quality: QualityConfig = QualityConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    processing: ProcessingConfig = ProcessingConfig()
    daemon: DaemonConfig = DaemonConfig()
    template: TemplateConfig = TemplateConfig()
    photometry: PhotometryConfig = PhotometryConfig()
    subtraction: SubtractionConfig = SubtractionConfig()
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    aavso_obscode: str | None = Field(None, description="your AAVSO observer code (`export --format aavso` needs it)")
    plot_after_each_frame: bool = Field(False, description="keep state_dir/plots/<target>.png up to date")
    diagnostics: bool = Field(
        False, description="PNG previews of poor frames and new templates under state_dir/diagnostics/"
    )
    _source: Path | None = PrivateAttr(None)

    @property
    def source(self) -> Path | None:
        """The file this config was read from (None when built in memory)."""
        return self._source

    def target_for_object(self, object_name: str) -> str | None:
        """The target whose name or ``object_names`` matches an OBJECT value (case and space blind)."""
        key = _normalise_object(object_name)
        for name, target in self.targets.items():
            if key in {_normalise_object(n) for n in [name, *target.object_names]}:
                return name
        return None


def _normalise_object(name: str) -> str:
    return "".join(name.split()).lower()


def _location(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def _keys_at(loc: tuple[int | str, ...]) -> list[str]:
    """The keys allowed in the mapping at ``loc`` (for a "did you mean")."""
    node: Any = Config
    for part in loc:
        if isinstance(node, type) and issubclass(node, BaseModel) and part in node.model_fields:
            node = node.model_fields[str(part)].annotation
        elif typing.get_origin(node) is dict:
            node = typing.get_args(node)[1]
        else:
            return []
        while typing.get_origin(node) in (typing.Union, types.UnionType, typing.Annotated):
            node = next(arg for arg in typing.get_args(node) if arg is not type(None))
    if typing.get_origin(node) is dict:
        return []
    return list(node.model_fields) if isinstance(node, type) and issubclass(node, BaseModel) else []


def _message(error: Any) -> str:
    if error["type"] == "extra_forbidden":
        key, loc = str(error["loc"][-1]), tuple(error["loc"][:-1])
        close = difflib.get_close_matches(key, _keys_at(loc), n=1, cutoff=0.6)
        return f"unknown key (did you mean {close[0]!r}?)" if close else "unknown key"
    if error["type"] == "missing":
        return "required key is missing"
    return str(error["msg"]).removeprefix("Value error, ")


def resolve_path(explicit: str | os.PathLike[str] | None) -> Path:
    """The config file to use: ``explicit``, else ``$LCOWATCH_CONFIG``, else the system default."""
    if explicit:
        return Path(explicit)
    if os.environ.get("LCOWATCH_CONFIG"):
        return Path(os.environ["LCOWATCH_CONFIG"])
    return DEFAULT_CONFIG_PATH


def parse(raw: Any, base_dir: Path) -> Config:
    """Validate a parsed YAML document; raise :class:`ConfigError` listing every problem."""
    if not isinstance(raw, dict):
        raise ConfigError(["(top level): expected a mapping of keys"])
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        problems = [f"{_location(e['loc'])}: {_message(e)}" for e in exc.errors()]
        # Missing files are told now too, not only once the rest is fixed.
        raise ConfigError(problems + _raw_file_problems(raw, base_dir)) from None
    resolved = _resolve_paths(config, base_dir)
    problems = _file_problems(resolved) + _path_problems(resolved) + _name_problems(resolved)
    if problems:
        raise ConfigError(problems)
    return resolved


def _raw_file_problems(raw: dict[str, Any], base_dir: Path) -> list[str]:
    """:func:`_file_problems` of a document that did not validate: the refcat paths it gives as text."""
    targets = raw.get("targets")
    return _missing_refcats(
        (name, _absolute(base_dir, Path(target["refcat"])))
        for name, target in (targets.items() if isinstance(targets, dict) else [])
        if isinstance(target, dict) and isinstance(target.get("refcat"), str)
    )


def _file_problems(config: Config) -> list[str]:
    return _missing_refcats((name, t.refcat) for name, t in config.targets.items() if t.refcat is not None)


def _missing_refcats(refcats: Iterable[tuple[str, Path]]) -> list[str]:
    return [f"targets.{name}.refcat: no such file: {path}" for name, path in refcats if not path.is_file()]


#: Folders of the operating system: never a state folder nor a watched one (files there are moved away).
SYSTEM_FOLDERS = tuple(
    Path(p) for p in ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc", "/run", "/sbin", "/sys", "/usr")
)


def _path_problems(config: Config) -> list[str]:
    """Folders that would harm the system or defeat the daemon: a system folder, the root, the state folder
    inside a watched one (its quarantine and results would be watched) or a watched one inside it."""

    def system(path: Path) -> bool:
        return path == Path("/") or any(path == d or d in path.parents for d in SYSTEM_FOLDERS)

    problems = []
    state = config.state_dir
    if system(state) or state in (Path("/var"), Path("/home")):
        problems.append(f"state_dir: {state} is a system folder; use one of its own, e.g. /var/lib/lcowatch")
    for k, folder in enumerate(config.watch.paths):
        where = f"watch.paths[{k}]"
        if system(folder):
            problems.append(f"{where}: {folder} is a system folder: every file there would be read or moved")
        elif folder == state or folder in state.parents:
            problems.append(f"{where}: {folder} holds state_dir ({state}): the daemon would watch its own output")
        elif state in folder.parents:
            problems.append(f"{where}: {folder} is inside state_dir ({state}); keep incoming frames apart")
    return problems


#: A target's name becomes a file name (results/NAME.ecsv, plots/NAME.png): no path separator, no control
#: character, no leading dot (nor "..": a way out of state_dir).
TARGET_NAME = re.compile(r"[^/\\\x00-\x1f\x7f.][^/\\\x00-\x1f\x7f]*")


def _name_problems(config: Config) -> list[str]:
    problems = [
        f"targets.{name}: the name becomes a file name: no '/', '\\', '..', control character or leading '.' "
        "(object_names can hold the OBJECT values it should match)"
        for name in config.targets
        if not TARGET_NAME.fullmatch(name) or ".." in name
    ]
    claimed: dict[str, str] = {}
    for name, target in config.targets.items():
        for alias in dict.fromkeys(_normalise_object(n) for n in [name, *target.object_names]):
            if alias in claimed:
                problems.append(
                    f"targets.{name}: OBJECT {alias!r} is matched by targets.{claimed[alias]} too; "
                    "a frame can belong to one target only"
                )
            claimed.setdefault(alias, name)
    return problems


def _absolute(base_dir: Path, path: Path) -> Path:
    """A config path as the daemon uses it: relative to the config file's folder, ``~`` expanded."""
    return (base_dir / path.expanduser()).resolve()


def _resolve_paths(config: Config, base_dir: Path) -> Config:
    targets = {
        name: t.model_copy(update={"refcat": _absolute(base_dir, t.refcat) if t.refcat else None})
        for name, t in config.targets.items()
    }
    watch = config.watch.model_copy(update={"paths": [_absolute(base_dir, p) for p in config.watch.paths]})
    state_dir = _absolute(base_dir, config.state_dir)
    return config.model_copy(update={"watch": watch, "state_dir": state_dir, "targets": targets})


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader that records a key given twice in one mapping (plain YAML keeps the last one, so
    a whole block can vanish without a word)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[str] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                self.duplicates.append(
                    f"key {key!r} appears twice in one block (lines {seen[key]} and {line}); the first would be lost"
                )
            else:
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate the config file (see :func:`resolve_path`)."""
    config_path = resolve_path(path)
    try:
        text = config_path.read_text()
    except OSError as exc:
        raise ConfigError([f"{config_path}: cannot read: {exc.strerror or exc}"]) from None
    try:
        loader = _StrictLoader(text)
        try:
            raw = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise ConfigError([f"{config_path}: not valid YAML: {exc}"]) from None
    if loader.duplicates:
        raise ConfigError([f"{config_path}: {duplicate}" for duplicate in loader.duplicates])
    config = parse(raw, config_path.resolve().parent)
    config._source = config_path.resolve()
    return config
