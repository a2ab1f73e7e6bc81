/*
 * encap.c - outer headers written in place in front of an inner IP packet.
 *
 * The balancer is not an IP hop for the inner packet: its bytes (TTL, DSCP,
 * ECN, checksum) are never written, so the backend sees what the client sent.
 * Everything is validated before the first byte is written, so a failing call
 * leaves the buffer as it was. The outer header rules and their RFCs are in
 * docs/packet-path.md.
 */
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

static inline void wr16(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static inline void wr32(uint8_t *p, uint32_t v)
{
    wr16(p, v >> 16);
    wr16(p + 2, v);
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

/* 0 for invalid params. The exported symbol is interposable, so the hot path
 * calls this copy instead of going through the PLT. */
static inline uint32_t overhead_of(const struct pylb_encap_params *p, uint8_t inner_l3)
{
    if (!p || (inner_l3 != 4 && inner_l3 != 6) ||
        p->kind < PYLB_ENCAP_IPIP || p->kind > PYLB_ENCAP_GUE)
        return 0;
    return ETH_HLEN + (pylb_ip_is_v4(&p->dst) ? IPV4_HLEN : IPV6_HLEN) + after_ip_len(p->kind);
}

PYLB_API uint32_t pylb_encap_overhead(const struct pylb_encap_params *p, uint8_t inner_l3)
{
    return overhead_of(p, inner_l3);
}

/* Says which condition of params_ok failed (keep the two in step). Formatting
 * a message is slow, so it stays out of the hot path. */
static __attribute__((cold, noinline)) int
check_params(const struct pylb_encap_params *p, const uint8_t *buf, uint32_t off,
             uint32_t inner_len, uint8_t inner_l3, uint32_t overhead)
{
    if (!p || !buf)
        return pylb_fail(PYLB_EINVAL, "encap: NULL params or buffer");
    if (p->kind < PYLB_ENCAP_IPIP || p->kind > PYLB_ENCAP_GUE)
        return pylb_fail(PYLB_EINVAL, "encap: unknown kind %u", p->kind);
    if (inner_l3 != 4 && inner_l3 != 6)
        return pylb_fail(PYLB_EINVAL, "encap: inner_l3 must be 4 or 6, not %u", inner_l3);
    if (pylb_ip_is_v4(&p->src) != pylb_ip_is_v4(&p->dst))
        return pylb_fail(PYLB_EINVAL, "encap: outer source and destination differ in family");
    if (p->ttl == 0)
        return pylb_fail(PYLB_EINVAL, "encap: outer TTL 0");
    if (p->kind != PYLB_ENCAP_IPIP && p->udp_dport == 0)
        return pylb_fail(PYLB_EINVAL, "encap: UDP destination port 0");
    if (p->kind == PYLB_ENCAP_VXLAN && p->vni > 0xffffff)
        return pylb_fail(PYLB_EINVAL, "encap: VNI %u over 24 bits", p->vni);
    if (off < overhead)
        return pylb_fail(PYLB_EFULL, "encap: %u bytes of headroom, %u needed", off, overhead);
    if (inner_len < (inner_l3 == 4 ? IPV4_HLEN : IPV6_HLEN) || buf[off] >> 4 != inner_l3)
        return pylb_fail(PYLB_EINVAL, "encap: inner packet of %u bytes is not IPv%u",
                         inner_len, inner_l3);
    uint64_t outer = (uint64_t)overhead - ETH_HLEN + inner_len;
    if (outer > p->mtu)
        return pylb_fail(PYLB_ETOOBIG, "encap: outer packet of %llu bytes over MTU %u",
                         (unsigned long long)outer, p->mtu);
    return PYLB_OK;
}

static inline bool params_ok(const struct pylb_encap_params *p, const uint8_t *buf,
                             uint32_t off, uint32_t inner_len, uint8_t inner_l3,
                             uint32_t overhead)
{
    return overhead != 0 && buf &&
           pylb_ip_is_v4(&p->src) == pylb_ip_is_v4(&p->dst) && p->ttl != 0 &&
           (p->kind == PYLB_ENCAP_IPIP || p->udp_dport != 0) &&
           (p->kind != PYLB_ENCAP_VXLAN || p->vni <= 0xffffff) &&
           off >= overhead &&
           inner_len >= (inner_l3 == 4 ? IPV4_HLEN : IPV6_HLEN) && buf[off] >> 4 == inner_l3 &&
           (uint64_t)overhead - ETH_HLEN + inner_len <= p->mtu;
}

/* IPv4 id when the outer packet may be fragmented (RFC 6864): the inner id
 * changes per packet, the flow id separates flows. Never 0. */
static inline uint16_t outer_ipv4_id(uint64_t flow_id, const uint8_t *inner)
{
    uint32_t id = (uint32_t)(flow_id ^ flow_id >> 16 ^ flow_id >> 32 ^ flow_id >> 48);
    id = (id ^ (uint32_t)(inner[4] << 8 | inner[5])) & 0xffff;
    return (uint16_t)(id | (id == 0));
}

static inline void write_ipv4(uint8_t *ip, const struct pylb_encap_params *p, uint8_t tos,
                              bool df, uint16_t id, uint8_t proto, uint32_t total)
{
    ip[0] = 0x45;
    ip[1] = tos;
    wr16(ip + 2, total);
    wr16(ip + 4, df ? 0 : id);  /* RFC 6864: id 0 is fine for atomic packets */
    wr16(ip + 6, df ? 0x4000 : 0);
    ip[8] = p->ttl;
    ip[9] = proto;
    ip[10] = ip[11] = 0;
    memcpy(ip + 12, p->src.b + 12, 4);
    memcpy(ip + 16, p->dst.b + 12, 4);
    uint16_t sum = csum_fold(csum_add(0, ip, IPV4_HLEN));
    memcpy(ip + 10, &sum, 2);
}

static inline void write_ipv6(uint8_t *ip, const struct pylb_encap_params *p, uint8_t tclass,
                              uint64_t flow_id, uint8_t proto, uint32_t total)
{
    /* Flow label from the flow id so that ECMP after us spreads flows (RFC 6438). */
    wr32(ip, 6u << 28 | (uint32_t)tclass << 20 | (uint32_t)(flow_id & 0xfffff));
    wr16(ip + 4, total - IPV6_HLEN);
    ip[6] = proto;
    ip[7] = p->ttl;
    memcpy(ip + 8, p->src.b, 16);
    memcpy(ip + 24, p->dst.b, 16);
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

PYLB_API int pylb_encap_write(const struct pylb_encap_params *p, uint8_t *buf, uint32_t off,
                              uint32_t inner_len, uint8_t inner_l3, uint64_t flow_id)
{
    uint32_t overhead = overhead_of(p, inner_l3);
    if (PYLB_UNLIKELY(!params_ok(p, buf, off, inner_len, inner_l3, overhead)))
        return check_params(p, buf, off, inner_len, inner_l3, overhead);

    const uint8_t *inner = buf + off;
    uint8_t *eth = buf + off - overhead;
    bool outer_v4 = pylb_ip_is_v4(&p->dst);
    bool inner_v4 = inner_l3 == 4;
    uint32_t ip_hlen = outer_v4 ? IPV4_HLEN : IPV6_HLEN;
    uint32_t total = overhead - ETH_HLEN + inner_len;  /* <= mtu <= 65535 */
    /* TOS / traffic class (DSCP and ECN) copied: RFC 2003 3.1, RFC 2473 6.4, RFC 6040. */
    uint8_t tos = inner_v4 ? inner[1] : (uint8_t)(inner[0] << 4 | inner[1] >> 4);
    /* Routers never fragment IPv6 (RFC 8200 5); DF keeps it so inside IPv4. */
    bool df = inner_v4 ? (inner[6] & 0x40) != 0 : true;
    uint8_t proto = p->kind != PYLB_ENCAP_IPIP ? PROTO_UDP : inner_v4 ? PROTO_IPIP : PROTO_IPV6;

    memcpy(eth, p->dst_mac, 6);
    memcpy(eth + 6, p->src_mac, 6);
    wr16(eth + 12, outer_v4 ? ETH_P_IPV4 : ETH_P_IPV6);
    uint8_t *ip = eth + ETH_HLEN;
    if (outer_v4)
        write_ipv4(ip, p, tos, df, df ? 0 : outer_ipv4_id(flow_id, inner), proto, total);
    else
        write_ipv6(ip, p, tos, flow_id, proto, total);
    if (p->kind == PYLB_ENCAP_IPIP)
        return (int)overhead;

    uint8_t *udp = ip + ip_hlen;
    uint32_t udp_len = total - ip_hlen;
    wr16(udp, udp_sport(flow_id));
    wr16(udp + 2, p->udp_dport);
    wr16(udp + 4, udp_len);
    wr16(udp + 6, 0);  /* IPv4: no checksum, RFC 7348 5 */
    if (p->kind == PYLB_ENCAP_VXLAN) {
        uint8_t *vx = udp + UDP_HLEN;
        wr32(vx, 0x08000000);  /* I flag: the VNI is valid */
        wr32(vx + 4, p->vni << 8);
        uint8_t *ieth = vx + VXLAN_HLEN;
        memcpy(ieth, p->inner_mac, 6);
        memcpy(ieth + 6, p->src_mac, 6);
        wr16(ieth + 12, inner_v4 ? ETH_P_IPV4 : ETH_P_IPV6);
    }
    /* Linux drops zero-checksum UDP over IPv6 unless udp6zerocsumrx is set. */
    if (!outer_v4)
        udp6_checksum(ip, udp, udp_len);
    return (int)overhead;
}
