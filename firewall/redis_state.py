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
- the per-image detectors' CUSUM statistic per client, ``<prefix>s:<name>:<key>``, updated by one
  script per request (on the monitoring worker, after the answer), kept ``keep_s`` after the
  client's last image;
- ``<prefix>secret``: 16 random bytes the first replica writes and all read at start, so that
  the decoy label a client gets before it has a genuine one is the same on every replica;
- per model, a stream of the queries each replica placed in its history, ``<prefix>q:<name>``,
  trimmed to about ``stream_length`` entries (XADD MAXLEN ~), one entry per request. A replica
  reads the entries published since its last read in the round trip that admits a request (the
  probing stage adds them before its search) and writes the request's entry before its answer
  leaves (one round trip on the worker thread), so a query finds every query answered before it
  was sent, whichever replica answered it; the search itself is in the replica's own FAISS
  index. A background reader (XREAD, blocking on a connection of its own) keeps an idle replica
  current and warms a new one. The entries carry the client id and address, so each replica
  counts every replica's probing evidence in its own memory;
- ``<prefix>ops``: a pub/sub channel on which an operator's lift or reset on one replica reaches
  the others' in-memory copies (and, for a reset, the probing evidence they counted).

Failure: every call has a deadline (``timeout_s``) and the connection pool a size; a failed call
marks the store degraded (metric ``firewall_shared_state_up`` 0, one alert line) and a task
reconnects with exponential backoff (``retry_s`` doubling to ``max_retry_s``). While degraded, the
``open`` fail mode decides from this replica's memory, a ``MemoryClientState`` that mirrors every
ban seen in Redis, so known bans still hold; ``closed`` answers UNAVAILABLE. Back in Redis, what
was counted locally is merged in (``merge``): the tokens each bucket spent while degraded are
spent in Redis too, bans and suspicion last as long as the longer of the two, the larger offence
count wins, and each CUSUM statistic counted locally raises Redis's to at least its value; the
bans this replica holds are written back too (Redis may have lost them), and the queries placed
meanwhile (a bounded buffer) are published. The keys counted while degraded are bounded by
``buffer``; beyond, dropped and counted. A lift or reset published while a replica was cut off
does not reach it.

Redis Cluster is not supported: a decision's keys (a client and its address) hash to different
slots, and one script must see both.

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
from typing import Any, Awaitable, Callable, Iterable, TypeVar

import numpy as np
import redis
import structlog
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError

from detectors.evidence import Cusum
from detectors.shared import ClientTest, QueryFeed, QueryRows
from firewall.config import BanConfig, StateConfig
from firewall.errors import Banned, StoreUnavailable, Throttled
from firewall.state import Bucket, ClientRecord, MemoryClientState

log = structlog.get_logger("firewall.state")

