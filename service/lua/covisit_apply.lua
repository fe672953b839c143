#!lua
-- HistoryStore.append on a Redis Cluster: the co-visitation pairs (src, item, t, d) of source items that
-- share one hash slot, as append_users.lua returned them (service/store.py groups them). Each source has
-- its set and its reference time (a string key) in KEYS; a pair names its source by group number.
for j = 1, SOURCES do
  local err = check_type(source_key(j, SOURCE.covisit), 'zset')
    or check_type(source_key(j, SOURCE.covisit_ref), 'string')
  if err then return redis.error_reply(err) end
end
local half_life = tonumber(ARGV[ARG.half_life])
local max_exp = tonumber(ARGV[ARG.rescale_exponent])
local refs, touched = {}, {}
for p = 1, PAIRS do
  local j = tonumber(pair_arg(p, PAIR.source))
  local r = refs[j]
  if r == nil then r = tonumber(redis.call('GET', source_key(j, SOURCE.covisit_ref))) end
  local added
  refs[j], added = add_covisit(source_key(j, SOURCE.covisit), r, pair_arg(p, PAIR.item),
    tonumber(pair_arg(p, PAIR.t)), tonumber(pair_arg(p, PAIR.d)), half_life, max_exp)
  if added then touched[j] = true end
end
local size = tonumber(ARGV[ARG.covisit_size])
for j in pairs(touched) do
  redis.call('ZREMRANGEBYRANK', source_key(j, SOURCE.covisit), 0, -(size + 1))
  redis.call('SET', source_key(j, SOURCE.covisit_ref), fmt(refs[j]))
end
return PAIRS
