/*
 * encap.h - the writing half of encap.c, inline for the worker's fast path.
 *
 * encap_emit writes the outer headers and trusts its arguments: the public
 * pylb_encap_write validates them first (encap.c); the worker validates a
 * backend's parameters once when its dataplane is compiled and checks only
 * what changes per packet (encap_fits). The MACs come apart from the
 * parameters so that the worker needs no per-packet copy of them.
 */
#ifndef PYLB_ENCAP_H
#define PYLB_ENCAP_H

#include <stdbool.h>
#include "internal.h"

#define ETH_HLEN 14
#define IPV4_HLEN 20
#define IPV6_HLEN 40
#define UDP_HLEN 8
#define VXLAN_HLEN 8
#define ETH_P_IPV4 0x0800
#define ETH_P_IPV6 0x86dd
#define PROTO_IPIP 4
#define PROTO_IPV6 41
#define PROTO_UDP 17

/* Big-endian stores, one instruction each rather than a byte at a time. */
static inline void wr16(uint8_t *p, uint32_t v)
{
    uint16_t be = (uint16_t)v;
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    be = __builtin_bswap16(be);
#endif
    memcpy(p, &be, 2);
}

static inline void wr32(uint8_t *p, uint32_t v)
{
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    memcpy(p, &v, 4);
}

/* One's-complement sum in native byte order (RFC 1071: order-independent, the
 * folded result is stored back in native order). Each chunk but the last must
 * have an even length. */
static inline uint64_t csum_add(uint64_t sum, const uint8_t *p, uint32_t len)
{
    for (; len >= 8; p += 8, len -= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        sum += w;
        sum += sum < w;  /* end-around carry */
    }
    uint64_t tail = 0;
    if (len >= 4) {
        uint32_t w;
        memcpy(&w, p, 4);
        tail += w;
        p += 4;
        len -= 4;
    }
    if (len >= 2) {
        uint16_t w;
        memcpy(&w, p, 2);
        tail += w;
        p += 2;
        len -= 2;
    }
    if (len) {
        uint16_t w = 0;
        memcpy(&w, p, 1);  /* the odd byte is the high half of a zero-padded word */
        tail += w;
    }
    sum += tail;
    return sum + (sum < tail);
}

