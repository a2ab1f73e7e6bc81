/* icmp.c - "packet too big" toward the client (RFC 1191 / RFC 8201), so a
 * path-MTU black hole cannot form where encapsulation overhead meets the MTU:
 * the client lowers its MSS / PMTU instead of retransmitting into a drop. */
#include <rte_ether.h>
#include <rte_icmp.h>
#include <rte_ip.h>
#include "worker.h"

#define IPV6_MIN_MTU 1280

/* The frame's L2 header with the MACs swapped: the answer goes back the way
 * the packet came (to the router), on the same VLAN. */
static uint8_t *reply_l2(struct pylb_worker *w, struct rte_mbuf *out, const uint8_t *in,
                         uint16_t l2_len, uint32_t total)
{
    uint8_t *f = (uint8_t *)rte_pktmbuf_append(out, (uint16_t)total);
    if (f == NULL)
        return NULL;
    memcpy(f, in, l2_len);
    memcpy(f, in + 6, 6);
    memcpy(f + 6, w->mac, 6);
    return f;
}

static int too_big_v4(struct pylb_worker *w, struct rte_mbuf *out, const uint8_t *in,
                      uint16_t l2_len, uint32_t inner_len, uint16_t mtu)
{
    const struct rte_ipv4_hdr *orig = (const struct rte_ipv4_hdr *)(in + l2_len);
    if (!(orig->fragment_offset & rte_cpu_to_be_16(RTE_IPV4_HDR_DF_FLAG)))
        return 0;    /* may be fragmented: no PMTU message is due */
    uint32_t quote = RTE_MIN(inner_len, (uint32_t)((orig->version_ihl & 0xf) * 4 + 8));
    uint8_t *f = reply_l2(w, out, in, l2_len, l2_len + 20 + 8 + quote);
    if (f == NULL)
        return 0;
    struct rte_ipv4_hdr *ip = (struct rte_ipv4_hdr *)(f + l2_len);
    memset(ip, 0, sizeof(*ip));
    ip->version_ihl = 0x45;
    ip->total_length = rte_cpu_to_be_16((uint16_t)(20 + 8 + quote));
    ip->time_to_live = 64;
    ip->next_proto_id = IPPROTO_ICMP;
    ip->src_addr = orig->dst_addr;    /* from the VIP the client spoke to */
    ip->dst_addr = orig->src_addr;
    ip->hdr_checksum = rte_ipv4_cksum(ip);
    uint8_t *icmp = (uint8_t *)(ip + 1);
    memset(icmp, 0, 8);
    icmp[0] = 3;    /* destination unreachable */
    icmp[1] = 4;    /* fragmentation needed and DF set */
    icmp[6] = (uint8_t)(mtu >> 8);
    icmp[7] = (uint8_t)mtu;
    memcpy(icmp + 8, orig, quote);
    uint16_t ck = (uint16_t)~rte_raw_cksum(icmp, 8 + quote);
    memcpy(icmp + 2, &ck, 2);
    return 1;
}

static int too_big_v6(struct pylb_worker *w, struct rte_mbuf *out, const uint8_t *in,
                      uint16_t l2_len, uint32_t inner_len, uint16_t mtu)
{
    const struct rte_ipv6_hdr *orig = (const struct rte_ipv6_hdr *)(in + l2_len);
    uint32_t quote = RTE_MIN(inner_len, (uint32_t)(IPV6_MIN_MTU - 40 - 8));
    uint8_t *f = reply_l2(w, out, in, l2_len, l2_len + 40 + 8 + quote);
    if (f == NULL)
        return 0;
    struct rte_ipv6_hdr *ip6 = (struct rte_ipv6_hdr *)(f + l2_len);
    ip6->vtc_flow = rte_cpu_to_be_32(6u << 28);
    ip6->payload_len = rte_cpu_to_be_16((uint16_t)(8 + quote));
    ip6->proto = 58;
    ip6->hop_limits = 64;
    memcpy(ip6->src_addr, orig->dst_addr, 16);
    memcpy(ip6->dst_addr, orig->src_addr, 16);
    uint8_t *icmp = (uint8_t *)(ip6 + 1);
    memset(icmp, 0, 8);
    icmp[0] = 2;    /* packet too big */
    uint32_t m = RTE_MAX((uint32_t)mtu, (uint32_t)IPV6_MIN_MTU);
    icmp[4] = (uint8_t)(m >> 24), icmp[5] = (uint8_t)(m >> 16);
    icmp[6] = (uint8_t)(m >> 8), icmp[7] = (uint8_t)m;
    memcpy(icmp + 8, orig, quote);
    uint16_t ck = rte_ipv6_udptcp_cksum(ip6, icmp);
    memcpy(icmp + 2, &ck, 2);
    return 1;
}

void icmp_send_too_big(struct pylb_worker *w, const struct rte_mbuf *m, uint16_t l2_len,
                       uint16_t l3_total, uint8_t l3, uint32_t backend)
{
    const struct dp_backend *b = &w->dp->backends[backend];
    uint32_t overhead = pylb_encap_overhead(&b->encap, l3);
    if (overhead == 0)
        return;
    /* The largest inner packet that fits: the MTU less the outer IP and
     * tunnel headers (the outer Ethernet header is not part of the MTU). */
    uint16_t mtu = (uint16_t)(b->encap.mtu - (overhead - RTE_ETHER_HDR_LEN));
    struct rte_mbuf *out = rte_pktmbuf_alloc(w->port->pool);
    if (out == NULL)
        return;
    const uint8_t *in = rte_pktmbuf_mtod(m, const uint8_t *);
    int ok = l3 == 4 ? too_big_v4(w, out, in, l2_len, l3_total, mtu)
                     : too_big_v6(w, out, in, l2_len, l3_total, mtu);
    if (!ok) {
        rte_pktmbuf_free(out);
        return;
    }
    w->st.icmp_too_big_sent++;
    worker_tx(w, out);
}
