/*
 * encap.c - outer headers written in place in front of an inner IP packet.
 *
 * The balancer is not an IP hop for the inner packet: its bytes (TTL, DSCP,
 * ECN, checksum) are never written, so the backend sees what the client sent.
 * Everything is validated before the first byte is written, so a failing call
 * leaves the buffer as it was. The outer header rules and their RFCs are in
 * docs/packet-path.md.
 */
#include "encap.h"

/* 0 for invalid params. The exported symbol is interposable, so the hot path
 * calls this copy instead of going through the PLT. */
static inline uint32_t overhead_of(const struct pylb_encap_params *p, uint8_t inner_l3)
{
    if (!p || (inner_l3 != 4 && inner_l3 != 6) ||
        p->kind < PYLB_ENCAP_IPIP || p->kind > PYLB_ENCAP_GUE)
        return 0;
    return encap_overhead(p);
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

PYLB_API int pylb_encap_write(const struct pylb_encap_params *p, uint8_t *buf, uint32_t off,
                              uint32_t inner_len, uint8_t inner_l3, uint64_t flow_id)
{
    uint32_t overhead = overhead_of(p, inner_l3);
    if (PYLB_UNLIKELY(!params_ok(p, buf, off, inner_len, inner_l3, overhead)))
        return check_params(p, buf, off, inner_len, inner_l3, overhead);

    return (int)encap_emit(p, p->dst_mac, p->src_mac, buf, off, inner_len, inner_l3, flow_id,
                           overhead, pylb_ip_is_v4(&p->dst));
}
