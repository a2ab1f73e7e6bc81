/* dataplane.c - compiles a pylb_dp_conf into one immutable block that
 * workers swap in by reference: they never see a half-built table. */
#include <stdlib.h>
#include "dataplane.h"
#include "encap.h"

static uint32_t vip_hash(const struct pylb_ip *ip, uint8_t proto, uint16_t port)
{
    uint64_t a, b;
    memcpy(&a, ip->b, 8);
    memcpy(&b, ip->b + 8, 8);
    uint64_t h = (a * 0x9E3779B97F4A7C15ull) ^ (b + ((uint64_t)proto << 16 | port));
    h ^= h >> 31;
    h *= 0xBF58476D1CE4E5B9ull;
    return (uint32_t)(h >> 32);
}

static int32_t index_probe(const struct pylb_dataplane *dp, const struct pylb_ip *ip,
                           uint8_t proto, uint16_t port)
{
    for (uint32_t i = vip_hash(ip, proto, port) & dp->index_mask;; i = (i + 1) & dp->index_mask) {
        int32_t v = dp->index[i];
        if (v < 0)
            return -1;
        const struct dp_vip *vip = &dp->vips[v];
        if (vip->proto == proto && vip->port == port && pylb_ip_eq(&vip->addr, ip))
            return v;
    }
}

int32_t dp_find_vip(const struct pylb_dataplane *dp, const struct pylb_ip *dst, uint8_t proto,
                    uint16_t dport)
{
    if (dp->n_vips == 0)
        return -1;
    int32_t v = index_probe(dp, dst, proto, dport);
    return v >= 0 ? v : index_probe(dp, dst, proto, 0);
}

int32_t dp_find_vip_any_port(const struct pylb_dataplane *dp, const struct pylb_ip *dst,
                             uint8_t proto)
{
    if (dp->n_vips == 0)
        return -1;
    int32_t v = index_probe(dp, dst, proto, 0);
    for (uint32_t i = 0; v < 0 && i < dp->n_vips; i++)
        if (dp->vips[i].proto == proto && pylb_ip_eq(&dp->vips[i].addr, dst))
            v = (int32_t)i;
    return v;
}

/* 64-bit words of a stateful bitmap. */
static size_t bitmap_words(uint32_t table_size)
{
    return ((size_t)table_size + 63) / 64;
}

static int check_conf(const struct pylb_dp_conf *c)
{
    if (c->n_vips > PYLB_MAX_VIPS)
        return pylb_fail(PYLB_EINVAL, "%u VIPs: at most %u", c->n_vips, PYLB_MAX_VIPS);
    if ((c->n_vips && c->vips == NULL) || (c->n_backends && c->backends == NULL))
        return pylb_fail(PYLB_EINVAL, "dataplane: arrays missing");
    for (uint32_t i = 0; i < c->n_vips; i++) {
        const struct pylb_dp_vip *v = &c->vips[i];
        if (v->table_size == 0 || v->current == NULL)
            return pylb_fail(PYLB_EINVAL, "VIP %u: no destination table", i);
        if ((v->previous == NULL) != (v->stateful == NULL))
            return pylb_fail(PYLB_EINVAL, "VIP %u: previous table and stateful buckets "
                             "come together", i);
        if (v->proto != 6 && v->proto != 17)
            return pylb_fail(PYLB_EINVAL, "VIP %u: protocol %u is not TCP or UDP", i, v->proto);
        for (uint32_t b = 0; b < v->table_size; b++) {
            uint32_t cur = v->current[b], prev = v->previous ? v->previous[b] : cur;
            if ((cur != PYLB_NO_BACKEND && cur >= c->n_backends) ||
                (prev != PYLB_NO_BACKEND && prev >= c->n_backends))
                return pylb_fail(PYLB_EINVAL, "VIP %u bucket %u: backend id out of range", i, b);
        }
        for (uint32_t j = 0; j < i; j++)
            if (pylb_ip_eq(&c->vips[j].addr, &v->addr) && c->vips[j].proto == v->proto &&
                c->vips[j].port == v->port)
                return pylb_fail(PYLB_EINVAL, "VIP %u repeats VIP %u", i, j);
    }
    return PYLB_OK;
}

static void compile_backends(struct pylb_dataplane *dp, const struct pylb_dp_conf *c)
{
    for (uint32_t i = 0; i < c->n_backends; i++) {
        struct dp_backend *b = &dp->backends[i];
        const struct pylb_dp_backend *in = &c->backends[i];
        int v4 = pylb_ip_is_v4(&in->addr);
        uint32_t vip = in->vip < c->n_vips ? in->vip : UINT32_MAX;
        if (vip != UINT32_MAX)
            b->encap = c->vips[vip].encap;
        b->encap.dst = in->addr;
        b->encap.src = v4 ? c->local_v4 : c->local_v6;
        b->encap.mtu = c->mtu;
        if (b->encap.ttl == 0)
            b->encap.ttl = 64;
        const struct pylb_ip *gw = v4 ? &c->gateway_v4 : &c->gateway_v6;
        b->next_hop = pylb_ip_is_zero(gw) ? in->addr : *gw;
        b->vip = vip;
        b->drained = in->weight_zero;
        b->encap_valid = encap_params_valid(&b->encap);
        b->outer_v4 = (uint8_t)pylb_ip_is_v4(&b->encap.dst);
        b->overhead = b->encap_valid ? (uint8_t)encap_overhead(&b->encap) : 0;
    }
}

