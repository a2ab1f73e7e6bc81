/* worker.c - the burst loop. Per packet: parse, find the VIP, look the flow
 * up in the cache, else decide by the destination table, encapsulate and
 * buffer for TX. Packets that need a decision beyond that are held and handed
 * to Python in batches (struct pylb_punt); nothing is dropped meanwhile. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <rte_cycles.h>
#include <unistd.h>
#include <rte_malloc.h>
#include "encap.h"
#include "worker.h"

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10
#define EMPTY_POLLS_BEFORE_SLEEP 64
/* How long a punt or a peer frame may wait for Python once it is there. Under
 * a steady trickle of frames neither max_bursts nor the idle bound ends a poll
 * (a burst of one frame counts as a burst): held packets and state requests
 * would wait for seconds (seen in the lab: 1-3 s stalls of TCP connections). */
#define WORK_WAIT_US 500
#define PEER_RING_SIZE 4096
#define PEER_LANE_KEY_OFFSET 36   /* in the peer header (docs/peer-protocol.md) */

void worker_count_drop(struct pylb_worker *w, uint64_t *reason, struct rte_mbuf *m)
{
    (*reason)++;
    w->st.drop_total++;
    rte_pktmbuf_free(m);
}

/* Frames for neither a VIP nor the balancer: to the kernel's TAP, or dropped.
 * Only lane 0 has the TAP: the others hand it what the TAP would take. */
void worker_to_exception(struct pylb_worker *w, struct rte_mbuf *m, uint64_t *drop_reason)
{
    if (PYLB_UNLIKELY(w->lane != 0) && !w->from_lane &&
        w->dp->exception_policy == PYLB_EXC_TAP) {
        lane_pass_frame(w, m, 0);
        return;
    }
    if (w->exc_port != NULL && rte_eth_tx_burst(w->exc_port->port_id, 0, &m, 1) == 1) {
        w->st.exception_tap++;
        return;
    }
    worker_count_drop(w, w->exc_port ? &w->st.drop_exception : drop_reason, m);
}

static uint8_t timeout_class(uint8_t proto, uint8_t tcp_flags)
{
    if (proto == 6)
        return (tcp_flags & (TCP_FIN | TCP_RST)) ? PYLB_TO_TCP_CLOSING : PYLB_TO_TCP;
    return proto == 17 ? PYLB_TO_UDP : PYLB_TO_OTHER;
}

_Static_assert(BACKEND_TX_HEADER >= ENCAP_MAX_OVERHEAD && ENCAP_MAX_OVERHEAD <= 96 &&
               ENCAP_MIN_OVERHEAD >= 32, "headers fit, and encap_copy_fixed can copy them");

/* Whatever the fast checks refused: pylb_encap_write's own checks say why
 * (too big, no headroom, bad parameters), and the outcome is theirs. */
static __attribute__((noinline)) int encap_checked(const struct pylb_worker *w,
                                                   const struct dp_backend *b,
                                                   const uint8_t dst_mac[6], uint8_t *buf,
                                                   uint32_t off, uint16_t l3_total, uint8_t l3,
                                                   uint64_t flow_id)
{
    struct pylb_encap_params params = b->encap;
    memcpy(params.dst_mac, dst_mac, 6);
    memcpy(params.src_mac, w->mac, 6);
    return pylb_encap_write(&params, buf, off, l3_total, l3, flow_id);
}

/* Encapsulates the inner IP packet of m toward backend id and buffers it.
 * Returns NULL when sent, else the drop reason's counter (m is not freed). */
uint64_t *worker_encap_send(struct pylb_worker *w, struct rte_mbuf *m, uint32_t id,
                            uint16_t l2_len, uint16_t l3_total, uint8_t l3, uint64_t flow_id)
{
    const struct pylb_dataplane *dp = w->dp;
    if (PYLB_UNLIKELY(id >= dp->n_backends))
        return &w->st.drop_no_backend;
    const struct dp_backend *b = &dp->backends[id];
    /* The next hop's MAC and the backend's headers as last prepared, while
     * the neighbour table has not changed since: per packet, no hash probe,
     * and only the fields that change are written. */
    struct backend_tx *tx = &w->be_tx[id];
    if (PYLB_UNLIKELY(tx->gen != w->neigh->gen)) {
        if (!pylb_neigh_lookup(w->neigh, &b->next_hop, tx->mac)) {
            neigh_solicit(w, &b->next_hop, 0);
            return &w->st.drop_no_neighbor;
        }
        if (b->encap_valid) {
            encap_fixed(&b->encap, tx->mac, w->mac, tx->fixed[0], 4, b->outer_v4);
            encap_fixed(&b->encap, tx->mac, w->mac, tx->fixed[1], 6, b->outer_v4);
        }
        tx->gen = w->neigh->gen;
    }
    uint8_t *buf = (uint8_t *)m->buf_addr;
    uint32_t off = m->data_off + l2_len;
    int rc;
    if (PYLB_LIKELY(b->encap_valid &&
                    encap_fits(&b->encap, buf, off, l3_total, l3, b->overhead))) {
        uint8_t *eth = buf + off - b->overhead;
        encap_copy_fixed(eth, tx->fixed[l3 == 6], b->overhead);
        encap_varying(b->encap.kind, eth, b->overhead, l3_total, l3, flow_id, b->outer_v4);
        rc = b->overhead;
    } else {
        rc = encap_checked(w, b, tx->mac, buf, off, l3_total, l3, flow_id);
    }
    if (PYLB_UNLIKELY(rc < 0))
        return rc == PYLB_ETOOBIG ? &w->st.drop_too_big : &w->st.drop_encap;
    m->data_off = (uint16_t)(off - (uint32_t)rc);
    m->data_len = (uint16_t)(l3_total + (uint32_t)rc);
    m->pkt_len = m->data_len;
    w->be_packets[id]++;
    w->be_bytes[id] += l3_total;
    worker_tx(w, m);
    return NULL;
}

