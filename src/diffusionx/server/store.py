"""The idempotency store: `(token, Idempotency-Key) -> the request's fingerprint and its result`.

Three backends behind one small protocol, chosen by `open_store(url_or_path)`:

- `MemoryStore` ("memory"): one process, forgotten on restart (tests, `--store memory`).
- `SQLiteStore` (a file path or `sqlite:///path`): the default of `diffusionx serve`; stdlib
  sqlite3 in WAL mode, so it survives a restart and several threads and processes on one machine
  may share the file (each claim is one `BEGIN IMMEDIATE` transaction).
- `RedisStore` (`redis://host:port/db`, `rediss://...`): for several replicas or machines; each
  operation is one Lua script, so a claim is atomic across replicas.

An entry is first *pending* (a replica claimed the key and is computing; the claim is a lease of
`lease_s` that its owner renews while it works, so a replica killed mid-refinement loses the key
after at most `lease_s` and a retry computes it), then *done* (the stored result, kept for
`window_s` after it finished: the idempotency window). Each token has its own capacity of keys:
claiming one more than `capacity_per_token` evicts that token's oldest finished entries, never
another token's, and never a pending one.

Keys match on the *parsed* request (`request_fingerprint`), not on the body's bytes: the same JSON
re-serialized with other whitespace or key order, or a default sent explicitly, is the same request.

Stored results are plain data, a JSON object (`meta`) and the payload bytes: never pickle.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from .._sqlite import open_wal, transaction

DEFAULT_CAPACITY_PER_TOKEN = 1024
DEFAULT_WINDOW_S = 24 * 3600.0
DEFAULT_LEASE_S = 15.0
STORE_FILE_NAME = "idempotency.sqlite3"

State = Literal["pending", "done"]


@dataclass(frozen=True)
class Entry:
    """One key's record. `meta` and `payload` are set once it is done."""

    fingerprint: str
    request_id: str
    owner: str
    state: State
    created: float  # wall time of the claim (orders eviction)
    expires: float  # pending: end of the owner's lease; done: end of the idempotency window
    meta: dict[str, Any] | None = None
    payload: bytes | None = None


@dataclass(frozen=True)
class Claim:
    """What `claim` found: `new` (the caller now owns a pending entry and must compute, then
    `complete` or `release`), `done` (a stored result: replay it) or `pending` (another owner is
    computing; its entry is in `entry`)."""

    outcome: Literal["new", "done", "pending"]
    entry: Entry | None = None


class IdempotencyStore(Protocol):
    capacity_per_token: int
    window_s: float
    lease_s: float

    def claim(self, who: str, key: str, fingerprint: str, request_id: str, owner: str) -> Claim:
        """Atomically: the live entry for (who, key), or a new pending one owned by `owner`."""
        ...

    def renew(self, who: str, key: str, owner: str) -> bool:
        """Extend `owner`'s lease on its pending entry; False if it is no longer the owner."""
        ...

    def complete(self, who: str, key: str, owner: str, entry: Entry) -> bool:
        """Store `entry` (state done) unless the key now holds a different request."""
        ...

    def release(self, who: str, key: str, owner: str) -> None:
        """Drop `owner`'s pending entry (its computation failed: a retry may compute again)."""
        ...

    def get(self, who: str, key: str) -> Entry | None: ...

    def close(self) -> None: ...

    def describe(self) -> str: ...


# ----- the request's fingerprint ----------------------------------------------------------------
def request_fingerprint(request: Any) -> str:
    """sha256 over the parsed request (a `RefineRequest`): its fields in sorted JSON, the latent
    tensor as dtype + shape + sha256 of its bytes (not of the safetensors file, whose header may
    be laid out differently), the image as size + sha256 of its RGB pixels (not of the PNG). The
    payload is the request's own parsed one (`parsed_latents` / `parsed_image`): not parsed again."""
    fields: dict[str, Any] = {
        "prompt": request.prompt,
        "strength": float(request.strength),
        "steps": int(request.steps),
        "seed": int(request.seed),
        "guidance": float(request.guidance_scale),
        "scheduler": request.scheduler,
        "return_format": request.return_format,
    }
    if request.latents is not None:
        array = request.parsed_latents().contiguous().numpy()  # as sent: fp16 or fp32
        fields["latents"] = {
            "latents": {
                "dtype": str(array.dtype),
                "shape": list(array.shape),
                "sha256": hashlib.sha256(array.tobytes()).hexdigest(),
            }
        }
    if request.image_png is not None:
        rgb = request.parsed_image()
        fields["image"] = {"size": list(rgb.size), "sha256": hashlib.sha256(rgb.tobytes()).hexdigest()}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# ----- memory -----------------------------------------------------------------------------------
