"""Tests for lcowatch.science.refcat: reference catalogs, VizieR answers replayed below astroquery, the cache.

No test touches the network: VizieR answers are hand-crafted VOTables in ``tests/data/vizier/`` (see its
README), served by replacing ``requests.adapters.HTTPAdapter.send`` (the transport under astroquery and
requests' Session), and every socket connection or DNS lookup raises :class:`NetworkAccessError`.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import requests
import structlog
from astropy.io import votable
from astropy.table import Table
from astropy.utils import iers

from conftest import NetworkAccessError
from lcowatch import log as lcowatch_log
from lcowatch.errors import RetryLater
from lcowatch.science import refcat
from lcowatch.science.refcat import (
    CATALOGS,
    REFCAT_BAND,
    CatalogFileError,
    CatalogResponseError,
    color_for_band,
    get_reference_stars,
    read_local_catalog,
    standard_band,
)

DATA = Path(__file__).resolve().parent / "data" / "vizier"
# Request centre: rounds to the recordings' query centre (150.123, +2.235); a 10' request becomes a
# 10.1' query, so the recordings' outermost star (10.05' from the query centre) is cut by the radius.
RA, DEC, RADIUS = 150.1232, 2.2348, 10.0


@pytest.fixture(autouse=True)
def events():
    """Every test: log events go to a fresh stream (whatever an earlier test configured); parsed here."""
    stream = io.StringIO()
    lcowatch_log.configure(stream, json=True, level="debug")
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    structlog.reset_defaults()


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """Back-off sleeps are recorded instead of slept."""
    slept: list[float] = []
    monkeypatch.setattr(refcat, "_sleep", slept.append)
    return slept


class FakeVizieR:
    """Replays recorded VizieR answers at the HTTP transport (``HTTPAdapter.send``), below astroquery.

    ``answer(table, *results)`` queues results for queries of that VizieR table: a recording's file
    name (HTTP 200), ``(status, file name)``, or an exception instance to raise (e.g. a timeout). The
    last result repeats. A query of a table with nothing queued fails the test.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.queues: dict[str, list[object]] = {}
        self.sources: list[str] = []
        self.bodies: list[str] = []
        self.timeouts: list[object] = []
        monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", self._send)

    def answer(self, table: str, *results: object) -> FakeVizieR:
        self.queues[table] = list(results)
        return self

    def _send(self, request: requests.PreparedRequest, **kwargs: object) -> requests.Response:
        body = request.body.decode() if isinstance(request.body, bytes) else str(request.body)
        assert request.url is not None and "vizier" in request.url, request.url
        match = re.search(r"^-source=(\S+)$", body, re.M)
        assert match, body
        source = match[1]
        self.sources.append(source)
        self.bodies.append(body)
        self.timeouts.append(kwargs.get("timeout"))
        queue = self.queues.get(source)
        assert queue, f"unexpected VizieR query for {source}"
        result = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(result, BaseException):
            raise result
        status, name = result if isinstance(result, tuple) else (200, result)
        content = (DATA / str(name)).read_bytes()
        response = requests.Response()
        response.status_code = int(status)
        response.reason = "OK" if status == 200 else "Service Unavailable"
        response.raw = io.BytesIO(content)
        kind = "text/xml" if str(name).endswith(".xml") else "text/html"
        response.headers["Content-Type"] = f"{kind};charset=UTF-8"
        response.encoding = "utf-8"
        response.url = request.url
        response.request = request
        return response


@pytest.fixture
def vizier(monkeypatch) -> FakeVizieR:
    return FakeVizieR(monkeypatch)


def recorded(name: str) -> Table:
    """A recording read straight with astropy, as a check on the normalised values."""
    return votable.parse_single_table(DATA / name).to_table(use_names_over_ids=True)


