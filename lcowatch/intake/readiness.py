"""Readiness: a file is worked on only once it is complete.

Complete means: its size and mtime have not changed for ``watch.quiet_seconds``, and its FITS structure is
whole. The structure check walks the headers (at most a few kB are read per HDU; a gzip file is inflated
in bounded chunks and thrown away) and verifies that every HDU's data, as its header declares it, is
present: a plain FITS file must be a whole number of 2880-byte blocks, a gzip stream must reach its end.
Nothing else from the header is used, except ``DATE-OBS`` / ``MJD-OBS`` to order the queue.

Verdicts:

``ready``
    complete; hand it to the worker.
``waiting``
    not complete *yet* (still being written, or truncated: the two cannot be told apart). A file that is
    still waiting ``watch.incomplete_after`` seconds after it was first seen, and is quiet, is given up
    as ``incomplete``.
``poison``
    can never become a good frame, whatever is appended (not FITS, a header that claims an image larger
    than ``processing.max_pixels``, a corrupt gzip stream): quarantine it at once.
"""

from __future__ import annotations

import gzip
import math
import os
import stat
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Literal

from lcowatch.intake.discovery import is_candidate

FITS_BLOCK = 2880
CARD = 80
GZIP_MAGIC = b"\x1f\x8b"
FITS_START = b"SIMPLE  ="
TEMPORARY_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload", ".filepart", "~")
MAX_HEADER_BLOCKS = 1000  # 36,000 cards; LCO headers have a few hundred
MAX_HDUS = 1000
SKIP_CHUNK = 1 << 20
_MJD_EPOCH = datetime(1858, 11, 17)
_VALID_BITPIX = {8, 16, 32, 64, -32, -64}

Kind = Literal["ready", "waiting", "poison"]


@dataclass(frozen=True)
class Verdict:
    kind: Kind
    reason: str | None = None
    mjd: float | None = None  # observation start, for ordering; None when the header has no time


def is_temporary(name: str) -> bool:
    """Names that writers use while a file is not finished: dotfiles, ``*.part``, ``*.tmp`` ..."""
    return name.startswith(".") or name.lower().endswith(TEMPORARY_SUFFIXES)


def is_wanted(path: Path) -> bool:
    """A name the daemon looks at: a FITS suffix, and not a temporary name."""
    return is_candidate(path) and not is_temporary(path.name)


def max_frame_bytes(max_pixels: int) -> int:
    """The most bytes a frame may hold (its data, decompressed); the same bound as the reader's."""
    return max_pixels * 8 + 64 * FITS_BLOCK


class _Incomplete(Exception):
    pass


class _Poison(Exception):
    pass


class _Stream:
    """Sequential reads and forward skips over a file or a gzip stream; counts the bytes passed."""

    def __init__(self, handle: BinaryIO | gzip.GzipFile, size: int | None) -> None:
        self.handle = handle
        self.size = size  # known for plain files; None for gzip
        self.position = 0

    def read(self, n: int) -> bytes:
        data = self.handle.read(n)
        self.position += len(data)
        return data

    def skip(self, n: int) -> int:
        if self.size is not None:
            step = max(0, min(n, self.size - self.position))
            self.handle.seek(step, os.SEEK_CUR)
            self.position += step
            return step
        done = 0
        while done < n:
            chunk = self.handle.read(min(SKIP_CHUNK, n - done))
            if not chunk:
                break
            done += len(chunk)
        self.position += done
        return done


def _cards(header: bytes) -> dict[str, str]:
    """Keyword -> raw value text (comment removed) of the cards that have a value."""
    values: dict[str, str] = {}
    for start in range(0, len(header), CARD):
        card = header[start : start + CARD].decode("ascii", "replace")
        key = card[:8].strip()
        if not key or card[8:10] != "= " or key in values:
            continue
        text = card[10:].strip()
        if text.startswith("'"):
            end = text.find("'", 1)
            values[key] = text[1:end] if end > 0 else text[1:]
        else:
            values[key] = text.split("/", 1)[0].strip()
    return values


