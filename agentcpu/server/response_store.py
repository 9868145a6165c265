"""Stored responses for `/v1/responses`: by id, bounded by count, bytes and idle time.

Design: one JSON file per record (`<id>.json`) in one directory, written atomically
(a temporary file, then `os.replace`), and an in-memory index id -> (bytes, last use)
in least-recently-used order. The index is rebuilt at start-up from the directory
listing alone (file size; mtime = last use), so a restarted server finds what an
earlier one stored without parsing a single file. Every use (store, read) sets the
file's mtime, so the LRU order survives restarts.

Bounds: past `max_count` records or `max_bytes` of JSON, the least recently used go
first (their files deleted). `ttl_s` is an idle TTL: a record unused that long is
gone. A record larger than `max_bytes` on its own is not kept. Records are
self-contained (a response stores the whole conversation it continued), so evicting
an older turn never breaks a newer one.

Without a directory the same index keeps the JSON bytes in memory (nothing survives a
restart): the library default, so tests and embedders write nothing unless asked.

Thread-safe (one lock around index and files; files are small). The server calls it
through `asyncio.to_thread`, off the event loop.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agentcpu.errors import InvalidRequestError

log = logging.getLogger(__name__)

RECORD_SUFFIX = ".json"
TEMP_SUFFIX = ".tmp"
RECORD_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")  # also a safe file name


@dataclass
class _Entry:
    size: int
    last_used: float


class ResponseStore:
    def __init__(
        self,
        directory: str | Path | None,
        *,
        max_count: int,
        max_bytes: int,
        ttl_s: float,
        clock: Callable[[], float] = time.time,
    ):
        if max_count < 1 or max_bytes < 1 or ttl_s <= 0:
            raise InvalidRequestError(
                f"response store bounds must be positive: max_count={max_count}, "
                f"max_bytes={max_bytes}, ttl_s={ttl_s}"
            )
        self.directory = Path(directory).expanduser() if directory is not None else None
        self.max_count, self.max_bytes, self.ttl_s = max_count, max_bytes, ttl_s
        self.clock = clock
        self._lock = threading.Lock()
        self._index: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._memory: dict[str, bytes] = {}  # the records themselves, without a directory
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            with self._lock:
                self._load()
                self._evict(self.clock())

    # ---- public -----------------------------------------------------------------

    def put(self, record_id: str, record: dict) -> bool:
        """Store (or replace) a record; False when it alone exceeds `max_bytes`."""
        if not RECORD_ID.match(record_id):
            raise InvalidRequestError(f"invalid record id {record_id!r}")
        data = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()
        with self._lock:
            now = self.clock()
            if len(data) > self.max_bytes:
                log.warning(
                    "response %s (%d bytes) exceeds the store's bound", record_id, len(data)
                )
                self._remove(record_id)
                return False
            self._write(record_id, data, now)
            self._forget(record_id)
            self._index[record_id] = _Entry(len(data), now)
            self._bytes += len(data)
            self._evict(now)
        return True

    def get(self, record_id: str) -> dict | None:
        """The record, or None when unknown, expired or unreadable; counts as a use."""
        with self._lock:
            now = self.clock()
            entry = self._index.get(record_id)
            if entry is None:
                return None
            if self._expired(entry, now):
                self._remove(record_id)
                return None
            try:
                record = json.loads(self._read(record_id))
            except (OSError, ValueError) as e:
                log.warning("stored response %s is unreadable (%s): dropped", record_id, e)
                self._remove(record_id)
                return None
            entry.last_used = now
            self._index.move_to_end(record_id)
            self._touch(record_id, now)
        return record

    def delete(self, record_id: str) -> bool:
        with self._lock:
            if record_id not in self._index:
                return False
            self._remove(record_id)
            return True

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, record_id: object) -> bool:
        return record_id in self._index

    @property
    def total_bytes(self) -> int:
        return self._bytes

    def ids(self) -> list[str]:
        """Ids from least to most recently used."""
        with self._lock:
            return list(self._index)

    # ---- index ------------------------------------------------------------------

    def _expired(self, entry: _Entry, now: float) -> bool:
        return now - entry.last_used >= self.ttl_s

    def _evict(self, now: float) -> None:
        while self._index:
            oldest_id, oldest = next(iter(self._index.items()))
            over = len(self._index) > self.max_count or self._bytes > self.max_bytes
            if not over and not self._expired(oldest, now):
                return
            self._remove(oldest_id)

    def _forget(self, record_id: str) -> None:
        entry = self._index.pop(record_id, None)
        if entry is not None:
            self._bytes -= entry.size

    def _remove(self, record_id: str) -> None:
        self._forget(record_id)
        if self.directory is None:
            self._memory.pop(record_id, None)
            return
        try:
            self._path(record_id).unlink(missing_ok=True)
        except OSError as e:
            log.warning("could not delete stored response %s: %s", record_id, e)

    def _load(self) -> None:
        found = []
        for path in self.directory.iterdir():  # type: ignore[union-attr]
            if path.name.endswith(TEMP_SUFFIX):  # a write cut short by a crash
                path.unlink(missing_ok=True)
            elif path.suffix == RECORD_SUFFIX and RECORD_ID.match(path.stem):
                stat = path.stat()
                found.append((stat.st_mtime, path.stem, stat.st_size))
        for last_used, record_id, size in sorted(found):
            self._index[record_id] = _Entry(size, last_used)
            self._bytes += size

    # ---- bytes ------------------------------------------------------------------

    def _path(self, record_id: str) -> Path:
        return self.directory / f"{record_id}{RECORD_SUFFIX}"  # type: ignore[operator]

    def _write(self, record_id: str, data: bytes, now: float) -> None:
        if self.directory is None:
            self._memory[record_id] = data
            return
        temp = self.directory / f".{record_id}.{uuid.uuid4().hex}{TEMP_SUFFIX}"
        try:
            with open(temp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.utime(temp, (now, now))
            os.replace(temp, self._path(record_id))
        except BaseException:
            temp.unlink(missing_ok=True)
            raise

    def _read(self, record_id: str) -> bytes:
        if self.directory is None:
            return self._memory[record_id]
        return self._path(record_id).read_bytes()

    def _touch(self, record_id: str, now: float) -> None:
        if self.directory is not None:
            try:
                os.utime(self._path(record_id), (now, now))
            except OSError:
                pass  # deleted behind our back: the next read finds out
