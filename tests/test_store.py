"""The idempotency store (server/store.py): backends, per-token capacity, the window, leases, and
the service over it: a restart or another replica replays a result instead of computing it again."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import threading
import time

import httpx
import pytest
import torch

from diffusionx.server.app import Limits, create_app
from diffusionx.server.run import start_in_thread
from diffusionx.server.store import (
    Entry,
    MemoryStore,
    RedisStore,
    SQLiteStore,
    open_store,
    request_fingerprint,
)
from diffusionx.wire import latents_to_bytes

TOKEN, OTHER = "store-token-aaaa", "store-token-bbbb"
PROMPT = "a large red circle on the left on a blue background"
LIMITS = Limits(rate_per_minute=600, burst=100)


# ----- a real redis-server ----------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A redis-server of its own on a free loopback port, nothing persisted; stopped afterwards."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server; .ci/run installs it)")
    import redis

    workdir = tmp_path_factory.mktemp("redis")
    port = _free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = subprocess.Popen([*args, "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"redis-server did not start on port {port} (exit code {process.poll()})")
            time.sleep(0.05)
    client.close()
    yield f"redis://127.0.0.1:{port}/0"
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture
def redis_db(redis_url):
    """An empty database on the shared redis-server."""
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.close()
    return redis_url


# ----- the stores, each backend -----------------------------------------------------------------
class Clock:
    def __init__(self):
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "sqlite", "redis"])
def make_store(request, tmp_path):
    """make_store(clock=..., **settings): a fresh store of the parametrized backend."""
    made = []

    def make(**settings):
        if request.param == "memory":
            store = MemoryStore(**settings)
        elif request.param == "sqlite":
            store = SQLiteStore(tmp_path / "idempotency.sqlite3", **settings)
        else:
            store = RedisStore(request.getfixturevalue("redis_db"), **settings)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def done(fingerprint: str, request_id: str, payload: bytes = b"\x00result") -> Entry:
    return Entry(fingerprint, request_id, "owner-a", "done", time.time(), 0.0, {"request_id": request_id}, payload)


def test_a_claim_then_a_result_then_a_replay(make_store):
    store = make_store()
    assert store.claim("who", "k", "fp", "r1", "owner-a").outcome == "new"
    pending = store.claim("who", "k", "fp", "r2", "owner-b")
    assert pending.outcome == "pending" and pending.entry.owner == "owner-a" and pending.entry.request_id == "r1"
    assert store.complete("who", "k", "owner-a", done("fp", "r1"))
    replay = store.claim("who", "k", "fp", "r3", "owner-b")
    assert replay.outcome == "done"
    assert replay.entry.payload == b"\x00result" and replay.entry.meta == {"request_id": "r1"}
    assert store.get("who", "k").fingerprint == "fp"
    assert store.claim("other-token", "k", "fp", "r4", "owner-b").outcome == "new"  # keys are per token


def test_a_released_claim_can_be_computed_again(make_store):
    store = make_store()
    store.claim("who", "k", "fp", "r1", "owner-a")
    store.release("who", "k", "owner-b")  # not its claim: kept
    assert store.claim("who", "k", "fp", "r2", "owner-b").outcome == "pending"
    store.release("who", "k", "owner-a")
    assert store.claim("who", "k", "fp", "r3", "owner-b").outcome == "new"


def test_each_token_has_its_own_capacity(make_store):
    """Token A filling its capacity evicts A's oldest results, never token B's."""
    store = make_store(capacity_per_token=3)
    store.claim("B", "b-1", "fp", "rb", "o")
    store.complete("B", "b-1", "o", done("fp", "rb"))
    for i in range(10):
        store.claim("A", f"a-{i}", "fp", f"ra{i}", "o")
        store.complete("A", f"a-{i}", "o", done("fp", f"ra{i}"))
    assert store.get("B", "b-1") is not None
    assert [i for i in range(10) if store.get("A", f"a-{i}") is not None] == [7, 8, 9]


def test_a_pending_claim_is_not_evicted(make_store):
    store = make_store(capacity_per_token=2)
    store.claim("A", "running", "fp", "r0", "o")  # pending: the owner is computing it
    for i in range(4):
        store.claim("A", f"a-{i}", "fp", f"r{i + 1}", "o")
        store.complete("A", f"a-{i}", "o", done("fp", f"r{i + 1}"))
    assert store.get("A", "running").state == "pending"


def test_results_expire_after_the_window_and_claims_after_the_lease(make_store):
    clock = Clock()
    store = make_store(window_s=3600.0, lease_s=10.0)
    if isinstance(store, RedisStore):  # Redis expires keys on its own clock: short real times
        store = make_store(window_s=0.6, lease_s=0.3)
        clock.now, clock_step = time.time(), None
    else:
        store.clock, clock_step = clock, clock
    store.claim("who", "k", "fp", "r1", "dead-owner")

    def wait(seconds):
        if clock_step is None:
            time.sleep(seconds)
        else:
            clock.now += seconds

    wait(store.lease_s / 2)
    assert store.claim("who", "k", "fp", "r2", "o").outcome == "pending"
    assert store.renew("who", "k", "dead-owner")  # renewed: alive for another lease
    wait(store.lease_s * 0.7)
    assert store.claim("who", "k", "fp", "r2", "o").outcome == "pending"
    wait(store.lease_s * 1.5)  # not renewed: the claim lapses, the next one takes over
    assert store.claim("who", "k", "fp", "r3", "o").outcome == "new"
    assert not store.renew("who", "k", "dead-owner")
    store.complete("who", "k", "o", done("fp", "r3"))
    wait(store.window_s * 0.5)
    assert store.claim("who", "k", "fp", "r4", "o").outcome == "done"
    wait(store.window_s * 0.7)
    assert store.get("who", "k") is None
    assert store.claim("who", "k", "fp", "r5", "o").outcome == "new"


def test_a_result_is_not_stored_over_a_different_request(make_store):
    store = make_store()
    store.claim("who", "k", "fp-1", "r1", "o")
    assert not store.complete("who", "k", "o", done("fp-2", "r2"))
    assert store.get("who", "k").fingerprint == "fp-1"


def test_sqlite_is_shared_by_connections_and_survives_reopening(tmp_path):
    path = tmp_path / "state" / "idempotency.sqlite3"
    first, second = SQLiteStore(path), SQLiteStore(path)
    assert first.claim("who", "k", "fp", "r1", "o1").outcome == "new"
    assert second.claim("who", "k", "fp", "r2", "o2").outcome == "pending"
    first.complete("who", "k", "o1", done("fp", "r1", b"bytes"))
    first.close()
    second.close()
    reopened = SQLiteStore(path)
    assert reopened.claim("who", "k", "fp", "r3", "o3").entry.payload == b"bytes"
    assert reopened._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    reopened.close()


def test_sqlite_claims_from_many_threads_make_one_owner(tmp_path):
    path = tmp_path / "idempotency.sqlite3"
    stores = [SQLiteStore(path) for _ in range(4)]
    outcomes = []
    barrier = threading.Barrier(8)

    def claim(i):
        barrier.wait()
        outcomes.append(stores[i % 4].claim("who", "k", "fp", f"r{i}", f"o{i}").outcome)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(outcomes) == ["new"] + ["pending"] * 7
    for store in stores:
        store.close()


def test_open_store_reads_urls_and_paths(tmp_path, redis_db):
    assert isinstance(open_store("memory"), MemoryStore)
    by_path = open_store(tmp_path / "a.sqlite3", capacity_per_token=5)
    assert isinstance(by_path, SQLiteStore) and by_path.capacity_per_token == 5
    by_url = open_store(f"sqlite://{tmp_path}/b.sqlite3")
    assert by_url.path == (tmp_path / "b.sqlite3").resolve()
    in_dir = open_store(tmp_path)
    assert in_dir.path.name == "idempotency.sqlite3"
    redis_store = open_store(redis_db, window_s=60.0)
    assert isinstance(redis_store, RedisStore) and redis_store.window_s == 60.0
    for store in (by_path, by_url, in_dir, redis_store):
        store.close()
    with pytest.raises(ValueError, match="unknown"):
        open_store("postgres://somewhere")
    with pytest.raises(ValueError, match=">= 1"):
        open_store("memory", capacity_per_token=0)


def test_serve_opens_sqlite_in_its_state_dir_and_checks_the_store(tmp_path, monkeypatch, capsys):
    import argparse

    from diffusionx.errors import InvalidInputError
    from diffusionx.server.config import add_serve_arguments, default_state_dir, store_location
    from diffusionx.server.run import limits_from_args, open_serve_store

    monkeypatch.setenv("DIFFUSIONX_STATE_DIR", str(tmp_path / "state"))
    assert default_state_dir() == tmp_path / "state"
    monkeypatch.delenv("DIFFUSIONX_STATE_DIR")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert store_location(None, None) == str(tmp_path / "xdg" / "diffusionx" / "idempotency.sqlite3")
    assert store_location("redis://cache:6379/2", tmp_path) == "redis://cache:6379/2"

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--state-dir", str(tmp_path / "srv"), "--idempotency-window", "60"])
    limits = limits_from_args(args)
    assert limits.idempotency_window_s == 60 and limits.idempotency_keys_per_token == 1024
    store, location = open_serve_store(args, limits)
    assert isinstance(store, SQLiteStore) and store.window_s == 60
    assert location == str(tmp_path / "srv" / "idempotency.sqlite3") and (tmp_path / "srv").is_dir()
    store.close()
    assert f"SQLite file {tmp_path / 'srv' / 'idempotency.sqlite3'}" in capsys.readouterr().err
    for bad in (f"redis://127.0.0.1:{_free_port()}/0", "ftp://nowhere"):
        with pytest.raises(InvalidInputError, match="cannot open the idempotency store"):
            open_serve_store(parser.parse_args(["--store", bad]), limits)


# ----- the fingerprint: the parsed request, not its bytes ---------------------------------------
def _latents(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_the_fingerprint_is_of_the_parsed_request():
    from diffusionx.cloud import RefineRequest

    base = RefineRequest(prompt=PROMPT, strength=0.5, latents=latents_to_bytes(_latents(), "fp32"))
    same = RefineRequest(prompt=PROMPT, strength=0.5, steps=20, latents=latents_to_bytes(_latents(), "fp32"))
    assert request_fingerprint(base) == request_fingerprint(same)
    from safetensors.torch import save

    # the same tensor in a safetensors file with other metadata: other bytes, the same request
    other_file = save({"latents": _latents()}, metadata={"written_by": "another client"})
    assert other_file != base.latents
    assert request_fingerprint(RefineRequest(prompt=PROMPT, strength=0.5, latents=other_file)) == (
        request_fingerprint(base)
    )
    for changed in (
        {"seed": 1},
        {"strength": 0.51},
        {"prompt": PROMPT + "!"},
        {"latents": latents_to_bytes(_latents(), "fp16")},  # another dtype: another answer
        {"latents": latents_to_bytes(_latents(1), "fp32")},
        {"return_format": "png"},
    ):
        kw = {"prompt": PROMPT, "strength": 0.5, "latents": base.latents, **changed}
        assert request_fingerprint(RefineRequest(**kw)) != request_fingerprint(base), changed


# ----- the service over a store -----------------------------------------------------------------
def body(engine, seed: int = 1, **kw) -> dict:
    latents = torch.randn(engine.latent_shape(), generator=torch.Generator().manual_seed(seed))
    return {
        "prompt": PROMPT,
        "strength": 0.5,
        "steps": 4,
        "seed": seed,
        "guidance": 1.0,
        "latent": base64.b64encode(latents_to_bytes(latents, "fp32")).decode(),
        **kw,
    }


def post(running, payload, key, token=TOKEN, **kw):
    headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": key}
    if isinstance(payload, (bytes, str)):
        headers["Content-Type"] = "application/json"
        return httpx.post(running.url + "/v1/refine", content=payload, headers=headers, timeout=120, **kw)
    return httpx.post(running.url + "/v1/refine", json=payload, headers=headers, timeout=120, **kw)


def serve(engine, store, limits=LIMITS, **kw):
    return start_in_thread(create_app(engine, tokens={TOKEN, OTHER}, max_batch=2, limits=limits, store=store, **kw))


def completed(running) -> int:
    return running.server.config.app.state.service.refiner.load().completed


def test_a_restarted_server_replays_instead_of_computing_again(untrained_pair, tmp_path, count_unet_calls):
    """A retry after a restart used to be computed twice: the cache was in memory only."""
    engine = untrained_pair.cloud
    path = tmp_path / "state" / "idempotency.sqlite3"
    payload = body(engine, seed=31)
    first = serve(engine, path)
    try:
        answer = post(first, payload, "restart-1")
    finally:
        first.stop()
    assert answer.status_code == 200, answer.text
    counter = count_unet_calls(engine.unet)
    second = serve(engine, path)  # a new process would open the same file
    try:
        again = post(second, payload, "restart-1")
        assert completed(second) == 0
    finally:
        second.stop()
    assert again.status_code == 200 and again.headers.get("idempotent-replay") == "true"
    assert again.json() == answer.json()  # payload, request_id, timings: the first answer
    assert counter.batches == []


def test_one_token_filling_its_keys_does_not_evict_anothers(untrained_pair):
    """One LRU shared by every token let a busy tenant evict everyone else's keys."""
    engine = untrained_pair.cloud
    limits = Limits(rate_per_minute=600, burst=100, idempotency_keys_per_token=3)
    running = serve(engine, "memory", limits=limits)
    try:
        assert post(running, body(engine, strength=0.0), "b-key", token=OTHER).status_code == 200
        for i in range(6):  # strength 0: no U-Net step, still a refinement
            assert post(running, body(engine, seed=i, strength=0.0), f"a-{i}").status_code == 200
        before = completed(running)
        other = post(running, body(engine, strength=0.0), "b-key", token=OTHER)
        assert other.status_code == 200 and other.headers.get("idempotent-replay") == "true"
        assert completed(running) == before
        evicted = post(running, body(engine, seed=0, strength=0.0), "a-0")  # A's oldest went
        assert evicted.status_code == 200 and "idempotent-replay" not in evicted.headers
        kept = post(running, body(engine, seed=5, strength=0.0), "a-5")
        assert kept.headers.get("idempotent-replay") == "true"
    finally:
        running.stop()


