-- Functions shared by the append scripts: append.lua (a single Redis, one script per batch) and, on a
-- Redis Cluster, append_users.lua, aggregate_shard.lua and covisit_apply.lua (service/store.py says which
-- runs where). LuaScript inserts this file after the generated prelude (service/lua_scripts.py).

local function check_type(key, kind)
  local t = redis.call('TYPE', key).ok
  if t ~= 'none' and t ~= kind then
    return 'WRONGTYPE ' .. key .. ' holds a ' .. t .. '; batch rejected'
  end
end

local function fmt(x) return string.format('%.17g', x) end

-- Forward decay: a weight 2^((t - ref) / half_life) relative to a reference time; when an event is
-- max_exp half-lives past ref, the set's scores are rescaled to a new ref (weights below 1e-12 dropped).
local function rescale(key, old_ref, new_ref, half_life)
  local factor = 2 ^ ((old_ref - new_ref) / half_life)
  local entries = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
  local args = {}
  for i = 1, #entries, 2 do
    local s = tonumber(entries[i + 1]) * factor
    if s >= 1e-12 then
      args[#args + 1] = fmt(s)
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

-- One event of item at ts into the trending set `key`; state holds the meta hash's ref and latest (nil
-- before the first event) and is updated in place.
local function add_trending(key, state, item, ts, half_life, max_exp)
  if state.ref == nil then state.ref, state.latest = ts, ts end
  if ts > state.latest then state.latest = ts end
  if (ts - state.ref) / half_life > max_exp then
    rescale(key, state.ref, ts, half_life)
    state.ref = ts
  end
  local w = 2 ^ ((ts - state.ref) / half_life)
  if w > 0 then redis.call('ZINCRBY', key, fmt(w), item) end
end

-- An item's first event ever makes it fresh (time first seen = ts); true if it did.
local function mark_seen_item(event_items_key, fresh_key, item, ts)
  if redis.call('SADD', event_items_key, item) == 1 then
    redis.call('ZADD', fresh_key, 'NX', fmt(ts), item)
    return true
  end
  return false
end

-- The user's W latest stored events at or before ts_arg, newest first, as {timestamp, item}.
local function stored_predecessors(history_key, ts_arg, cv_window)
  local rows = redis.call('ZREVRANGEBYSCORE', history_key, ts_arg, '-inf', 'WITHSCORES', 'LIMIT', 0, cv_window)
  local before = {}
  for r = 1, #rows, 2 do
    before[#before + 1] = {tonumber(rows[r + 1]), cjson.decode(string.sub(rows[r], 17))[1]}
  end
  return before
end

-- Co-visitation pairs: for each new event (item at t), each of the user's W previous events (item src, the
-- d-th before it in time order) gives emit(src, item, t, d). new_events: per user, a list of
-- {timestamp, batch position, item, t}; stored_before: batch position → stored_predecessors. New events of
-- one user are taken in time order, whatever their order in the batch; at equal timestamps the batch's
-- events are the later arrivals.
local function covisit_pairs(new_events, stored_before, cv_window, emit)
  for _, list in pairs(new_events) do
    table.sort(list, function(a, b)
      if a[1] ~= b[1] then return a[1] < b[1] end
      return a[2] < b[2]
    end)
    for p = 1, #list do
      local e = list[p]
      local before = stored_before[e[2]]
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
          emit(prev, e[3], e[4], d)
        end
      end
    end
  end
end

-- Adds 2^((t - ref) / half_life) / d to member item of the co-visitation set `key` (ref nil: t); returns
-- the set's reference time afterwards and whether anything was added.
local function add_covisit(key, ref, item, t, d, half_life, max_exp)
  if ref == nil then ref = t end
  if (t - ref) / half_life > max_exp then
    rescale(key, ref, t, half_life)
    ref = t
  end
  local w = 2 ^ ((t - ref) / half_life) / d
  if w > 0 then
    redis.call('ZINCRBY', key, fmt(w), item)
    return ref, true
  end
  return ref, false