class MemoryStore:
    """In one process: a dict per token, oldest first."""

    def __init__(
        self,
        capacity_per_token: int = DEFAULT_CAPACITY_PER_TOKEN,
        window_s: float = DEFAULT_WINDOW_S,
        lease_s: float = DEFAULT_LEASE_S,
        clock: Callable[[], float] = time.time,
    ):
        _check_settings(capacity_per_token, window_s, lease_s)
        self.capacity_per_token, self.window_s, self.lease_s, self.clock = capacity_per_token, window_s, lease_s, clock
        self._lock = threading.Lock()
        self._tokens: dict[str, OrderedDict[str, Entry]] = {}

    def _live(self, who: str, key: str, now: float) -> Entry | None:
        entries = self._tokens.get(who)
        entry = entries.get(key) if entries else None
        if entry is not None and entry.expires <= now:
            del entries[key]
            return None
        return entry

    def claim(self, who: str, key: str, fingerprint: str, request_id: str, owner: str) -> Claim:
        with self._lock:
            now = self.clock()
            entry = self._live(who, key, now)
            if entry is not None:
                return Claim(entry.state, entry)
            entries = self._tokens.setdefault(who, OrderedDict())
            entries[key] = Entry(fingerprint, request_id, owner, "pending", now, now + self.lease_s)
            for old in [k for k, e in entries.items() if e.expires <= now]:
                del entries[old]
            excess = len(entries) - self.capacity_per_token
            for old in [k for k, e in entries.items() if e.state == "done"][: max(0, excess)]:
                del entries[old]
            return Claim("new")

    def renew(self, who: str, key: str, owner: str) -> bool:
        with self._lock:
            now = self.clock()
            entry = self._live(who, key, now)
            if entry is None or entry.state != "pending" or entry.owner != owner:
                return False
            self._tokens[who][key] = replace(entry, expires=now + self.lease_s)
            return True

    def complete(self, who: str, key: str, owner: str, entry: Entry) -> bool:
        with self._lock:
            now = self.clock()
            current = self._live(who, key, now)
            if current is not None and current.fingerprint != entry.fingerprint:
                return False
            entries = self._tokens.setdefault(who, OrderedDict())
            created = current.created if current is not None else entry.created
            entries[key] = replace(entry, owner=owner, state="done", created=created, expires=now + self.window_s)
            return True

    def release(self, who: str, key: str, owner: str) -> None:
        with self._lock:
            entries = self._tokens.get(who)
            entry = entries.get(key) if entries else None
            if entry is not None and entry.state == "pending" and entry.owner == owner:
                del entries[key]

    def get(self, who: str, key: str) -> Entry | None:
        with self._lock:
            return self._live(who, key, self.clock())

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return "memory (this process only; forgotten on restart)"