def fetch(tmp_path: Path, band: str = "gp", **kwargs: object) -> Table:
    kwargs.setdefault("cache_dir", tmp_path / "cache")
    return get_reference_stars(RA, DEC, kwargs.pop("radius", RADIUS), band, **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- tests


class TestBands:
    """LCO filters map to standard bands (w -> r); each band has its colour; unknown filters fail."""

    def test_mapping(self):
        assert REFCAT_BAND == {
            "up": "u", "gp": "g", "rp": "r", "ip": "i", "zs": "z",
            "B": "B", "V": "V", "R": "R", "I": "I", "w": "r",
        }  # fmt: skip

    def test_colours(self):
        assert color_for_band("g") == ("g", "r") == color_for_band("rp")
        assert color_for_band("ip") == ("r", "i")
        assert color_for_band("zs") == ("i", "z")
        assert color_for_band("up") == ("u", "g")
        assert color_for_band("B") == color_for_band("V") == ("B", "V")
        assert color_for_band("R") == ("V", "R")
        assert color_for_band("I") == ("R", "I")
        assert color_for_band("w") == ("g", "r")

    def test_unknown_filter(self):
        with pytest.raises(ValueError, match="no reference band"):
            standard_band("Y")

    def test_astropy_never_downloads(self):
        assert iers.conf.auto_download is False


class TestSuccessfulQuery:
    """A VizieR answer is normalised to ra, dec, <band>, <band>_err (+ mag, color) with provenance."""

    def test_refcat2_field(self, tmp_path, vizier):
        vizier.answer("J/ApJ/867/105/refcat2", "refcat2_field.xml")
        stars = fetch(tmp_path)
        assert vizier.sources == ["J/ApJ/867/105/refcat2"]
        assert stars.colnames == [
            "ra", "dec", "g", "g_err", "r", "r_err", "i", "i_err", "z", "z_err",
            "mag", "mag_err", "color", "color_err",
        ]  # fmt: skip
        raw = recorded("refcat2_field.xml")
        assert len(raw) == 14 and len(stars) == 13  # the star 10.05' out is beyond the 10' radius
        np.testing.assert_allclose(stars["ra"], raw["RA_ICRS"][:13])
        np.testing.assert_allclose(stars["dec"], raw["DE_ICRS"][:13])
        np.testing.assert_allclose(stars["g"], raw["gmag"][:13], atol=1e-6)
        np.testing.assert_allclose(stars["i_err"], raw["e_imag"][:13], atol=1e-6)
        np.testing.assert_allclose(stars["mag"], stars["g"])
        np.testing.assert_allclose(stars["color"], stars["g"] - stars["r"])
        assert np.isnan(stars["z"][5]) and np.isnan(stars["z_err"][5])  # empty TD in the recording
        assert ((stars["ra"] >= 0) & (stars["ra"] < 360)).all()
        assert str(stars["ra"].unit) == "deg" and str(stars["g"].unit) == "mag"

    def test_provenance(self, tmp_path, vizier):
        vizier.answer("J/ApJ/867/105/refcat2", "refcat2_field.xml")
        meta = fetch(tmp_path).meta
        assert meta["catalog"] == "refcat2"
        assert meta["vizier_id"] == "J/ApJ/867/105/refcat2" and meta["vizier_catalog"] == "J/ApJ/867/105"
        assert meta["catalog_name"] == "ATLAS-RefCat2" and "Tonry" in meta["release"]
        assert (meta["query_ra"], meta["query_dec"], meta["query_radius_arcmin"]) == (150.123, 2.235, 10.1)
        assert meta["query_time_utc"].endswith("+00:00")
        assert meta["band"] == "g" and meta["color"] == "g-r"
        assert meta["from_cache"] is False and Path(meta["cache_file"]).is_file()

    def test_query_sent_through_astroquery(self, tmp_path, vizier):
        vizier.answer("J/ApJ/867/105/refcat2", "refcat2_field.xml")
        fetch(tmp_path, timeout=7.0)
        body = vizier.bodies[0]
        assert "-c=150.12300000+2.23500000" in body and "-c.rm=10.1" in body
        assert "-sort=_r" in body and "e_gmag" in body and "zmag" in body
        assert vizier.timeouts == [7.0]

    def test_band_needs_its_own_magnitude(self, tmp_path, vizier):
        vizier.answer("J/ApJ/867/105/refcat2", "refcat2_field.xml")
        stars = fetch(tmp_path, "zs")
        assert len(stars) == 12  # the star without z is dropped for z (colour i-z)
        assert stars.meta["color"] == "i-z"

    def test_ra_wraps_into_0_360(self):
        tab = refcat._normalise(
            Table({"RA_ICRS": [-45.0, 359.5], "DE_ICRS": [0.0, 1.0], "gmag": [15.0, 16.0]}),
            CATALOGS["refcat2"],
        )
        np.testing.assert_allclose(tab["ra"], [315.0, 359.5])
        assert np.isnan(tab["g_err"]).all()


class TestProviders:
    """Each catalog's own column names (APASS g'mag, Gaia fluxes and flags, SDSS class) are normalised."""

    def test_ps1(self, tmp_path, vizier):
        vizier.answer("II/349/ps1", "ps1_field.xml")
        stars = fetch(tmp_path, "rp", preference={"r": ["ps1"]})
        assert stars.meta["catalog"] == "ps1"
        assert {"g", "r", "i", "z", "y", "y_err"} <= set(stars.colnames)
        raw = recorded("ps1_field.xml")
        usable = (raw["_r"] < 10.0) & ~raw["gmag"].mask & (raw["rmag"] >= 14.0) & (raw["Qual"] & 1 == 0)
        assert len(stars) == usable.sum() == 5  # of 13 in the radius: one without g, 6 saturated, a galaxy
        np.testing.assert_allclose(stars["r"], raw["rmag"][usable], atol=1e-6)

    def test_ps1_saturation_and_quality_drop_only_the_bad_magnitudes(self):
        """PS1 is saturated brighter than 14 mag in that band only; extended objects go entirely."""
        tab = refcat._normalise(
            Table({"RAJ2000": [1.0, 2.0, 3.0], "DEJ2000": [0.0, 0.0, 0.0], "gmag": [13.5, 15.0, 15.0],
                   "rmag": [14.5, 13.9, 15.0], "Qual": [52, 52, 53]}),
            CATALOGS["ps1"],
        )  # fmt: skip
        np.testing.assert_allclose(tab["ra"], [1.0, 2.0])
        np.testing.assert_allclose(tab["g"], [np.nan, 15.0])
        np.testing.assert_allclose(tab["r"], [14.5, np.nan])

    def test_apass_primed_names(self, tmp_path, vizier):
        vizier.answer("II/336/apass9", "apass9_field.xml")
        stars = fetch(tmp_path, "V")
        assert stars.meta["catalog"] == "apass" and stars.meta["color"] == "B-V"
        raw = recorded("apass9_field.xml")
        assert "g'mag" in raw.colnames
        assert {"B", "V", "g", "r", "i"} <= set(stars.colnames)
        np.testing.assert_allclose(stars["g"], raw["g'mag"][: len(stars)], atol=1e-6)
        np.testing.assert_allclose(stars["color"], stars["B"] - stars["V"])
        assert np.isnan(stars["B_err"][1])  # e_Bmag missing in the recording: NaN, star kept

    def test_gaia_synthetic(self, tmp_path, vizier):
        vizier.answer("I/360/syntphot", "gaia_syntphot_field.xml")
        stars = fetch(tmp_path, "B", preference={"B": ["gaia_synth"]})
        raw = recorded("gaia_syntphot_field.xml")[:13]
        assert stars.meta["catalog"] == "gaia_synth"
        assert len(stars) == 12  # BFlag = 0 for one star: its B is not used
        good = np.asarray(raw["BFlag"]) == 1
        expect = 2.5 / np.log(10) * np.asarray(raw["e_FB"]) / np.asarray(raw["FB"])
        np.testing.assert_allclose(stars["B_err"], expect[good], rtol=1e-6)
        np.testing.assert_allclose(stars["B"], raw["Bmag"][good], atol=1e-6)

    def test_sdss_stars_only(self, tmp_path, vizier):
        vizier.answer("V/147/sdss12", "sdss12_field.xml")
        stars = fetch(tmp_path, "up")
        assert stars.meta["catalog"] == "sdss" and stars.meta["color"] == "u-g"
        raw = recorded("sdss12_field.xml")
        stellar = (raw["_r"] < 10.0) & (raw["mode"] == 1) & (raw["class"] == 6)
        assert stellar.sum() == 11  # 13 within the radius, less a galaxy and a secondary detection
        unsaturated = (raw["umag"] >= 14.0) & (raw["gmag"] >= 14.0)  # u-g needs both
        assert 0 < len(stars) == (stellar & unsaturated).sum() < 11

    def test_missing_columns_is_malformed(self):
        with pytest.raises(CatalogResponseError, match="lacks the expected columns"):
            refcat._normalise(Table({"foo": [1.0]}), CATALOGS["ps1"])


class TestTimeout:
    """Timeouts and connection errors are retried with exponential back-off, then RetryLater."""

    def test_retried_then_retry_later(self, tmp_path, vizier, sleeps, events):
        vizier.answer(
            "J/ApJ/867/105/refcat2",
            requests.exceptions.ConnectTimeout("connect timed out"),
            requests.exceptions.ReadTimeout("read timed out"),
            requests.exceptions.ConnectionError("connection refused"),
        )
        with pytest.raises(RetryLater, match="catalog unreachable") as info:
            fetch(tmp_path, retries=2, backoff=2.0)
        assert not isinstance(info.value, CatalogResponseError)
        assert vizier.sources == ["J/ApJ/867/105/refcat2"] * 3  # 1 + 2 retries; no fall-through to ps1
        assert sleeps == [2.0, 4.0]
        failed = [e for e in events() if e["event"] == "refcat.query_failed"]
        assert [e["attempt"] for e in failed] == [1, 2, 3] and "ConnectTimeout" in failed[0]["error"]
        assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())

    def test_recovers_after_a_timeout(self, tmp_path, vizier, sleeps):
        vizier.answer("J/ApJ/867/105/refcat2", requests.exceptions.ReadTimeout("slow"), "refcat2_field.xml")
        stars = fetch(tmp_path, retries=2, backoff=0.5)
        assert len(stars) == 13 and len(vizier.sources) == 2 and sleeps == [0.5]

    def test_server_error_is_retried(self, tmp_path, vizier, sleeps):
        vizier.answer("J/ApJ/867/105/refcat2", (503, "html_error.html"))
        with pytest.raises(RetryLater, match="catalog unreachable"):
            fetch(tmp_path, retries=1)
        assert len(vizier.sources) == 2 and sleeps == [2.0]

    def test_no_retries(self, tmp_path, vizier, sleeps):
        vizier.answer("J/ApJ/867/105/refcat2", requests.exceptions.ConnectTimeout("x"))
        with pytest.raises(RetryLater):
            fetch(tmp_path, retries=0)
        assert len(vizier.sources) == 1 and sleeps == []


