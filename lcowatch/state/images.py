"""Reference images for image subtraction: one cutout around the target per target, filter and instrument
class, with where it came from; kept in the database so that it changes in the same transaction as the
points measured against it."""

from __future__ import annotations

import math
import sqlite3
import time
from dataclasses import dataclass

import numpy as np

from lcowatch.science.register import Affine
from lcowatch.state.references import affine_from_text, affine_to_text


@dataclass(frozen=True)
class ReferenceImage:
    """A cutout of one frame around a target: the reference that frames of its filter and instrument class
    are subtracted from.

    ``image`` is background-subtracted electrons (NaN where masked) and ``variance`` electrons**2, both
    float32 of shape (ny, nx); the cutout's pixel (0, 0) is the frame's pixel ``origin`` (x, y), 0-based.
    ``frame_from_reference`` maps the target's reference pixel frame into the frame's pixels; ``fwhm_pix``
    is the frame's seeing in its own pixels. Later frames averaged in (``frames``) are resampled onto the
    first frame's cutout and put on its flux scale; ``sha256``, ``file`` and ``mjd`` stay the first's.
    ``transient_total`` is the transient's light the image holds (electrons on its flux scale, a point
    source's whole flux, with ``transient_total_err``), measured against another camera's reference that is
    free of it; 0 when it holds none; inf when it holds some that nothing could measure. An image that
    holds any is never averaged into.
    """

    target: str
    filter: str
    instrument_class: str
    sha256: str
    file: str
    mjd: float
    fwhm_pix: float
    origin: tuple[int, int]
    frame_from_reference: Affine
    image: np.ndarray
    variance: np.ndarray
    frames: int  # frames averaged into it
    reason: str
    transient_total: float = 0.0
    transient_total_err: float = 0.0

    @property
    def light_measured(self) -> bool:
        """Whether it holds transient light of a known amount, added back to the points."""
        return self.transient_total != 0.0 and math.isfinite(self.transient_total)

    @property
    def light_unmeasured(self) -> bool:
        """Whether it holds transient light that nothing could measure."""
        return math.isinf(self.transient_total)


def write_reference_image(conn: sqlite3.Connection, ref: ReferenceImage) -> None:
    ny, nx = ref.image.shape
    conn.execute(
        "INSERT OR REPLACE INTO reference_images (target, filter, instrument_class, sha256, file, mjd, fwhm_pix, "
        "origin_x, origin_y, nx, ny, frame_from_reference, image, variance, frames, reason, transient_total, "
        "transient_total_err, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            ref.target, ref.filter, ref.instrument_class, ref.sha256, ref.file, ref.mjd, ref.fwhm_pix,
            ref.origin[0], ref.origin[1], nx, ny, affine_to_text(ref.frame_from_reference),
            ref.image.astype(np.float32).tobytes(), ref.variance.astype(np.float32).tobytes(), ref.frames, ref.reason,
            ref.transient_total, ref.transient_total_err, time.time(),
        ),
    )  # fmt: skip


def reference_image(conn: sqlite3.Connection, target: str, filter: str, instrument_class: str) -> ReferenceImage | None:
    row = conn.execute(
        "SELECT * FROM reference_images WHERE target = ? AND filter = ? AND instrument_class = ?",
        (target, filter, instrument_class),
    ).fetchone()
    if row is None:
        return None
    shape = (row["ny"], row["nx"])
    return ReferenceImage(
        target, filter, instrument_class, row["sha256"], row["file"], row["mjd"], row["fwhm_pix"],
        (row["origin_x"], row["origin_y"]), affine_from_text(row["frame_from_reference"]),
        np.frombuffer(row["image"], np.float32).reshape(shape),
        np.frombuffer(row["variance"], np.float32).reshape(shape),
        row["frames"], row["reason"], row["transient_total"] or 0.0, row["transient_total_err"] or 0.0,
    )  # fmt: skip


def clean_reference_image(
    conn: sqlite3.Connection, target: str, filter: str, other_than: str, before_mjd: float
) -> ReferenceImage | None:
    """The earliest reference image of a target and filter, of an instrument class other than ``other_than``,
    made from a frame before ``before_mjd`` and holding none of the transient's light as far as is known;
    None when there is none. Only earlier ones: a reference founded from a later frame (frames met out of
    order, as in a backlog) may hold light nothing had yet shown, and an earlier frame measured against it
    would come out negative."""
    row = conn.execute(
        "SELECT instrument_class FROM reference_images WHERE target = ? AND filter = ? AND instrument_class != ? "
        "AND mjd < ? AND COALESCE(transient_total, 0) = 0 ORDER BY mjd LIMIT 1",
        (target, filter, other_than, before_mjd),
    ).fetchone()
    return None if row is None else reference_image(conn, target, filter, row[0])


def reference_images(conn: sqlite3.Connection, target: str) -> list[dict[str, object]]:
    """A target's reference images, without their pixels: for ``lcowatch reference``."""
    rows = conn.execute(
        "SELECT filter, instrument_class, file, mjd, frames, fwhm_pix, nx, ny, reason, "
        "COALESCE(transient_total, 0) AS transient_total, COALESCE(transient_total_err, 0) AS transient_total_err, "
        "created "
        "FROM reference_images "
        "WHERE target = ? ORDER BY filter, instrument_class",
        (target,),
    )
    return [dict(row) for row in rows]


def reference_pins(conn: sqlite3.Connection, target: str, filter: str, instrument_class: str) -> list[str]:
    """The sha256 of the frames a user set as the reference image of a target, filter and instrument class,
    in their order (the first is the base, the others are averaged in); empty when the rules choose."""
    rows = conn.execute(
        "SELECT sha256 FROM reference_pins WHERE target = ? AND filter = ? AND instrument_class = ? ORDER BY position",
        (target, filter, instrument_class),
    )
    return [row[0] for row in rows]


def pin_reference(conn: sqlite3.Connection, target: str, filter: str, instrument_class: str, shas: list[str]) -> None:
    """Make ``shas`` the frames of that reference image (the caller's transaction)."""
    conn.execute(
        "DELETE FROM reference_pins WHERE target = ? AND filter = ? AND instrument_class = ?",
        (target, filter, instrument_class),
    )
    conn.executemany(
        "INSERT INTO reference_pins (target, filter, instrument_class, sha256, position) VALUES (?, ?, ?, ?, ?)",
        [(target, filter, instrument_class, sha, k) for k, sha in enumerate(shas)],
    )


def target_pins(conn: sqlite3.Connection, target: str) -> dict[tuple[str, str], list[str]]:
    """A target's pins by (filter, instrument class), each in its order."""
    pins: dict[tuple[str, str], list[str]] = {}
    rows = conn.execute(
        "SELECT filter, instrument_class, sha256 FROM reference_pins WHERE target = ? ORDER BY position", (target,)
    )
    for filter, instrument_class, sha256 in rows:
        pins.setdefault((filter, instrument_class), []).append(sha256)
    return pins