/* worker_encap_send for a received frame: a failure is its outcome. */
static int worker_forward(struct pylb_worker *w, struct rte_mbuf *m, uint32_t id, uint16_t l2_len,
                          uint16_t l3_total, uint8_t l3, uint64_t flow_id)
{
    uint64_t *reason = worker_encap_send(w, m, id, l2_len, l3_total, l3, flow_id);
    if (PYLB_LIKELY(reason == NULL))
        return 1;
    if (reason == &w->st.drop_too_big)
        icmp_send_too_big(w, m, l2_len, l3_total, l3, id);
    worker_count_drop(w, reason, m);
    return 0;
}

static int hold(struct pylb_worker *w, struct rte_mbuf *m, const struct pylb_parsed *pp,
                uint64_t flow_id, struct pylb_punt *punt)
{
    uint32_t slot = w->free_slots[--w->n_free];
    struct held_pkt *h = &w->held[slot];
    h->m = m;
    h->key = pp->key;
    h->flow_id = flow_id;
    h->l2_len = pp->l2_len;
    h->l3_total = pp->l3_total;
    h->l3 = pp->l3;
    h->tcp_flags = pp->tcp_flags;
    h->proto = pp->l4_proto;
    punt->slot = slot;
    punt->tcp_flags = pp->tcp_flags;
    punt->flow_id = flow_id;
    punt->key = pp->key;
    w->st.held++;
    w->st.held_now++;
    return 1;
}

static int vip_miss(struct pylb_worker *w, struct rte_mbuf *m, const struct pylb_parsed *pp,
                    int32_t vi, uint64_t flow_id, uint32_t now, struct pylb_punt *punt,
                    int room);

/* A packet to a VIP. Returns the number of punts written (0 or 1). */
static int handle_vip(struct pylb_worker *w, struct rte_mbuf *m, const struct pylb_parsed *pp,
                      int32_t vi, uint32_t now, struct pylb_punt *punt, int room)
{
    const struct pylb_dataplane *dp = w->dp;
    const struct dp_vip *v = &dp->vips[vi];
    uint8_t l3 = pp->l3;
    if (PYLB_UNLIKELY(pp->flags & PYLB_PF_FRAGMENT)) {
        /* Fragments carry no ports after the first: all of a datagram's
         * fragments go by the 3-tuple so they reach one backend. */
        struct pylb_flow_key k3 = pp->key;
        k3.sport = k3.dport = 0;
        uint64_t id3 = pylb_flow_id(&k3, dp->flow_seed);
        uint32_t be = v->current[pylb_bucket_fast(id3, v->table_size, v->bucket_magic)];
        if (be == PYLB_NO_BACKEND) {
            worker_count_drop(w, &w->st.drop_no_backend, m);
            return 0;
        }
        if (worker_forward(w, m, be, pp->l2_len, pp->l3_total, l3, id3))
            w->st.fwd_fragment++;
        return 0;
    }
    uint64_t flow_id = pylb_flow_id(&pp->key, dp->flow_seed);
    uint32_t be;
    if (pylb_flow_cache_lookup(w->cache, &pp->key, flow_id, now, pp->tcp_flags, &be)) {
        if (PYLB_UNLIKELY(w->sticky_live) && !w->from_lane && lane_of(w, flow_id) != w->lane &&
            lane_keep_order(w, m, flow_id))
            return 0;
        if (worker_forward(w, m, be, pp->l2_len, pp->l3_total, l3, flow_id))
            w->st.fwd_cache_hit++;
        return 0;
    }
    return vip_miss(w, m, pp, vi, flow_id, now, punt, room);
}

/* A packet to a VIP whose flow the cache does not hold: the tables decide,
 * or Python does. Returns the number of punts written (0 or 1). */