class TestEmptyField:
    """A field without stars in every catalog gives an empty table (not an error), and is cached."""

    def test_all_empty(self, tmp_path, vizier):
        vizier.answer("J/ApJ/867/105/refcat2", "refcat2_empty.xml")
        vizier.answer("II/349/ps1", "no_resource.xml")
        vizier.answer("II/336/apass9", "refcat2_empty.xml")  # a table of another name: still no rows
        stars = fetch(tmp_path)
        assert len(stars) == 0
        assert {"ra", "dec", "mag", "mag_err", "color", "color_err"} <= set(stars.colnames)
        assert stars.meta["tried"] == ["refcat2", "ps1", "apass"] and stars.meta["catalog"] is None
        assert vizier.sources == ["J/ApJ/867/105/refcat2", "II/349/ps1", "II/336/apass9"]

    def test_empty_answers_are_cached(self, tmp_path, vizier, monkeypatch):
        vizier.answer("J/ApJ/867/105/refcat2", "refcat2_empty.xml")
        vizier.answer("II/349/ps1", "no_resource.xml")
        vizier.answer("II/336/apass9", "no_resource.xml")
        fetch(tmp_path)
        vizier.queues.clear()  # any further query would fail the test
        again = fetch(tmp_path)
        assert len(again) == 0 and len(vizier.sources) == 3


