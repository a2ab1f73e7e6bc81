/* peer.c - the data path's part of the peer protocol: reading a held
 * packet, sending a datagram to a peer, forwarding a packet a peer sent. The
 * protocol itself is Python's (pylb/cluster.py, docs/peer-protocol.md). */
#include <rte_ether.h>
#include <rte_ip.h>
#include <rte_udp.h>
#include "worker.h"

PYLB_API int pylb_worker_peer_recv(struct pylb_worker *w, uint8_t *buf, uint32_t stride,
                                   uint32_t *lens, uint32_t max, uint32_t *n, uint32_t *cut)
{
    uint32_t got = 0, short_copies = 0;
    while (got < max) {
        struct rte_mbuf *m[PYLB_BURST];
        uint32_t k = rte_ring_dequeue_burst(w->peer_ring, (void **)m,
                                            RTE_MIN(max - got, (uint32_t)PYLB_BURST), NULL);
        if (k == 0)
            break;
        for (uint32_t i = 0; i < k; i++, got++) {
            uint32_t take = RTE_MIN((uint32_t)m[i]->data_len, stride);
            memcpy(buf + (size_t)got * stride, rte_pktmbuf_mtod(m[i], const uint8_t *), take);
            lens[got] = take;
            short_copies += take < m[i]->data_len;
        }
        rte_pktmbuf_free_bulk(m, k);
    }
    *n = got;
    if (cut)
        *cut = short_copies;
    return PYLB_OK;
}

PYLB_API int pylb_worker_held_ip(const struct pylb_worker *w, uint32_t slot, uint8_t *buf,
                                 uint32_t size, uint32_t *len)
{
    if (slot >= w->max_held || w->held[slot].m == NULL)
        return pylb_fail(PYLB_ENOTFOUND, "no held packet in slot %u", slot);
    const struct held_pkt *h = &w->held[slot];
    if (h->l3_total > size)
        return pylb_fail(PYLB_ETOOBIG, "held packet of %u bytes, buffer of %u", h->l3_total, size);
    if ((uint32_t)h->l2_len + h->l3_total > h->m->data_len)
        return pylb_fail(PYLB_EINVAL, "held packet longer than its frame's first segment");
    memcpy(buf, rte_pktmbuf_mtod_offset(h->m, const uint8_t *, h->l2_len), h->l3_total);
    *len = h->l3_total;
    return PYLB_OK;
}

/* Writes Ethernet + IP + UDP in front of the payload already at the end of
 * m; the UDP checksum is left 0 over IPv4 and computed over IPv6. */
static void write_udp_headers(struct pylb_worker *w, struct rte_mbuf *m, const struct pylb_ip *src,
                              const struct pylb_ip *dst, const uint8_t dst_mac[6], uint16_t port,
                              uint32_t len)
{
    int v4 = pylb_ip_is_v4(dst);
    uint8_t *f = rte_pktmbuf_mtod(m, uint8_t *);
    struct rte_ether_hdr *eth = (struct rte_ether_hdr *)f;
    memcpy(eth->dst_addr.addr_bytes, dst_mac, 6);
    memcpy(eth->src_addr.addr_bytes, w->mac, 6);
    eth->ether_type = rte_cpu_to_be_16(v4 ? RTE_ETHER_TYPE_IPV4 : RTE_ETHER_TYPE_IPV6);
    struct rte_udp_hdr *udp;
    if (v4) {
        struct rte_ipv4_hdr *ip = (struct rte_ipv4_hdr *)(eth + 1);
        memset(ip, 0, sizeof(*ip));
        ip->version_ihl = 0x45;
        ip->total_length = rte_cpu_to_be_16((uint16_t)(20 + 8 + len));
        ip->fragment_offset = rte_cpu_to_be_16(RTE_IPV4_HDR_DF_FLAG);
        ip->time_to_live = 64;
        ip->next_proto_id = IPPROTO_UDP;
        memcpy(&ip->src_addr, src->b + 12, 4);
        memcpy(&ip->dst_addr, dst->b + 12, 4);
        ip->hdr_checksum = rte_ipv4_cksum(ip);
        udp = (struct rte_udp_hdr *)(ip + 1);
    } else {
        struct rte_ipv6_hdr *ip6 = (struct rte_ipv6_hdr *)(eth + 1);
        ip6->vtc_flow = rte_cpu_to_be_32(6u << 28);
        ip6->payload_len = rte_cpu_to_be_16((uint16_t)(8 + len));
        ip6->proto = IPPROTO_UDP;
        ip6->hop_limits = 64;
        memcpy(ip6->src_addr, src->b, 16);
        memcpy(ip6->dst_addr, dst->b, 16);
        udp = (struct rte_udp_hdr *)(ip6 + 1);
    }
    udp->src_port = udp->dst_port = rte_cpu_to_be_16(port);
    udp->dgram_len = rte_cpu_to_be_16((uint16_t)(8 + len));
    udp->dgram_cksum = 0;
    if (!v4)
        udp->dgram_cksum = rte_ipv6_udptcp_cksum((struct rte_ipv6_hdr *)(eth + 1), udp);
}

