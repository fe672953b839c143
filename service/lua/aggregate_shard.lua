#!lua
-- HistoryStore.append on a Redis Cluster: one shard of the item aggregates (trending, the items seen in
-- events, fresh items; service/store.py picks an item's shard), for the stored events of its items that
-- append_users.lua returned. Checks every key's type before the first write.
local err = check_type(KEYS[KEY.trend], 'zset') or check_type(KEYS[KEY.trend_meta], 'hash')
  or check_type(KEYS[KEY.fresh], 'zset') or check_type(KEYS[KEY.event_items], 'set')
if err then return redis.error_reply(err) end
local half_life = tonumber(ARGV[ARG.half_life])
local max_exp = tonumber(ARGV[ARG.rescale_exponent])
local meta = redis.call('HMGET', KEYS[KEY.trend_meta], 'ref', 'latest')
local trend = {ref = tonumber(meta[1]), latest = tonumber(meta[2])}
local fresh_added = false
for i = 1, EVENTS do
  local item, ts = event_arg(i, EVENT.item), tonumber(event_arg(i, EVENT.ts))
  add_trending(KEYS[KEY.trend], trend, item, ts, half_life, max_exp)
  if mark_seen_item(KEYS[KEY.event_items], KEYS[KEY.fresh], item, ts) then fresh_added = true end
end
if fresh_added then
  redis.call('ZREMRANGEBYRANK', KEYS[KEY.fresh], 0, -(tonumber(ARGV[ARG.fresh_size]) + 1))
end
if trend.ref ~= nil then
  redis.call('HSET', KEYS[KEY.trend_meta], 'ref', fmt(trend.ref), 'latest', fmt(trend.latest))
end
return EVENTS