class TestMalformedResponse:
    """HTML pages, garbage, truncated XML and VizieR errors raise CatalogResponseError (a RetryLater).

    They are neither retried at once nor cached, and do not fall through to the next catalog.
    """

    @pytest.mark.parametrize(
        ("name", "message"),
        [
            ("html_error.html", "not a VOTable"),
            ("garbage.bin", "not a VOTable"),
            ("refcat2_truncated.xml", "malformed VOTable"),
            ("query_error.xml", "VizieR reported an error: .*unknown column"),
        ],
    )
    def test_malformed(self, tmp_path, vizier, name, message):
        vizier.answer("J/ApJ/867/105/refcat2", name)
        with pytest.raises(CatalogResponseError, match=message) as info:
            fetch(tmp_path)
        assert isinstance(info.value, RetryLater)
        assert "ATLAS-RefCat2" in str(info.value)
        assert vizier.sources == ["J/ApJ/867/105/refcat2"]
        assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*.ecsv"))

    def test_client_error_not_retried(self, tmp_path, vizier, sleeps):
        vizier.answer("J/ApJ/867/105/refcat2", (400, "html_error.html"))
        with pytest.raises(CatalogResponseError, match="HTTP 400"):
            fetch(tmp_path)
        assert len(vizier.sources) == 1 and sleeps == []


