/*
 * parse.c - what one frame carries, read from a plain buffer.
 *
 * Works on bytes, not mbufs, so the tests drive the same code as the worker.
 * Never reads outside [frame, frame+len). L4 is bounded by the IP length
 * fields, never by the frame length, so Ethernet padding is never taken for
 * transport data. Accept/reject rules and their reasons: docs/packet-path.md.
 *
 * On TRUNCATED or BAD_HEADER, l3 (and l2_len) say which layer failed; the
 * other fields may be partly filled and mean nothing.
 */
#include "internal.h"

#define ETH_HLEN 14
#define VLAN_HLEN 4
#define ETH_P_IPV4 0x0800
#define ETH_P_ARP 0x0806
#define ETH_P_8021Q 0x8100
#define ETH_P_8021AD 0x88a8
#define ETH_P_IPV6 0x86dd

#define ARP_LEN 28
#define IPV4_HLEN 20
#define IPV6_HLEN 40
#define TCP_HLEN 20
#define UDP_HLEN 8
#define ICMP_HLEN 8  /* every ICMP and ICMPv6 message has at least this */

#define PROTO_HOPOPTS 0
#define PROTO_ICMP 1
#define PROTO_TCP 6
#define PROTO_UDP 17
#define PROTO_ROUTING 43
#define PROTO_FRAGMENT 44
#define PROTO_ICMPV6 58
#define PROTO_DSTOPTS 60

/* RFC 8200 allows each header once (destination options twice): a longer
 * chain is an attack on the parser's time, not traffic. */
#define IPV6_MAX_EXT 8

static inline uint16_t rd16(const uint8_t *p)
{
    return (uint16_t)(p[0] << 8 | p[1]);
}

/* avail: bytes the IP length fields give the transport header (padding excluded). */
static inline int parse_l4(const uint8_t *l4, uint32_t avail, uint8_t proto,
                           uint8_t icmp_proto, struct pylb_parsed *out)
{
    if (proto == PROTO_TCP) {
        if (PYLB_UNLIKELY(avail < TCP_HLEN))
            return PYLB_PARSE_TRUNCATED;
        uint32_t doff = (uint32_t)(l4[12] >> 4) * 4;
        if (PYLB_UNLIKELY(doff < TCP_HLEN))
            return PYLB_PARSE_BAD_HEADER;
        if (PYLB_UNLIKELY(doff > avail))
            return PYLB_PARSE_TRUNCATED;
        out->tcp_flags = l4[13];
    } else if (proto == PROTO_UDP) {
        if (PYLB_UNLIKELY(avail < UDP_HLEN))
            return PYLB_PARSE_TRUNCATED;
        uint32_t ulen = rd16(l4 + 4);
        /* A first fragment carries only part of the datagram its length counts. */
        uint32_t limit = (out->flags & PYLB_PF_FRAGMENT) ? 0xffff : avail;
        if (PYLB_UNLIKELY(ulen < UDP_HLEN || ulen > limit))
            return PYLB_PARSE_BAD_HEADER;
    } else {
        if (proto == icmp_proto) {
            if (PYLB_UNLIKELY(avail < ICMP_HLEN))
                return PYLB_PARSE_TRUNCATED;
            out->icmp_type = l4[0];
            out->icmp_code = l4[1];
        }
        return PYLB_PARSE_OK;
    }
    out->key.sport = rd16(l4);
    out->key.dport = rd16(l4 + 2);
    out->flags |= PYLB_PF_HAS_L4;
    return PYLB_PARSE_OK;
}

static inline int parse_ipv4(const uint8_t *ip, uint32_t avail, struct pylb_parsed *out)
{
    out->l3 = PYLB_L3_IPV4;
    if (PYLB_UNLIKELY(avail < IPV4_HLEN))
        return PYLB_PARSE_TRUNCATED;
    uint32_t hlen = (uint32_t)(ip[0] & 0x0f) * 4;
    uint32_t total = rd16(ip + 2);
    if (PYLB_UNLIKELY((ip[0] >> 4) != 4 || hlen < IPV4_HLEN || total < hlen))
        return PYLB_PARSE_BAD_HEADER;
    /* total >= hlen, so this also catches options cut off by the frame end. */
    if (PYLB_UNLIKELY(total > avail))
        return PYLB_PARSE_TRUNCATED;

    uint16_t frag = rd16(ip + 6);
    out->tos = ip[1];
    out->ttl = ip[8];
    out->df = (frag >> 14) & 1;
    out->l4_proto = ip[9];
    out->key.proto = ip[9];
    out->l3_len = (uint16_t)hlen;
    out->l3_total = (uint16_t)total;
    pylb_ip_from_v4(&out->key.src, ip + 12);
    pylb_ip_from_v4(&out->key.dst, ip + 16);
    if (hlen > IPV4_HLEN)
        out->flags |= PYLB_PF_IP_OPTIONS;
    if (frag & 0x3fff) {  /* MF or offset */
        out->flags |= PYLB_PF_FRAGMENT;
        if (frag & 0x1fff) {
            out->flags |= PYLB_PF_LATER_FRAGMENT;
            return PYLB_PARSE_OK;
        }
    }
    return parse_l4(ip + hlen, total - hlen, ip[9], PROTO_ICMP, out);
}

