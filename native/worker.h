/* worker.h - one worker's state; shared by worker.c and neigh_wire.c. */
#ifndef PYLB_WORKER_H
#define PYLB_WORKER_H

#include <rte_ethdev.h>
#include <rte_mbuf.h>
#include "dataplane.h"
#include "neigh.h"
#include "port_internal.h"

/* A packet held for Python's verdict, with what the verdict needs. */
struct held_pkt {
    struct rte_mbuf *m;
    struct pylb_flow_key key;
    uint64_t flow_id;
    uint16_t l2_len;
    uint16_t l3_total;
    uint8_t l3;
    uint8_t tcp_flags;
    uint8_t proto;
};

/* What every packet to one backend shares: its next hop's MAC, and its outer
 * headers but for what changes per packet (encap.h: encap_fixed), one per
 * inner family. Valid while the neighbour table's gen is `gen`. */
#define BACKEND_TX_HEADER 84         /* ENCAP_MAX_OVERHEAD (worker.c checks) */
struct backend_tx {
    uint64_t gen;                    /* 0: not prepared (gens start at 1) */
    uint8_t mac[6];
    uint8_t fixed[2][BACKEND_TX_HEADER];  /* inner IPv4, inner IPv6 */
};

/* A flow whose frames this worker handed to another lane (lanes.c, "Order"). */
#define STICKY_SETS 1024
#define STICKY_WAYS 4
#define STICKY_SWEEP_SETS 16     /* looked at per poll while any is in use */
struct lane_sticky {
    uint64_t flow_id;
    uint32_t pos;                /* the lane's ring position after its last frame */
    uint16_t lane;
    uint16_t used;
};

struct pylb_worker {
    struct pylb_port *port;
    struct pylb_port *exc_port;
    uint16_t rxq, txq;
    uint8_t mac[6];
    struct pylb_flow_cache *cache;
    struct pylb_neigh *neigh;
    struct pylb_dataplane *dp;
    struct rte_eth_dev_tx_buffer *txb;
    struct rte_ring *peer_ring;  /* peer-protocol frames, read by pylb_worker_peer_recv */
    uint64_t tx_drain_tsc;
    uint64_t last_flush_tsc;
    uint64_t tx_buffered;        /* mbufs handed to the TX buffer */
    uint32_t idle_sleep_max_us;
    uint32_t max_held;
    uint32_t n_free;
    uint32_t *free_slots;
    struct held_pkt *held;
    uint64_t *be_packets;        /* per backend id of the current dataplane */
    uint64_t *be_bytes;
    uint64_t *be_new;            /* new flows (as st.fwd_new counts them) per backend id */
    struct backend_tx *be_tx;    /* per backend id: MAC and headers, as last prepared */
    uint32_t n_be;
    uint32_t *health_steer;      /* [family 4, 6][local port]: backend id + 1, 0 = none */
    uint16_t lane, lanes;        /* lanes.c: 0 and 1 when the worker is alone */
    uint8_t from_lane;           /* the burst being handled came from this lane's ring */
    struct rte_ring *lane_frames[PYLB_MAX_LANES];
    struct rte_ring *lane_notices[PYLB_MAX_LANES];
    uint32_t *lane_done[PYLB_MAX_LANES];  /* each lane's ring position taken, handled, sent */
    struct lane_sticky *sticky;  /* STICKY_SETS x STICKY_WAYS */
    uint32_t sticky_live;        /* entries in use: 0 spares the lookup on a hit */
    uint32_t sticky_sweep;       /* the next set lane_sweep_sticky looks at */
    struct pylb_stats st;
};

/* The lane of a flow (pylb.h, "Lanes"). */
static inline uint16_t lane_of(const struct pylb_worker *w, uint64_t flow_id)
{
    return (uint16_t)((flow_id >> PYLB_LANE_KEY_SHIFT) % w->lanes);
}

/* lanes.c: looks the lanes' rings up (lanes <= 1: alone, nothing to find). */
int lanes_attach(struct pylb_worker *w, const char *name, uint16_t lane, uint16_t lanes);
/* Hands m to another lane's frame ring, or drops it (drop_lane_full). */
void lane_pass_frame(struct pylb_worker *w, struct rte_mbuf *m, uint16_t lane);
/* The same for a frame of flow flow_id, remembering that its flow has frames
 * on that lane's ring (its next frames follow them there). */
void lane_pass_flow_frame(struct pylb_worker *w, struct rte_mbuf *m, uint64_t flow_id,
                          uint16_t lane);
/* For a cache hit of another lane's flow: 1 when m was handed to that lane
 * behind the flow's frames still there (it must not overtake them), 0 when
 * it may be forwarded here. */
int lane_keep_order(struct pylb_worker *w, struct rte_mbuf *m, uint64_t flow_id);
/* Forgets a few sets' flows whose lanes sent everything handed to them. */
void lane_sweep_sticky(struct pylb_worker *w);
/* This lane took, handled and sent its ring's frames up to position pos. */
void lane_publish_done(struct pylb_worker *w, uint32_t pos);
/* Hands a new-state notice to another lane, or counts it lost. */
void lane_pass_notice(struct pylb_worker *w, const struct pylb_punt *notice, uint16_t lane);
/* Takes up to room notices from this lane's notice ring into punts. */
uint32_t lane_take_notices(struct pylb_worker *w, struct pylb_punt *punts, uint32_t room);

/* TX through the worker's buffer; counted in tx_buffered. */
static inline void worker_tx(struct pylb_worker *w, struct rte_mbuf *m)
{
    w->tx_buffered++;
    rte_eth_tx_buffer(w->port->port_id, w->txq, w->txb, m);
}

/* Encapsulates the IP packet in m (after l2_len bytes) toward backend id and
 * buffers it; NULL when sent, else the drop reason's counter (m not freed). */
uint64_t *worker_encap_send(struct pylb_worker *w, struct rte_mbuf *m, uint32_t id,
                            uint16_t l2_len, uint16_t l3_total, uint8_t l3, uint64_t flow_id);
/* A frame for neither a VIP nor the balancer: to the kernel's TAP when one is
 * configured, else dropped with drop_reason. */
void worker_to_exception(struct pylb_worker *w, struct rte_mbuf *m, uint64_t *drop_reason);
/* Frees m counting a drop reason. */
void worker_count_drop(struct pylb_worker *w, uint64_t *reason, struct rte_mbuf *m);

/* Answers a packet dropped as too big with ICMP "fragmentation needed" /
 * ICMPv6 "packet too big" toward its source (icmp.c); m is not consumed. */
void icmp_send_too_big(struct pylb_worker *w, const struct rte_mbuf *m, uint16_t l2_len,
                       uint16_t l3_total, uint8_t l3, uint32_t backend);

/* ARP and NDP on the wire (neigh_wire.c). Each consumes or sends m and counts
 * the outcome. */
void neigh_handle_arp(struct pylb_worker *w, struct rte_mbuf *m, const struct pylb_parsed *pp);
/* Returns 1 when m was an NS/NA it handled, 0 to let the caller go on. */
int neigh_handle_nd(struct pylb_worker *w, struct rte_mbuf *m, const struct pylb_parsed *pp);
/* Sends an ARP request or NS for ip unless one went out within the last second
 * (force=1 ignores that). Returns PYLB_OK or an error. */
int neigh_solicit(struct pylb_worker *w, const struct pylb_ip *ip, int force);

#endif