class TestCache:
    """A cached field covering the request never touches the network; refresh=True queries again."""

    def test_second_call_offline(self, tmp_path, vizier, monkeypatch):
        vizier.answer("J/ApJ/867/105/refcat2", "refcat2_field.xml")
        first = fetch(tmp_path)

        def network_down(*args, **kwargs):
            raise requests.exceptions.ConnectionError("network is down")

        monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", network_down)
        second = fetch(tmp_path)
        assert second.meta["from_cache"] is True
        assert len(second) == len(first) == 13
        for col in ("ra", "dec", "g", "g_err", "mag", "color"):
            np.testing.assert_allclose(second[col], first[col])
        assert second.meta["query_time_utc"] == first.meta["query_time_utc"]

    def test_smaller_field_inside_is_a_hit(self, tmp_path, vizier):
        vizier.answer("J/ApJ/867/105/refcat2", "refcat2_field.xml")
        fetch(tmp_path)
        inner = get_reference_stars(RA + 0.01, DEC, 5.0, "rp", cache_dir=tmp_path / "cache")
        assert len(vizier.sources) == 1 and inner.meta["from_cache"] is True
        assert 0 < len(inner) < 13

    def test_field_not_covered_is_a_miss(self, tmp_path, vizier):
        vizier.answer("J/ApJ/867/105/refcat2", "refcat2_field.xml")
        fetch(tmp_path)
        fetch(tmp_path, radius=12.0)
        assert len(vizier.sources) == 2

    def test_refresh_requeries(self, tmp_path, vizier):
        vizier.answer("J/ApJ/867/105/refcat2", "refcat2_field.xml")
        fetch(tmp_path)
        again = fetch(tmp_path, refresh=True)
        assert len(vizier.sources) == 2 and again.meta["from_cache"] is False

    def test_cache_file_is_ecsv_with_provenance(self, tmp_path, vizier):
        vizier.answer("J/ApJ/867/105/refcat2", "refcat2_field.xml")
        fetch(tmp_path)
        files = sorted((tmp_path / "cache").iterdir())
        assert [f.name for f in files] == ["refcat2_150.123_+2.235_r10.1.ecsv"]  # no tmp file left
        cached = Table.read(files[0], format="ascii.ecsv")
        assert len(cached) == 14  # the whole query, not only the request
        assert cached.meta["vizier_id"] == "J/ApJ/867/105/refcat2"
        assert cached.meta["query_radius_arcmin"] == 10.1 and "query_time_utc" in cached.meta

    def test_damaged_cache_file_is_replaced(self, tmp_path, vizier):
        vizier.answer("J/ApJ/867/105/refcat2", "refcat2_field.xml")
        fetch(tmp_path)
        (cache_file,) = (tmp_path / "cache").iterdir()
        cache_file.write_text("# %ECSV 1.0\nnot really\n")
        stars = fetch(tmp_path)
        assert len(stars) == 13 and len(vizier.sources) == 2
        assert len(Table.read(cache_file, format="ascii.ecsv")) == 14

    def test_failed_write_leaves_nothing(self, tmp_path, vizier, monkeypatch):
        vizier.answer("J/ApJ/867/105/refcat2", "refcat2_field.xml")

        def disk_full(*args, **kwargs):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(refcat.os, "fsync", disk_full)
        with pytest.raises(OSError, match="No space"):
            fetch(tmp_path)
        assert list((tmp_path / "cache").iterdir()) == []


