-- keygate's request rates in Redis: GCRA with a burst of the whole quota, all of one
-- request's cells at once or none. Every key shares the request's hash tag (its shard).
--   KEYS[i]           cell i: its theoretical arrival time (server microseconds)
--   ARGV[2i-1], [2i]  cell i's emission interval (microseconds) and its limit (per minute)
-- Time is the server's own (TIME), so replicas' clocks do not matter.
-- Reply: {1, tightest cell, remaining, reset µs} admitted, or
--        {0, refusing cell, reset µs, retry after µs} refused (nothing written).

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local news = {}
local best, best_left, best_reset = 0, -1, 0
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i - 1])
  local cap = interval * tonumber(ARGV[2 * i])
  local base = math.max(tonumber(redis.call('GET', KEYS[i]) or '0') or 0, now)
  local ahead = base + interval - now
  if ahead > cap then
    return {0, i, base - now, ahead - cap}
  end
  news[i] = base + interval
  local left = math.floor((cap - ahead) / interval)
  if best_left < 0 or left < best_left then
    best, best_left, best_reset = i, left, ahead
  end
end
for i = 1, #KEYS do
  -- Back at full capacity when it expires: nothing is lost by forgetting it then.
  redis.call('SET', KEYS[i], string.format('%.0f', news[i]), 'PX',
    math.ceil((news[i] - now) / 1000) + 1)
end
return {1, best, best_left, best_reset}