# ----- SQLite -----------------------------------------------------------------------------------
_SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency (
    who TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    request_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'done')),
    created REAL NOT NULL,
    expires REAL NOT NULL,
    meta TEXT,
    payload BLOB,
    PRIMARY KEY (who, key)
);
CREATE INDEX IF NOT EXISTS idempotency_age ON idempotency (who, state, created);
CREATE INDEX IF NOT EXISTS idempotency_expiry ON idempotency (expires);
"""
_COLUMNS = "fingerprint, request_id, owner, state, created, expires, meta, payload"
_UPSERT = f"INSERT OR REPLACE INTO idempotency (who, key, {_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"


class SQLiteStore:
    """A file on this machine (WAL mode): survives restarts; threads and processes may share it."""

    def __init__(
        self,
        path: str | Path,
        capacity_per_token: int = DEFAULT_CAPACITY_PER_TOKEN,
        window_s: float = DEFAULT_WINDOW_S,
        lease_s: float = DEFAULT_LEASE_S,
        clock: Callable[[], float] = time.time,
        busy_timeout_s: float = 30.0,
    ):
        _check_settings(capacity_per_token, window_s, lease_s)
        self.capacity_per_token, self.window_s, self.lease_s, self.clock = capacity_per_token, window_s, lease_s, clock
        self.path = Path(path).expanduser().resolve()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection per store, used under a lock by this process's threads; other processes
        # open their own. Autocommit, with explicit BEGIN IMMEDIATE for read-modify-write steps.
        self._db = open_wal(self.path, _SCHEMA, busy_timeout_s)
        self._lock = threading.Lock()

    def _transaction(self):
        return transaction(self._db)

    @staticmethod
    def _entry(row) -> Entry:
        fingerprint, request_id, owner, state, created, expires, meta, payload = row
        return Entry(
            fingerprint,
            request_id,
            owner,
            state,
            created,
            expires,
            json.loads(meta) if meta is not None else None,
            bytes(payload) if payload is not None else None,
        )

    def _live(self, db, who: str, key: str, now: float) -> Entry | None:
        row = db.execute(
            f"SELECT {_COLUMNS} FROM idempotency WHERE who = ? AND key = ? AND expires > ?", (who, key, now)
        ).fetchone()
        return self._entry(row) if row is not None else None

    def claim(self, who: str, key: str, fingerprint: str, request_id: str, owner: str) -> Claim:
        with self._lock, self._transaction() as db:
            now = self.clock()
            entry = self._live(db, who, key, now)
            if entry is not None:
                return Claim(entry.state, entry)
            db.execute("DELETE FROM idempotency WHERE expires <= ?", (now,))  # every token's (indexed)
            db.execute(
                _UPSERT, (who, key, fingerprint, request_id, owner, "pending", now, now + self.lease_s, None, None)
            )
            (count,) = db.execute("SELECT COUNT(*) FROM idempotency WHERE who = ?", (who,)).fetchone()
            excess = count - self.capacity_per_token
            if excess > 0:
                db.execute(
                    "DELETE FROM idempotency WHERE rowid IN (SELECT rowid FROM idempotency "
                    "WHERE who = ? AND state = 'done' ORDER BY created LIMIT ?)",
                    (who, excess),
                )
            return Claim("new")

    def renew(self, who: str, key: str, owner: str) -> bool:
        with self._lock:
            now = self.clock()
            cursor = self._db.execute(
                "UPDATE idempotency SET expires = ? WHERE who = ? AND key = ? AND owner = ? "
                "AND state = 'pending' AND expires > ?",
                (now + self.lease_s, who, key, owner, now),
            )
            return cursor.rowcount == 1

    def complete(self, who: str, key: str, owner: str, entry: Entry) -> bool:
        meta = json.dumps(entry.meta, sort_keys=True, allow_nan=False)
        with self._lock, self._transaction() as db:
            now = self.clock()
            current = self._live(db, who, key, now)
            if current is not None and current.fingerprint != entry.fingerprint:
                return False
            created = current.created if current is not None else entry.created
            row = (who, key, entry.fingerprint, entry.request_id, owner, "done", created, now + self.window_s)
            db.execute(_UPSERT, (*row, meta, entry.payload))
            return True

    def release(self, who: str, key: str, owner: str) -> None:
        with self._lock:
            self._db.execute(
                "DELETE FROM idempotency WHERE who = ? AND key = ? AND owner = ? AND state = 'pending'",
                (who, key, owner),
            )

    def get(self, who: str, key: str) -> Entry | None:
        with self._lock:
            return self._live(self._db, who, key, self.clock())

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def describe(self) -> str:
        return f"SQLite file {self.path}"


# ----- Redis ------------------------------------------------------------------------------------
# Keys: {prefix}:{<who>}:e:<key> (a hash per entry) and {prefix}:{<who>}:index (a sorted set of the
# token's keys by claim time). The braces make a token's keys one Redis Cluster hash slot. Expiry
# is Redis's own (PEXPIRE): a pending entry lives for its lease, a done one for the window.
_CLAIM = """
local entry = redis.call('HGETALL', KEYS[1])
if #entry > 0 then return entry end
local now, lease, capacity, window = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
redis.call('HSET', KEYS[1], 'fingerprint', ARGV[1], 'request_id', ARGV[2], 'owner', ARGV[3],
           'state', 'pending', 'created', ARGV[4], 'expires', now + lease / 1000)
