-- Forget a blocked key (the admin API's unblock); 0 if it was not blocked as of now.
--
-- KEYS[1]  the key's state hash (see record.lua)
-- KEYS[2]  the rule's blocked index
-- ARGV[1]  now (the caller's clock), ARGV[2] the task id

local b = tonumber(redis.call('HGET', KEYS[1], 'b') or '0')
if b == 0 or not (tonumber(ARGV[1]) < b) then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[2])
return 1
