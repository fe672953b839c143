#!lua
-- HistoryStore.append on a Redis Cluster, per-user part: the users of one hash slot (service/store.py),
-- atomic. Stores their new events as append.lua does (store_events: dedup, history, seen-set, retention) and returns
-- what the aggregate scripts need, so that the aggregates can live in other slots:
-- {accepted, duplicates, n, n pairs (item, t) of the stored events, then (src, item, t, d) co-visitation
-- pairs}, numbers as strings. The reply is cached under KEYS[KEY.batch] like append.lua's, so a
-- transparent retry after a lost reply gets it again without storing anything twice.
local done = redis.call('GET', KEYS[KEY.batch])
if done then return cjson.decode(done) end
local function user_keys(j)
  return user_key(j, USER.history), user_key(j, USER.seen), user_key(j, USER.event_ids)
end
local err = check_user_keys(USERS, user_keys) or check_type(KEYS[KEY.seq], 'string')
  or check_timestamps(EVENTS, function(i) return event_arg(i, EVENT.timestamp) end)
if err then return redis.error_reply(err) end

local window = tonumber(ARGV[ARG.dedup_window])
local cv_window = tonumber(ARGV[ARG.covisit_window])
local now = tonumber(redis.call('TIME')[1])
local n = EVENTS
local stored_before = {}
if cv_window > 0 then
  for i = 1, n do
    local history = user_key(tonumber(event_arg(i, EVENT.user)), USER.history)
    stored_before[i] = stored_predecessors(history, event_arg(i, EVENT.timestamp), cv_window)
  end
end
local stored = {}  -- (item, t) of every stored event
local event_slots = {
  user = EVENT.user, event_id = EVENT.event_id, timestamp = EVENT.timestamp, item = EVENT.item,
  payload = EVENT.payload,
}
local accepted, dups, new_events = store_events(n, USERS, event_arg, event_slots, user_keys, KEYS[KEY.seq],
  now, tonumber(ARGV[ARG.history_cap]), tonumber(ARGV[ARG.history_ttl_ms]), window, function(item, t)
    stored[#stored + 1] = item
    stored[#stored + 1] = fmt(t)
  end)

local reply = {tostring(accepted), tostring(dups), tostring(#stored / 2)}
for _, v in ipairs(stored) do reply[#reply + 1] = v end
if cv_window > 0 then
  covisit_pairs(new_events, stored_before, cv_window, function(src, item, t, d)
    reply[#reply + 1] = src
    reply[#reply + 1] = item
    reply[#reply + 1] = fmt(t)
    reply[#reply + 1] = tostring(d)
  end)
end
redis.call('SET', KEYS[KEY.batch], cjson.encode(reply), 'EX', tonumber(ARGV[ARG.batch_ttl]))
return reply
