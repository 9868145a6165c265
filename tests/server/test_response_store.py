"""The /v1/responses store: bounds by count, bytes and idle time, LRU first, on disk or
in memory, and a restart over the same directory finds what was stored."""

from __future__ import annotations

import json
import threading

import pytest

from agentcpu.errors import InvalidRequestError
from agentcpu.server.response_store import ResponseStore

BIG = 10**9
HOUR = 3600.0


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _record(n: int, pad: int = 0) -> dict:
    return {"response": {"id": f"resp_{n}", "output": "x" * pad}}


def _size(record: dict) -> int:
    return len(json.dumps(record, separators=(",", ":")).encode())


@pytest.fixture(params=["disk", "memory"])
def where(request, tmp_path):
    return tmp_path / "store" if request.param == "disk" else None


def _store(directory, clock=None, **bounds) -> ResponseStore:
    options = {"max_count": BIG, "max_bytes": BIG, "ttl_s": 24 * HOUR, **bounds}
    return ResponseStore(directory, clock=clock or Clock(), **options)


def test_put_get_delete(where):
    store = _store(where)
    assert store.put("resp_1", _record(1))
    assert store.get("resp_1") == _record(1) and "resp_1" in store and len(store) == 1
    assert store.total_bytes == _size(_record(1))
    assert store.delete("resp_1") and store.get("resp_1") is None
    assert not store.delete("resp_1") and len(store) == 0 and store.total_bytes == 0


def test_count_bound_evicts_least_recently_used(where):
    clock = Clock()
    store = _store(where, clock, max_count=3)
    for n in range(3):
        store.put(f"resp_{n}", _record(n))
        clock.advance(1)
    assert store.get("resp_0") is not None  # now the most recently used
    clock.advance(1)
    store.put("resp_3", _record(3))
    assert store.ids() == ["resp_2", "resp_0", "resp_3"]  # resp_1 was least recently used
    assert store.get("resp_1") is None


def test_byte_bound_evicts_least_recently_used_and_refuses_a_record_too_big(where):
    clock = Clock()
    one = _size(_record(0, pad=100))
    store = _store(where, clock, max_bytes=3 * one)
    for n in range(3):
        store.put(f"resp_{n}", _record(n, pad=100))
        clock.advance(1)
    store.get("resp_0")
    store.put("resp_3", _record(3, pad=100))
    assert store.ids() == ["resp_2", "resp_0", "resp_3"] and store.total_bytes == 3 * one
    store.put("resp_4", _record(4, pad=one + 100))  # twice the size: two records go
    assert store.ids() == ["resp_3", "resp_4"] and store.total_bytes == 3 * one
    assert not store.put("resp_5", _record(5, pad=3 * one))  # alone beyond the bound
    assert "resp_5" not in store and store.ids() == ["resp_3", "resp_4"]


def test_idle_ttl_with_an_injected_clock(where):
    clock = Clock()
    store = _store(where, clock, ttl_s=HOUR)
    store.put("resp_a", _record(1))
    store.put("resp_b", _record(2))
    clock.advance(0.75 * HOUR)
    assert store.get("resp_a") is not None  # a use restarts its idle time
    clock.advance(0.5 * HOUR)
    assert store.get("resp_b") is None and store.get("resp_a") is not None
    store.put("resp_c", _record(3))
    clock.advance(HOUR)
    store.put("resp_d", _record(4))  # sweeps what expired
    assert store.ids() == ["resp_d"]


def test_restart_finds_records_in_lru_order_and_keeps_bounds(tmp_path):
    clock = Clock()
    directory = tmp_path / "responses"
    first = _store(directory, clock)
    for n in range(4):
        first.put(f"resp_{n}", _record(n))
        clock.advance(10)
    first.get("resp_0")
    first.delete("resp_2")
    (directory / ".resp_9.abc.tmp").write_text("{")  # a write cut short by a crash
    again = _store(directory, clock, max_count=2)
    assert again.ids() == ["resp_3", "resp_0"]  # resp_1 was least recently used
    assert again.get("resp_0") == _record(0) and again.get("resp_3") == _record(3)
    assert sorted(p.name for p in directory.iterdir()) == ["resp_0.json", "resp_3.json"]
    clock.advance(2 * 24 * HOUR)
    assert len(_store(directory, clock)) == 0  # all expired while the server was down


def test_unreadable_record_is_dropped(tmp_path):
    store = _store(tmp_path)
    store.put("resp_1", _record(1))
    (tmp_path / "resp_1.json").write_text("{not json")
    assert store.get("resp_1") is None and "resp_1" not in store
    assert not (tmp_path / "resp_1.json").exists()


def test_ids_are_checked_and_unknown_ids_never_touch_the_disk(tmp_path):
    store = _store(tmp_path / "store")
    (tmp_path / "secret.json").write_text("{}")
    assert store.get("../secret") is None and not store.delete("../secret")
    with pytest.raises(InvalidRequestError):
        store.put("../secret", {})
    with pytest.raises(InvalidRequestError):
        _store(None, max_count=0)


def test_concurrent_puts_keep_the_bounds(where):
    store = _store(where, max_count=20)

    def writer(base: int) -> None:
        for n in range(50):
            store.put(f"resp_{base}_{n}", _record(n))
            store.get(f"resp_{base}_{n // 2}")

    threads = [threading.Thread(target=writer, args=(b,)) for b in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store) == 20 and store.total_bytes == sum(_size(store.get(i)) for i in store.ids())
    if where is not None:
        assert len(list(where.iterdir())) == 20


def test_serve_keeps_responses_in_a_per_user_cache_dir(monkeypatch, tmp_path):
    from agentcpu.commands.serve import default_response_store_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_response_store_dir() == tmp_path / "agentcpu" / "responses"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert str(default_response_store_dir()).endswith(".cache/agentcpu/responses")
