#!lua
-- HistoryStore.append: one atomic call per batch (service/store.py). KEY, USER, USERS, user_key, ARG,
-- EVENT, EVENTS and event_arg come from the prelude generated from APPEND's layout in service/store.py
-- (see service/lua_scripts.py): KEYS are the fixed keys then one group of keys per user, ARGV the
-- parameters then one group per event.
-- Phase 1 only reads (cached result of a retried call, key types, timestamps) and returns an error before
-- any write, so a rejected batch changes nothing; Redis refuses the whole script up front when it is out
-- of memory (the shebang marks it as a writing script).
-- The co-visitation keys (prefix .. item id) are built here, not declared in KEYS: cross-item keys touched
-- from Lua work on a single Redis (or a primary with replicas) only, not on Redis Cluster for now.
local done = redis.call('GET', KEYS[KEY.batch])
if done then
  local a, d = string.match(done, '(%d+),(%d+)')
  return {tonumber(a), tonumber(d)}
end
local function check_type(key, kind)
  local t = redis.call('TYPE', key).ok
  if t ~= 'none' and t ~= kind then
    return 'WRONGTYPE ' .. key .. ' holds a ' .. t .. '; batch rejected'
  end
end
local user_kinds = {{USER.history, 'zset'}, {USER.seen, 'set'}, {USER.event_ids, 'zset'}}
for j = 1, USERS do
  for _, slot_kind in ipairs(user_kinds) do
    local err = check_type(user_key(j, slot_kind[1]), slot_kind[2])
    if err then return redis.error_reply(err) end
  end
end
local fixed_kinds = {
  {KEY.seq, 'string'}, {KEY.trend, 'zset'}, {KEY.trend_meta, 'hash'}, {KEY.covisit_ref, 'hash'},
  {KEY.fresh, 'zset'}, {KEY.event_items, 'set'},
}
for _, slot_kind in ipairs(fixed_kinds) do
  local err = check_type(KEYS[slot_kind[1]], slot_kind[2])
  if err then return redis.error_reply(err) end
end
local n = EVENTS
for i = 1, n do
  local ts = tonumber(event_arg(i, EVENT.timestamp))
  if not ts or ts ~= ts or ts == math.huge or ts == -math.huge then
    return redis.error_reply('event ' .. (i - 1) .. ': timestamp is not a finite number; batch rejected')
  end
end

local cap = tonumber(ARGV[ARG.history_cap])
local ttl_ms = tonumber(ARGV[ARG.history_ttl_ms])
local half_life = tonumber(ARGV[ARG.half_life])
local window = tonumber(ARGV[ARG.dedup_window])
local max_exp = tonumber(ARGV[ARG.rescale_exponent])
local cv_prefix = ARGV[ARG.covisit_prefix]
local cv_window = tonumber(ARGV[ARG.covisit_window])
local cv_size = tonumber(ARGV[ARG.covisit_size])
local fresh_size = tonumber(ARGV[ARG.fresh_size])
local now = tonumber(redis.call('TIME')[1])

