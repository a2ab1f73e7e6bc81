/* flow_cache_shared.c - a flow cache in a named hugepage memzone, for the
 * worker processes of one balancer (pylb/lanes.py): the cache itself holds no
 * pointers, so each process attaches its own handle to the same memory. */
#include <stdio.h>
#include <rte_errno.h>
#include <rte_memzone.h>
#include "internal.h"

#define FC_LINE 64u

/* The memzone's name for a shared cache's name, once the call may go on. */
static int zone_name(char *out, size_t size, const char *name, struct pylb_flow_cache **cache)
{
    if (name == NULL || name[0] == '\0' || strlen(name) + 3 >= size)
        return pylb_fail(PYLB_EINVAL, "shared flow cache: name of 1 to %zu characters required",
                         size - 4);
    if (cache == NULL || !pylb_eal_running())
        return pylb_fail(PYLB_ESTATE, "shared flow cache: start the EAL first");
    snprintf(out, size, "fc_%s", name);
    return PYLB_OK;
}

PYLB_API int pylb_flow_cache_create_shared(const char *name, uint64_t capacity,
                                           const uint32_t timeouts_ms[4],
                                           struct pylb_flow_cache **out)
{
    char zname[RTE_MEMZONE_NAMESIZE];
    int rc = zone_name(zname, sizeof(zname), name, out);
    if (rc != PYLB_OK)
        return rc;
    size_t len = pylb_flow_cache_footprint(capacity);
    if (len == 0)
        return pylb_fail(PYLB_EINVAL, "shared flow cache: capacity %llu out of range",
                         (unsigned long long)capacity);
    const struct rte_memzone *mz = rte_memzone_reserve_aligned(zname, len, SOCKET_ID_ANY, 0,
                                                               FC_LINE);
    if (mz == NULL)
        return pylb_fail(PYLB_ENOMEM, "shared flow cache %s: %zu bytes: %s", name, len,
                         rte_strerror(rte_errno));
    struct pylb_flow_cache *c;
    rc = pylb_flow_cache_attach(mz->addr, len, capacity, 1, timeouts_ms, &c);
    if (rc != PYLB_OK) {
        rte_memzone_free(mz);
        return rc;
    }
    *out = c;
    return PYLB_OK;
}

PYLB_API int pylb_flow_cache_attach_shared(const char *name, uint64_t capacity,
                                           struct pylb_flow_cache **out)
{
    char zname[RTE_MEMZONE_NAMESIZE];
    int rc = zone_name(zname, sizeof(zname), name, out);
    if (rc != PYLB_OK)
        return rc;
    const struct rte_memzone *mz = rte_memzone_lookup(zname);
    if (mz == NULL)
        return pylb_fail(PYLB_ENOTFOUND, "shared flow cache %s: not found (is the primary "
                         "running?)", name);
    return pylb_flow_cache_attach(mz->addr, mz->len, capacity, 0, NULL, out);
}

PYLB_API void pylb_flow_cache_free_shared(const char *name)
{
    char zname[RTE_MEMZONE_NAMESIZE];
    struct pylb_flow_cache *unused;
    if (zone_name(zname, sizeof(zname), name, &unused) == PYLB_OK)
        rte_memzone_free(rte_memzone_lookup(zname));
}
