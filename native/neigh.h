/* neigh.h - the next-hop table inside the worker's process. */
#ifndef PYLB_NEIGH_H
#define PYLB_NEIGH_H

#include "internal.h"

enum neigh_state { NEIGH_EMPTY = 0, NEIGH_PENDING = 1, NEIGH_DYNAMIC = 2, NEIGH_STATIC = 3 };

struct neigh_entry {
    struct pylb_ip ip;
    uint8_t mac[6];
    uint8_t state;
    uint8_t pad;
    uint32_t last_request_ms;   /* rate-limits ARP requests / solicitations */
};

struct pylb_neigh {
    uint32_t mask;
    struct neigh_entry *entries;
    /* Changes whenever a MAC is learnt or set: workers keep each backend's
     * next-hop MAC and look it up again only when this moved. Starts at 1. */
    uint64_t gen;
};

/* The entry for ip, created PENDING if absent; NULL when the table is full. */
struct neigh_entry *neigh_slot(struct pylb_neigh *n, const struct pylb_ip *ip, int create);
/* Records a MAC learnt from the wire; static entries keep theirs. */
int neigh_learn(struct pylb_neigh *n, const struct pylb_ip *ip, const uint8_t mac[6], int create);

#endif