class TestPreference:
    """Catalogs are tried in preference order past those that answer with no usable stars."""

    def test_first_empty_second_used(self, tmp_path, vizier):
        vizier.answer("J/ApJ/867/105/refcat2", "refcat2_empty.xml")
        vizier.answer("II/349/ps1", "ps1_field.xml")
        stars = fetch(tmp_path)
        assert stars.meta["catalog"] == "ps1" and stars.meta["tried"] == ["refcat2", "ps1"]
        assert len(stars) == 5  # see TestProviders.test_ps1
        assert vizier.sources == ["J/ApJ/867/105/refcat2", "II/349/ps1"]

    def test_catalog_without_band_is_not_asked(self, tmp_path, vizier):
        vizier.answer("I/360/syntphot", "gaia_syntphot_field.xml")
        stars = fetch(tmp_path, "R")  # default [apass, gaia_synth]; APASS has no R
        assert stars.meta["catalog"] == "gaia_synth" and stars.meta["color"] == "V-R"
        assert vizier.sources == ["I/360/syntphot"]

    def test_custom_preference(self, tmp_path, vizier):
        vizier.answer("II/336/apass9", "apass9_field.xml")
        stars = fetch(tmp_path, "ip", preference={"i": ["apass"]})
        assert stars.meta["catalog"] == "apass" and len(stars) > 0

    def test_unknown_catalog(self, tmp_path):
        with pytest.raises(ValueError, match="unknown catalog"):
            fetch(tmp_path, preference={"g": ["ucac4"]})

    def test_preference_without_the_band(self, tmp_path):
        with pytest.raises(ValueError, match="has u and colour u-g"):
            fetch(tmp_path, "up", preference={"u": ["refcat2", "apass"]})

    def test_unknown_source(self, tmp_path):
        with pytest.raises(ValueError, match="source"):
            fetch(tmp_path, source="simbad")


