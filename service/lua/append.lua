#!lua
-- HistoryStore.append on a single Redis: one atomic call per batch (service/store.py). KEY, USER, USERS,
-- user_key, ARG, EVENT, EVENTS and event_arg come from the prelude generated from APPEND's layout in
-- service/store.py (see service/lua_scripts.py): KEYS are the fixed keys then one group of keys per user,
-- ARGV the parameters then one group per event. check_type, add_trending, ... are lib_aggregates.lua's.
-- Phase 1 only reads (cached result of a retried call, key types, timestamps) and returns an error before
-- any write, so a rejected batch changes nothing; Redis refuses the whole script up front when it is out
-- of memory (the shebang marks it as a writing script).
-- The co-visitation keys (prefix .. item id) are built here, not declared in KEYS, which a single Redis
-- allows; on a Redis Cluster append_users.lua, aggregate_shard.lua and covisit_apply.lua split this work.
local done = redis.call('GET', KEYS[KEY.batch])
if done then
  local a, d = string.match(done, '(%d+),(%d+)')
  return {tonumber(a), tonumber(d)}
end
local function user_keys(j)
  return user_key(j, USER.history), user_key(j, USER.seen), user_key(j, USER.event_ids)
end
local err = check_user_keys(USERS, user_keys)
if err then return redis.error_reply(err) end
local fixed_kinds = {
  {KEY.seq, 'string'}, {KEY.trend, 'zset'}, {KEY.trend_meta, 'hash'}, {KEY.covisit_ref, 'hash'},
  {KEY.fresh, 'zset'}, {KEY.event_items, 'set'},
}
for _, slot_kind in ipairs(fixed_kinds) do
  local err = check_type(KEYS[slot_kind[1]], slot_kind[2])
  if err then return redis.error_reply(err) end
end
local n = EVENTS
err = check_timestamps(n, function(i) return event_arg(i, EVENT.timestamp) end)
if err then return redis.error_reply(err) end

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

-- Co-visitation, read-only part: each event's stored predecessors, and the type of every co-visitation
-- key the batch may write.
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
    local before = stored_predecessors(user_key(j, USER.history), event_arg(i, EVENT.timestamp), cv_window)
    for _, row in ipairs(before) do
      local err = check_cv(row[2])
      if err then return redis.error_reply(err) end
    end
    stored_before[i] = before
    local err = check_cv(event_arg(i, EVENT.item))
    if err then return redis.error_reply(err) end
  end
end

local meta = redis.call('HMGET', KEYS[KEY.trend_meta], 'ref', 'latest')
local trend = {ref = tonumber(meta[1]), latest = tonumber(meta[2])}
local fresh_added = false
local event_slots = {
  user = EVENT.user, event_id = EVENT.event_id, timestamp = EVENT.timestamp, item = EVENT.item,
  payload = EVENT.payload,
}
local accepted, dups, new_events = store_events(n, USERS, event_arg, event_slots, user_keys, KEYS[KEY.seq],
  now, cap, ttl_ms, window, function(item, t)
    add_trending(KEYS[KEY.trend], trend, item, t, half_life, max_exp)
    if mark_seen_item(KEYS[KEY.event_items], KEYS[KEY.fresh], item, t) then fresh_added = true end
  end)

-- Co-visitation: each pair (src, item, t, d) adds 2^((t - ref_src) / half_life) / d to member item of
-- src's set.
if cv_window > 0 then
  local refs, cv_touched = {}, {}
  covisit_pairs(new_events, stored_before, cv_window, function(src, item, t, d)
    local r = refs[src]
    if r == nil then r = tonumber(redis.call('HGET', KEYS[KEY.covisit_ref], src)) end
    local added
    refs[src], added = add_covisit(cv_prefix .. src, r, item, t, d, half_life, max_exp)
    if added then cv_touched[src] = true end
  end)
  local ref_args = {}
  for src in pairs(cv_touched) do
    redis.call('ZREMRANGEBYRANK', cv_prefix .. src, 0, -(cv_size + 1))
    ref_args[#ref_args + 1] = src
    ref_args[#ref_args + 1] = fmt(refs[src])
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
if trend.ref ~= nil then
  redis.call('HSET', KEYS[KEY.trend_meta], 'ref', fmt(trend.ref), 'latest', fmt(trend.latest))
end
redis.call('SET', KEYS[KEY.batch], accepted .. ',' .. dups, 'EX', tonumber(ARGV[ARG.batch_ttl]))
return {accepted, dups}