redis.call('PEXPIRE', KEYS[1], lease)
redis.call('ZADD', KEYS[2], now, ARGV[8])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window / 1000)
redis.call('PEXPIRE', KEYS[2], window + lease)
local excess = redis.call('ZCARD', KEYS[2]) - capacity
if excess > 0 then
  for _, member in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    if excess <= 0 then break end
    local other = ARGV[9] .. member
    if redis.call('HGET', other, 'state') ~= 'pending' then
      redis.call('DEL', other)
      redis.call('ZREM', KEYS[2], member)
      excess = excess - 1
    end
  end
end
return {}
"""
_RENEW = """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] and redis.call('HGET', KEYS[1], 'state') == 'pending' then
  redis.call('HSET', KEYS[1], 'expires', tonumber(ARGV[2]) + tonumber(ARGV[3]) / 1000)
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
return 0
"""
_COMPLETE = """
local current = redis.call('HGET', KEYS[1], 'fingerprint')
if current and current ~= ARGV[1] then return 0 end
local created = redis.call('HGET', KEYS[1], 'created') or ARGV[4]
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'fingerprint', ARGV[1], 'request_id', ARGV[2], 'owner', ARGV[3], 'state', 'done',
           'created', created, 'expires', tonumber(ARGV[5]) + tonumber(ARGV[6]) / 1000, 'meta', ARGV[7],
           'payload', ARGV[8])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('ZADD', KEYS[2], created, ARGV[9])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
