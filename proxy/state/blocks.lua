-- The admin API's listing: misses and blocked_until of many keys in one reply.
-- One string, not an array of arrays: redis-py parses each reply element in Python,
-- and 100,000 blocked keys cost seconds that way.
--
-- KEYS     the keys' state hashes (see record.lua), all of one rule
-- Returns  "m b" for each key in order ("- -" for a key gone meanwhile), lines joined by "\n"

local out = {}
for i, key in ipairs(KEYS) do
  local v = redis.call('HMGET', key, 'm', 'b')
  out[i] = (v[1] or '-') .. ' ' .. (v[2] or '-')
end
return table.concat(out, '\n')
