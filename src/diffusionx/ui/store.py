"""Where the web UI keeps its sessions, so that a restart of `diffusionx ui` loses no one's rounds.

One SQLite file (stdlib sqlite3, WAL mode; `diffusionx ui --state FILE`, by default
`ui-sessions.sqlite3` in the state directory `diffusionx serve` uses) with two tables:

- `sessions`: one row per tab, its settings as JSON (steps, seed, head, policy spec, epoch, ...)
  and its final (the result's summary and the page's view of it as JSON, its PNG, its latents);
- `rounds`: one row per round, its summary as JSON, its latents as a safetensors blob
  (`diffusionx.wire`, in the dtype the round had: the next round SDEdits from them, so a restored
  session continues exactly as the live one would) and its PNG.

Every write is one `BEGIN IMMEDIATE` transaction (the session row and its new rounds together),
so a crash never leaves half a round. Nothing is pickled: JSON, PNG and safetensors only.
Sessions whose last write is older than `max_age_s` (7 days by default) are deleted.
"""

from __future__ import annotations

import contextlib
import io
import json
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .._sqlite import open_wal, transaction
from ..engine import Timing
from ..session import FinalResult, Round
from ..wire import image_to_png, latents_from_bytes, latents_to_bytes

STORE_FORMAT = "diffusionx-ui-store/1"
STORE_FILE_NAME = "ui-sessions.sqlite3"
DEFAULT_MAX_AGE_S = 7 * 24 * 3600.0
# dtype names as stored; the wire carries fp16 as fp16 and everything else as fp32 (lossless for
# bf16 and fp32), and the stored name casts it back.
_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


KEEP_FINAL = "keep"  # `save(final=KEEP_FINAL)`: the stored final is unchanged (not written again)


class StoredSessionError(LookupError):
    """A stored session exists but cannot be restored (a corrupt or foreign row). A LookupError, so
    the page gets the same 404 as for an unknown session and starts a new one."""


@dataclass(frozen=True)
class StoredRound:
    index: int
    summary: dict[str, Any]  # Round.summary() plus the latents' dtype
    latents: bytes  # safetensors (diffusionx.wire)
    image_png: bytes


@dataclass(frozen=True)
class StoredFinal:
    summary: dict[str, Any]  # {"result": FinalResult.summary() + dtype, "view": what the page shows}
    image_png: bytes
    latents: bytes | None


@dataclass(frozen=True)
class StoredSession:
    id: str
    settings: dict[str, Any]
    rounds: list[StoredRound]
    final: StoredFinal | None
    created: float
    updated: float


# ----- Round / FinalResult <-> rows -------------------------------------------------------------
def _dtype_name(latents: torch.Tensor) -> str:
    return str(latents.dtype).removeprefix("torch.")


def _latents_blob(latents: torch.Tensor) -> bytes:
    return latents_to_bytes(latents, "fp16" if latents.dtype == torch.float16 else "fp32")


def _latents_back(blob: bytes, dtype: str, device: str | None) -> torch.Tensor:
    if dtype not in _DTYPES:
        raise ValueError(f"unknown latent dtype {dtype!r}")
    latents = latents_from_bytes(blob).to(_DTYPES[dtype])
    if device and device != "cpu":
        with contextlib.suppress(RuntimeError, AssertionError):  # that device is gone: cpu (the engine moves them)
            latents = latents.to(device)
    return latents


