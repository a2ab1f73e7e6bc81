/*
 * flow_id.c - the seeded flow hash (docs/flow-id.md; reference pylb/flow_id.py).
 *
 * The key is read as five little-endian 64-bit words, the last one built from
 * the fields, so the id depends neither on struct padding nor on host byte
 * order: every balancer, whatever its CPU, computes the same id.
 */
#include "internal.h"

#define P1 0x9E3779B185EBCA87ULL
#define P2 0xC2B2AE3D27D4EB4FULL
#define P3 0x165667B19E3779F9ULL
#define FLOW_KEY_BYTES 40

_Static_assert(sizeof(struct pylb_flow_key) == FLOW_KEY_BYTES, "flow key is 40 bytes");

static inline uint64_t rotl64(uint64_t x, int r)
{
    return (x << r) | (x >> (64 - r));
}

static inline uint64_t load_le64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof(v));
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

/* Each word goes through a multiply before it meets the accumulator, and the
 * rotation feeds the high bits of one product into the low bits of the next:
 * a multiply alone only carries differences upward. */
static inline uint64_t mix_round(uint64_t acc, uint64_t word)
{
    return rotl64(acc ^ (word * P2), 31) * P1;
}

/* murmur3's fmix64: every input bit reaches every output bit. */
static inline uint64_t fmix64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xFF51AFD7ED558CCDULL;
    x ^= x >> 33;
    x *= 0xC4CEB9FE1A85EC53ULL;
    return x ^ (x >> 33);
}

/* Not exported: Maglev hashes backend names with it (maglev.c). */
uint64_t pylb_hash_bytes(const uint8_t *data, size_t len, uint64_t seed)
{
    uint64_t acc = seed ^ P3;
    size_t i = 0;
    for (; i + 8 <= len; i += 8)
        acc = mix_round(acc, load_le64(data + i));
    if (i < len) {
        uint8_t tail[8] = {0};
        memcpy(tail, data + i, len - i);
        acc = mix_round(acc, load_le64(tail));
    }
    return fmix64(acc ^ len);
}

/* pylb_hash_bytes over the 40-byte key, unrolled; pad is never read. */
PYLB_API uint64_t pylb_flow_id(const struct pylb_flow_key *key, uint64_t seed)
{
    uint64_t ports_proto = (uint64_t)key->sport | (uint64_t)key->dport << 16
                           | (uint64_t)key->proto << 32;
    uint64_t acc = seed ^ P3;
    acc = mix_round(acc, load_le64(key->src.b));
    acc = mix_round(acc, load_le64(key->src.b + 8));
    acc = mix_round(acc, load_le64(key->dst.b));
    acc = mix_round(acc, load_le64(key->dst.b + 8));
    acc = mix_round(acc, ports_proto);
    return fmix64(acc ^ FLOW_KEY_BYTES);
}

/* m is never 0: tables are validated when they are built. The reference
 * definition; the fast path uses pylb_bucket_fast (internal.h). */
PYLB_API uint32_t pylb_bucket(uint64_t flow_id, uint32_t m)
{
    return (uint32_t)(flow_id % m);
}

PYLB_API int pylb_bucket_burst(const uint64_t *flow_ids, uint32_t n, uint32_t m, uint32_t *buckets)
{
    if (m == 0 || (n && (!flow_ids || !buckets)))
        return pylb_fail(PYLB_EINVAL, "bucket_burst: m is 0 or an array is NULL");
    pylb_bucket_magic_t magic = pylb_bucket_magic(m);
    for (uint32_t i = 0; i < n; i++)
        buckets[i] = pylb_bucket_fast(flow_ids[i], m, magic);
    return PYLB_OK;
}