PYLB_API int pylb_worker_send_peer(struct pylb_worker *w, const struct pylb_ip *peer,
                                   const uint8_t *payload, uint32_t len)
{
    const struct pylb_dataplane *dp = w->dp;
    if (dp == NULL || dp->peer_port == 0)
        return pylb_fail(PYLB_ESTATE, "send_peer: no peer port configured");
    int v4 = pylb_ip_is_v4(peer);
    if ((v4 && !dp->has_v4) || (!v4 && !dp->has_v6))
        return pylb_fail(PYLB_EINVAL, "send_peer: no data address of the peer's family");
    uint32_t hdrs = RTE_ETHER_HDR_LEN + (v4 ? 20 : 40) + 8;
    if (len + hdrs - RTE_ETHER_HDR_LEN > dp->mtu)
        return pylb_fail(PYLB_ETOOBIG, "send_peer: %u bytes exceed the MTU %u", len, dp->mtu);
    const struct pylb_ip *nh = peer;
    const struct pylb_ip *gw = v4 ? &dp->gateway_v4 : &dp->gateway_v6;
    if (!pylb_ip_is_zero(gw))
        nh = gw;
    uint8_t mac[6];
    if (!pylb_neigh_lookup(w->neigh, nh, mac)) {
        neigh_solicit(w, nh, 0);
        return pylb_fail(PYLB_ENOTFOUND, "send_peer: next hop's MAC not known yet");
    }
    struct rte_mbuf *m = rte_pktmbuf_alloc(w->port->pool);
    if (m == NULL)
        return pylb_fail(PYLB_ENOMEM, "send_peer: no mbuf");
    uint8_t *f = (uint8_t *)rte_pktmbuf_append(m, (uint16_t)(hdrs + len));
    if (f == NULL) {
        rte_pktmbuf_free(m);
        return pylb_fail(PYLB_ETOOBIG, "send_peer: %u bytes do not fit an mbuf", len);
    }
    memcpy(f + hdrs, payload, len);
    write_udp_headers(w, m, v4 ? &dp->local_v4 : &dp->local_v6, peer, mac, dp->peer_port, len);
    w->st.peer_sent++;
    worker_tx(w, m);
    return PYLB_OK;
}

PYLB_API int pylb_worker_forward_ip(struct pylb_worker *w, const uint8_t *ip_packet, uint32_t len,
                                    uint32_t backend, uint64_t flow_id)
{
    if (w->dp == NULL)
        return pylb_fail(PYLB_ESTATE, "forward_ip: no dataplane set");
    if (len < 20 || len > 9216 || ((ip_packet[0] >> 4) != 4 && (ip_packet[0] >> 4) != 6))
        return pylb_fail(PYLB_EINVAL, "forward_ip: not an IP packet");
    struct rte_mbuf *m = rte_pktmbuf_alloc(w->port->pool);
    if (m == NULL)
        return pylb_fail(PYLB_ENOMEM, "forward_ip: no mbuf");
    uint8_t *f = (uint8_t *)rte_pktmbuf_append(m, (uint16_t)len);
    if (f == NULL) {
        rte_pktmbuf_free(m);
        return pylb_fail(PYLB_ETOOBIG, "forward_ip: %u bytes do not fit an mbuf", len);
    }
    memcpy(f, ip_packet, len);
    uint64_t *reason = worker_encap_send(w, m, backend, 0, (uint16_t)len, ip_packet[0] >> 4, flow_id);
    if (reason != NULL) {
        w->st.fwd_for_peer_failed++;
        rte_pktmbuf_free(m);
        return pylb_fail(PYLB_EINVAL, "forward_ip: not forwarded (%s)",
                         reason == &w->st.drop_no_neighbor ? "next hop unknown" :
                         reason == &w->st.drop_too_big ? "too big" : "no such backend");
    }
    w->st.fwd_for_peer++;
    return PYLB_OK;
}