static inline int parse_ipv6(const uint8_t *ip, uint32_t avail, struct pylb_parsed *out)
{
    out->l3 = PYLB_L3_IPV6;
    if (PYLB_UNLIKELY(avail < IPV6_HLEN))
        return PYLB_PARSE_TRUNCATED;
    if (PYLB_UNLIKELY((ip[0] >> 4) != 6))
        return PYLB_PARSE_BAD_HEADER;
    /* Jumbograms (payload length 0 + hop-by-hop option) cannot be in an
     * Ethernet frame; their empty payload fails the chain below. */
    uint32_t total = IPV6_HLEN + rd16(ip + 4);
    if (PYLB_UNLIKELY(total > avail))
        return PYLB_PARSE_TRUNCATED;

    out->tos = (uint8_t)(rd16(ip) >> 4);
    out->ttl = ip[7];
    out->l3_total = (uint16_t)total;
    memcpy(out->key.src.b, ip + 8, 16);
    memcpy(out->key.dst.b, ip + 24, 16);

    uint32_t off = IPV6_HLEN;
    uint8_t next = ip[6];
    int later = 0;
    for (int n = 0; next == PROTO_HOPOPTS || next == PROTO_ROUTING ||
                    next == PROTO_DSTOPTS || next == PROTO_FRAGMENT; n++) {
        /* Hop-by-hop is only valid first (RFC 8200 4.1). */
        if (PYLB_UNLIKELY(n == IPV6_MAX_EXT || (next == PROTO_HOPOPTS && n != 0)))
            return PYLB_PARSE_BAD_HEADER;
        /* Every extension header is at least 8 bytes. */
        if (PYLB_UNLIKELY(off + 8 > total))
            return PYLB_PARSE_TRUNCATED;
        uint32_t hlen = 8;
        if (next == PROTO_FRAGMENT) {
            out->flags |= PYLB_PF_FRAGMENT;
            later = (rd16(ip + off + 2) & 0xfff8) != 0;
        } else {
            hlen = ((uint32_t)ip[off + 1] + 1) * 8;
            if (PYLB_UNLIKELY(off + hlen > total))
                return PYLB_PARSE_TRUNCATED;
        }
        out->flags |= PYLB_PF_IP_OPTIONS;
        next = ip[off];
        off += hlen;
        if (later)
            break;
    }
    out->l3_len = (uint16_t)off;
    out->l4_proto = next;
    out->key.proto = next;
    if (later) {
        out->flags |= PYLB_PF_LATER_FRAGMENT;
        return PYLB_PARSE_OK;
    }
    /* AH, ESP, no-next-header and unknown protocols: OK without ports. */
    return parse_l4(ip + off, total - off, next, PROTO_ICMPV6, out);
}

static inline int parse_arp(const uint8_t *arp, uint32_t avail, struct pylb_parsed *out)
{
    out->l3 = PYLB_L3_ARP;
    if (PYLB_UNLIKELY(avail < ARP_LEN))
        return PYLB_PARSE_TRUNCATED;
    /* Only Ethernet/IPv4 ARP exists for the balancer. */
    if (PYLB_UNLIKELY(rd16(arp) != 1 || rd16(arp + 2) != ETH_P_IPV4 ||
                      arp[4] != 6 || arp[5] != 4))
        return PYLB_PARSE_BAD_HEADER;
    out->l3_len = ARP_LEN;
    out->l3_total = ARP_LEN;
    /* Sender and target protocol addresses, for the neighbour code. */
    pylb_ip_from_v4(&out->key.src, arp + 14);
    pylb_ip_from_v4(&out->key.dst, arp + 24);
    return PYLB_PARSE_OK;
}

PYLB_API int pylb_parse(const uint8_t *frame, uint32_t len, struct pylb_parsed *out)
{
    /* 58 bytes: a few vector stores, cheaper than tracking what each path set. */
    memset(out, 0, sizeof(*out));
    if (PYLB_UNLIKELY(len < ETH_HLEN))
        return PYLB_PARSE_TRUNCATED;

    uint32_t l2 = ETH_HLEN;
    uint16_t type = rd16(frame + 12);
    if (type == ETH_P_8021Q) {
        if (PYLB_UNLIKELY(len < ETH_HLEN + VLAN_HLEN))
            return PYLB_PARSE_TRUNCATED;
        uint16_t inner = rd16(frame + 16);
        /* Stacked tags are not ours to forward: reported before anything is set. */
        if (PYLB_UNLIKELY(inner == ETH_P_8021Q || inner == ETH_P_8021AD))
            return PYLB_PARSE_NOT_IP;
        out->vlan_tci = rd16(frame + 14);
        out->flags = PYLB_PF_VLAN;
        type = inner;
        l2 += VLAN_HLEN;
    } else if (PYLB_UNLIKELY(type == ETH_P_8021AD)) {
        return PYLB_PARSE_NOT_IP;
    }
    out->l2_len = (uint16_t)l2;

    if (PYLB_LIKELY(type == ETH_P_IPV4))
        return parse_ipv4(frame + l2, len - l2, out);
    if (type == ETH_P_IPV6)
        return parse_ipv6(frame + l2, len - l2, out);
    if (type == ETH_P_ARP)
        return parse_arp(frame + l2, len - l2, out);
    return PYLB_PARSE_NOT_IP;
}
