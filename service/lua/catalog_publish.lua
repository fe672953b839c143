#!lua
-- CatalogSync.publish: one atomic publication (service/catalog_sync.py). KEY, ARG, ITEM, ITEMS and
-- item_arg come from the prelude generated from PUBLISH's layout in service/catalog_sync.py (see
-- service/lua_scripts.py). The epoch is set with the log's first revision only.
if redis.call('EXISTS', KEYS[KEY.epoch]) == 0 then redis.call('SET', KEYS[KEY.epoch], ARGV[ARG.epoch]) end
local rev = redis.call('INCR', KEYS[KEY.revision])
for i = 1, ITEMS do
  local item = item_arg(i, ITEM.id)
  redis.call('HSET', KEYS[KEY.items], item, item_arg(i, ITEM.blob))
  redis.call('ZADD', KEYS[KEY.log], rev, item)
end
return rev