def _image_back(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        out = image.copy()
    out.info = {}
    return out


def round_record(r: Round) -> StoredRound:
    summary = {**r.summary(), "latent_dtype": _dtype_name(r.latents), "latent_device": r.latents.device.type}
    return StoredRound(r.index, summary, _latents_blob(r.latents), image_to_png(r.image))


def round_from_record(record: StoredRound) -> Round:
    s = record.summary
    timing = {k: v for k, v in s["timing"].items() if k != "total_s"}
    return Round(
        index=int(s["index"]),
        prompt=str(s["prompt"]),
        seed=int(s["seed"]),
        strength=float(s["strength"]),
        steps=int(s["steps"]),
        unet_steps=int(s["unet_steps"]),
        mode=str(s["mode"]),
        parent=None if s["parent"] is None else int(s["parent"]),
        latents=_latents_back(record.latents, s["latent_dtype"], s.get("latent_device")),
        image=_image_back(record.image_png),
        timing=Timing(**timing),
        prompt_truncated=bool(s.get("prompt_truncated", False)),
        unknown_words=tuple(s.get("out_of_vocabulary", ())),
        preview_decoded=s.get("decoder") == "preview",
    )


def final_record(final: FinalResult, view: dict[str, Any] | None) -> StoredFinal:
    result = final.summary()
    if final.latents is not None:
        result["latent_dtype"] = _dtype_name(final.latents)
        result["latent_device"] = final.latents.device.type
    latents = None if final.latents is None else _latents_blob(final.latents)
    return StoredFinal({"result": result, "view": view}, image_to_png(final.image), latents)


def final_from_record(record: StoredFinal) -> tuple[FinalResult, dict[str, Any] | None]:
    s = record.summary["result"]
    timing = {k: v for k, v in s["cloud_timing"].items() if k != "total_s"}
    latents = None
    if record.latents is not None:
        latents = _latents_back(record.latents, s["latent_dtype"], s.get("latent_device"))
    final = FinalResult(
        prompt=str(s["prompt"]),
        source_round=int(s["source_round"]),
        image=_image_back(record.image_png),
        latents=latents,
        refined=bool(s["refined"]),
        reason=s.get("reason"),
        strength=float(s["strength"]),
        steps=int(s["steps"]),
        unet_steps=int(s["unet_steps"]),
        cloud_seconds=float(s["cloud_seconds"]),
        cloud_timing=Timing(**timing),
        edge_decode_s=float(s["edge_decode_s"]),
        bytes_up=int(s["bytes_up"]),
        bytes_down=int(s["bytes_down"]),
    )
    return final, record.summary.get("view")


# ----- SQLite -----------------------------------------------------------------------------------
_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    settings TEXT NOT NULL,
    final_summary TEXT,
    final_image BLOB,
    final_latents BLOB,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_updated ON sessions (updated);
CREATE TABLE IF NOT EXISTS rounds (
    session TEXT NOT NULL,
    idx INTEGER NOT NULL,
    summary TEXT NOT NULL,
    latents BLOB NOT NULL,
    image BLOB NOT NULL,
    PRIMARY KEY (session, idx)
);
"""


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, allow_nan=False)


class SQLiteSessionStore:
    """The UI's sessions in one file on this machine (WAL mode): survives restarts."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        clock: Callable[[], float] = time.time,
        busy_timeout_s: float = 30.0,
    ):
        if not max_age_s > 0:
            raise ValueError(f"the session age limit must be positive, got {max_age_s}")
        self.max_age_s, self.clock = float(max_age_s), clock
        self.path = Path(path).expanduser().resolve()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = open_wal(self.path, _SCHEMA, busy_timeout_s)
        self._lock = threading.Lock()

    def _transaction(self):
        return transaction(self._db)

    def save(
        self,
        sid: str,
        settings: dict[str, Any],
        rounds: Sequence[StoredRound] = (),
        *,
        final: StoredFinal | str | None = None,
        replace_rounds: bool = False,
    ) -> None:
        """In one transaction: the session's row (settings and final, replaced; the final kept as
        stored with `final=KEEP_FINAL`) and `rounds` added (or, with `replace_rounds`, the
        session's rounds replaced by `rounds`)."""
        text = _json(settings)
        keep = isinstance(final, str) and final == KEEP_FINAL
        if keep or final is None:
            final_row: tuple[Any, ...] = (None, None, None)
        elif isinstance(final, StoredFinal):
            final_row = (_json(final.summary), final.image_png, final.latents)
        else:
            raise TypeError(f"final must be a StoredFinal, None or KEEP_FINAL, got {final!r}")
        round_rows = [(sid, r.index, _json(r.summary), r.latents, r.image_png) for r in rounds]
        update = "settings = excluded.settings, updated = excluded.updated"
        if not keep:
            update += (", final_summary = excluded.final_summary, final_image = excluded.final_image, "
                       "final_latents = excluded.final_latents")
        with self._lock, self._transaction() as db:
            now = self.clock()
            db.execute(
                "INSERT INTO sessions (id, settings, final_summary, final_image, final_latents, created, updated) "
                f"VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET {update}",
                (sid, text, *final_row, now, now),
            )
            if replace_rounds:
                db.execute("DELETE FROM rounds WHERE session = ?", (sid,))
            db.executemany(
                "INSERT OR REPLACE INTO rounds (session, idx, summary, latents, image) VALUES (?, ?, ?, ?, ?)",
                round_rows,
            )

    def load(self, sid: str) -> StoredSession | None:
        """The stored session, or None if there is none (or it is older than the age limit)."""
        with self._lock:
            row = self._db.execute(
                "SELECT settings, final_summary, final_image, final_latents, created, updated FROM sessions "
                "WHERE id = ? AND updated > ?",
                (sid, self.clock() - self.max_age_s),
            ).fetchone()
            if row is None:
                return None
            rows = self._db.execute(
                "SELECT idx, summary, latents, image FROM rounds WHERE session = ? ORDER BY idx", (sid,)
            ).fetchall()
        settings, final_summary, final_image, final_latents, created, updated = row
        final = None
        if final_summary is not None:
            final = StoredFinal(json.loads(final_summary), bytes(final_image),
                                None if final_latents is None else bytes(final_latents))
        rounds = [StoredRound(int(i), json.loads(s), bytes(lat), bytes(img)) for i, s, lat, img in rows]
        return StoredSession(sid, json.loads(settings), rounds, final, created, updated)

    def delete(self, sid: str) -> None:
        with self._lock, self._transaction() as db:
            db.execute("DELETE FROM rounds WHERE session = ?", (sid,))
            db.execute("DELETE FROM sessions WHERE id = ?", (sid,))

    def evict(self, keep: Collection[str] = ()) -> int:
        """Delete the sessions last written more than `max_age_s` ago, except those in `keep` (in
        use in this process). Returns how many were deleted."""
        with self._lock, self._transaction() as db:
            cutoff = self.clock() - self.max_age_s
            old = [sid for (sid,) in db.execute("SELECT id FROM sessions WHERE updated <= ?", (cutoff,))]
            old = [sid for sid in old if sid not in keep]
            for sid in old:
                db.execute("DELETE FROM rounds WHERE session = ?", (sid,))
                db.execute("DELETE FROM sessions WHERE id = ?", (sid,))
            return len(old)

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def describe(self) -> str:
        return f"SQLite file {self.path}"


def open_session_store(location: str, *, max_age_s: float = DEFAULT_MAX_AGE_S) -> SQLiteSessionStore | None:
    """`--state`: "memory" (None: sessions live in this process only), a file path or sqlite:///path."""
    if location == "memory":
        return None
    path = location.removeprefix("sqlite:///") if location.startswith("sqlite:///") else location
    if "://" in path:
        raise ValueError(f"the UI's session store is a SQLite file or 'memory', got {location!r}")
    return SQLiteSessionStore(path, max_age_s=max_age_s)
