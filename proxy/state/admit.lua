-- guard.admit() for one key, atomically. The probe slot is taken here, so of all
-- replicas and workers exactly one request per probe_every goes through to re-check.
--
-- KEYS[1]  the key's state hash {m, f, l, b, p} (see record.lua)
-- KEYS[2]  the key's seen-alive flag (see record.lua)
-- ARGV[1]  now (the caller's clock, seconds)
-- ARGV[2]  probe_every in seconds, "inf" when off
-- ARGV[3]  the rule's scope tag (a flag set under another scope is none)
--
-- Returns {"forward", counted, alive} | {"block", blocked_until, next_probe}
--       | {"probe", blocked_until, next_probe}
-- where counted is "1" when the key has a state hash at all (a 2xx must then reach
-- record.lua to reset it), "0" when there is nothing a 2xx could reset; alive is "1"
-- when the key's seen-alive flag is set (a 2xx need not set it again: after Redis
-- lost its data, it must).

local now = tonumber(ARGV[1])
local v = redis.call('HMGET', KEYS[1], 'b', 'p', 'm')
local b = tonumber(v[1] or '0')

-- guard.current(): a finished block leaves nothing behind; a mere count is never blocked
if b == 0 or not (now < b) then
  local alive = redis.call('GET', KEYS[2]) == ARGV[3]
  return {'forward', v[3] and '1' or '0', alive and '1' or '0'}
end

local p = tonumber(v[2])
if now >= p then
  p = now + tonumber(ARGV[2])
  redis.call('HSET', KEYS[1], 'p', string.format('%.17g', p))
  return {'probe', string.format('%.17g', b), string.format('%.17g', p)}
end
return {'block', string.format('%.17g', b), string.format('%.17g', p)}
