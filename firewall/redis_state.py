"""``ClientState`` in Redis: the state every replica shares (``state: {backend: redis}``).

Each decision is one Lua script, run atomically by the server on its own clock (``TIME``), so
replicas agree on time and never act on a stale copy:

- a record per client id or address, a hash under ``<prefix>c:<key>``: the bucket's theoretical
  arrival time (GCRA, the Generic Cell Rate Algorithm of ATM networks, ITU-T I.371: a bucket of
  rate r and burst b is one timestamp ``tat``; a request of cost n is allowed while
  ``tat - now <= (b - min(n, b)) / r`` and moves ``tat`` by n / r, which is the token bucket of
  ``firewall.state.take_tokens`` exactly), the suspect bucket's, the suspect and ban ends, offence
  count and time, the refusal budget's count and window. Its TTL is the latest moment anything in
  it matters, so a fresh id's record lives only until its bucket is full again;
- the first label a client was answered per model, ``<prefix>l:<key>`` (HSETNX), kept ``label_ttl_s``
  after its last answer (written in batches every 50 ms: no decision of the request depends on it);
- the stateful detectors' decaying evidence counts, ``<prefix>e:<name>:<key>``, kept until they
  decay below 0.01;
- ``<prefix>secret``: 16 random bytes the first replica writes and all read at start, so that
  the decoy label a client gets before it has a genuine one is the same on every replica;
- per model, a stream of the queries each replica placed in its history, ``<prefix>q:<name>``,
  trimmed to about ``stream_length`` entries (XADD MAXLEN ~). Each replica reads the others'
  entries (XREAD, blocking on a connection of its own) into its own FAISS index on a worker
  thread, and publishes its own from a bounded buffer; a search never waits for the network.

Failure: every call has a deadline (``timeout_s``) and the connection pool a size; a failed call
marks the store degraded (metric ``firewall_shared_state_up`` 0, one alert line) and a task
reconnects with exponential backoff (``retry_s`` doubling to ``max_retry_s``). While degraded, the
``open`` fail mode decides from this replica's memory, a ``MemoryClientState`` that mirrors every
ban seen in Redis, so known bans still hold; ``closed`` answers UNAVAILABLE. Back in Redis, the
bans this replica holds are written back (the longer one wins) and the query buffer is published.
Bucket levels, offence counts raised while degraded and evidence counted locally are not merged.

Redis sees client ids and addresses (as keys). Use TLS (``rediss://``) and a password off the
pod's network; deploy/k8s/components/redis keeps Redis reachable from firewall pods only.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

import numpy as np
import redis
import structlog
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError

from detectors.evidence import DecayingCount
from detectors.shared import Counts, QueryFeed, QueryRows
from firewall.config import BanConfig, StateConfig
from firewall.errors import Banned, StoreUnavailable, Throttled
from firewall.state import Bucket, ClientRecord, MemoryClientState

log = structlog.get_logger("firewall.state")

T = TypeVar("T")
FAILURES = (RedisError, OSError, asyncio.TimeoutError)
READ_BLOCK_MS = 1000  # a stream reader waits this long for new entries before asking again
READ_COUNT = 512  # entries per read
SMALLEST_COUNT = 0.01  # an evidence count is forgotten once it has decayed below this
LABEL_FLUSH_S = 0.05  # first labels are written to Redis in batches this often
PUBLISH_DELAY_S = 0.01  # queries are published this long after the first of a batch was placed

PRELUDE = """
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function num(x) return tonumber(x) or 0 end
local function fmt(x) return string.format('%.6f', x) end
-- keep a record while anything in it matters; ARGV[#ARGV] is how long offences matter
local function keep(key, now)
  local f = redis.call('HMGET', key, 'tat', 'stat', 'sus', 'ban', 'refu', 'off', 'offat')
  local last = math.max(num(f[1]), num(f[2]), num(f[3]), num(f[4]), num(f[5]))
  if num(f[6]) > 0 then last = math.max(last, num(f[7]) + tonumber(ARGV[#ARGV])) end
  local ms = math.ceil((last - now) * 1000)
  if ms > 0 then redis.call('PEXPIRE', key, ms + 1000) else redis.call('DEL', key) end
end
-- GCRA: spend cost from the bucket in field, or return false
local function take(key, field, cost, rate, burst, now)
  local tat = math.max(num(redis.call('HGET', key, field)), now)
  if tat - now > (burst - math.min(cost, burst)) / rate then return false end
  redis.call('HSET', key, field, fmt(tat + cost / rate))
  return true
end
"""

SCRIPTS = {
    # KEYS: client, address. ARGV: cost, rate (0: no bucket), burst, keep. -> {'banned', left, which} | {'throttled'} | {'ok'}
    "admit_address": """
local now = clock()
for i = 1, 2 do
  local ban = num(redis.call('HGET', KEYS[i], 'ban'))
  if ban > now then return {'banned', fmt(ban - now), i} end
end
local rate = tonumber(ARGV[2])
if rate == 0 then return {'ok'} end
if not take(KEYS[2], 'tat', tonumber(ARGV[1]), rate, tonumber(ARGV[3]), now) then return {'throttled'} end
keep(KEYS[2], now)
return {'ok'}
""",
    # KEYS: client. ARGV: cost, rate (0: no bucket), burst, suspect rate, suspect burst, keep.
    "admit_client": """
local now = clock()
local f = redis.call('HMGET', KEYS[1], 'ban', 'sus')
if num(f[1]) > now then return {'banned', fmt(num(f[1]) - now), 1} end
local rate = tonumber(ARGV[2])
if rate == 0 then return {'ok'} end
local cost = tonumber(ARGV[1])
local allowed
if num(f[2]) > now then
  allowed = take(KEYS[1], 'stat', cost, tonumber(ARGV[4]), tonumber(ARGV[5]), now)
else
  allowed = take(KEYS[1], 'tat', cost, rate, tonumber(ARGV[3]), now)
end
if not allowed then return {'throttled'} end
keep(KEYS[1], now)
return {'ok'}
""",
    # KEYS: address. ARGV: budget, window, cooldown, keep. -> 1 when this refusal bans the address
    "count_refusal": """
local now = clock()
local f = redis.call('HMGET', KEYS[1], 'ref', 'refu', 'ban')
local refusals, window_end = num(f[1]), num(f[2])
if window_end <= now then refusals, window_end = 0, now + tonumber(ARGV[2]) end
refusals = refusals + 1
local banned = 0
if refusals > tonumber(ARGV[1]) and num(f[3]) <= now then
  redis.call('HSET', KEYS[1], 'ban', fmt(now + tonumber(ARGV[3])))
  window_end = math.max(window_end, now + tonumber(ARGV[3]))
  banned = 1
end
redis.call('HSET', KEYS[1], 'ref', refusals, 'refu', fmt(window_end))
keep(KEYS[1], now)
return banned
""",
    # KEYS: client. ARGV: first, factor, max, forget, suspect, keep. -> {1, duration} | {0, left}
    "ban": """
local now = clock()
local f = redis.call('HMGET', KEYS[1], 'ban', 'off', 'offat')
if num(f[1]) > now then return {0, fmt(num(f[1]) - now)} end
local offences = num(f[2])
if now - num(f[3]) > tonumber(ARGV[4]) then offences = 0 end
local duration = math.min(tonumber(ARGV[1]) * tonumber(ARGV[2]) ^ math.min(offences, 64), tonumber(ARGV[3]))
redis.call('HSET', KEYS[1], 'off', offences + 1, 'offat', fmt(now), 'ban', fmt(now + duration),
  'sus', fmt(now + duration + tonumber(ARGV[5])))
keep(KEYS[1], now)
return {1, fmt(duration)}
""",
    # KEYS: key. ARGV: field ('sus': a suspect period; 'ban': a ban held locally while Redis was away),
    # seconds, keep. The period lasts at least that long from now; a longer one already there wins.
    "extend": """
local now = clock()
local until_ = math.max(num(redis.call('HGET', KEYS[1], ARGV[1])), now + tonumber(ARGV[2]))
redis.call('HSET', KEYS[1], ARGV[1], fmt(until_))
keep(KEYS[1], now)
return 1
""",
    # KEYS: counter. ARGV: count, decay rate (ln 2 / half-life). -> the decayed count (a string)
    "count": """
local now = clock()
local f = redis.call('HMGET', KEYS[1], 'v', 't')
local count, rate = tonumber(ARGV[1]), tonumber(ARGV[2])
if not f[1] then
  if count == 0 then return '0' end
  f = {0, now}
end
local v = tonumber(f[1]) * math.exp(-rate * math.max(now - tonumber(f[2]), 0)) + count
if count > 0 then
  redis.call('HSET', KEYS[1], 'v', fmt(v), 't', fmt(now))
  redis.call('PEXPIRE', KEYS[1], math.ceil(1000 * math.max(math.log(v / %(smallest)s), 0) / rate) + 1000)
end
return fmt(v)
""".replace("%(smallest)s", repr(SMALLEST_COUNT)),
}


class _Down(Exception):
    """The store did not answer; the caller decides from local memory (fail mode open)."""


class RedisClientState:
    def __init__(self, config: StateConfig, local: MemoryClientState, keep_offences_s: float):
        self.config = config
        self.local = local  # answers while Redis is away, and holds every ban seen
        self.keep_offences_s = keep_offences_s
        self.replica = uuid.uuid4().hex  # tells this replica's stream entries from the others'
        self.secret = local.secret  # until Redis gives the shared one
        # The event loop's client (admission, the streams) and the worker threads' own (policy,
        # detectors): a worker blocks on its socket instead of waiting for the busy loop.
        self.client = Redis(connection_pool=self._pool(config.max_connections, config.timeout_s))
        self.scripts = {name: self.client.register_script(PRELUDE + body) for name, body in SCRIPTS.items()}
        self.blocking = redis.Redis(connection_pool=self._pool(config.max_connections, config.timeout_s, redis.BlockingConnectionPool))
        self.blocking_scripts = {name: self.blocking.register_script(PRELUDE + body) for name, body in SCRIPTS.items()}
        self.up = False  # until the first answer
        self.errors = 0
        self.feeds: list[RedisFeed] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self._recovery: asyncio.Task | None = None
        self._lock = threading.Lock()
        self._labels: dict[tuple[str, str], int] = {}  # (client, model) -> label, waiting for the next batch
        self._label_writer: asyncio.Task | None = None
        self.dropped_writes = 0

    def _pool(self, size: int, timeout_s: float, kind: type = BlockingConnectionPool) -> Any:
        tls: dict[str, Any] = {}
        if self.config.tls is not None:
            tls = {
                "ssl_ca_certs": str(self.config.tls.ca) if self.config.tls.ca else None,
                "ssl_certfile": str(self.config.tls.cert) if self.config.tls.cert else None,
                "ssl_keyfile": str(self.config.tls.key) if self.config.tls.key else None,
                "ssl_check_hostname": self.config.tls.check_hostname,
            }
        return kind.from_url(
            self.config.url,
            max_connections=size,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=self.config.timeout_s,
            **tls,
        )

    def _key(self, key: str) -> str:
        return f"{self.config.key_prefix}c:{key}"

    # -- calls, failure and recovery -------------------------------------------------------------

    async def _call(self, call: Awaitable[T]) -> T:
        """Await a Redis call (the connections' timeouts bound it); ``_Down`` (open) or UNAVAILABLE (closed) when it fails."""
        if not self.up:
            if asyncio.iscoroutine(call):
                call.close()
            self._fail_closed()
            raise _Down
        try:
            return await call
        except FAILURES as error:
            self._degrade(error)
            self._fail_closed()
            raise _Down from None

    def _run(self, name: str, keys: list[str], args: list[Any]) -> Awaitable[Any]:
        return self._call(self.scripts[name](keys=keys, args=args))

    def _blocking(self, call: Callable[[], T]) -> T:
        """A call on a worker thread, bounded by the connections' timeouts; like ``_call``."""
        if not self.up or self.loop is None or self.loop.is_closed():
            self._fail_closed()
            raise _Down
        try:
            return call()
        except FAILURES as error:
            self.loop.call_soon_threadsafe(self._degrade, error)
            self._fail_closed()
            raise _Down from None

    def _run_blocking(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return self._blocking(lambda: self.blocking_scripts[name](keys=keys, args=args))

    def _fail_closed(self) -> None:
        if self.config.fail_mode == "closed":
            raise StoreUnavailable("shared state store unreachable")

    def _degrade(self, error: BaseException) -> None:
        """On the event loop: count the failure; the first one alerts and starts the recovery."""
        self.errors += 1
        if self.up:
            self.up = False
            self._alert("shared-state-degraded", "warning", error=type(error).__name__)
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.get_running_loop().create_task(self._recover())

    def _alert(self, action: str, level: str, **fields: Any) -> None:
        line = {
            "event.kind": "alert",
            "event.category": ["database"],
            "event.action": action,
            "rule.name": "shared_state",
            "firewall.fail_mode": self.config.fail_mode,
            **fields,
        }
        (log.warning if level == "warning" else log.info)("alert", **line)

    async def _recover(self) -> None:
        delay = self.config.retry_s
        while True:
            await asyncio.sleep(delay)
            try:
                await asyncio.wait_for(self.client.ping(), self.config.timeout_s)
                await self._resync()
            except FAILURES:
                self.errors += 1
                delay = min(2 * delay, self.config.max_retry_s)
                continue
            self.up = True
            self._alert("shared-state-recovered", "info")
            for feed in self.feeds:
                feed.wake()
            return

    async def _resync(self) -> None:
        """Write back the shared secret and the bans this replica holds (decided while degraded, or seen before)."""
        await self.client.set(f"{self.config.key_prefix}secret", self.secret, nx=True)
        bans = list(self.local.active_bans().items())
        for start in range(0, len(bans), 500):
            pipe = self.client.pipeline(transaction=False)
            for key, left in bans[start : start + 500]:
                await self.scripts["extend"](keys=[self._key(key)], args=["ban", left, self.keep_offences_s], client=pipe)
            await asyncio.wait_for(pipe.execute(), self.config.timeout_s * 4)

    # -- admission (event loop) --------------------------------------------------------------------

    async def admit_address(self, client_key: str, peer_key: str, cost: int, bucket: Bucket | None) -> None:
        rate, burst = (bucket.rate, bucket.burst) if bucket else (0, 0)
        try:
            keys = [self._key(client_key), self._key(peer_key)]
            reply = await self._run("admit_address", keys, [cost, rate, burst, self.keep_offences_s])
        except _Down:
            return await self.local.admit_address(client_key, peer_key, cost, bucket)
        self._verdict(reply, [client_key, peer_key], "address rate limit")

    async def admit_client(self, key: str, cost: int, bucket: Bucket | None, suspect: Bucket) -> bool:
        rate, burst = (bucket.rate, bucket.burst) if bucket else (0, 0)
        args = [cost, rate, burst, suspect.rate, suspect.burst, self.keep_offences_s]
        try:
            reply = await self._run("admit_client", [self._key(key)], args)
        except _Down:
            return await self.local.admit_client(key, cost, bucket, suspect)
        self._verdict(reply, [key], "client rate limit")
        return False  # a record is never discarded here: it expires with its bucket

    def _verdict(self, reply: list, keys: list[str], throttled: str) -> None:
        verdict = reply[0].decode()
        if verdict == "banned":
            key = keys[int(reply[2]) - 1]
            self.local.mirror_ban(key, float(reply[1]))
            raise Banned(f"{key!r} banned")
        if verdict == "throttled":
            raise Throttled(throttled)

    async def count_refusal(self, peer_key: str, budget: int, window_s: float, cooldown_s: float) -> bool:
        try:
            banned = await self._run("count_refusal", [self._key(peer_key)], [budget, window_s, cooldown_s, self.keep_offences_s])
        except _Down:
            return await self.local.count_refusal(peer_key, budget, window_s, cooldown_s)
        if banned:
            self.local.mirror_ban(peer_key, cooldown_s)
        return bool(banned)

    def discard(self, key: str) -> None:
        pass  # the record of a fresh id expires once its bucket is full again

    # -- policy (worker threads) -------------------------------------------------------------------

    def ban(self, key: str, config: BanConfig, suspect_s: float) -> float | None:
        args = [config.first_s, config.factor, config.max_s, config.forget_s, suspect_s, self.keep_offences_s]
        try:
            started, seconds = self._run_blocking("ban", [self._key(key)], args)
        except _Down:
            return self.local.ban(key, config, suspect_s)
        self.local.mirror_ban(key, float(seconds))
        return float(seconds) if started else None

    def suspect(self, key: str, seconds: float) -> None:
        try:
            self._run_blocking("extend", [self._key(key)], ["sus", seconds, self.keep_offences_s])
        except _Down:
            self.local.suspect(key, seconds)

    def remember(self, key: str, model: str, label: int) -> None:
        """Written locally now, and to Redis with the next batch (every ``LABEL_FLUSH_S``): no
        decision of this request depends on it. At most ``buffer`` labels wait; beyond, the label
        stays local and is counted dropped."""
        self.local.remember(key, model, label)
        with self._lock:
            if len(self._labels) >= self.config.buffer and (key, model) not in self._labels:
                self.dropped_writes += 1
                return
            self._labels.setdefault((key, model), label)

    async def _write_labels(self) -> None:
        prefix, ttl = f"{self.config.key_prefix}l:", math.ceil(self.config.label_ttl_s)
        while True:
            await asyncio.sleep(LABEL_FLUSH_S)
            if not self.up or not self._labels:
                continue  # while degraded the newest labels wait (bounded) for the recovery
            with self._lock:
                labels, self._labels = self._labels, {}
            pipe = self.client.pipeline(transaction=False)
            for (key, model), label in labels.items():
                pipe.hsetnx(prefix + key, model, label).expire(prefix + key, ttl)
            try:
                await pipe.execute()
            except FAILURES as error:
                self.dropped_writes += len(labels)
                self._degrade(error)

    def first_label(self, key: str, model: str) -> int | None:
        try:
            label = self._blocking(lambda: self.blocking.hget(f"{self.config.key_prefix}l:{key}", model))
        except _Down:
            return self.local.first_label(key, model)
        return self.local.first_label(key, model) if label is None else int(label)  # local: not written yet

    # -- operators -------------------------------------------------------------------------------------

    def get(self, key: str) -> ClientRecord | None:
        """The record in Redis on this process's clock (this replica's copy while Redis is away)."""

        def read() -> tuple:
            pipe = self.blocking.pipeline(transaction=False)
            pipe.time().hgetall(self._key(key)).hgetall(f"{self.config.key_prefix}l:{key}")
            return tuple(pipe.execute())

        try:
            (seconds, micros), fields, labels = self._blocking(read)
        except _Down:
            return self.local.get(key)
        if not fields and not labels:
            return None
        shift = time.monotonic() - (seconds + micros / 1e6)  # Redis's clock to this process's
        moment = lambda name: float(fields.get(name, 0)) + shift if name in fields else 0.0  # noqa: E731
        return ClientRecord(
            suspect_until=moment(b"sus"),
            banned_until=moment(b"ban"),
            offences=int(fields.get(b"off", 0)),
            last_offence_at=moment(b"offat"),
            first_labels={model.decode(): int(label) for model, label in labels.items()},
            refusals=int(fields.get(b"ref", 0)),
            refusals_until=moment(b"refu"),
        )

    def items(self) -> list[tuple[str, ClientRecord]]:
        return self.local.items()  # what this replica holds: listing every key in Redis would scan it all

    def remove(self, key: str) -> bool:
        tracked = self.local.remove(key)
        try:
            removed = self._blocking(lambda: self.blocking.delete(self._key(key), f"{self.config.key_prefix}l:{key}"))
        except _Down:
            return tracked
        return tracked or removed > 0

    def lift(self, key: str) -> None:
        self.local.lift(key)
        self._blocking(lambda: self.blocking.hset(self._key(key), mapping={"ban": 0, "sus": 0}))  # _Down: not lifted

    # -- stateful detectors --------------------------------------------------------------------------

    def counts(self, name: str, half_life_s: float, max_keys: int) -> Counts:
        return RedisCounts(self, f"{self.config.key_prefix}e:{name}:", DecayingCount(half_life_s, max_keys))

    def feed(self, name: str, receive: Callable[[QueryRows], None]) -> QueryFeed | None:
        feed = RedisFeed(self, f"{self.config.key_prefix}q:{name}", receive)
        self.feeds.append(feed)
        return feed

    # -- life cycle and metrics ----------------------------------------------------------------------

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(self._share_secret(), self.config.timeout_s)
            await self._resync()  # bans restored from a snapshot
            self.up = True
        except FAILURES as error:
            self._degrade(error)
            self._alert("shared-state-degraded", "warning", error=type(error).__name__)
        for feed in self.feeds:
            feed.start()
        self._label_writer = asyncio.create_task(self._write_labels())

    async def _share_secret(self) -> None:
        """The first replica's random secret becomes everyone's (one key, no TTL)."""
        name = f"{self.config.key_prefix}secret"
        await self.client.set(name, self.local.secret, nx=True)
        self.secret = await self.client.get(name) or self.local.secret

    async def close(self) -> None:
        for feed in self.feeds:
            await feed.close()
        for task in (self._recovery, self._label_writer):
            if task is not None:
                task.cancel()
        await self.client.aclose()
        self.blocking.close()

    def refresh(self) -> None:
        self.local.refresh()

    def snapshot(self, path: Path) -> int:
        return self.local.snapshot(path)

    def restore(self, path: Path) -> int:
        return self.local.restore(path)

    def stats(self) -> dict[str, float]:
        return {
            **self.local.stats(),
            "shared_up": float(self.up),
            "shared_errors": float(self.errors),
            "shared_dropped": float(self.dropped_writes + sum(feed.dropped for feed in self.feeds)),
        }


class RedisCounts:
    """Decaying counts in Redis, one per key for every replica; the last value seen is kept locally
    (it goes on decaying there) and counting goes on locally while Redis is away."""

    def __init__(self, state: RedisClientState, prefix: str, local: DecayingCount):
        self.state, self.prefix, self.local = state, prefix, local
        self.rate = local.rate

    def add(self, key: str, count: float, now: float) -> float:
        try:
            value = float(self.state._run_blocking("count", [self.prefix + key], [count, self.rate]))
        except _Down:
            return self.local.add(key, count, now)
        self.local.set(key, value, now)
        return value

    def current(self, key: str, now: float) -> float:
        return self.add(key, 0.0, now)  # adding nothing reads without writing

    def forget(self, key: str) -> None:
        self.local.forget(key)
        try:
            self.state._blocking(lambda: self.state.blocking.delete(self.prefix + key))
        except _Down:
            pass  # it decays and expires on its own

    def __len__(self) -> int:
        return len(self.local)


class RedisFeed:
    """One model's query stream: publish this replica's queries, receive the others'."""

    def __init__(self, state: RedisClientState, stream: str, receive: Callable[[QueryRows], None]):
        self.state, self.stream, self.receive = state, stream, receive
        self.outbox: deque[QueryRows] = deque()
        self.waiting = 0  # rows in the outbox
        self.dropped = 0  # rows not exchanged: dropped from a full outbox, a failed write, a bad entry
        self.lock = threading.Lock()
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []

    def publish(self, rows: QueryRows) -> None:
        with self.lock:
            self.outbox.append(rows)
            self.waiting += len(rows)
            while self.waiting > self.state.config.buffer:  # the oldest go first
                self.waiting -= len(old := self.outbox.popleft())
                self.dropped += len(old)
        loop = self.state.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.wake)

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._tasks = [asyncio.create_task(self._write()), asyncio.create_task(self._read())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _write(self) -> None:
        state = self.state
        while True:
            await self._wake.wait()
            await asyncio.sleep(PUBLISH_DELAY_S)  # after the responses being sent, and in batches
            self._wake.clear()
            if not state.up:
                continue  # the outbox keeps the newest rows; recovery wakes this task
            with self.lock:
                batch, self.waiting = list(self.outbox), 0
                self.outbox.clear()
            if not batch:
                continue
            pipe = state.client.pipeline(transaction=False)
            for rows in batch:
                pipe.xadd(self.stream, encode(rows, state.replica), maxlen=state.config.stream_length, approximate=True)
            try:
                await asyncio.wait_for(pipe.execute(), state.config.timeout_s)
            except FAILURES as error:
                self.dropped += sum(len(rows) for rows in batch)
                state._degrade(error)

    async def _read(self) -> None:
        """Read every entry after the last one seen (at start: the whole stream, a warm history)."""
        state = self.state
        timeout = READ_BLOCK_MS / 1000 + state.config.timeout_s
        reader = Redis(connection_pool=state._pool(1, timeout))  # a blocked read holds its connection
        last = "0-0"
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not state.up:
                    await asyncio.sleep(state.config.retry_s)
                    continue
                try:
                    reply = await reader.xread({self.stream: last}, count=READ_COUNT, block=READ_BLOCK_MS)
                except FAILURES as error:
                    state._degrade(error)
                    continue
                received = []
                for _, entries in reply:
                    for entry_id, fields in entries:
                        last = entry_id
                        if fields.get(b"r") == state.replica.encode():
                            continue
                        try:
                            received.append(decode(fields))
                        except (KeyError, ValueError):
                            self.dropped += 1
                if received:
                    await loop.run_in_executor(None, self.receive, concatenate(received))
        finally:
            await reader.aclose()


def encode(rows: QueryRows, replica: str) -> dict[str, bytes | str | int]:
    return {
        "r": replica,
        "d": rows.vectors.shape[1],
        "v": rows.vectors.astype("<f4").tobytes(),
        "k": rows.keys.astype("<u8").tobytes(),
        "l": rows.labels.astype("<i8").tobytes(),
        "a": rows.answers.astype("<i8").tobytes(),
        "e": rows.evidence.astype(np.uint8).tobytes(),
        "t": rows.times.astype("<f8").tobytes(),
    }


def decode(fields: dict[bytes, bytes]) -> QueryRows:
    """A stream entry's rows; ValueError when its sizes do not agree."""
    dim = int(fields[b"d"])
    keys = np.frombuffer(fields[b"k"], "<u8")
    rows = QueryRows(
        vectors=np.frombuffer(fields[b"v"], "<f4").reshape(-1, dim).astype(np.float32),
        keys=keys.astype(np.uint64),
        labels=np.frombuffer(fields[b"l"], "<i8").astype(np.int64),
        answers=np.frombuffer(fields[b"a"], "<i8").astype(np.int64),
        evidence=np.frombuffer(fields[b"e"], np.uint8).astype(bool),
        times=np.frombuffer(fields[b"t"], "<f8").astype(np.float64),
    )
    if dim < 1 or any(len(column) != len(keys) for column in (rows.vectors, rows.labels, rows.answers, rows.evidence, rows.times)):
        raise ValueError("stream entry sizes disagree")
    return rows


def concatenate(batches: list[QueryRows]) -> QueryRows:
    return QueryRows(*(np.concatenate([getattr(rows, name) for rows in batches]) for name in QueryRows.__dataclass_fields__))