class TestLocalFile:
    """Local CSV/ECSV catalogs: gmag/e_gmag or g/g_err names; clear errors naming file and gap."""

    def write_csv(self, path: Path, header: str, rows: list[str]) -> Path:
        path.write_text("\n".join([header, *rows]) + "\n")
        return path

    def test_csv_gmag_style(self, tmp_path):
        f = self.write_csv(
            tmp_path / "stars.csv",
            "RA,Dec,gmag,e_gmag,rmag,rmagerr",
            [
                "150.120,2.230,15.10,0.01,14.60,0.02",
                "150.130,2.240,16.20,0.02,15.40,0.03",
                "10,10,12,0.1,11,0.1",
            ],
        )
        stars = get_reference_stars(RA, DEC, RADIUS, "gp", source="file", path=f, cache_dir=tmp_path)
        assert len(stars) == 2  # the third star is far outside the field
        np.testing.assert_allclose(stars["g"], [15.10, 16.20])
        np.testing.assert_allclose(stars["g_err"], [0.01, 0.02])
        np.testing.assert_allclose(stars["r_err"], [0.02, 0.03])
        np.testing.assert_allclose(stars["color"], [0.5, 0.8])
        assert stars.meta["catalog"] == "file" and stars.meta["catalog_name"] == "stars.csv"
        assert not (tmp_path / "cache").exists()

    def test_ecsv_plain_names(self, tmp_path):
        tab = Table(
            {
                "ra": [150.12, 150.13],
                "dec": [2.23, 2.24],
                "V": [14.0, 15.0],
                "V_err": [0.01, 0.02],
                "B": [14.6, 15.9],
                "B_err": [0.02, 0.03],
            }
        )
        f = tmp_path / "stars.ecsv"
        tab.write(f, format="ascii.ecsv")
        norm = read_local_catalog(f)
        assert norm.colnames == ["ra", "dec", "B", "B_err", "V", "V_err"]
        stars = get_reference_stars(RA, DEC, RADIUS, "V", source="file", path=f, cache_dir=tmp_path)
        np.testing.assert_allclose(stars["mag"], [14.0, 15.0])
        np.testing.assert_allclose(stars["color"], [0.6, 0.9])

    def test_missing_error_column(self, tmp_path):
        f = self.write_csv(tmp_path / "s.csv", "ra,dec,i", ["150.12,2.23,14.0"])
        stars = get_reference_stars(RA, DEC, RADIUS, "ip", source="file", path=f, cache_dir=tmp_path)
        assert stars["i_err"][0] == 0.0 and stars.meta["errors_missing"] == ["i"]
        assert np.isnan(stars["color"][0])  # no r: the colour is unknown, the star is kept

    def test_missing_ra(self, tmp_path):
        f = self.write_csv(tmp_path / "nora.csv", "x,dec,g,g_err", ["1,2,15,0.1"])
        with pytest.raises(CatalogFileError, match=r"nora\.csv: missing column\(s\) ra \(one of ra, raj2000"):
            read_local_catalog(f)

    @pytest.mark.parametrize(("ra", "dec"), [("RAJ2000", "DEJ2000"), ("raMean", "decMean"), ("RA_ICRS", "DE_ICRS")])
    def test_position_columns_of_vizier_ps1_and_gaia(self, tmp_path, ra, dec):
        f = self.write_csv(tmp_path / "v.csv", f"{ra},{dec},g,r", ["150.12,2.23,15.1,14.6"])
        stars = read_local_catalog(f)
        np.testing.assert_allclose([stars["ra"][0], stars["dec"][0]], [150.12, 2.23])

    def test_no_band_column(self, tmp_path):
        f = self.write_csv(tmp_path / "nobands.csv", "ra,dec,Gmag_gaia", ["150.1,2.2,15"])
        with pytest.raises(CatalogFileError, match=r"nobands\.csv: no band column"):
            read_local_catalog(f)

    def test_band_not_in_file(self, tmp_path):
        f = self.write_csv(tmp_path / "gonly.csv", "ra,dec,g,g_err", ["150.12,2.23,15,0.1"])
        with pytest.raises(CatalogFileError, match=r"gonly\.csv: no column for band 'z'.*has bands g"):
            get_reference_stars(RA, DEC, RADIUS, "zs", source="file", path=f, cache_dir=tmp_path)

    def test_sexagesimal_rejected(self, tmp_path):
        f = self.write_csv(tmp_path / "sexa.csv", "ra,dec,g", ["10:00:29.6,+02:14:04,15"])
        with pytest.raises(CatalogFileError, match="decimal degrees"):
            read_local_catalog(f)

    def test_missing_file(self, tmp_path):
        with pytest.raises(CatalogFileError, match="not found"):
            read_local_catalog(tmp_path / "absent.csv")

    def test_file_source_needs_path(self, tmp_path):
        with pytest.raises(ValueError, match="path"):
            get_reference_stars(RA, DEC, RADIUS, "gp", source="file", cache_dir=tmp_path)


class TestNoNetworkGuard:
    """Without the replay, a query reaches the socket guard, which fails the test loudly."""

    def test_guard_trips(self, tmp_path):
        with pytest.raises(NetworkAccessError):
            fetch(tmp_path, retries=0)