return 1
"""
_RELEASE = """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] and redis.call('HGET', KEYS[1], 'state') == 'pending' then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[2])
end
return 0
"""


class RedisStore:
    """A Redis database shared by every replica (`redis://host:port/db`)."""

    def __init__(
        self,
        url: str,
        capacity_per_token: int = DEFAULT_CAPACITY_PER_TOKEN,
        window_s: float = DEFAULT_WINDOW_S,
        lease_s: float = DEFAULT_LEASE_S,
        clock: Callable[[], float] = time.time,
        prefix: str = "diffusionx:idempotency",
    ):
        _check_settings(capacity_per_token, window_s, lease_s)
        try:
            import redis
        except ImportError:
            raise RuntimeError(
                f"--store {url} needs the redis package: pip install 'diffusionx[serve]' (or 'redis')"
            ) from None
        self.capacity_per_token, self.window_s, self.lease_s, self.clock = capacity_per_token, window_s, lease_s, clock
        self.url, self.prefix = url, prefix
        self._redis = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=10)
        try:  # fail at start, not at the first request
            self._redis.ping()
        except redis.RedisError as err:
            self._redis.close()
            raise ConnectionError(f"cannot reach Redis at {_redact(url)}: {err}") from None
        self._claim = self._redis.register_script(_CLAIM)
        self._renew = self._redis.register_script(_RENEW)
        self._complete = self._redis.register_script(_COMPLETE)
        self._release = self._redis.register_script(_RELEASE)

    def _keys(self, who: str, key: str) -> tuple[str, str, str]:
        entry_prefix = f"{self.prefix}:{{{who}}}:e:"
        return entry_prefix + key, f"{self.prefix}:{{{who}}}:index", entry_prefix

    def _ms(self, seconds: float) -> int:
        return max(1, int(seconds * 1000))

    @staticmethod
    def _entry(flat: list[bytes]) -> Entry:
        fields = {flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)}
        meta = fields.get("meta")
        return Entry(
            fields["fingerprint"].decode(),
            fields["request_id"].decode(),
            fields["owner"].decode(),
            fields["state"].decode(),  # type: ignore[arg-type]
            float(fields["created"]),
            float(fields["expires"]),
            json.loads(meta) if meta is not None else None,
            fields.get("payload"),
        )

    def claim(self, who: str, key: str, fingerprint: str, request_id: str, owner: str) -> Claim:
        entry_key, index, entry_prefix = self._keys(who, key)
        args = [fingerprint, request_id, owner, repr(self.clock()), self._ms(self.lease_s)]
        args += [self.capacity_per_token, self._ms(self.window_s), key, entry_prefix]
        found = self._claim(keys=[entry_key, index], args=args)
        if not found:
            return Claim("new")
        entry = self._entry(found)
        return Claim(entry.state, entry)

    def renew(self, who: str, key: str, owner: str) -> bool:
        entry_key, _, _ = self._keys(who, key)
        return bool(self._renew(keys=[entry_key], args=[owner, repr(self.clock()), self._ms(self.lease_s)]))

    def complete(self, who: str, key: str, owner: str, entry: Entry) -> bool:
        entry_key, index, _ = self._keys(who, key)
        meta = json.dumps(entry.meta, sort_keys=True, allow_nan=False)
        args = [entry.fingerprint, entry.request_id, owner, repr(entry.created), repr(self.clock())]
        args += [self._ms(self.window_s), meta, entry.payload or b"", key]
        return bool(self._complete(keys=[entry_key, index], args=args))

    def release(self, who: str, key: str, owner: str) -> None:
        entry_key, index, _ = self._keys(who, key)
        self._release(keys=[entry_key, index], args=[owner, key])

    def get(self, who: str, key: str) -> Entry | None:
        entry_key, _, _ = self._keys(who, key)
        found = self._redis.hgetall(entry_key)
        if not found:
            return None
        flat: list[bytes] = []
        for name, value in found.items():
            flat += [name, value]
        return self._entry(flat)

    def close(self) -> None:
        self._redis.close()

    def describe(self) -> str:
        return f"Redis {_redact(self.url)}"


# ----- opening one ------------------------------------------------------------------------------
def open_store(
    url_or_path: str | Path,
    *,
    capacity_per_token: int = DEFAULT_CAPACITY_PER_TOKEN,
    window_s: float = DEFAULT_WINDOW_S,
    lease_s: float = DEFAULT_LEASE_S,
) -> IdempotencyStore:
    """A store from "memory"; "redis://host:port/db" (or rediss://, unix://); "sqlite:///path" or a
    plain file path (SQLite). A directory means the file `idempotency.sqlite3` inside it."""
    settings = {"capacity_per_token": capacity_per_token, "window_s": window_s, "lease_s": lease_s}
    text = str(url_or_path).strip()
    if not text:
        raise ValueError("the idempotency store is empty: give 'memory', a file path, or redis://host:port/db")
    if text == "memory":
        return MemoryStore(**settings)
    if text.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(text, **settings)
    if text.startswith("sqlite://"):
        text = text[len("sqlite://") :]
        if not text:
            raise ValueError("sqlite:// needs a path: sqlite:///var/lib/diffusionx/idempotency.sqlite3")
    elif "://" in text:
        raise ValueError(f"unknown idempotency store {text!r}: use memory, a file path, sqlite:///path or redis://")
    path = Path(text).expanduser()
    if path.is_dir():
        path = path / STORE_FILE_NAME
    return SQLiteStore(path, **settings)


def _check_settings(capacity_per_token: int, window_s: float, lease_s: float) -> None:
    if capacity_per_token < 1:
        raise ValueError(f"the idempotency capacity per token must be >= 1, got {capacity_per_token}")
    if not window_s > 0 or not lease_s > 0:
        raise ValueError(f"the idempotency window and lease must be > 0 s, got {window_s} and {lease_s}")


def _redact(url: str) -> str:
    """A Redis URL without its password."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest
