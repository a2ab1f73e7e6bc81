/* dataplane.h - the compiled forwarding configuration, read by workers. */
#ifndef PYLB_DATAPLANE_H
#define PYLB_DATAPLANE_H

#include "internal.h"

struct dp_backend {
    struct pylb_encap_params encap;  /* all but the MACs filled at compile */
    struct pylb_ip next_hop;         /* gateway of its family, or itself */
    uint32_t vip;
    uint8_t drained;
    /* Checked once here, so the fast path checks per packet only what the
     * packet changes (encap.h); 0: every packet takes pylb_encap_write. */
    uint8_t encap_valid;
    uint8_t outer_v4;
    uint8_t overhead;                /* outer header bytes, Ethernet included */
};

struct dp_vip {
    pylb_bucket_magic_t bucket_magic;  /* of table_size: buckets without a division */
    struct pylb_ip addr;
    uint8_t proto;
    uint8_t flags;
    uint16_t port;
    uint32_t table_size;
    uint32_t *current;
    uint32_t *previous;              /* NULL: no stateful bucket (pylb.h) */
    uint64_t *stateful;              /* bit per bucket; NULL with previous */
};

/* One allocation: header, then vips, backends, tables and the VIP index. */
struct pylb_dataplane {
    uint64_t generation;
    uint64_t flow_seed;
    struct pylb_ip local_v4, local_v6;
    struct pylb_ip gateway_v4, gateway_v6;  /* zero = on-link */
    uint8_t has_v4, has_v6, exception_policy;
    uint16_t mtu, peer_port;
    uint32_t n_vips, n_backends;
    struct dp_vip *vips;
    struct dp_backend *backends;
    uint32_t index_mask;             /* open-addressed VIP index, power of two */
    int32_t *index;                  /* vip number or -1 */
} __attribute__((aligned(64)));    /* the VIPs that follow it need 16 (bucket_magic) */
_Static_assert(sizeof(struct pylb_dataplane) % _Alignof(struct dp_vip) == 0,
               "VIPs start aligned right after the header");

/* VIP for (dst, proto, dport): an exact port match first, then "all ports". */
int32_t dp_find_vip(const struct pylb_dataplane *dp, const struct pylb_ip *dst, uint8_t proto,
                    uint16_t dport);

/* VIP for a fragment, by (dst, proto) only: the all-ports VIP of the address
 * if there is one, else its first-listed VIP of that protocol. */
int32_t dp_find_vip_any_port(const struct pylb_dataplane *dp, const struct pylb_ip *dst,
                             uint8_t proto);

/* A bucket a change in force moved: a flow without state here may have
 * state elsewhere, so only its owner can place it. */
static inline int dp_stateful(const struct dp_vip *v, uint32_t bucket)
{
    return v->stateful != NULL && (v->stateful[bucket >> 6] >> (bucket & 63) & 1);
}

static inline int dp_is_local(const struct pylb_dataplane *dp, const struct pylb_ip *ip)
{
    return (dp->has_v4 && pylb_ip_eq(ip, &dp->local_v4)) ||
           (dp->has_v6 && pylb_ip_eq(ip, &dp->local_v6));
}

#endif
