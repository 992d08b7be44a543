-- guard.record() for one key, atomically, with the key's own expiry (guard.expires)
-- and the per-rule indexes that make the gauges cheap.
--
-- The state hash mirrors guard.KeyState: m misses, f first_miss, l last_miss,
-- b blocked_until (0: counting), p next_probe ("inf": none). Times are the caller's
-- clock in seconds, written with %.17g so they read back bit for bit.
--
-- KEYS[1]  the key's state hash
-- KEYS[2]  the key's seen-alive flag (its value: the rule's scope tag)
-- KEYS[3]  the rule's counting index (zset: task id -> when the count lapses)
-- KEYS[4]  the rule's blocked index (zset: task id -> blocked_until)
-- ARGV     now, kind ("ok": 2xx, "miss", "other"), task id, window, threshold,
--          threshold_after_2xx, grace, block_for, probe_every ("inf" when off),
--          seen-alive lifetime in ms, the rule's scope tag (a flag set under another
--          path or other miss statuses is not this rule's to trust)
--
-- Returns {miss, blocked, unblocked, alive} ("0"/"1"), then m, f, l, b, p when a state is kept.

local now = tonumber(ARGV[1])
local kind = ARGV[2]
local id = ARGV[3]
local window = tonumber(ARGV[4])

local function fmt(x)
  return string.format('%.17g', x)
end

local function load()
  local v = redis.call('HMGET', KEYS[1], 'm', 'f', 'l', 'b', 'p')
  if not v[1] then
    return nil
  end
  return {m = tonumber(v[1]), f = tonumber(v[2]), l = tonumber(v[3]),
          b = tonumber(v[4]), p = tonumber(v[5])}
end

-- guard.current()
local function current(s)
  if s == nil then
    return nil
  end
  if s.b ~= 0 then
    if now < s.b then
      return s
    end
    return nil
  end
  if now < s.l + window then
    return s
  end
  return nil
end

local function reply(flags, s)
  if s ~= nil then
    table.insert(flags, string.format('%d', s.m))
    table.insert(flags, fmt(s.f))
    table.insert(flags, fmt(s.l))
    table.insert(flags, fmt(s.b))
    table.insert(flags, fmt(s.p))
  end
  return flags
end

-- Relative to the caller's `now`, so a replica's clock need not agree with Redis's.
local function ttl_ms(at)
  return math.max(1, math.ceil((at - now) * 1000))
end

local function keep(s, expires)
  redis.call('HSET', KEYS[1], 'm', string.format('%d', s.m), 'f', fmt(s.f), 'l', fmt(s.l),
             'b', fmt(s.b), 'p', fmt(s.p))
  redis.call('PEXPIRE', KEYS[1], ttl_ms(expires))
end

-- An index lives as long as its longest-lived member, so it expires on its own too.
local function index(idx, score)
  redis.call('ZADD', idx, fmt(score), id)
  local ttl = ttl_ms(score)
  if redis.call('PTTL', idx) < ttl then
    redis.call('PEXPIRE', idx, ttl)
  end
end

local s = load()

if kind == 'ok' then
  -- any 2xx: forget the key (ending a block a probe found), remember it as seen alive
  local was_blocked = s ~= nil and now < s.b
  if s ~= nil then
    redis.call('DEL', KEYS[1])
    redis.call('ZREM', KEYS[3], id)
    redis.call('ZREM', KEYS[4], id)
  end
  redis.call('SET', KEYS[2], ARGV[11], 'PX', ARGV[10])
  return {'0', '0', was_blocked and '1' or '0', '1'}
end

s = current(s)
if kind ~= 'miss' then
  return reply({'0', '0', '0', '0'}, s)
end
if s ~= nil and s.b ~= 0 then
  -- a probe (or a request in flight when the block began) missed: the block stays as it was
  return reply({'1', '0', '0', '0'}, s)
end

local alive = redis.call('GET', KEYS[2]) == ARGV[11]
local misses, first
if s == nil then
  misses, first = 1, now
else
  misses, first = s.m + 1, s.f
end
local threshold
if alive then
  threshold = tonumber(ARGV[6])
else
  threshold = tonumber(ARGV[5])
end

if misses >= threshold and (alive or now - first >= tonumber(ARGV[7])) then
  local blocked = {m = misses, f = first, l = now, b = now + tonumber(ARGV[8]),
                   p = now + tonumber(ARGV[9])}
  keep(blocked, blocked.b)
  redis.call('ZREM', KEYS[3], id)
  index(KEYS[4], blocked.b)
  return reply({'1', '1', '0', '0'}, blocked)
end

local counting = {m = misses, f = first, l = now, b = 0, p = math.huge}
keep(counting, now + window)
redis.call('ZREM', KEYS[4], id)
index(KEYS[3], now + window)
return reply({'1', '0', '0', '0'}, counting)