-- Co-visitation, read-only part: each event's stored predecessors (the W latest stored events at or before
-- its timestamp), and the type of every co-visitation key the batch may write.
local stored_before = {}
if cv_window > 0 then
  local cv_checked = {}
  local function check_cv(item)
    if not cv_checked[item] then
      cv_checked[item] = true
      return check_type(cv_prefix .. item, 'zset')
    end
  end
  for i = 1, n do
    local j = tonumber(event_arg(i, EVENT.user))
    local ts_arg, item = event_arg(i, EVENT.timestamp), event_arg(i, EVENT.item)
    local rows = redis.call('ZREVRANGEBYSCORE', user_key(j, USER.history), ts_arg, '-inf', 'WITHSCORES',
      'LIMIT', 0, cv_window)
    local before = {}
    for r = 1, #rows, 2 do
      local prev = cjson.decode(string.sub(rows[r], 17))[1]
      before[#before + 1] = {tonumber(rows[r + 1]), prev}
      local err = check_cv(prev)
      if err then return redis.error_reply(err) end
    end
    stored_before[i] = before
    local err = check_cv(item)
    if err then return redis.error_reply(err) end
  end
end

for j = 1, USERS do
  redis.call('ZREMRANGEBYSCORE', user_key(j, USER.event_ids), '-inf', '(' .. (now - window))
end

-- Forward decay: a weight 2^((t - ref) / half_life) relative to a reference time; when an event is
-- max_exp half-lives past ref, the set's scores are rescaled to a new ref (weights below 1e-12 dropped).
local function rescale(key, old_ref, new_ref)
  local factor = 2 ^ ((old_ref - new_ref) / half_life)
  local entries = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
  local args = {}
  for i = 1, #entries, 2 do
    local s = tonumber(entries[i + 1]) * factor
    if s >= 1e-12 then
      args[#args + 1] = string.format('%.17g', s)
      args[#args + 1] = entries[i]
    else
      redis.call('ZREM', key, entries[i])
    end
    if #args >= 2000 then
      redis.call('ZADD', key, unpack(args))
      args = {}
    end
  end
  if #args > 0 then redis.call('ZADD', key, unpack(args)) end
end

local meta = redis.call('HMGET', KEYS[KEY.trend_meta], 'ref', 'latest')
local ref, latest = tonumber(meta[1]), tonumber(meta[2])
local seq = redis.call('INCRBY', KEYS[KEY.seq], n) - n
local accepted, dups = 0, 0
local touched, with_ids, new_events = {}, {}, {}
local fresh_added = false
for i = 1, n do
  local j, eid = tonumber(event_arg(i, EVENT.user)), event_arg(i, EVENT.event_id)
  local ts_arg, item = event_arg(i, EVENT.timestamp), event_arg(i, EVENT.item)
  local new = true
  if eid ~= '' then
    new = redis.call('ZADD', user_key(j, USER.event_ids), 'NX', now, eid) == 1
    with_ids[j] = true
  end
  if new then
    accepted = accepted + 1
    seq = seq + 1
    redis.call('ZADD', user_key(j, USER.history), ts_arg,
      string.format('%016x', seq) .. event_arg(i, EVENT.payload))
    redis.call('SADD', user_key(j, USER.seen), item)
    touched[j] = true
    -- trending is about now: a timestamp from a skewed clock must not outweigh every real event
    local ts = math.min(tonumber(ts_arg), now + 3600)
    if ref == nil then ref, latest = ts, ts end
    if ts > latest then latest = ts end
    if (ts - ref) / half_life > max_exp then
      rescale(KEYS[KEY.trend], ref, ts)
      ref = ts
    end
    local w = 2 ^ ((ts - ref) / half_life)
    if w > 0 then redis.call('ZINCRBY', KEYS[KEY.trend], string.format('%.17g', w), item) end
    -- fresh items: the first event ever of an item (time first seen = its timestamp)
    if redis.call('SADD', KEYS[KEY.event_items], item) == 1 then
      redis.call('ZADD', KEYS[KEY.fresh], 'NX', string.format('%.17g', ts), item)
      fresh_added = true
    end
    local list = new_events[j]
    if not list then
      list = {}
      new_events[j] = list
    end
    list[#list + 1] = {tonumber(ts_arg), i, item, ts}
  else
    dups = dups + 1
  end
end

-- Co-visitation: for each new event (item i at t), each of the user's W previous events (item j, the d-th
-- before it in time order) adds 2^((t - ref_j) / half_life) / d to member i of j's set. New events of one
-- user are taken in time order, whatever their order in the batch.
if cv_window > 0 then
  local refs, cv_touched = {}, {}
  local function cv_add(src, item, t, weight_div)
    local key = cv_prefix .. src
    local r = refs[src]
    if r == nil then
      r = tonumber(redis.call('HGET', KEYS[KEY.covisit_ref], src)) or t
    end
    if (t - r) / half_life > max_exp then
      rescale(key, r, t)
      r = t
    end
    refs[src] = r
    local w = 2 ^ ((t - r) / half_life) / weight_div
    if w > 0 then
      redis.call('ZINCRBY', key, string.format('%.17g', w), item)
      cv_touched[src] = true
    end
  end
  for _, list in pairs(new_events) do
    table.sort(list, function(a, b)
      if a[1] ~= b[1] then return a[1] < b[1] end
      return a[2] < b[2]
    end)
    for p = 1, #list do
      local e = list[p]
      local before = stored_before[e[2]]
      -- merge, newest first: earlier new events of the batch (list[p-1], ...) and the stored ones; at
      -- equal timestamps the batch's events are the later arrivals
      local q, s, d = p - 1, 1, 0
      local used = {[e[3]] = true}
      while d < cv_window and (q >= 1 or s <= #before) do
        local prev
        if q >= 1 and (s > #before or list[q][1] >= before[s][1]) then
          prev = list[q][3]
          q = q - 1
        else
          prev = before[s][2]
          s = s + 1
        end
        d = d + 1
        if not used[prev] then
          used[prev] = true
          cv_add(prev, e[3], e[4], d)
        end
      end
    end
  end
  local ref_args = {}
  for src in pairs(cv_touched) do
    redis.call('ZREMRANGEBYRANK', cv_prefix .. src, 0, -(cv_size + 1))
    ref_args[#ref_args + 1] = src
    ref_args[#ref_args + 1] = string.format('%.17g', refs[src])
    if #ref_args >= 2000 then
      redis.call('HSET', KEYS[KEY.covisit_ref], unpack(ref_args))
      ref_args = {}
    end
  end
  if #ref_args > 0 then redis.call('HSET', KEYS[KEY.covisit_ref], unpack(ref_args)) end
end

if fresh_added then
  redis.call('ZREMRANGEBYRANK', KEYS[KEY.fresh], 0, -(fresh_size + 1))
end
-- retention: a user's keys expire ttl_ms after their last stored event (0: kept); the event ids live at
-- most the dedup window, and no longer than the history they deduplicate
for j in pairs(touched) do
  redis.call('ZREMRANGEBYRANK', user_key(j, USER.history), 0, -(cap + 1))
  if ttl_ms > 0 then
    redis.call('PEXPIRE', user_key(j, USER.history), ttl_ms)
    redis.call('PEXPIRE', user_key(j, USER.seen), ttl_ms)
  end
end
local ids_ttl_ms = window * 1000
if ttl_ms > 0 and ttl_ms < ids_ttl_ms then ids_ttl_ms = ttl_ms end
for j in pairs(with_ids) do
  if touched[j] then redis.call('PEXPIRE', user_key(j, USER.event_ids), ids_ttl_ms) end
end
if ref ~= nil then
  redis.call('HSET', KEYS[KEY.trend_meta], 'ref', string.format('%.17g', ref), 'latest',
    string.format('%.17g', latest))
end
redis.call('SET', KEYS[KEY.batch], accepted .. ',' .. dups, 'EX', tonumber(ARGV[ARG.batch_ttl]))
return {accepted, dups}
