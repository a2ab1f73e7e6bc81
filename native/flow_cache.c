/* flow_cache.c - placeholder until implemented. */
#include "internal.h"
PYLB_API size_t pylb_flow_cache_footprint(uint64_t capacity) { return 0; }
PYLB_API int pylb_flow_cache_attach(void *mem, size_t len, uint64_t capacity, int init,
                           const uint32_t timeouts_ms[4], struct pylb_flow_cache **out)
{ return pylb_fail(PYLB_EINVAL, "flow_cache: not implemented"); }
PYLB_API int pylb_flow_cache_create(uint64_t capacity, const uint32_t timeouts_ms[4], struct pylb_flow_cache **out)
{ return pylb_fail(PYLB_EINVAL, "flow_cache: not implemented"); }
PYLB_API void pylb_flow_cache_destroy(struct pylb_flow_cache *c) {}
PYLB_API int pylb_flow_cache_set_timeouts(struct pylb_flow_cache *c, const uint32_t timeouts_ms[4]) { return PYLB_EINVAL; }
PYLB_API int pylb_flow_cache_lookup(struct pylb_flow_cache *c, const struct pylb_flow_key *key,
                           uint64_t flow_id, uint32_t now_ms, uint8_t tcp_flags, uint32_t *backend) { return 0; }
PYLB_API int pylb_flow_cache_insert(struct pylb_flow_cache *c, const struct pylb_flow_key *key,
                           uint64_t flow_id, uint32_t backend, uint32_t now_ms, uint8_t timeout_class) { return PYLB_EFULL; }
PYLB_API int pylb_flow_cache_remove(struct pylb_flow_cache *c, const struct pylb_flow_key *key, uint64_t flow_id) { return PYLB_ENOTFOUND; }
PYLB_API uint64_t pylb_flow_cache_age(struct pylb_flow_cache *c, uint32_t now_ms, uint64_t max_sets) { return 0; }
PYLB_API uint64_t pylb_flow_cache_count(struct pylb_flow_cache *c, uint32_t now_ms) { return 0; }
PYLB_API uint64_t pylb_flow_cache_capacity(const struct pylb_flow_cache *c) { return 0; }