T = TypeVar("T")
FAILURES = (RedisError, OSError, asyncio.TimeoutError)
READ_BLOCK_MS = 1000  # a stream reader waits this long for new entries before asking again
READ_COUNT = 512  # entries per read
CLOSE_S = 5.0  # closing waits this long for the background tasks and the connections
MERGE_BATCH = 500  # records merged back per pipelined round trip
LIST_LIMIT = 100_000  # records an operator's listing reads from Redis at most
LABEL_FLUSH_S = 0.05  # first labels are written to Redis in batches this often

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
    # KEYS: statistic. ARGV: flagged step, clean step, flags ('1' flagged, '0' clean, in order), keep.
    # -> {peak, value}: Page's CUSUM, floored at 0; a statistic at 0 is deleted
    "cusum": """
local v = tonumber(redis.call('GET', KEYS[1])) or 0
local peak = v
for i = 1, #ARGV[3] do
  local step = string.sub(ARGV[3], i, i) == '1' and tonumber(ARGV[1]) or tonumber(ARGV[2])
  v = math.max(0, v + step)
  peak = math.max(peak, v)
end
if #ARGV[3] > 0 then
  if v > 0 then redis.call('SET', KEYS[1], fmt(v), 'PX', math.ceil(tonumber(ARGV[4]) * 1000)) else redis.call('DEL', KEYS[1]) end
end
return {fmt(peak), fmt(v)}
""",
    # KEYS: statistic. ARGV: value counted locally, keep. Redis's statistic becomes at least that.
    "cusum_merge": """
local v = tonumber(ARGV[1])
if v > (tonumber(redis.call('GET', KEYS[1])) or 0) then
  redis.call('SET', KEYS[1], fmt(v), 'PX', math.ceil(tonumber(ARGV[2]) * 1000))
end
return 1
""",
    # KEYS: record. ARGV: bucket field ('' for none), seconds of refill the tokens spent locally take,
    # ban left, suspicion left, offences, seconds since the last one, keep. What one replica counted
    # while Redis was away, merged in: spent tokens add up, the later end and the larger count win.
    "merge": """
local now = clock()
local function later(field, left)
  if left > 0 then redis.call('HSET', KEYS[1], field, fmt(math.max(num(redis.call('HGET', KEYS[1], field)), now + left))) end
end
if ARGV[1] ~= '' and tonumber(ARGV[2]) > 0 then
  redis.call('HSET', KEYS[1], ARGV[1], fmt(math.max(num(redis.call('HGET', KEYS[1], ARGV[1])), now) + tonumber(ARGV[2])))
end
later('ban', tonumber(ARGV[3]))
later('sus', tonumber(ARGV[4]))
local f = redis.call('HMGET', KEYS[1], 'off', 'offat')
if tonumber(ARGV[5]) > num(f[1]) then
  redis.call('HSET', KEYS[1], 'off', ARGV[5], 'offat', fmt(math.max(num(f[2]), now - tonumber(ARGV[6]))))
end
keep(KEYS[1], now)
return 1
""",
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
        # Set at close: the background loops end even when a Redis client turned their
        # cancellation into a connection error they would otherwise retry after.
        self.closed = False
        self.errors = 0
        self.feeds: list[RedisFeed] = []
        self.tests: list[RedisCusum] = []
        self._listener: asyncio.Task | None = None
        # Keys decided from local memory while Redis was away, with the buckets they drew from
        # (the client's and the suspect one): merged back at recovery.
        self._pending: dict[str, tuple[Bucket | None, Bucket | None]] = {}
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
        while not self.closed:
            await asyncio.sleep(delay)
            try:
                await asyncio.wait_for(self.client.ping(), self.config.timeout_s)
                await self._resync()
                self.up = True
                await self._merge()  # what was decided from memory while the resynchronisation ran
            except FAILURES:
                self.up = False
                self.errors += 1
                delay = min(2 * delay, self.config.max_retry_s)
                continue
            self._alert("shared-state-recovered", "info")
            return

    async def _resync(self) -> None:
        """Write back the shared secret, merge what was counted here while degraded, write back
        the bans this replica holds (Redis may have lost them), publish the queries placed meanwhile."""
        await self.client.set(f"{self.config.key_prefix}secret", self.secret, nx=True)
        await self._merge(self.local.active_bans())
        for test in self.tests:
            await test.merge()
        for feed in self.feeds:
            await feed.flush()

    async def _merge(self, bans: Iterable[str] = ()) -> None:
        """Merge the records decided from memory while degraded, and ``bans`` held here, into Redis."""
        with self._lock:
            pending, self._pending = self._pending, {}
        keys = list(pending) + [key for key in bans if key not in pending]
        try:
            for start in range(0, len(keys), MERGE_BATCH):
                pipe = self.client.pipeline(transaction=False)
                for key in keys[start : start + MERGE_BATCH]:
                    args = self._merge_args(key, *pending.get(key, (None, None)))
                    if args is not None:
                        await self.scripts["merge"](keys=[self._key(key)], args=args, client=pipe)
                await asyncio.wait_for(pipe.execute(), self.config.timeout_s * 4)
        except BaseException:
            # Tried again at the next recovery; a batch that reached Redis before the failure is
            # charged twice then (stricter, never looser).
            with self._lock:
                self._pending = pending | self._pending
            raise
        for key in pending:  # spent in Redis now: not again at the next recovery
            self.local.update(key, lambda record: setattr(record, "tokens", None))

    def _merge_args(self, key: str, bucket: Bucket | None, suspect: Bucket | None) -> list[Any] | None:
        """The ``merge`` script's arguments for what this replica holds of ``key``."""
        record = self.local.get(key)
        if record is None:
            return None
        now = self.local.clock()
        field, spent = "", 0.0
        current = suspect if suspect is not None and record.suspect_until > now else bucket
        if current is not None and record.tokens is not None:
            tokens = min(float(current.burst), record.tokens + (now - record.refilled_at) * current.rate)
            field, spent = ("stat" if current is suspect else "tat"), (current.burst - tokens) / current.rate
        return [
            field,
            spent,
            max(record.banned_until - now, 0.0),
            max(record.suspect_until - now, 0.0),
            record.offences,
            max(now - record.last_offence_at, 0.0),
            self.keep_offences_s,
        ]

    def _counted_locally(self, key: str, bucket: Bucket | None = None, suspect: Bucket | None = None) -> None:
        """Remember that ``key`` was decided from local memory, to merge it back at recovery."""
        with self._lock:
            if key not in self._pending and len(self._pending) >= self.config.buffer:
                self.dropped_writes += 1
                return
            old_bucket, old_suspect = self._pending.get(key, (None, None))
            self._pending[key] = (bucket or old_bucket, suspect or old_suspect)

    # -- admission (event loop) --------------------------------------------------------------------

    async def admit_address(self, client_key: str, peer_key: str, cost: int, bucket: Bucket | None) -> None:
        rate, burst = (bucket.rate, bucket.burst) if bucket else (0, 0)
        try:
            keys = [self._key(client_key), self._key(peer_key)]
            reply = await self._run("admit_address", keys, [cost, rate, burst, self.keep_offences_s])
        except _Down:
            if bucket is not None:
                self._counted_locally(peer_key, bucket)
            return await self.local.admit_address(client_key, peer_key, cost, bucket)
        self._verdict(reply, [client_key, peer_key], "address rate limit")

    async def admit_client(self, key: str, cost: int, bucket: Bucket | None, suspect: Bucket) -> bool:
        rate, burst = (bucket.rate, bucket.burst) if bucket else (0, 0)
        args = [cost, rate, burst, suspect.rate, suspect.burst, self.keep_offences_s]
        # In the same round trip, the queries the other replicas published so far: the probing
        # stage adds them before its search (EVAL: a pipelined EVALSHA would cost a SCRIPT EXISTS).
        pipe = self.client.pipeline(transaction=False).eval(self.scripts["admit_client"].script, 1, self._key(key), *args)
        if self.feeds:
            pipe.xread({feed.stream: feed.last for feed in self.feeds}, count=READ_COUNT)
        try:
            reply, *published = await self._call(pipe.execute())
        except _Down:
            if bucket is not None:
                self._counted_locally(key, bucket, suspect)
            return await self.local.admit_client(key, cost, bucket, suspect)
        for feed in self.feeds:
            feed.prefetched(published[0] or [] if published else [])
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
            self._counted_locally(peer_key)
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
            self._counted_locally(key)
            return self.local.ban(key, config, suspect_s)
        self.local.mirror_ban(key, float(seconds))
        return float(seconds) if started else None

    def suspect(self, key: str, seconds: float) -> None:
        try:
            self._run_blocking("extend", [self._key(key)], ["sus", seconds, self.keep_offences_s])
        except _Down:
            self._counted_locally(key)
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
        while not self.closed:
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
        record = _record(fields, time.monotonic() - (seconds + micros / 1e6))
        record.first_labels = {model.decode(): int(label) for model, label in labels.items()}
        return record

    def items(self) -> list[tuple[str, ClientRecord]]:
        """Every replica's records, read from Redis (at most ``LIST_LIMIT``; first labels left out);
        this replica's own while Redis is away."""
        prefix = self._key("")

        def read() -> list[tuple[str, ClientRecord]]:
            names = []
            for name in self.blocking.scan_iter(match=prefix.replace("*", "\\*") + "*", count=1000):
                names.append(name)
                if len(names) >= LIST_LIMIT:
                    break
            found = []
            for start in range(0, len(names), MERGE_BATCH):
                pipe = self.blocking.pipeline(transaction=False).time()
                for name in names[start : start + MERGE_BATCH]:
                    pipe.hgetall(name)
                (seconds, micros), *records = pipe.execute()
                shift = time.monotonic() - (seconds + micros / 1e6)
                found += [(name.decode()[len(prefix) :], _record(fields, shift)) for name, fields in zip(names[start:], records) if fields]
            return found

        try:
            return self._blocking(read)
        except _Down:
            return self.local.items()

    def remove(self, key: str) -> bool:
        tracked = self.local.remove(key)
        try:
            removed = self._blocking(lambda: self._announce("reset", key, self.blocking.pipeline(transaction=False).delete(self._key(key), f"{self.config.key_prefix}l:{key}")))[0]
        except _Down:
            return tracked
        return tracked or removed > 0

    def lift(self, key: str) -> None:
        self.local.lift(key)
        pipe = self.blocking.pipeline(transaction=False).hset(self._key(key), mapping={"ban": 0, "sus": 0})
        self._blocking(lambda: self._announce("lift", key, pipe))  # _Down: not lifted

    def _announce(self, action: str, key: str, pipe: Any) -> list:
        """Run ``pipe`` and tell the other replicas to do the same to their in-memory copy of ``key``."""
        return pipe.publish(f"{self.config.key_prefix}ops", f"{action}:{self.replica}:{key}").execute()

    async def _listen(self) -> None:
        """Apply the other replicas' lifts and resets to this replica's in-memory copies."""
        channel = f"{self.config.key_prefix}ops"
        listener = Redis(connection_pool=self._pool(1, READ_BLOCK_MS / 1000 + self.config.timeout_s))
        try:
            while not self.closed:
                if not self.up:
                    await asyncio.sleep(self.config.retry_s)
                    continue
                try:
                    async with listener.pubsub() as pubsub:
                        await pubsub.subscribe(channel)
                        while self.up and not self.closed:
                            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=READ_BLOCK_MS / 1000)
                            if message is not None:
                                self._apply(message["data"].decode(errors="replace"))
                except FAILURES as error:
                    self._degrade(error)
        finally:
            await listener.aclose()

    def _apply(self, message: str) -> None:
        action, replica, key = (message.split(":", 2) + ["", ""])[:3]
        if replica == self.replica:
            return
        if action == "lift":
            self.local.lift(key)
        elif action == "reset":
            self.local.remove(key)
            for feed in self.feeds:  # the evidence each replica counted from the stream
                feed.forget(key)

    # -- stateful detectors --------------------------------------------------------------------------

    def cusum(self, name: str, p0: float, p1: float, threshold: float, max_keys: int, keep_s: float) -> ClientTest:
        test = RedisCusum(self, f"{self.config.key_prefix}s:{name}:", Cusum(p0, p1, threshold, max_keys), keep_s)
        self.tests.append(test)
        return test

    def feed(self, name: str, receive: Callable[[QueryRows], None], forget: Callable[[str], None]) -> QueryFeed | None:
        feed = RedisFeed(self, f"{self.config.key_prefix}q:{name}", receive, forget)
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
        self._listener = asyncio.create_task(self._listen())

    async def _share_secret(self) -> None:
        """The first replica's random secret becomes everyone's (one key, no TTL)."""
        name = f"{self.config.key_prefix}secret"
        await self.client.set(name, self.local.secret, nx=True)
        self.secret = await self.client.get(name) or self.local.secret

    async def close(self) -> None:
        self.closed = True
        tasks = [self._recovery, self._label_writer, self._listener, *(feed.reader for feed in self.feeds)]
        tasks = [task for task in tasks if task is not None]
        for task in tasks:
            task.cancel()
        if tasks:  # a task still closing its connection after this is left behind: shutdown never hangs on Redis
            await asyncio.wait(tasks, timeout=CLOSE_S)
        try:
            await asyncio.wait_for(self.client.aclose(), CLOSE_S)
        except FAILURES:
            pass  # the process is going away
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


