/* neigh_wire.c - ARP (RFC 826) and IPv6 neighbour discovery (RFC 4861) on
 * the wire: answering for the balancer's addresses and VIPs, learning next
 * hops, and asking for them. Frames are rewritten in place where possible. */
#include <rte_arp.h>
#include <rte_ether.h>
#include <rte_icmp.h>
#include <rte_ip.h>
#include "worker.h"

#define ND_NS 135
#define ND_NA 136
#define ND_OPT_SOURCE_LL 1
#define ND_OPT_TARGET_LL 2
#define SOLICIT_INTERVAL_MS 1000

/* Is ip an address we answer for: a data address, or a VIP with the flag. */
static int answers_for(const struct pylb_dataplane *dp, const struct pylb_ip *ip)
{
    if (dp_is_local(dp, ip))
        return 1;
    for (uint32_t i = 0; i < dp->n_vips; i++)
        if ((dp->vips[i].flags & PYLB_VIP_ANSWER_ARP) && pylb_ip_eq(&dp->vips[i].addr, ip))
            return 1;
    return 0;
}

static void drop(struct pylb_worker *w, uint64_t *reason, struct rte_mbuf *m)
{
    (*reason)++;
    w->st.drop_total++;
    rte_pktmbuf_free(m);
}

void neigh_handle_arp(struct pylb_worker *w, struct rte_mbuf *m, const struct pylb_parsed *pp)
{
    struct rte_ether_hdr *eth = rte_pktmbuf_mtod(m, struct rte_ether_hdr *);
    struct rte_arp_hdr *arp = rte_pktmbuf_mtod_offset(m, struct rte_arp_hdr *, pp->l2_len);
    struct rte_arp_ipv4 *a = &arp->arp_data;
    struct pylb_ip sender, target;
    if (arp->arp_hardware != rte_cpu_to_be_16(RTE_ARP_HRD_ETHER) ||
        arp->arp_protocol != rte_cpu_to_be_16(RTE_ETHER_TYPE_IPV4) || arp->arp_hlen != 6 ||
        arp->arp_plen != 4) {
        drop(w, &w->st.drop_arp_other, m);
        return;
    }
    pylb_ip_from_v4(&sender, (const uint8_t *)&a->arp_sip);
    pylb_ip_from_v4(&target, (const uint8_t *)&a->arp_tip);
    uint16_t op = rte_be_to_cpu_16(arp->arp_opcode);
    int for_us = answers_for(w->dp, &target);
    if (op == RTE_ARP_OP_REQUEST && for_us) {
        /* Like Linux: a request for us also teaches us the sender. */
        neigh_learn(w->neigh, &sender, a->arp_sha.addr_bytes, 0);
        arp->arp_opcode = rte_cpu_to_be_16(RTE_ARP_OP_REPLY);
        a->arp_tha = a->arp_sha;
        a->arp_tip = a->arp_sip;
        memcpy(a->arp_sha.addr_bytes, w->mac, 6);
        memcpy(&a->arp_sip, target.b + 12, 4);
        eth->dst_addr = a->arp_tha;
        memcpy(eth->src_addr.addr_bytes, w->mac, 6);
        w->st.arp_replied++;
        worker_tx(w, m);
        return;
    }
    if (op == RTE_ARP_OP_REPLY && dp_is_local(w->dp, &target) &&
        neigh_learn(w->neigh, &sender, a->arp_sha.addr_bytes, 0)) {
        w->st.neigh_learned++;
        rte_pktmbuf_free(m);
        return;
    }
    /* Not ours: the kernel behind the exception TAP may own the address. */
    worker_to_exception(w, m, &w->st.drop_arp_other);
}

/* The link-layer address option of type `type` in an NS/NA, or NULL. */
static const uint8_t *nd_option(const uint8_t *opt, int len, uint8_t type)
{
    while (len >= 8) {
        int olen = opt[1] * 8;
        if (olen == 0 || olen > len)
            return NULL;
        if (opt[0] == type)
            return opt + 2;
        opt += olen;
        len -= olen;
    }
    return NULL;
}

/* Writes an NS or NA frame into the empty mbuf m: Ethernet (with vlan_tci
 * when vlan is set), IPv6 with hop limit 255 (RFC 4861 7.1.2: receivers check
 * it), the ND body for `target`, and our link-layer address option.
 * Returns 0 when it does not fit. */
