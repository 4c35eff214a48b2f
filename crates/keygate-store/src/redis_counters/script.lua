-- keygate's counters in Redis: one script, four operations (reserve, end, reap, rebuild),
-- each atomic. Every key a call touches shares one hash tag (its shard), declared in KEYS:
--   KEYS[1] the shard's reservations (hash: id -> description, id..':r' -> reply; 'd' = ended)
--   KEYS[2] when each of them is due (sorted set, server microseconds)
--   KEYS[3] the shard's outbox (stream of settled charges, for the ledger)
--   KEYS[4] the shard's ready marker: set once its budgets were rebuilt from the ledger (a
--           server that restarted empty has none, and reservations wait for it)
--   KEYS[5..] the counters of the call, one per charge
-- Common ARGV: op, id, tombstone ms, outbox ('1': on), ready ('1': reserve only once the
-- marker is set).
-- Amounts, limits and period starts arrive as decimal strings; Lua's numbers are doubles,
-- exact below 2^53 (the caller caps limits there). Time is the server's own (TIME).

local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function int(x)
  return string.format('%.0f', x)
end

-- A rate counter as of now: what it holds after draining `limit` every `per` microseconds.
local function rate_state(key, limit, per, now)
  local h = redis.call('HMGET', key, 'u', 't')
  local u = tonumber(h[1]) or 0
  local t = tonumber(h[2]) or now
  if u <= 0 or limit <= 0 then
    return u, now
  end
  local elapsed = now - t
  if elapsed <= 0 then
    return u, t
  end
  local drained = math.floor(elapsed * limit / per)
  if drained >= u then
    return 0, now
  end
  -- Advance only by the time the drained whole units took, keeping the rest.
  return u - drained, t + math.floor(drained * per / limit)
end

local function rate_write(key, u, t, limit, per)
  redis.call('HSET', key, 'u', int(u), 't', int(t))
  -- Empty again after u / limit * per at most: then nothing is lost by forgetting it.
  local ms = math.ceil(per / 1000) + 1000
  if limit > 0 then
    ms = math.ceil(u / limit * per / 1000) + 1000
  end
  redis.call('PEXPIRE', key, ms)
end