def _record(fields: dict[bytes, bytes], shift: float) -> ClientRecord:
    """A record's hash in Redis as a ``ClientRecord``; ``shift`` takes Redis's clock to this process's."""
    def moment(name: bytes) -> float:
        return float(fields[name]) + shift if name in fields else 0.0

    return ClientRecord(
        suspect_until=moment(b"sus"),
        banned_until=moment(b"ban"),
        offences=int(fields.get(b"off", 0)),
        last_offence_at=moment(b"offat"),
        refusals=int(fields.get(b"ref", 0)),
        refusals_until=moment(b"refu"),
    )


class RedisCusum:
    """Page's CUSUM per client in Redis, one statistic for every replica (``detectors.evidence.Cusum``
    in memory). The last value seen is kept locally, and counting goes on there while Redis is away;
    those statistics raise Redis's at recovery."""

    def __init__(self, state: RedisClientState, prefix: str, local: Cusum, keep_s: float):
        self.state, self.prefix, self.local, self.keep_s = state, prefix, local, keep_s
        self.threshold = local.threshold
        self._flagged, self._clean = local.flagged_step, local.clean_step
        self._pending: set[str] = set()  # counted locally while Redis was away

    def add(self, key: str, flags: list[bool], now: float) -> float:
        args = [self._flagged, self._clean, "".join("1" if flag else "0" for flag in flags), self.keep_s]
        try:
            peak, value = self.state._run_blocking("cusum", [self.prefix + key], args)
        except _Down:
            with self.state._lock:
                if key in self._pending or len(self._pending) < self.state.config.buffer:
                    self._pending.add(key)
                else:
                    self.state.dropped_writes += 1
            return self.local.add(key, flags, now)
        self.local.set(key, float(value), now)
        return float(peak)

    def current(self, key: str) -> float:
        return self.add(key, [], 0.0)  # no image: reads without writing

    def forget(self, key: str) -> None:
        self.local.forget(key)
        try:
            self.state._blocking(lambda: self.state.blocking.delete(self.prefix + key))
        except _Down:
            pass  # it expires on its own

    async def merge(self) -> None:
        """Raise Redis's statistics to those counted here while it was away."""
        with self.state._lock:
            pending, self._pending = self._pending, set()
        pipe = self.state.client.pipeline(transaction=False)
        for key in pending:
            await self.state.scripts["cusum_merge"](keys=[self.prefix + key], args=[self.local.current(key), self.keep_s], client=pipe)
        try:
            await asyncio.wait_for(pipe.execute(), self.state.config.timeout_s * 4)
        except BaseException:
            with self.state._lock:
                self._pending |= pending
            raise