static int write_nd(struct pylb_worker *w, struct rte_mbuf *m, int vlan, uint16_t vlan_tci,
                    const uint8_t dst_mac[6], const struct pylb_ip *src,
                    const struct pylb_ip *dst, uint8_t type, uint8_t flags,
                    const struct pylb_ip *target, uint8_t option)
{
    const uint16_t body = 4 + 4 + 16 + 8;   /* type..checksum, flags, target, option */
    const uint16_t l2 = vlan ? RTE_ETHER_HDR_LEN + 4 : RTE_ETHER_HDR_LEN;
    uint8_t *f = (uint8_t *)rte_pktmbuf_append(m, l2 + 40 + body);
    if (f == NULL)
        return 0;
    struct rte_ether_hdr *eth = (struct rte_ether_hdr *)f;
    struct rte_ipv6_hdr *ip6 = (struct rte_ipv6_hdr *)(f + l2);
    uint8_t *icmp = (uint8_t *)(ip6 + 1);
    memcpy(eth->dst_addr.addr_bytes, dst_mac, 6);
    memcpy(eth->src_addr.addr_bytes, w->mac, 6);
    if (vlan) {
        struct rte_vlan_hdr *vh = (struct rte_vlan_hdr *)(eth + 1);
        eth->ether_type = rte_cpu_to_be_16(RTE_ETHER_TYPE_VLAN);
        vh->vlan_tci = rte_cpu_to_be_16(vlan_tci);
        vh->eth_proto = rte_cpu_to_be_16(RTE_ETHER_TYPE_IPV6);
    } else {
        eth->ether_type = rte_cpu_to_be_16(RTE_ETHER_TYPE_IPV6);
    }
    ip6->vtc_flow = rte_cpu_to_be_32(6u << 28);
    ip6->payload_len = rte_cpu_to_be_16(body);
    ip6->proto = 58;
    ip6->hop_limits = 255;
    memcpy(ip6->src_addr, src->b, 16);
    memcpy(ip6->dst_addr, dst->b, 16);
    memset(icmp, 0, body);
    icmp[0] = type;
    icmp[4] = flags;
    memcpy(icmp + 8, target->b, 16);
    icmp[24] = option;
    icmp[25] = 1;
    memcpy(icmp + 26, w->mac, 6);
    uint16_t ck = rte_ipv6_udptcp_cksum(ip6, icmp);
    memcpy(icmp + 2, &ck, 2);
    return 1;
}

int neigh_handle_nd(struct pylb_worker *w, struct rte_mbuf *m, const struct pylb_parsed *pp)
{
    if (pp->l3 != PYLB_L3_IPV6 || (pp->icmp_type != ND_NS && pp->icmp_type != ND_NA))
        return 0;
    const uint8_t *icmp = rte_pktmbuf_mtod_offset(m, const uint8_t *, pp->l2_len + pp->l3_len);
    int len = (int)pp->l3_total - (int)pp->l3_len;
    if (len < 24 || pp->ttl != 255) {
        drop(w, &w->st.drop_icmp, m);
        return 1;
    }
    struct pylb_ip target;
    memcpy(target.b, icmp + 8, 16);
    const uint8_t *ll = nd_option(icmp + 24, len - 24,
                                  pp->icmp_type == ND_NS ? ND_OPT_SOURCE_LL : ND_OPT_TARGET_LL);
    if (pp->icmp_type == ND_NA) {
        if (ll && neigh_learn(w->neigh, &target, ll, 0)) {
            w->st.neigh_learned++;
            rte_pktmbuf_free(m);
        } else {
            drop(w, &w->st.drop_icmp, m);
        }
        return 1;
    }
    if (!answers_for(w->dp, &target)) {
        worker_to_exception(w, m, &w->st.drop_icmp);
        return 1;
    }
    struct pylb_ip from = pp->key.src;
    uint8_t to_mac[6];
    const struct rte_ether_hdr *eth = rte_pktmbuf_mtod(m, const struct rte_ether_hdr *);
    memcpy(to_mac, eth->src_addr.addr_bytes, 6);
    if (pylb_ip_is_zero(&from)) {
        /* Duplicate address detection: answer to all nodes, unsolicited. */
        static const uint8_t all_nodes[16] = {0xff, 0x02, [15] = 1};
        memcpy(from.b, all_nodes, 16);
        const uint8_t mc[6] = {0x33, 0x33, 0, 0, 0, 1};
        memcpy(to_mac, mc, 6);
    } else if (ll) {
        neigh_learn(w->neigh, &from, ll, 0);
        memcpy(to_mac, ll, 6);
    }
    /* The answer leaves on the solicitation's VLAN, as an ARP reply does. */
    uint8_t flags = (uint8_t)((pylb_ip_is_zero(&pp->key.src) ? 0 : 0x40) | 0x20);   /* S, O */
    int vlan = (pp->flags & PYLB_PF_VLAN) != 0;
    uint16_t tci = pp->vlan_tci;
    rte_pktmbuf_reset(m);
    if (!write_nd(w, m, vlan, tci, to_mac, &target, &from, ND_NA, flags, &target,
                  ND_OPT_TARGET_LL)) {
        drop(w, &w->st.drop_icmp, m);
        return 1;
    }
    w->st.nd_replied++;
    worker_tx(w, m);
    return 1;
}