static inline uint16_t csum_fold(uint64_t sum)
{
    sum = (sum & 0xffffffff) + (sum >> 32);
    sum = (sum & 0xffffffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

static inline uint32_t after_ip_len(uint8_t kind)
{
    return kind == PYLB_ENCAP_VXLAN ? UDP_HLEN + VXLAN_HLEN + ETH_HLEN
         : kind == PYLB_ENCAP_GUE ? UDP_HLEN : 0;
}

/* IPv4 id when the outer packet may be fragmented (RFC 6864): the inner id
 * changes per packet, the flow id separates flows. Never 0. */
static inline uint16_t outer_ipv4_id(uint64_t flow_id, const uint8_t *inner)
{
    uint32_t id = (uint32_t)(flow_id ^ flow_id >> 16 ^ flow_id >> 32 ^ flow_id >> 48);
    id = (id ^ (uint32_t)(inner[4] << 8 | inner[5])) & 0xffff;
    return (uint16_t)(id | (id == 0));
}

/* The outer IPv4 header is written in two parts: what every packet to a
 * backend shares (a worker keeps it ready, encap_fixed), and what changes per
 * packet (encap_varying); the checksum covers both, so it comes last. */
static inline void write_ipv4_varying(uint8_t *ip, uint8_t tos, bool df, uint16_t id,
                                      uint32_t total)
{
    ip[1] = tos;
    wr16(ip + 2, total);
    wr16(ip + 4, df ? 0 : id);  /* RFC 6864: id 0 is fine for atomic packets */
    wr16(ip + 6, df ? 0x4000 : 0);
    ip[10] = ip[11] = 0;
    uint16_t sum = csum_fold(csum_add(0, ip, IPV4_HLEN));
    memcpy(ip + 10, &sum, 2);
}

static inline void write_ipv6_varying(uint8_t *ip, uint8_t tclass, uint64_t flow_id,
                                      uint32_t total)
{
    /* Flow label from the flow id so that ECMP after us spreads flows (RFC 6438). */
    wr32(ip, 6u << 28 | (uint32_t)tclass << 20 | (uint32_t)(flow_id & 0xfffff));
    wr16(ip + 4, total - IPV6_HLEN);
}

/* RFC 6335 dynamic range 49152..65535, as VXLAN (RFC 7348 5) recommends. */
static inline uint16_t udp_sport(uint64_t flow_id)
{
    uint64_t h = flow_id ^ flow_id >> 23 ^ flow_id >> 41;
    return (uint16_t)(0xc000 | (h & 0x3fff));
}

/* The UDP checksum over IPv6 covers everything from the UDP header to the end
 * of the inner packet, which is contiguous in buf. */
static inline void udp6_checksum(uint8_t *ip, uint8_t *udp, uint32_t udp_len)
{
    uint8_t pseudo[8] = {0, 0, (uint8_t)(udp_len >> 8), (uint8_t)udp_len, 0, 0, 0, PROTO_UDP};
    uint64_t sum = csum_add(0, ip + 8, 32);
    sum = csum_add(sum, pseudo, sizeof(pseudo));
    uint16_t c = csum_fold(csum_add(sum, udp, udp_len));
    if (c == 0)
        c = 0xffff;  /* 0 would mean "no checksum", which IPv6 forbids */
    memcpy(udp + 6, &c, 2);
}

/* The outer bytes every packet of inner family inner_l3 to these parameters
 * and MACs shares: Ethernet, the fixed fields of IP and UDP, VXLAN and its
 * inner Ethernet header. Written at eth, outer headers of encap_overhead(p)
 * bytes; encap_varying completes them. */
static inline void encap_fixed(const struct pylb_encap_params *p, const uint8_t dst_mac[6],
                               const uint8_t src_mac[6], uint8_t *eth, uint8_t inner_l3,
                               bool outer_v4)
{
    bool inner_v4 = inner_l3 == 4;
    uint8_t proto = p->kind != PYLB_ENCAP_IPIP ? PROTO_UDP : inner_v4 ? PROTO_IPIP : PROTO_IPV6;
    memcpy(eth, dst_mac, 6);
    memcpy(eth + 6, src_mac, 6);
    wr16(eth + 12, outer_v4 ? ETH_P_IPV4 : ETH_P_IPV6);
    uint8_t *ip = eth + ETH_HLEN;
    if (outer_v4) {
        ip[0] = 0x45;
        ip[8] = p->ttl;
        ip[9] = proto;
        memcpy(ip + 12, p->src.b + 12, 4);
        memcpy(ip + 16, p->dst.b + 12, 4);
    } else {
        ip[6] = proto;
        ip[7] = p->ttl;
        memcpy(ip + 8, p->src.b, 16);
        memcpy(ip + 24, p->dst.b, 16);
    }
    if (p->kind == PYLB_ENCAP_IPIP)
        return;
    uint8_t *udp = ip + (outer_v4 ? IPV4_HLEN : IPV6_HLEN);
    wr16(udp + 2, p->udp_dport);
    if (p->kind == PYLB_ENCAP_VXLAN) {
        uint8_t *vx = udp + UDP_HLEN;
        wr32(vx, 0x08000000);  /* I flag: the VNI is valid */
        wr32(vx + 4, p->vni << 8);
        uint8_t *ieth = vx + VXLAN_HLEN;
        memcpy(ieth, p->inner_mac, 6);
        memcpy(ieth + 6, src_mac, 6);
        wr16(ieth + 12, inner_v4 ? ETH_P_IPV4 : ETH_P_IPV6);
    }
}

/* The rest, from the inner packet at eth + overhead: lengths, TOS / traffic
 * class, DF and id, flow label, UDP source port, checksums. */
static inline void encap_varying(uint8_t kind, uint8_t *eth, uint32_t overhead, uint32_t inner_len,
                                 uint8_t inner_l3, uint64_t flow_id, bool outer_v4)
{
    const uint8_t *inner = eth + overhead;
    bool inner_v4 = inner_l3 == 4;
    uint32_t ip_hlen = outer_v4 ? IPV4_HLEN : IPV6_HLEN;
    uint32_t total = overhead - ETH_HLEN + inner_len;  /* <= mtu <= 65535 */
    /* TOS / traffic class (DSCP and ECN) copied: RFC 2003 3.1, RFC 2473 6.4, RFC 6040. */
    uint8_t tos = inner_v4 ? inner[1] : (uint8_t)(inner[0] << 4 | inner[1] >> 4);
    uint8_t *ip = eth + ETH_HLEN;
    if (outer_v4) {
        /* Routers never fragment IPv6 (RFC 8200 5); DF keeps it so inside IPv4. */
        bool df = inner_v4 ? (inner[6] & 0x40) != 0 : true;
        write_ipv4_varying(ip, tos, df, df ? 0 : outer_ipv4_id(flow_id, inner), total);
    } else {
        write_ipv6_varying(ip, tos, flow_id, total);
    }
    if (kind == PYLB_ENCAP_IPIP)
        return;
    uint8_t *udp = ip + ip_hlen;
    uint32_t udp_len = total - ip_hlen;
    wr16(udp, udp_sport(flow_id));
    wr16(udp + 4, udp_len);
    wr16(udp + 6, 0);  /* IPv4: no checksum, RFC 7348 5 */
    /* Linux drops zero-checksum UDP over IPv6 unless udp6zerocsumrx is set. */
    if (!outer_v4)
        udp6_checksum(ip, udp, udp_len);
}

/* The outer headers for a valid inner packet with room in front of it: what
 * pylb_encap_write does once its checks passed. outer_v4 and overhead are
 * those of p (pylb_ip_is_v4(&p->dst), pylb_encap_overhead). Returns the
 * overhead. */
static inline uint32_t encap_emit(const struct pylb_encap_params *p, const uint8_t dst_mac[6],
                                  const uint8_t src_mac[6], uint8_t *buf, uint32_t off,
                                  uint32_t inner_len, uint8_t inner_l3, uint64_t flow_id,
                                  uint32_t overhead, bool outer_v4)
{
    uint8_t *eth = buf + off - overhead;
    encap_fixed(p, dst_mac, src_mac, eth, inner_l3, outer_v4);
    encap_varying(p->kind, eth, overhead, inner_len, inner_l3, flow_id, outer_v4);
    return overhead;
}

/* Outer headers are 34 (IPv4, IPIP) to 84 bytes (IPv6, VXLAN). */
#define ENCAP_MAX_OVERHEAD (ETH_HLEN + IPV6_HLEN + UDP_HLEN + VXLAN_HLEN + ETH_HLEN)
#define ENCAP_MIN_OVERHEAD (ETH_HLEN + IPV4_HLEN)

/* Copies n bytes of prepared outer headers (ENCAP_MIN_OVERHEAD <= n <=
 * ENCAP_MAX_OVERHEAD) in two or three 32-byte moves that may overlap, rather
 * than a memcpy call of variable length. Never writes past dst + n. */
static inline void encap_copy_fixed(uint8_t *dst, const uint8_t *src, uint32_t n)
{
    memcpy(dst, src, 32);
    if (n > 64)
        memcpy(dst + 32, src + 32, 32);
    memcpy(dst + n - 32, src + n - 32, 32);
}

/* What a packet must satisfy, beyond parameters checked once
 * (encap_params_valid), for encap_emit. */
static inline bool encap_fits(const struct pylb_encap_params *p, const uint8_t *buf, uint32_t off,
                              uint32_t inner_len, uint8_t inner_l3, uint32_t overhead)
{
    return (inner_l3 == 4 || inner_l3 == 6) && off >= overhead &&
           inner_len >= (inner_l3 == 4 ? IPV4_HLEN : IPV6_HLEN) && buf[off] >> 4 == inner_l3 &&
           overhead - ETH_HLEN + inner_len <= p->mtu;
}

/* The per-packet-independent half of pylb_encap_write's checks. */
static inline bool encap_params_valid(const struct pylb_encap_params *p)
{
    return p->kind >= PYLB_ENCAP_IPIP && p->kind <= PYLB_ENCAP_GUE &&
           pylb_ip_is_v4(&p->src) == pylb_ip_is_v4(&p->dst) && p->ttl != 0 &&
           (p->kind == PYLB_ENCAP_IPIP || p->udp_dport != 0) &&
           (p->kind != PYLB_ENCAP_VXLAN || p->vni <= 0xffffff);
}

static inline uint32_t encap_overhead(const struct pylb_encap_params *p)
{
    return ETH_HLEN + (pylb_ip_is_v4(&p->dst) ? IPV4_HLEN : IPV6_HLEN) + after_ip_len(p->kind);
}

#endif