PYLB_API int pylb_dataplane_compile(const struct pylb_dp_conf *c, struct pylb_dataplane **out)
{
    if (c == NULL || out == NULL)
        return pylb_fail(PYLB_EINVAL, "dataplane: NULL argument");
    int rc = check_conf(c);
    if (rc != PYLB_OK)
        return rc;
    uint32_t mask = 1;
    while (mask < 2 * c->n_vips + 1)
        mask <<= 1;
    size_t words = 0;
    for (uint32_t i = 0; i < c->n_vips; i++)
        words += (size_t)c->vips[i].table_size * (c->vips[i].previous ? 2 : 1) +
                 (c->vips[i].stateful ? 2 * bitmap_words(c->vips[i].table_size) + 1 : 0);
    size_t size = sizeof(struct pylb_dataplane) + c->n_vips * sizeof(struct dp_vip) +
                  c->n_backends * sizeof(struct dp_backend) + mask * sizeof(int32_t) +
                  words * sizeof(uint32_t) + 64;
    struct pylb_dataplane *dp = aligned_alloc(64, (size + 63) & ~(size_t)63);
    if (dp == NULL)
        return pylb_fail(PYLB_ENOMEM, "dataplane: %zu bytes", size);
    memset(dp, 0, size);
    dp->generation = c->generation;
    dp->flow_seed = c->flow_seed;
    dp->local_v4 = c->local_v4;
    dp->local_v6 = c->local_v6;
    dp->gateway_v4 = c->gateway_v4;
    dp->gateway_v6 = c->gateway_v6;
    dp->has_v4 = c->has_v4;
    dp->has_v6 = c->has_v6;
    dp->exception_policy = c->exception_policy;
    dp->mtu = c->mtu ? c->mtu : 1500;
    dp->peer_port = c->peer_port;
    dp->n_vips = c->n_vips;
    dp->n_backends = c->n_backends;
    dp->vips = (struct dp_vip *)(dp + 1);
    dp->backends = (struct dp_backend *)(dp->vips + c->n_vips);
    dp->index = (int32_t *)(dp->backends + c->n_backends);
    dp->index_mask = mask - 1;
    uint32_t *tables = (uint32_t *)(dp->index + mask);
    memset(dp->index, 0xff, mask * sizeof(int32_t));
    for (uint32_t i = 0; i < c->n_vips; i++) {
        const struct pylb_dp_vip *in = &c->vips[i];
        struct dp_vip *v = &dp->vips[i];
        v->addr = in->addr;
        v->proto = in->proto;
        v->flags = in->flags;
        v->port = in->port;
        v->table_size = in->table_size;
        v->bucket_magic = pylb_bucket_magic(in->table_size);
        v->current = tables;
        memcpy(tables, in->current, in->table_size * sizeof(uint32_t));
        tables += in->table_size;
        if (in->previous) {
            v->previous = tables;
            memcpy(tables, in->previous, in->table_size * sizeof(uint32_t));
            tables += in->table_size;
            /* 64-bit words: start at the next 8-byte boundary. */
            tables += (uintptr_t)tables & 7 ? 1 : 0;
            v->stateful = (uint64_t *)tables;
            for (uint32_t b = 0; b < in->table_size; b++)
                if (in->stateful[b])
                    v->stateful[b >> 6] |= 1ull << (b & 63);
            tables += 2 * bitmap_words(in->table_size);
        }
        uint32_t slot = vip_hash(&v->addr, v->proto, v->port) & dp->index_mask;
        while (dp->index[slot] >= 0)
            slot = (slot + 1) & dp->index_mask;
        dp->index[slot] = (int32_t)i;
    }
    compile_backends(dp, c);
    *out = dp;
    return PYLB_OK;
}

PYLB_API void pylb_dataplane_free(struct pylb_dataplane *dp)
{
    free(dp);
}

PYLB_API uint64_t pylb_dataplane_generation(const struct pylb_dataplane *dp)
{
    return dp->generation;
}

PYLB_API int pylb_dataplane_classify(const struct pylb_dataplane *dp, const struct pylb_flow_key *key,
                                     int32_t *vip, uint64_t *flow_id, uint32_t *bucket,
                                     uint32_t *current, uint32_t *previous, uint8_t *stateful)
{
    if (dp == NULL || key == NULL)
        return pylb_fail(PYLB_EINVAL, "classify: NULL argument");
    *flow_id = pylb_flow_id(key, dp->flow_seed);
    *vip = dp_find_vip(dp, &key->dst, key->proto, key->dport);
    *bucket = 0;
    *current = *previous = PYLB_NO_BACKEND;
    *stateful = 0;
    if (*vip < 0)
        return PYLB_OK;
    const struct dp_vip *v = &dp->vips[*vip];
    *bucket = pylb_bucket_fast(*flow_id, v->table_size, v->bucket_magic);
    *current = v->current[*bucket];
    *stateful = (uint8_t)dp_stateful(v, *bucket);
    *previous = *stateful ? v->previous[*bucket] : *current;
    return PYLB_OK;
}

PYLB_API uint32_t pylb_dataplane_keep_divergent(const struct pylb_dataplane *dp,
                                                struct pylb_cache_entry *e, uint32_t n)
{
    uint32_t kept = 0;
    for (uint32_t i = 0; dp != NULL && e != NULL && i < n; i++) {
        int32_t vi = dp_find_vip(dp, &e[i].key.dst, e[i].key.proto, e[i].key.dport);
        if (vi < 0)
            continue;
        const struct dp_vip *v = &dp->vips[vi];
        uint32_t b = pylb_bucket_fast(e[i].flow_id, v->table_size, v->bucket_magic);
        if (!dp_stateful(v, b) || v->current[b] == e[i].backend)
            continue;
        e[kept] = e[i];
        e[kept].vip = vi;
        e[kept].bucket = b;
        kept++;
    }
    return kept;
}