static struct rte_mbuf *arp_request(struct pylb_worker *w, const struct pylb_ip *ip)
{
    if (!w->dp->has_v4)
        return NULL;
    struct rte_mbuf *m = rte_pktmbuf_alloc(w->port->pool);
    if (m == NULL)
        return NULL;
    struct rte_ether_hdr *eth = (struct rte_ether_hdr *)rte_pktmbuf_append(
        m, RTE_ETHER_HDR_LEN + sizeof(struct rte_arp_hdr));
    if (eth == NULL) {
        rte_pktmbuf_free(m);
        return NULL;
    }
    struct rte_arp_hdr *arp = (struct rte_arp_hdr *)(eth + 1);
    memset(eth->dst_addr.addr_bytes, 0xff, 6);
    memcpy(eth->src_addr.addr_bytes, w->mac, 6);
    eth->ether_type = rte_cpu_to_be_16(RTE_ETHER_TYPE_ARP);
    arp->arp_hardware = rte_cpu_to_be_16(RTE_ARP_HRD_ETHER);
    arp->arp_protocol = rte_cpu_to_be_16(RTE_ETHER_TYPE_IPV4);
    arp->arp_hlen = 6;
    arp->arp_plen = 4;
    arp->arp_opcode = rte_cpu_to_be_16(RTE_ARP_OP_REQUEST);
    memcpy(arp->arp_data.arp_sha.addr_bytes, w->mac, 6);
    memcpy(&arp->arp_data.arp_sip, w->dp->local_v4.b + 12, 4);
    memset(arp->arp_data.arp_tha.addr_bytes, 0, 6);
    memcpy(&arp->arp_data.arp_tip, ip->b + 12, 4);
    return m;
}

static struct rte_mbuf *neighbour_solicitation(struct pylb_worker *w, const struct pylb_ip *ip)
{
    if (!w->dp->has_v6)
        return NULL;
    struct rte_mbuf *m = rte_pktmbuf_alloc(w->port->pool);
    if (m == NULL)
        return NULL;
    /* Solicited-node multicast: ff02::1:ffXX:XXXX and 33:33:ff:XX:XX:XX. */
    const struct pylb_ip mc_ip = {{0xff, 0x02, [11] = 1, [12] = 0xff, ip->b[13], ip->b[14],
                                   ip->b[15]}};
    const uint8_t mc_mac[6] = {0x33, 0x33, 0xff, ip->b[13], ip->b[14], ip->b[15]};
    if (!write_nd(w, m, 0, 0, mc_mac, &w->dp->local_v6, &mc_ip, ND_NS, 0, ip,
                  ND_OPT_SOURCE_LL)) {
        rte_pktmbuf_free(m);
        return NULL;
    }
    return m;
}

int neigh_solicit(struct pylb_worker *w, const struct pylb_ip *ip, int force)
{
    struct neigh_entry *e = neigh_slot(w->neigh, ip, 1);
    if (e == NULL)
        return pylb_fail(PYLB_EFULL, "neighbour table is full");
    if (e->state == NEIGH_STATIC)
        return PYLB_OK;
    uint32_t now = pylb_now_ms();
    if (!force && e->last_request_ms && (int32_t)(now - e->last_request_ms) < SOLICIT_INTERVAL_MS)
        return PYLB_OK;
    e->last_request_ms = now ? now : 1;
    struct rte_mbuf *m = pylb_ip_is_v4(ip) ? arp_request(w, ip) : neighbour_solicitation(w, ip);
    if (m == NULL)
        return pylb_fail(PYLB_ENOMEM, "solicit: no mbuf, or no local address of that family");
    w->st.neigh_requests++;
    worker_tx(w, m);
    return PYLB_OK;
}