static int vip_miss(struct pylb_worker *w, struct rte_mbuf *m, const struct pylb_parsed *pp,
                    int32_t vi, uint64_t flow_id, uint32_t now, struct pylb_punt *punt,
                    int room)
{
    const struct dp_vip *v = &w->dp->vips[vi];
    uint8_t l3 = pp->l3;
    uint32_t bucket = pylb_bucket_fast(flow_id, v->table_size, v->bucket_magic);
    uint32_t cur = v->current[bucket];
    int moved = dp_stateful(v, bucket);
    uint32_t prev = moved ? v->previous[bucket] : cur;
    int is_tcp = pp->l4_proto == 6;
    int syn = is_tcp && (pp->tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN;
    if (moved && !syn) {
        /* An existing flow (or, for UDP, maybe a new one) with no state in a
         * bucket whose backend changed: only the owner can say (rule 3).
         * Its lane's Python asks, so that one process keeps its request. */
        if (PYLB_UNLIKELY(w->lanes > 1) && !w->from_lane) {
            uint16_t to = lane_of(w, flow_id);
            if (to != w->lane) {
                lane_pass_flow_frame(w, m, flow_id, to);
                return 0;
            }
        }
        punt->reason = is_tcp ? PYLB_PUNT_MOVED : PYLB_PUNT_UDP_MOVED;
        punt->vip = (int16_t)vi;
        punt->bucket = bucket;
        punt->current = cur;
        punt->previous = prev;
        punt->backend = PYLB_NO_BACKEND;
        return hold(w, m, pp, flow_id, punt);
    }
    if (cur == PYLB_NO_BACKEND) {
        worker_count_drop(w, &w->st.drop_no_backend, m);
        return 0;
    }
    /* State only for a flow that was forwarded: a packet dropped here (no
     * neighbour yet) must not leave a cache entry or a notice behind. */
    if (!worker_forward(w, m, cur, pp->l2_len, pp->l3_total, l3, flow_id))
        return 0;
    if (syn || !is_tcp) {
        w->st.fwd_new++;
        w->be_new[cur]++;
    } else
        w->st.fwd_table++;
    int notice = 0;
    if (moved || (v->flags & PYLB_VIP_TRACK_ALL)) {
        int rc = pylb_flow_cache_insert(w->cache, &pp->key, flow_id, cur, now,
                                        timeout_class(pp->l4_proto, pp->tcp_flags));
        if (rc == PYLB_OK)
            w->st.cache_insert++;
        else
            w->st.cache_full++;
        if (moved) {
            /* Rule 2: a new flow in a moved bucket needs its state at the
             * owner; tell Python, which batches the pushes. */
            uint16_t to = PYLB_UNLIKELY(w->lanes > 1) ? lane_of(w, flow_id) : w->lane;
            struct pylb_punt passed;
            if (to != w->lane)
                punt = &passed;     /* written here, then handed to the flow's lane */
            if (room > 0 || to != w->lane) {
                punt->slot = PYLB_NO_BACKEND;
                punt->reason = PYLB_PUNT_NEW_STATE;
                punt->tcp_flags = pp->tcp_flags;
                punt->vip = (int16_t)vi;
                punt->flow_id = flow_id;
                punt->bucket = bucket;
                punt->current = cur;
                punt->previous = prev;
                punt->backend = cur;
                punt->key = pp->key;
                if (to != w->lane) {
                    lane_pass_notice(w, punt, to);
                } else {
                    w->st.notices++;
                    notice = 1;
                }
            } else {
                w->st.notices_lost++;
            }
        }
    }
    return notice;
}

#define HEALTH_STEER_PORTS 65536

static inline uint32_t *health_steer_slot(const struct pylb_worker *w, uint8_t l3, uint16_t port)
{
    return &w->health_steer[(l3 == 6 ? HEALTH_STEER_PORTS : 0) + port];
}

/* TCP to a local port a health check's connection is steered from. */
static int health_check_answer(const struct pylb_worker *w, const struct pylb_parsed *pp)
{
    return w->health_steer != NULL && pp->l4_proto == 6 && (pp->flags & PYLB_PF_HAS_L4) &&
           __atomic_load_n(health_steer_slot(w, pp->l3, pp->key.dport), __ATOMIC_RELAXED) != 0;
}

static inline int is_peer_frame(const struct pylb_dataplane *dp, const struct pylb_parsed *pp)
{
    return dp->peer_port && pp->l4_proto == 17 && pp->key.dport == dp->peer_port &&
           (pp->flags & PYLB_PF_HAS_L4) && dp_is_local(dp, &pp->key.dst);
}

/* A peer message's lane: its header's lane key (docs/peer-protocol.md). One
 * too short to carry it stays here, where Python drops it as malformed. */
static uint16_t peer_lane(const struct pylb_worker *w, const struct rte_mbuf *m,
                          const struct pylb_parsed *pp)
{
    uint32_t off = (uint32_t)pp->l2_len + pp->l3_len + 8 + PEER_LANE_KEY_OFFSET;
    if (off >= m->data_len)
        return w->lane;
    return (uint16_t)(rte_pktmbuf_mtod(m, const uint8_t *)[off] % w->lanes);
}

/* Everything but a VIP's unfragmented packets, once parsed (rc, pp):
 * returns punts written. */
static int handle_frame(struct pylb_worker *w, struct rte_mbuf *m, int rc,
                        const struct pylb_parsed *pp, uint32_t now, struct pylb_punt *punt,
                        int room)
{
    if (PYLB_UNLIKELY(rc != PYLB_PARSE_OK)) {
        if (rc == PYLB_PARSE_TRUNCATED)
            worker_count_drop(w, &w->st.drop_parse_truncated, m);
        else if (rc == PYLB_PARSE_BAD_HEADER)
            worker_count_drop(w, &w->st.drop_parse_bad, m);
        else
            worker_to_exception(w, m, &w->st.drop_not_ip);
        return 0;
    }
    const struct pylb_dataplane *dp = w->dp;
    int arp = pp->l3 == PYLB_L3_ARP;
    /* Later fragments carry no port: every fragment of a datagram finds its
     * VIP by address and protocol alone, so all of them meet at one VIP. */
    int32_t vi = arp ? -1
                 : PYLB_UNLIKELY(pp->flags & PYLB_PF_FRAGMENT)
                     ? dp_find_vip_any_port(dp, &pp->key.dst, pp->l4_proto)
                     : dp_find_vip(dp, &pp->key.dst, pp->l4_proto, pp->key.dport);
    if (PYLB_LIKELY(vi >= 0))
        return handle_vip(w, m, pp, vi, now, punt, room);
    int peer = !arp && is_peer_frame(dp, pp);
    if (PYLB_UNLIKELY(w->lanes > 1) && !w->from_lane) {
        /* A peer message to the lane of its flows; the rest (ARP, NDP, the
         * kernel's and the balancer's own traffic) to lane 0, which alone
         * has the exception port and answers for the balancer. */
        uint16_t to = peer ? peer_lane(w, m, pp) : 0;
        if (to != w->lane) {
            lane_pass_frame(w, m, to);
            return 0;
        }
    }
    if (PYLB_UNLIKELY(arp)) {
        neigh_handle_arp(w, m, pp);
        return 0;
    }
    if (pp->l4_proto == 58 && neigh_handle_nd(w, m, pp))
        return 0;
    if (peer) {
        /* Peer messages take their own ring, never the VIP path. */
        if (rte_ring_enqueue(w->peer_ring, m) == 0)
            w->st.peer_rx++;
        else
            worker_count_drop(w, &w->st.drop_peer_ring_full, m);
        return 0;
    }
    if (PYLB_UNLIKELY(dp_is_local(dp, &pp->key.dst))) {
        /* The kernel behind the TAP gets only the answers to its health
         * checks: the host's own services stay out of the data port's reach. */
        if (health_check_answer(w, pp))
            worker_to_exception(w, m, &w->st.drop_exception);
        else
            worker_count_drop(w, &w->st.drop_local, m);
        return 0;
    }
    if (pp->l4_proto == 1 || pp->l4_proto == 58)
        worker_to_exception(w, m, &w->st.drop_icmp);
    else
        worker_to_exception(w, m, &w->st.drop_no_vip);
    return 0;
}

/*
 * One received burst, in stages so that memory latencies overlap instead of
 * adding up: parse every frame and hash every VIP flow, look all of them up
 * in the flow cache at once (every set prefetched first), then forward the
 * hits and take the rest through handle_frame, in arrival order. Returns
 * punts written; room is what handle_frame's first call may use.
 */
static uint32_t handle_burst(struct pylb_worker *w, struct rte_mbuf **m, uint16_t n,
                             uint32_t now, struct pylb_punt *punts, int room)
{
    const struct pylb_dataplane *dp = w->dp;
    struct pylb_parsed pp[PYLB_BURST];
    int rc[PYLB_BURST];
    int32_t vip[PYLB_BURST];           /* >= 0: a VIP flow, looked up as number asked_at[i] */
    const struct pylb_flow_key *keys[PYLB_BURST];
    uint64_t ids[PYLB_BURST];
    uint8_t flags[PYLB_BURST], asked_at[PYLB_BURST];
    uint32_t backends[PYLB_BURST], asked = 0;

    for (uint16_t i = 0; i < n; i++)
        rte_prefetch0(rte_pktmbuf_mtod(m[i], void *));
    for (uint16_t i = 0; i < n; i++) {
        vip[i] = -1;
        if (PYLB_LIKELY(!w->from_lane)) {
            w->st.rx++;
            w->st.rx_bytes += m[i]->pkt_len;
        } else {
            w->st.lane_in++;
        }
        if (PYLB_UNLIKELY(m[i]->nb_segs > 1) && rte_pktmbuf_linearize(m[i]) != 0) {
            worker_count_drop(w, &w->st.drop_too_big, m[i]);
            m[i] = NULL;
            continue;
        }
        rc[i] = pylb_parse(rte_pktmbuf_mtod(m[i], const uint8_t *), m[i]->data_len, &pp[i]);
        if (PYLB_UNLIKELY(rc[i] != PYLB_PARSE_OK || pp[i].l3 == PYLB_L3_ARP ||
                          (pp[i].flags & PYLB_PF_FRAGMENT)))
            continue;
        int32_t vi = dp_find_vip(dp, &pp[i].key.dst, pp[i].l4_proto, pp[i].key.dport);
        if (vi < 0)
            continue;
        vip[i] = vi;
        asked_at[i] = (uint8_t)asked;
        keys[asked] = &pp[i].key;
        ids[asked] = pylb_flow_id(&pp[i].key, dp->flow_seed);
        flags[asked++] = pp[i].tcp_flags;
    }
    uint64_t hits = 0;
    if (asked)
        pylb_flow_cache_lookup_burst(w->cache, keys, ids, flags, asked, now, backends, &hits);
    uint32_t np = 0;
    uint64_t inserts = w->st.cache_insert;
    for (uint16_t i = 0; i < n; i++) {
        if (PYLB_UNLIKELY(m[i] == NULL))
            continue;
        int room_i = room - (int)np;
        if (vip[i] < 0) {
            np += (uint32_t)handle_frame(w, m[i], rc[i], &pp[i], now, &punts[np], room_i);
            continue;
        }
        uint32_t j = asked_at[i];
        if (hits >> j & 1) {
            /* A flow handed to its lane a moment ago: its frames there go first. */
            if (PYLB_UNLIKELY(w->sticky_live) && !w->from_lane &&
                lane_of(w, ids[j]) != w->lane && lane_keep_order(w, m[i], ids[j]))
                continue;
            if (worker_forward(w, m[i], backends[j], pp[i].l2_len, pp[i].l3_total, pp[i].l3,
                               ids[j]))
                w->st.fwd_cache_hit++;
        } else if (PYLB_UNLIKELY(w->st.cache_insert != inserts)) {
            /* An earlier packet of this burst cached a flow after the
             * lookup: it may be this one's (a SYN and its next packet), so
             * ask the cache again rather than take a hit for a miss. */
            np += (uint32_t)handle_vip(w, m[i], &pp[i], vip[i], now, &punts[np], room_i);
        } else {
            np += (uint32_t)vip_miss(w, m[i], &pp[i], vip[i], ids[j], now, &punts[np], room_i);
        }
    }
    return np;
}

static void flush(struct pylb_worker *w, uint64_t now_tsc)
{
    rte_eth_tx_buffer_flush(w->port->port_id, w->txq, w->txb);
    w->last_flush_tsc = now_tsc;
}

/* A health check's frame from the kernel: TCP from a steered local port to a
 * VIP. Sends it, encapsulated, to the check's backend (or frees it when that
 * fails) and returns 1; returns 0 for any other frame. */
static int steer_health_check(struct pylb_worker *w, struct rte_mbuf *m)
{
    struct pylb_parsed pp;
    if (PYLB_UNLIKELY(m->nb_segs > 1) && rte_pktmbuf_linearize(m) != 0)
        return 0;
    if (pylb_parse(rte_pktmbuf_mtod(m, const uint8_t *), m->data_len, &pp) != PYLB_PARSE_OK ||
        pp.l4_proto != 6 || !(pp.flags & PYLB_PF_HAS_L4) || (pp.l3 != 4 && pp.l3 != 6))
        return 0;
    uint32_t id = __atomic_load_n(health_steer_slot(w, pp.l3, pp.key.sport), __ATOMIC_RELAXED);
    if (id == 0 || dp_find_vip(w->dp, &pp.key.dst, 6, pp.key.dport) < 0)
        return 0;
    uint64_t flow_id = pylb_flow_id(&pp.key, w->dp->flow_seed);
    if (worker_encap_send(w, m, id - 1, pp.l2_len, pp.l3_total, pp.l3, flow_id) == NULL) {
        w->st.health_steered++;
    } else {
        /* The check fails as it would for traffic; the kernel retransmits. */
        w->st.health_steer_failed++;
        rte_pktmbuf_free(m);
    }
    return 1;
}

/* Kernel to wire: what the TAP device sends leaves by the data port, but for
 * health checks steered to a backend. */
static void pump_exception_port(struct pylb_worker *w)
{
    struct rte_mbuf *m[PYLB_BURST];
    uint16_t n = rte_eth_rx_burst(w->exc_port->port_id, 0, m, PYLB_BURST);
    w->st.tap_rx += n;
    for (uint16_t i = 0; i < n; i++) {
        if (w->health_steer != NULL && steer_health_check(w, m[i]))
            continue;
        w->st.tap_to_wire++;
        worker_tx(w, m[i]);
    }
}

PYLB_API int pylb_worker_steer_health(struct pylb_worker *w, uint8_t family, uint16_t port,
                                      uint32_t backend)
{
    if (w == NULL || (family != 4 && family != 6))
        return pylb_fail(PYLB_EINVAL, "steer_health: a worker and family 4 or 6 are required");
    if (w->health_steer == NULL)
        return pylb_fail(PYLB_ESTATE, "steer_health: the worker has no exception TAP");
    /* Stored as id + 1, so that 0 (calloc's) means not steered. */
    uint32_t value = backend == UINT32_MAX ? 0 : backend + 1;
    __atomic_store_n(health_steer_slot(w, family, port), value, __ATOMIC_RELAXED);
    return PYLB_OK;
}

/* What the other lanes handed to this one: frames, handled as if received
 * (a held packet of this lane's flows, a peer message for them, lane 0's
 * share), and notices. Returns punts written; *frames the frames taken. */
static uint32_t take_from_lanes(struct pylb_worker *w, struct pylb_punt *punts, uint32_t room,
                                uint32_t *frames)
{
    uint32_t np = 0, k = 0;
    /* As the poll loop asks before a burst: room for its punts and notices,
     * and a held slot for each frame. */
    if (room >= 2 * PYLB_BURST && w->n_free >= PYLB_BURST) {
        struct rte_mbuf *m[PYLB_BURST];
        struct rte_ring *r = w->lane_frames[w->lane];
        k = rte_ring_dequeue_burst(r, (void **)m, PYLB_BURST, NULL);
        if (k > 0) {
            uint32_t taken = r->cons.tail;     /* one consumer: this lane */
            w->from_lane = 1;
            np = handle_burst(w, m, (uint16_t)k, pylb_now_ms(), punts,
                              (int)(room - PYLB_BURST));
            w->from_lane = 0;
            /* Sent, not only buffered, before the lanes that handed them on
             * may send their flows' next frames themselves (lanes.c, "Order"). */
            flush(w, rte_rdtsc());
            lane_publish_done(w, taken);
        }
    }
    if (room - np >= PYLB_BURST)
        np += lane_take_notices(w, punts + np, PYLB_BURST);
    *frames = k;
    return np;
}

PYLB_API int pylb_worker_poll(struct pylb_worker *w, uint32_t max_bursts, uint32_t max_idle_us,
                              struct pylb_punt *punts, uint32_t max_punts, uint32_t *n_punts)
{
    if (w == NULL || n_punts == NULL || (max_punts && punts == NULL))
        return pylb_fail(PYLB_EINVAL, "poll: NULL argument");
    if (w->dp == NULL)
        return pylb_fail(PYLB_ESTATE, "poll: no dataplane set");
    uint64_t hz = rte_get_tsc_hz();
    uint64_t max_idle = (uint64_t)max_idle_us * hz / 1000000u;
    uint64_t work_wait = (uint64_t)WORK_WAIT_US * hz / 1000000u;
    uint64_t idle_start = 0, work_since = 0;
    /* max_idle_us also bounds the whole call, so that Python's timers (state
     * pushes, request retries, a reload) run that often whatever the traffic. */
    uint64_t call_end = max_idle_us ? rte_rdtsc() + max_idle : UINT64_MAX;
    uint32_t np = 0, bursts = 0, empty = 0, sleep_us = 0;
    struct rte_mbuf *m[PYLB_BURST];
    w->st.polls++;
    if (PYLB_UNLIKELY(w->sticky_live))
        lane_sweep_sticky(w);
    while (bursts < max_bursts && max_punts - np >= 2 * PYLB_BURST && w->n_free >= PYLB_BURST) {
        uint16_t n = rte_eth_rx_burst(w->port->port_id, w->rxq, m, PYLB_BURST);
        uint64_t now_tsc = rte_rdtsc();
        if (w->exc_port)
            pump_exception_port(w);
        if (n > 0) {
            uint32_t now = pylb_now_ms();
            np += handle_burst(w, m, n, now, &punts[np], (int)(max_punts - np - PYLB_BURST));
        }
        uint32_t from_lanes = 0;
        if (PYLB_UNLIKELY(w->lanes > 1)) {
            uint32_t frames, got = take_from_lanes(w, &punts[np], max_punts - np, &frames);
            np += got;
            from_lanes = frames + got;
        }
        if (n > 0 || from_lanes > 0) {
            if (work_since == 0 && (np > 0 || rte_ring_count(w->peer_ring) > 0))
                work_since = now_tsc;
            bursts++;
            empty = 0;
            sleep_us = 0;
            idle_start = 0;
        } else {
            if (idle_start == 0)
                idle_start = now_tsc;
            else if (now_tsc - idle_start >= max_idle)
                break;
            if (w->txb->length)
                flush(w, now_tsc);
            if (++empty >= EMPTY_POLLS_BEFORE_SLEEP && w->idle_sleep_max_us) {
                /* Back off so that balancers sharing a core leave it to others. */
                sleep_us = sleep_us ? RTE_MIN(sleep_us * 2, w->idle_sleep_max_us) : 1;
                struct timespec ts = {0, (long)sleep_us * 1000};
                nanosleep(&ts, NULL);
                w->st.idle_sleeps++;
            }
        }
        if (now_tsc - w->last_flush_tsc >= w->tx_drain_tsc)
            flush(w, now_tsc);
        if ((work_since && now_tsc - work_since >= work_wait) || now_tsc >= call_end)
            break;
    }
    flush(w, rte_rdtsc());
    *n_punts = np;
    return PYLB_OK;
}

PYLB_API int pylb_worker_apply(struct pylb_worker *w, const struct pylb_verdict *v, uint32_t n)
{
    int bad = 0;
    uint32_t now = pylb_now_ms();
    uint8_t on_stack[1024];                          /* verdicts whose flow is cached after */
    uint8_t *insert = n <= sizeof(on_stack) ? on_stack : calloc(n, 1);
    if (insert == on_stack)
        memset(on_stack, 0, n);
    for (uint32_t i = 0; i < n; i++) {
        uint32_t slot = v[i].slot;
        if (slot >= w->max_held || w->held[slot].m == NULL) {
            bad++;
            continue;
        }
        struct held_pkt *h = &w->held[slot];
        struct rte_mbuf *m = h->m;
        h->m = NULL;
        w->free_slots[w->n_free++] = slot;   /* h stays readable: no hold until poll */
        w->st.held_now--;
        if (v[i].action == PYLB_VERDICT_FORWARD) {
            w->st.verdict_forward++;
            if (v[i].cache && v[i].backend < w->dp->n_backends) {
                if (insert != NULL)
                    insert[i] = 1;
                else if (pylb_flow_cache_insert(w->cache, &h->key, h->flow_id, v[i].backend,
                                                now, timeout_class(h->proto, h->tcp_flags))
                         == PYLB_OK)
                    w->st.cache_insert++;     /* out of memory: cached first, as before */
                else
                    w->st.cache_full++;
            }
            if (worker_forward(w, m, v[i].backend, h->l2_len, h->l3_total, h->l3, h->flow_id))
                w->st.fwd_verdict++;
        } else if (v[i].action == PYLB_VERDICT_PEER) {
            w->st.verdict_peer++;
            rte_pktmbuf_free(m);
        } else {
            w->st.verdict_drop++;
            worker_count_drop(w, &w->st.drop_verdict, m);
        }
    }
    /* Cached only once sent: another worker's hit on the entry must not leave
     * before these packets of its flow (lanes.c, "Order"). */
    flush(w, rte_rdtsc());
    for (uint32_t i = 0; insert != NULL && i < n; i++) {
        if (!insert[i])
            continue;
        const struct held_pkt *h = &w->held[v[i].slot];
        if (pylb_flow_cache_insert(w->cache, &h->key, h->flow_id, v[i].backend, now,
                                   timeout_class(h->proto, h->tcp_flags)) == PYLB_OK)
            w->st.cache_insert++;
        else
            w->st.cache_full++;
    }
    if (insert != on_stack)
        free(insert);
    return bad ? pylb_fail(PYLB_EINVAL, "%d verdicts named no held packet", bad) : PYLB_OK;
}

PYLB_API int pylb_worker_create(const struct pylb_worker_conf *c, struct pylb_worker **out)
{
    if (c == NULL || out == NULL || c->port == NULL || c->cache == NULL || c->neigh == NULL)
        return pylb_fail(PYLB_EINVAL, "worker: port, flow cache and neighbour table are required");
    uint32_t max_held = c->max_held ? c->max_held : 1024;
    if (max_held < 2 * PYLB_BURST)
        return pylb_fail(PYLB_EINVAL, "worker: max_held must be at least %d", 2 * PYLB_BURST);
    struct pylb_worker *w = rte_zmalloc("pylb_worker", sizeof(*w), RTE_CACHE_LINE_SIZE);
    if (w == NULL)
        return pylb_fail(PYLB_ENOMEM, "worker: out of memory");
    w->port = c->port;
    w->exc_port = c->exception_port;
    w->rxq = c->rx_queue;
    w->txq = c->tx_queue;
    w->cache = c->cache;
    w->neigh = c->neigh;
    w->idle_sleep_max_us = c->idle_sleep_max_us;
    w->max_held = max_held;
    w->tx_drain_tsc = (uint64_t)(c->tx_drain_us ? c->tx_drain_us : 100) * rte_get_tsc_hz() / 1000000u;
    w->txb = rte_zmalloc("pylb_txb", RTE_ETH_TX_BUFFER_SIZE(PYLB_BURST), 0);
    char ring_name[RTE_RING_NAMESIZE];
    static int worker_seq;
    /* Ring names are shared by a balancer's processes: the pid tells theirs apart. */
    snprintf(ring_name, sizeof(ring_name), "pylb_peer%d_%d", (int)getpid(),
             __atomic_fetch_add(&worker_seq, 1, __ATOMIC_RELAXED));
    w->peer_ring = rte_ring_create(ring_name, PEER_RING_SIZE, rte_socket_id(),
                                   RING_F_SP_ENQ | RING_F_SC_DEQ);
    w->held = calloc(max_held, sizeof(struct held_pkt));
    w->free_slots = malloc(max_held * sizeof(uint32_t));
    if (w->exc_port != NULL)   /* 512 KiB: a slot per local port, no hashing */
        w->health_steer = calloc(2 * HEALTH_STEER_PORTS, sizeof(uint32_t));
    if (w->txb == NULL || w->held == NULL || w->free_slots == NULL || w->peer_ring == NULL ||
        (w->exc_port != NULL && w->health_steer == NULL)) {
        pylb_worker_destroy(w);
        return pylb_fail(PYLB_ENOMEM, "worker: out of memory");
    }
    for (uint32_t i = 0; i < max_held; i++)
        w->free_slots[i] = max_held - 1 - i;
    w->n_free = max_held;
    rte_eth_tx_buffer_init(w->txb, PYLB_BURST);
    rte_eth_tx_buffer_set_err_callback(w->txb, rte_eth_tx_buffer_count_callback, &w->st.tx_dropped);
    int rc = lanes_attach(w, c->lanes_name, c->lane, c->lanes);
    if (rc == PYLB_OK)
        rc = pylb_port_mac(c->port, w->mac);
    if (rc != PYLB_OK) {
        pylb_worker_destroy(w);
        return rc;
    }
    *out = w;
    return PYLB_OK;
}

PYLB_API void pylb_worker_destroy(struct pylb_worker *w)
{
    if (w == NULL)
        return;
    if (w->held) {
        for (uint32_t i = 0; i < w->max_held; i++)
            if (w->held[i].m) {
                w->st.verdict_drop++;
                w->st.held_now--;
                worker_count_drop(w, &w->st.drop_verdict, w->held[i].m);
            }
    }
    if (w->txb)
        rte_eth_tx_buffer_flush(w->port->port_id, w->txq, w->txb);
    if (w->peer_ring) {
        free_ring_mbufs(w->peer_ring);
        rte_ring_free(w->peer_ring);
    }
    free(w->held);
    free(w->free_slots);
    free(w->be_packets);
    free(w->be_bytes);
    free(w->be_new);
    free(w->be_tx);
    free(w->health_steer);
    free(w->sticky);
    rte_free(w->txb);
    rte_free(w);
}

PYLB_API int pylb_worker_set_dataplane(struct pylb_worker *w, struct pylb_dataplane *dp,
                                       struct pylb_dataplane **old)
{
    if (w == NULL || dp == NULL)
        return pylb_fail(PYLB_EINVAL, "set_dataplane: NULL argument");
    if (w->st.held_now)
        return pylb_fail(PYLB_ESTATE, "set_dataplane: %llu packets still wait for a verdict",
                         (unsigned long long)w->st.held_now);
    /* Backend ids are stable across configurations: counts carry over. */
    uint32_t n = RTE_MAX(dp->n_backends, RTE_MAX(w->n_be, 1u));
    uint64_t *p = calloc(n, sizeof(uint64_t)), *b = calloc(n, sizeof(uint64_t));
    uint64_t *nf = calloc(n, sizeof(uint64_t));
    /* Next hops and parameters are the new configuration's: every backend's
     * MAC and headers are prepared again. */
    struct backend_tx *tx = calloc(n, sizeof(*tx));
    if (p == NULL || b == NULL || nf == NULL || tx == NULL) {
        free(p);
        free(b);
        free(nf);
        free(tx);
        return pylb_fail(PYLB_ENOMEM, "set_dataplane: out of memory");
    }
    if (w->n_be) {
        memcpy(p, w->be_packets, w->n_be * sizeof(uint64_t));
        memcpy(b, w->be_bytes, w->n_be * sizeof(uint64_t));
        memcpy(nf, w->be_new, w->n_be * sizeof(uint64_t));
    }
    free(w->be_packets);
    free(w->be_bytes);
    free(w->be_new);
    free(w->be_tx);
    w->be_packets = p;
    w->be_bytes = b;
    w->be_new = nf;
    w->be_tx = tx;
    w->n_be = n;
    if (old)
        *old = w->dp;
    w->dp = dp;
    return PYLB_OK;
}

PYLB_API int pylb_worker_flush(struct pylb_worker *w)
{
    flush(w, rte_rdtsc());
    return PYLB_OK;
}

PYLB_API int pylb_worker_stats(const struct pylb_worker *w, struct pylb_stats *out)
{
    *out = w->st;
    /* What the TX buffer still holds is neither sent nor dropped yet. */
    out->tx_ok = w->tx_buffered - w->st.tx_dropped - w->txb->length;
    return PYLB_OK;
}

PYLB_API int pylb_worker_backend_counts(const struct pylb_worker *w, uint64_t *packets,
                                        uint64_t *bytes, uint64_t *new_flows, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++) {
        int known = i < w->n_be && w->be_packets != NULL;
        packets[i] = known ? w->be_packets[i] : 0;
        bytes[i] = known ? w->be_bytes[i] : 0;
        new_flows[i] = known ? w->be_new[i] : 0;
    }
    return PYLB_OK;
}

PYLB_API int pylb_worker_solicit(struct pylb_worker *w, const struct pylb_ip *ip)
{
    if (w->dp == NULL)
        return pylb_fail(PYLB_ESTATE, "solicit: no dataplane set (it holds the local addresses)");
    int rc = neigh_solicit(w, ip, 1);
    flush(w, rte_rdtsc());
    return rc;
}

PYLB_API uint32_t pylb_worker_backlog(const struct pylb_worker *w)
{
    uint32_t n = rte_ring_count(w->peer_ring);
    if (w->lanes > 1)
        n += rte_ring_count(w->lane_frames[w->lane]) + rte_ring_count(w->lane_notices[w->lane]);
    if (w->port->is_ring && w->rxq < w->port->n_rings && w->port->rx_ring[w->rxq])
        n += rte_ring_count(w->port->rx_ring[w->rxq]);
    return n;
}

PYLB_API int pylb_worker_age_cache(struct pylb_worker *w, uint64_t max_sets, uint64_t *freed)
{
    uint64_t n = pylb_flow_cache_age(w->cache, pylb_now_ms(), max_sets);
    if (freed)
        *freed = n;
    return PYLB_OK;
}