def _int(values: dict[str, str], key: str, default: int | None = None) -> int:
    raw = values.get(key)
    if raw is None:
        if default is None:
            raise _Poison(f"header has no {key}")
        return default
    try:
        return int(raw)
    except ValueError:
        raise _Poison(f"header {key} = {raw!r} is not an integer") from None


def _mjd(values: dict[str, str]) -> float | None:
    date_obs = values.get("DATE-OBS", "").strip()
    if date_obs:
        try:
            moment = datetime.fromisoformat(date_obs.rstrip("Z"))
        except ValueError:
            pass
        else:
            return (moment.replace(tzinfo=None) - _MJD_EPOCH).total_seconds() / 86400.0
    try:
        mjd = float(values.get("MJD-OBS", ""))
    except ValueError:
        return None
    return mjd if math.isfinite(mjd) else None


def _read_header(stream: _Stream, index: int) -> bytes | None:
    """The header blocks of HDU ``index`` up to its END card; None at a clean end of file."""
    blocks: list[bytes] = []
    while True:
        block = stream.read(FITS_BLOCK)
        if not block and not blocks and index > 0:
            return None
        if len(block) < FITS_BLOCK:
            raise _Incomplete(f"header of HDU {index} ends at byte {stream.position}")
        if not blocks:
            if index == 0 and not block.startswith(FITS_START):
                raise _Poison("not a FITS file (no SIMPLE card)")
            if index > 0 and not block.startswith(b"XTENSION="):
                if block.strip(b"\0 "):
                    raise _Poison(f"bytes after HDU {index - 1} are not a FITS extension")
                # Zeros where the next HDU should be: a preallocated file not filled yet (and a file
                # that keeps them is no good either: the reader refuses trailing padding).
                raise _Incomplete(f"zero bytes after HDU {index - 1}, at byte {stream.position - len(block)}")
        blocks.append(block)
        for start in range(0, FITS_BLOCK, CARD):
            if block[start : start + 8] == b"END     ":
                return b"".join(blocks)
        if len(blocks) >= MAX_HEADER_BLOCKS:
            raise _Poison(f"header of HDU {index} has no END card in {MAX_HEADER_BLOCKS} blocks")


def _data_bytes(values: dict[str, str], index: int, max_pixels: int, max_bytes: int) -> int:
    bitpix = _int(values, "BITPIX")
    if bitpix not in _VALID_BITPIX:
        raise _Poison(f"HDU {index} has an invalid BITPIX {bitpix}")
    naxis = _int(values, "NAXIS")
    if not 0 <= naxis <= 999:
        raise _Poison(f"HDU {index} has an invalid NAXIS {naxis}")
    axes = [_int(values, f"NAXIS{i}") for i in range(1, naxis + 1)]
    if any(n < 0 for n in axes):
        raise _Poison(f"HDU {index} has a negative axis length")
    xtension = values.get("XTENSION", "").strip()
    if naxis >= 2 and (index == 0 or xtension == "IMAGE"):
        pixels = math.prod(axes)
        if pixels > max_pixels:
            shape = "x".join(str(n) for n in axes)
            raise _Poison(f"header claims an image of {shape} pixels, more than processing.max_pixels")
    if values.get("ZIMAGE", "").strip() == "T":
        zaxes = [_int(values, f"ZNAXIS{i}", 1) for i in range(1, _int(values, "ZNAXIS", 0) + 1)]
        if math.prod(zaxes) > max_pixels:
            shape = "x".join(str(n) for n in zaxes)
            raise _Poison(f"header claims an image of {shape} pixels, more than processing.max_pixels")
    if naxis == 0:
        return 0
    pcount = _int(values, "PCOUNT", 0) if index > 0 else 0
    gcount = _int(values, "GCOUNT", 1) if index > 0 else 1
    size = abs(bitpix) // 8 * gcount * (pcount + math.prod(axes))
    if size > max_bytes:
        raise _Poison(f"HDU {index} claims {size} bytes of data, more than a frame may hold")
    return size