-- A budget counter for the period starting at `start`: what it holds and the period it
-- counts (a later one, if another replica's clock ran ahead and moved it on).
local function fixed_state(key, start)
  local h = redis.call('HMGET', key, 'u', 's')
  local s = h[2]
  if not s then
    return 0, start
  end
  if s == start then
    return tonumber(h[1]) or 0, s
  end
  if tonumber(s) < tonumber(start) then
    return 0, start
  end
  return tonumber(h[1]) or 0, s
end

local function fixed_write(key, u, s, keep_ms)
  redis.call('HSET', key, 'u', int(u), 's', s)
  if keep_ms ~= '0' then
    redis.call('PEXPIRE', key, keep_ms)
  end
end

local function tombstone(id, now, tomb_ms)
  redis.call('HSET', KEYS[1], id, 'd')
  redis.call('HDEL', KEYS[1], id .. ':r')
  redis.call('ZADD', KEYS[2], int(now + tomb_ms * 1000), id)
end

-- Up to `max` reservations past their due time: a held one is settled at its reserved
-- amounts (its counters keep them; the outbox gets it), an ended one is forgotten.
local function reap(now, max, outbox, tomb_ms)
  local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', int(now), 'LIMIT', 0, max)
  for _, id in ipairs(due) do
    local v = redis.call('HGET', KEYS[1], id)
    if v and v ~= 'd' then
      if outbox == '1' then
        redis.call('XADD', KEYS[3], '*', 'id', id, 'c', v, 'a', 'held')
      end
      tombstone(id, now, tomb_ms)
    else
      redis.call('HDEL', KEYS[1], id, id .. ':r')
      redis.call('ZREM', KEYS[2], id)
    end
  end
  return #due
end

local op = ARGV[1]
local id = ARGV[2]
local tomb_ms = tonumber(ARGV[3])
local outbox = ARGV[4]
local now = now_us()

if op == 'rebuild' then
  -- ARGV[6] n, ARGV[7] '1' on the last part; per counter: period start (ns), what the
  -- ledger holds for it, how long to keep it (ms, 0: for ever). Never lowers a counter.
  local n = tonumber(ARGV[6])
  for i = 1, n do
    local b = 7 + (i - 1) * 3
    local key = KEYS[4 + i]
    local start, used = ARGV[b + 1], tonumber(ARGV[b + 2])
    local u, s = fixed_state(key, start)
    if s == start and used > u then
      fixed_write(key, used, start, ARGV[b + 3])
    end
  end
  if ARGV[7] == '1' then
    redis.call('SET', KEYS[4], '1')
  end
  return n
end

if op == 'reap' then
  return reap(now, tonumber(ARGV[6]), outbox, tomb_ms)
end
reap(now, 4, outbox, tomb_ms)

if op == 'reserve' then
  -- ARGV[6] ttl ms, ARGV[7] description, ARGV[8] n; per charge: kind, limit, amount, p1, p2
  -- (rate: per in microseconds, unused; budget: period start in ns, how long to keep the
  -- counter in ms, or 0 for ever).
  if ARGV[5] == '1' and redis.call('EXISTS', KEYS[4]) == 0 then
    return {-2}
  end
  local v = redis.call('HGET', KEYS[1], id)
  if v == 'd' then
    return {-1}
  end
  if v then
    -- A retry of a reservation already made: the same answer, no second effect.
    return {1, redis.call('HGET', KEYS[1], id .. ':r')}
  end
  local n = tonumber(ARGV[8])
  for i = 1, n do
    local b = 8 + (i - 1) * 5
    local key = KEYS[4 + i]
    local limit, amount = tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
    local u
    if ARGV[b + 1] == 'r' then
      u = rate_state(key, limit, tonumber(ARGV[b + 4]), now)
    else
      u = fixed_state(key, ARGV[b + 4])
    end
    for j = 1, i - 1 do
      if KEYS[4 + j] == key then
        u = u + tonumber(ARGV[8 + (j - 1) * 5 + 3])
      end
    end
    if u + amount > limit then
      return {0, i - 1, int(u)}
    end
  end
  local reply = {}
  for i = 1, n do
    local b = 8 + (i - 1) * 5
    local key = KEYS[4 + i]
    local limit, amount = tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
    if ARGV[b + 1] == 'r' then
      local per = tonumber(ARGV[b + 4])
      local u, t = rate_state(key, limit, per, now)
      rate_write(key, u + amount, t, limit, per)
      reply[i] = int(u + amount) .. ' -'
    else
      local u, s = fixed_state(key, ARGV[b + 4])
      fixed_write(key, u + amount, s, ARGV[b + 5])
      reply[i] = int(u + amount) .. ' ' .. s
    end
  end
  local r = table.concat(reply, ' ')
  redis.call('HSET', KEYS[1], id, ARGV[7], id .. ':r', r)
  redis.call('ZADD', KEYS[2], int(now + tonumber(ARGV[6]) * 1000), id)
  return {1, r}
end

if op == 'end' then
  -- ARGV[6] description, ARGV[7] actual amounts (JSON; '' for a release), ARGV[8] n; per
  -- charge: kind, limit, held, new, p1 (rate: per in microseconds; budget: period start),
  -- p2 (budget: how long to keep its counter, ms).
  local v = redis.call('HGET', KEYS[1], id)
  if v == 'd' then
    return 0
  end
  -- Ended from now on, also when unknown here (never made, or lost): a reserve of the same
  -- id arriving late has no effect.
  tombstone(id, now, tomb_ms)
  if outbox == '1' and ARGV[7] ~= '' then
    redis.call('XADD', KEYS[3], '*', 'id', id, 'c', ARGV[6], 'a', ARGV[7])
  end
  -- Made, but lost here (the server restarted empty since): nothing is held to give back,
  -- and what it spent is counted now, so the rebuilt counters miss none of it (a release
  -- spent nothing).
  if not v and ARGV[7] == '' then
    return 0
  end
  local n = tonumber(ARGV[8])
  for i = 1, n do
    local b = 8 + (i - 1) * 6
    local key = KEYS[4 + i]
    local limit, new = tonumber(ARGV[b + 2]), tonumber(ARGV[b + 4])
    local held = 0
    if v then
      held = tonumber(ARGV[b + 3])
    end
    if ARGV[b + 1] == 'r' then
      local per = tonumber(ARGV[b + 5])
      local u, t = rate_state(key, limit, per, now)
      rate_write(key, math.max(u - held, 0) + new, t, limit, per)
    else
      -- Spend belongs to the period it was admitted in: once over, nothing to correct.
      local u, s = fixed_state(key, ARGV[b + 5])
      if s == ARGV[b + 5] then
        fixed_write(key, math.max(u - held, 0) + new, s, ARGV[b + 6])
      end
    end
  end
  return 1
end

return redis.error_reply('keygate: unknown operation')