end

-- Per-user part. key_of(j) gives user j's history, seen and event_ids keys.
local function check_user_keys(users, key_of)
  for j = 1, users do
    local history, seen, event_ids = key_of(j)
    for _, key_kind in ipairs({{history, 'zset'}, {seen, 'set'}, {event_ids, 'zset'}}) do
      local err = check_type(key_kind[1], key_kind[2])
      if err then return err end
    end
  end
end

local function check_timestamps(events, ts_of)
  for i = 1, events do
    local ts = tonumber(ts_of(i))
    if not ts or ts ~= ts or ts == math.huge or ts == -math.huge then
      return 'event ' .. (i - 1) .. ': timestamp is not a finite number; batch rejected'
    end
  end
end

-- Retention: a touched user's history is capped; with ttl_ms > 0 their keys expire ttl_ms after their last
-- stored event; the event ids live at most the dedup window, and no longer than the history they dedup.
local function retain(touched, with_ids, key_of, cap, ttl_ms, window)
  local ids_ttl_ms = window * 1000
  if ttl_ms > 0 and ttl_ms < ids_ttl_ms then ids_ttl_ms = ttl_ms end
  for j in pairs(touched) do
    local history, seen, event_ids = key_of(j)
    redis.call('ZREMRANGEBYRANK', history, 0, -(cap + 1))
    if ttl_ms > 0 then
      redis.call('PEXPIRE', history, ttl_ms)
      redis.call('PEXPIRE', seen, ttl_ms)
    end
    if with_ids[j] then redis.call('PEXPIRE', event_ids, ids_ttl_ms) end
  end
end

-- The per-user part of an append, shared by append.lua and append_users.lua. Prunes each user's event ids
-- past the dedup window, then stores every event whose id ('' for none) is new for its user: arg(i, slot)
-- reads event i's ARGV slot, and slots names the script's user, event_id, timestamp, item and payload
-- slots. A history member is 16 hex digits of a
-- number from the counter seq_key, then the payload. Applies retention at the end. For each stored event,
-- on_stored(item, t) is called with t its timestamp capped at now + 1 h (the aggregates are about now: a
-- skewed clock must not outweigh every real event). Returns accepted, duplicates and new_events (per
-- user, {timestamp, batch position, item, t}: covisit_pairs' input).
local function store_events(n, users, arg, slots, user_keys, seq_key, now, cap, ttl_ms, window, on_stored)
  for j = 1, users do
    local _, _, event_ids = user_keys(j)
    redis.call('ZREMRANGEBYSCORE', event_ids, '-inf', '(' .. (now - window))
  end
  local seq = redis.call('INCRBY', seq_key, n) - n
  local accepted, dups, touched, with_ids, new_events = 0, 0, {}, {}, {}
  for i = 1, n do
    local j, eid = tonumber(arg(i, slots.user)), arg(i, slots.event_id)
    local ts_arg, item = arg(i, slots.timestamp), arg(i, slots.item)
    local history, seen, event_ids = user_keys(j)
    if eid ~= '' then with_ids[j] = true end
    if eid == '' or redis.call('ZADD', event_ids, 'NX', now, eid) == 1 then
      accepted, seq, touched[j] = accepted + 1, seq + 1, true
      redis.call('ZADD', history, ts_arg, string.format('%016x', seq) .. arg(i, slots.payload))
      redis.call('SADD', seen, item)
      local t = math.min(tonumber(ts_arg), now + 3600)
      local list = new_events[j]
      if not list then
        list = {}
        new_events[j] = list
      end
      list[#list + 1] = {tonumber(ts_arg), i, item, t}
      on_stored(item, t)
    else
      dups = dups + 1
    end
  end
  retain(touched, with_ids, user_keys, cap, ttl_ms, window)
  return accepted, dups, new_events
end
