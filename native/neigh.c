/* neigh.c */
#include "internal.h"
PYLB_API int pylb_neigh_create(uint32_t capacity, struct pylb_neigh **out)
{ return pylb_fail(PYLB_EINVAL, "pylb_neigh_create: not implemented"); }

PYLB_API void pylb_neigh_destroy(struct pylb_neigh *n)
{}

PYLB_API int pylb_neigh_set_static(struct pylb_neigh *n, const struct pylb_ip *ip, const uint8_t mac[6])
{ return pylb_fail(PYLB_EINVAL, "pylb_neigh_set_static: not implemented"); }

PYLB_API int pylb_neigh_lookup(struct pylb_neigh *n, const struct pylb_ip *ip, uint8_t mac[6])
{ return pylb_fail(PYLB_EINVAL, "pylb_neigh_lookup: not implemented"); }