class RedisFeed:
    """One model's query stream. ``publish`` writes this replica's queries before the answer leaves,
    and ``catch_up`` reads the others' before a search, so a query sent after another one was
    answered, by any replica, finds it in the history: a client spreading an attack over replicas
    meets the history one replica would have. A background reader keeps an idle replica current
    (and warms a new one from the whole stream)."""

    def __init__(self, state: RedisClientState, stream: str, receive: Callable[[QueryRows], None], forget: Callable[[str], None]):
        self.state, self.stream, self.receive, self.forget = state, stream, receive, forget
        self.outbox: deque[QueryRows] = deque()  # written while Redis was away, published at recovery
        self.waiting = 0  # rows in the outbox
        self.dropped = 0  # rows not exchanged: dropped from a full outbox, a failed write, a bad entry
        self.last = "0-0"  # the newest entry delivered to ``receive``
        self.lock = threading.Lock()  # the outbox and the entries read at admission (held briefly: the event loop takes it)
        self.delivering = threading.RLock()  # one delivery at a time, and no search while one runs
        self._prefetched: list[list] = []  # entries read at admission, not delivered yet
        self._gap = False  # some were let go (too many waiting): the next catch-up reads Redis
        self.reader: asyncio.Task | None = None  # cancelled by the state's close

    def publish(self, rows: QueryRows) -> None:
        fields = encode(rows, self.state.replica)
        config = self.state.config
        try:
            self.state._blocking(lambda: self.state.blocking.xadd(self.stream, fields, maxlen=config.stream_length, approximate=True))
        except _Down:
            with self.lock:
                self.outbox.append(rows)
                self.waiting += len(rows)
                while self.waiting > config.buffer:  # the oldest go first
                    self.waiting -= len(old := self.outbox.popleft())
                    self.dropped += len(old)

    def prefetched(self, reply: list) -> None:
        """Entries read at a request's admission (every stream's), for ``catch_up`` to deliver."""
        entries = [found for stream, found in reply if stream.decode() == self.stream]
        with self.lock:
            self._prefetched += entries
            while sum(map(len, self._prefetched)) > self.state.config.buffer:
                self._prefetched.pop(0)
                self._gap = True
            self._gap |= any(len(found) >= READ_COUNT for found in entries)  # more than one read held

    def catch_up(self) -> None:
        """Receive every entry the other replicas had published when this request was admitted (a
        worker thread, before a search): what the admission read, and Redis itself only when that
        was not all. Delivering is held throughout, so no search starts while another request's
        catch-up is delivering what this one needs."""
        with self.delivering:
            with self.lock:
                waiting, self._prefetched = self._prefetched, []
                gap, self._gap = self._gap, False
            for found in waiting:
                self._deliver([(self.stream, found)])
            while gap:
                try:
                    reply = self.state._blocking(lambda: self.state.blocking.xread({self.stream: self.last}, count=READ_COUNT))
                except _Down:
                    return  # the local history goes on alone
                gap = self._deliver(reply) >= READ_COUNT

    def _deliver(self, reply: list) -> int:
        """Hand the entries newer than ``last`` to ``receive``, in order; return how many the reply held."""
        entries = [entry for _, found in reply for entry in found]
        with self.delivering:  # two readers may have read the same entries: each is delivered once
            for entry_id, fields in entries:
                if _entry_order(entry_id) <= _entry_order(self.last):
                    continue
                self.last = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                if fields.get(b"r") == self.state.replica.encode():
                    continue
                try:
                    rows = decode(fields)
                except (KeyError, ValueError):
                    self.dropped += 1
                    continue
                self.receive(rows)
        return len(entries)

    def start(self) -> None:
        self.reader = asyncio.create_task(self._read())

    async def flush(self) -> None:
        """Publish what was written while Redis was away (at recovery)."""
        with self.lock:
            batch, self.waiting = list(self.outbox), 0
            self.outbox.clear()
        if not batch:
            return
        state = self.state
        pipe = state.client.pipeline(transaction=False)
        for rows in batch:
            pipe.xadd(self.stream, encode(rows, state.replica), maxlen=state.config.stream_length, approximate=True)
        try:
            await asyncio.wait_for(pipe.execute(), state.config.timeout_s * 4)
        except FAILURES:
            with self.lock:  # published at the next recovery (entries written twice are two queries)
                self.outbox.extendleft(reversed(batch))
                self.waiting += sum(len(rows) for rows in batch)
            raise

    async def _read(self) -> None:
        """Wait for new entries and deliver them (a worker thread), whether or not requests come."""
        state = self.state
        timeout = READ_BLOCK_MS / 1000 + state.config.timeout_s
        reader = Redis(connection_pool=state._pool(1, timeout))  # a blocked read holds its connection
        loop = asyncio.get_running_loop()
        try:
            while not state.closed:
                if not state.up:
                    await asyncio.sleep(state.config.retry_s)
                    continue
                try:
                    reply = await reader.xread({self.stream: self.last}, count=READ_COUNT, block=READ_BLOCK_MS)
                except FAILURES as error:
                    state._degrade(error)
                    continue
                if reply:
                    await loop.run_in_executor(None, self._deliver, reply)
        finally:
            await reader.aclose()


def _entry_order(entry_id: bytes | str) -> tuple[int, int]:
    milliseconds, _, sequence = (entry_id.decode() if isinstance(entry_id, bytes) else entry_id).partition("-")
    return int(milliseconds), int(sequence or 0)


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
        "c": rows.client,
        "p": rows.address,
        "w": str(float(rows.weight)),
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
        client=fields[b"c"].decode(errors="replace"),
        address=fields[b"p"].decode(errors="replace"),
        weight=float(fields[b"w"]),
    )
    if dim < 1 or any(len(column) != len(keys) for column in (rows.vectors, rows.labels, rows.answers, rows.evidence, rows.times)):
        raise ValueError("stream entry sizes disagree")
    if not 0.0 <= rows.weight <= len(keys):  # NaN fails too
        raise ValueError("stream entry weight out of range")
    return rows
