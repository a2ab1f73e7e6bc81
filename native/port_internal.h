/* port_internal.h - what the worker needs to know of a port. */
#ifndef PYLB_PORT_INTERNAL_H
#define PYLB_PORT_INTERNAL_H

#include <rte_mbuf.h>
#include <rte_ring.h>
#include "internal.h"

struct pylb_port {
    uint16_t port_id;
    uint8_t is_ring;       /* ring:NAME test port */
    uint8_t is_vdev;       /* probed here: removed again at close */
    uint8_t started;
    uint8_t has_own_mac;   /* ring ports: mac below, not the PMD's */
    uint8_t attached;      /* opened by the primary; this process only uses it */
    uint16_t n_rings;      /* ring ports: queues (rx_ring[i], tx_ring[i]) */
    uint8_t mac[6];
    char name[64];
    struct rte_mempool *pool;
    struct rte_ring *rx_ring[PYLB_MAX_LANES];  /* ring ports: what each queue receives */
    struct rte_ring *tx_ring[PYLB_MAX_LANES];  /* ring ports: what each queue transmitted */
};

/* Frees every mbuf left on a ring (at close: nothing is lost silently). */
static inline void free_ring_mbufs(struct rte_ring *r)
{
    void *m;
    while (rte_ring_dequeue(r, &m) == 0)
        rte_pktmbuf_free((struct rte_mbuf *)m);
}

#endif