def _walk(stream: _Stream, max_pixels: int) -> float | None:
    """Walk every HDU; return the observation time found in the headers.

    A file that is only an empty primary HDU (what an fpack file is before its first extension is
    written) is not complete.
    """
    max_bytes = max_frame_bytes(max_pixels)
    mjd: float | None = None
    data_bytes = 0
    for index in range(MAX_HDUS):
        header = _read_header(stream, index)
        if header is None:
            break
        values = _cards(header)
        size = _data_bytes(values, index, max_pixels, max_bytes)
        data_bytes += size
        if data_bytes > max_bytes:
            raise _Poison(f"its HDUs claim {data_bytes} bytes of data, more than a frame may hold")
        if mjd is None:
            mjd = _mjd(values)
        padded = -(-size // FITS_BLOCK) * FITS_BLOCK
        if stream.skip(padded) < padded:
            raise _Incomplete(f"data of HDU {index} ends at byte {stream.position}")
        if stream.size is not None and stream.position == stream.size:
            break
    else:
        raise _Poison(f"more than {MAX_HDUS} HDUs")
    if index == 0 and data_bytes == 0:
        raise _Incomplete("only an empty primary HDU so far")
    return mjd


def check_complete(path: Path, *, max_pixels: int) -> Verdict:
    """Whether the file at ``path`` is a whole FITS file (see the module docstring). Never raises."""
    try:
        with open(path, "rb", buffering=0) as raw:
            size = os.fstat(raw.fileno()).st_size
            if size == 0:
                return Verdict("waiting", "empty file")
            head = raw.read(FITS_BLOCK)
            raw.seek(0)
            if not head.strip(b"\0"):
                return Verdict("waiting", "only zero bytes so far")
            if FITS_START.startswith(head) or GZIP_MAGIC.startswith(head):
                return Verdict("waiting", f"only {len(head)} bytes so far")
            if head.startswith(GZIP_MAGIC):
                if size > max_frame_bytes(max_pixels):
                    return Verdict("poison", f"file of {size} bytes is larger than a frame may be")
                with gzip.GzipFile(fileobj=raw, mode="rb") as inflated:
                    stream = _Stream(inflated, None)
                    mjd = _walk(stream, max_pixels)
                    # Read on to the end-of-stream marker (EOFError when it is missing), bounded.
                    while stream.skip(SKIP_CHUNK):
                        if stream.position > max_frame_bytes(max_pixels):
                            return Verdict("poison", "gzip content larger than a frame may be")
                return Verdict("ready", mjd=mjd)
            if not head.startswith(FITS_START):
                return Verdict("poison", "not a FITS file (no SIMPLE card)")
            if size > max_frame_bytes(max_pixels):
                return Verdict("poison", f"file of {size} bytes is larger than a frame may be")
            if size % FITS_BLOCK:
                return Verdict("waiting", f"size {size} is not a whole number of 2880-byte FITS blocks")
            mjd = _walk(_Stream(raw, size), max_pixels)
            return Verdict("ready", mjd=mjd)
    except _Incomplete as exc:
        return Verdict("waiting", str(exc))
    except EOFError:
        return Verdict("waiting", "gzip stream is not complete")
    except _Poison as exc:
        return Verdict("poison", str(exc))
    except (gzip.BadGzipFile, zlib.error) as exc:
        return Verdict("poison", f"corrupt gzip stream: {exc}")
    except OSError as exc:
        return Verdict("waiting", f"cannot read: {exc.strerror or exc}")


@dataclass(frozen=True)
class Result:
    """What the tracker decided about one path.

    ``kind``: ``ready`` (``mjd``, ``size``, ``mtime_ns`` say what was checked), ``poison`` or ``incomplete``
    (``reason``), ``gone`` (vanished or not a regular file any more).
    """

    path: Path
    kind: Literal["ready", "poison", "incomplete", "gone"]
    reason: str | None = None
    mjd: float | None = None
    size: int = 0
    mtime_ns: int = 0


@dataclass
class _Track:
    first_seen: float
    size: int
    mtime_ns: int
    quiet_since: float
    next_check: float
    checked: tuple[int, int] | None = None
    verdict: Verdict | None = None


class Tracker:
    """Files seen but not yet handed on, each with its quiet-period clock. Used by one thread.

    A file is *quiet* once its size and mtime have not changed for ``quiet_seconds``: observed by two
    stat calls that far apart, or, at first sight, an mtime already that old (a file renamed or moved
    into place is complete at once). Only a quiet file gets the structure check.
    """

    def __init__(
        self,
        quiet_seconds: float,
        incomplete_after: float,
        max_pixels: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], float] = time.time,
        check: Callable[..., Verdict] = check_complete,
    ) -> None:
        self.quiet_seconds = quiet_seconds
        self.incomplete_after = incomplete_after
        self.max_pixels = max_pixels
        self._clock = clock
        self._wallclock = wallclock
        self._check = check
        self._tracks: dict[Path, _Track] = {}

    def configure(self, quiet_seconds: float, incomplete_after: float, max_pixels: int) -> None:
        self.quiet_seconds, self.incomplete_after, self.max_pixels = quiet_seconds, incomplete_after, max_pixels
        for track in self._tracks.values():
            track.checked = None
            track.next_check = 0.0

    def __len__(self) -> int:
        return len(self._tracks)

    def due(self) -> bool:
        """Whether a file is due to be looked at now."""
        now = self._clock()
        return any(track.next_check <= now for track in self._tracks.values())

    def __contains__(self, path: object) -> bool:
        return path in self._tracks

    def add(self, path: Path, *, after: float = 0.0) -> None:
        """Start tracking ``path``, or look at it again if it is tracked already: soon, or ``after`` seconds."""
        now = self._clock()
        next_check = now + after if after else 0.0
        track = self._tracks.get(path)
        if track is not None:
            track.next_check = next_check
            return
        self._tracks[path] = _Track(first_seen=now, size=-1, mtime_ns=-1, quiet_since=now, next_check=next_check)

    def poll(self, *, tick: Callable[[], None] | None = None, budget: float | None = None) -> list[Result]:
        """Look at the files that are due; return (and stop tracking) those decided.

        ``tick`` is called now and then during a long pass (the daemon pings its watchdog there). With a
        ``budget`` (seconds), the pass ends once it is spent (after one file at least); the files not looked
        at stay due for the next.
        """
        now = self._clock()
        recheck = max(0.05, min(1.0, self.quiet_seconds))
        results: list[Result] = []
        started = last_tick = time.monotonic()
        looked = 0
        for path, track in list(self._tracks.items()):
            if track.next_check > now:
                continue
            if budget is not None and looked and time.monotonic() - started > budget:
                break  # at least one file a pass, however slow
            looked += 1
            if tick is not None and time.monotonic() - last_tick > 1.0:
                tick()
                last_tick = time.monotonic()
            result = self._look(path, track, now, recheck)
            if result is not None:
                del self._tracks[path]
                results.append(result)
        return results

    def _look(self, path: Path, track: _Track, now: float, recheck: float) -> Result | None:
        try:
            st = os.stat(path)
        except OSError:
            return Result(path, "gone", "vanished")
        if not stat.S_ISREG(st.st_mode):
            return Result(path, "gone", "not a regular file")
        if (st.st_size, st.st_mtime_ns) != (track.size, track.mtime_ns):
            first_look = track.size < 0
            track.size, track.mtime_ns = st.st_size, st.st_mtime_ns
            track.quiet_since = now
            if first_look:
                age = self._wallclock() - st.st_mtime_ns / 1e9
                if age >= self.quiet_seconds:
                    track.quiet_since = now - age
        quiet_for = now - track.quiet_since
        if quiet_for < self.quiet_seconds:
            track.next_check = track.quiet_since + self.quiet_seconds
            return None
        signature = (st.st_size, st.st_mtime_ns)
        if track.checked != signature or track.verdict is None:
            track.verdict = self._check(path, max_pixels=self.max_pixels)
            track.checked = signature
        verdict = track.verdict
        if verdict.kind == "ready":
            return Result(path, "ready", mjd=verdict.mjd, size=st.st_size, mtime_ns=st.st_mtime_ns)
        if verdict.kind == "poison":
            return Result(path, "poison", verdict.reason, size=st.st_size, mtime_ns=st.st_mtime_ns)
        if now - track.first_seen >= self.incomplete_after:
            reason = f"incomplete: {verdict.reason} ({now - track.first_seen:.0f} s after it was first seen)"
            return Result(path, "incomplete", reason, size=st.st_size, mtime_ns=st.st_mtime_ns)
        track.next_check = now + recheck
        return None