def test_the_same_json_reserialized_is_the_same_request(untrained_pair):
    """Keys matched on the body's bytes: the same JSON with other spacing was refused as reused."""
    engine = untrained_pair.cloud
    running = serve(engine, "memory")
    payload = body(engine, seed=41)
    try:
        first = post(running, json.dumps(payload), "json-1")
        assert first.status_code == 200, first.text
        reordered = json.dumps(dict(reversed(list(payload.items()))), indent=2)
        second = post(running, reordered, "json-1")
        assert second.status_code == 200 and second.headers.get("idempotent-replay") == "true"
        explicit = post(running, {**payload, "scheduler": "ddim", "return_format": "latent"}, "json-1")
        assert explicit.status_code == 200 and explicit.headers.get("idempotent-replay") == "true"
        assert first.json()["payload"] == second.json()["payload"] == explicit.json()["payload"]
        assert completed(running) == 1
        different = post(running, {**payload, "seed": 42}, "json-1")
        assert different.status_code == 422 and different.json()["error"]["code"] == "idempotency_key_reused"
    finally:
        running.stop()


def test_two_servers_sharing_redis_see_each_others_keys(untrained_pair, redis_db):
    engine = untrained_pair.cloud
    one, two = serve(engine, redis_db, replica="one"), serve(engine, redis_db, replica="two")
    try:
        payload = body(engine, seed=51)
        first = post(one, payload, "shared-1")
        second = post(two, payload, "shared-1")
        assert first.status_code == second.status_code == 200
        assert second.headers.get("idempotent-replay") == "true"
        assert second.json()["request_id"] == first.json()["request_id"] and second.json()["replica"] == "one"
        assert completed(one) == 1 and completed(two) == 0
        reused = post(two, {**payload, "seed": 52}, "shared-1")
        assert reused.status_code == 422
        other_token = post(two, payload, "shared-1", token=OTHER)
        assert other_token.status_code == 200 and "idempotent-replay" not in other_token.headers
    finally:
        one.stop()
        two.stop()


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_a_retry_at_another_replica_waits_for_the_first(untrained_pair, tmp_path, backend, request):
    """While replica one computes a key, a retry at replica two waits for its result instead of
    computing it again."""
    engine = untrained_pair.cloud
    store = str(tmp_path / "shared.sqlite3") if backend == "sqlite" else request.getfixturevalue("redis_db")
    one, two = serve(engine, store, replica="one"), serve(engine, store, replica="two")
    slow = engine.unet.register_forward_pre_hook(lambda module, args: time.sleep(0.1))
    payload = body(engine, seed=61, strength=1.0, steps=8)
    answers = {}
    try:
        thread = threading.Thread(target=lambda: answers.update(first=post(one, payload, "slow-1")))
        thread.start()
        deadline = time.monotonic() + 60
        while one.server.config.app.state.service.refiner.load().unet_calls < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        retry = post(two, payload, "slow-1")
        thread.join(120)
        assert completed(two) == 0
    finally:
        slow.remove()
        one.stop()
        two.stop()
    assert answers["first"].status_code == retry.status_code == 200
    assert retry.headers.get("idempotent-replay") == "true"
    assert retry.json()["payload"] == answers["first"].json()["payload"]


def test_a_dead_replicas_claim_lapses_and_the_retry_computes(untrained_pair):
    """A replica killed mid-refinement leaves a pending claim; once its lease lapses, the retry
    computes the request (once) instead of waiting for ever."""
    engine = untrained_pair.cloud
    limits = Limits(rate_per_minute=600, burst=100, idempotency_lease_s=0.5)
    store = MemoryStore(lease_s=0.5)
    running = serve(engine, store, limits=limits)
    try:
        service = running.server.config.app.state.service
        from diffusionx.server.app import RefineBody

        parsed = service.to_request(RefineBody.model_validate(body(engine, seed=71)))
        who = service.authenticate(f"Bearer {TOKEN}")
        store.claim(who, "orphan", request_fingerprint(parsed), "r-dead", "killed-replica/0")
        started = time.monotonic()
        answer = post(running, body(engine, seed=71), "orphan")
        assert answer.status_code == 200 and "idempotent-replay" not in answer.headers
        assert 0.3 < time.monotonic() - started < 30
        assert completed(running) == 1
        assert store.get(who, "orphan").state == "done"
    finally:
        running.stop()
