/* neigh.c - next hops' MAC addresses: static overrides and what ARP / NDP
 * taught. One table per worker process, written and read by that process's
 * worker thread only, so it needs no atomics. */
#include <stdlib.h>
#include "neigh.h"

static uint32_t ip_hash(const struct pylb_ip *ip)
{
    uint64_t a, b;
    memcpy(&a, ip->b, 8);
    memcpy(&b, ip->b + 8, 8);
    uint64_t h = (a ^ (b * 0x9E3779B97F4A7C15ull)) * 0xBF58476D1CE4E5B9ull;
    return (uint32_t)(h >> 32);
}

PYLB_API int pylb_neigh_create(uint32_t capacity, struct pylb_neigh **out)
{
    if (out == NULL || capacity == 0 || capacity > (1u << 20))
        return pylb_fail(PYLB_EINVAL, "neighbour table: capacity must be 1..1048576");
    uint32_t size = 2;
    while (size < capacity * 2)
        size <<= 1;
    struct pylb_neigh *n = calloc(1, sizeof(*n));
    if (n)
        n->entries = calloc(size, sizeof(struct neigh_entry));
    if (n == NULL || n->entries == NULL) {
        free(n);
        return pylb_fail(PYLB_ENOMEM, "neighbour table: out of memory");
    }
    n->mask = size - 1;
    n->gen = 1;
    *out = n;
    return PYLB_OK;
}

PYLB_API void pylb_neigh_destroy(struct pylb_neigh *n)
{
    if (n) {
        free(n->entries);
        free(n);
    }
}

struct neigh_entry *neigh_slot(struct pylb_neigh *n, const struct pylb_ip *ip, int create)
{
    uint32_t i = ip_hash(ip) & n->mask;
    for (uint32_t probes = 0; probes <= n->mask; probes++, i = (i + 1) & n->mask) {
        struct neigh_entry *e = &n->entries[i];
        if (e->state == NEIGH_EMPTY) {
            if (!create)
                return NULL;
            /* Keep half the table free so probes stay short and always end. */
            if (probes > n->mask / 2)
                return NULL;
            e->ip = *ip;
            e->state = NEIGH_PENDING;
            return e;
        }
        if (pylb_ip_eq(&e->ip, ip))
            return e;
    }
    return NULL;
}

int neigh_learn(struct pylb_neigh *n, const struct pylb_ip *ip, const uint8_t mac[6], int create)
{
    struct neigh_entry *e = neigh_slot(n, ip, create);
    if (e == NULL || e->state == NEIGH_STATIC)
        return 0;
    memcpy(e->mac, mac, 6);
    e->state = NEIGH_DYNAMIC;
    n->gen++;
    return 1;
}

PYLB_API int pylb_neigh_set_static(struct pylb_neigh *n, const struct pylb_ip *ip, const uint8_t mac[6])
{
    struct neigh_entry *e = neigh_slot(n, ip, 1);
    if (e == NULL)
        return pylb_fail(PYLB_EFULL, "neighbour table is full");
    memcpy(e->mac, mac, 6);
    e->state = NEIGH_STATIC;
    n->gen++;
    return PYLB_OK;
}

PYLB_API int pylb_neigh_learn(struct pylb_neigh *n, const struct pylb_ip *ip, const uint8_t mac[6])
{
    struct neigh_entry *e = neigh_slot(n, ip, 1);
    if (e == NULL)
        return pylb_fail(PYLB_EFULL, "neighbour table is full");
    if (e->state == NEIGH_DYNAMIC && memcmp(e->mac, mac, 6) == 0)
        return PYLB_OK;     /* unchanged: workers keep their prepared headers */
    neigh_learn(n, ip, mac, 1);
    return PYLB_OK;
}

PYLB_API int pylb_neigh_lookup(struct pylb_neigh *n, const struct pylb_ip *ip, uint8_t mac[6])
{
    struct neigh_entry *e = neigh_slot(n, ip, 0);
    if (e == NULL || e->state < NEIGH_DYNAMIC)
        return 0;
    memcpy(mac, e->mac, 6);
    return 1;
}
