/* internal.h - shared by the shim's modules; never read by cffi. */
#ifndef PYLB_INTERNAL_H
#define PYLB_INTERNAL_H

#include <stdarg.h>
#include <string.h>
#include "pylb.h"

#define PYLB_API __attribute__((visibility("default")))
#define PYLB_LIKELY(x) __builtin_expect(!!(x), 1)
#define PYLB_UNLIKELY(x) __builtin_expect(!!(x), 0)

/* Records the message of a failing call and returns status. */
int pylb_fail(int status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static inline int pylb_ip_is_v4(const struct pylb_ip *ip)
{
    static const uint8_t prefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    return memcmp(ip->b, prefix, 12) == 0;
}

static inline int pylb_ip_is_zero(const struct pylb_ip *ip)
{
    static const uint8_t zero[16];
    return memcmp(ip->b, zero, 16) == 0;
}

static inline int pylb_ip_eq(const struct pylb_ip *a, const struct pylb_ip *b)
{
    return memcmp(a->b, b->b, 16) == 0;
}

static inline void pylb_ip_from_v4(struct pylb_ip *ip, const uint8_t v4[4])
{
    memset(ip->b, 0, 10);
    ip->b[10] = 0xff;
    ip->b[11] = 0xff;
    memcpy(ip->b + 12, v4, 4);
}

/*
 * flow_id % m without a division, for the fast path (a 64-bit divide costs
 * tens of cycles). With magic = ceil(2^128 / m), computed once per table,
 * the remainder is the top bits of (magic * flow_id mod 2^128) * m: the
 * fraction flow_id / m, kept to 128 bits, times m. This is exact for every
 * 64-bit flow_id when m < 2^64 (Lemire, Kaser and Kurz, "Faster remainder by
 * direct computation", 2019: 128 fraction bits cover 64 of numerator and 64
 * of divisor). m = 1 gives magic 0 (2^128 wraps) and bucket 0, as it should.
 * tests/test_flow_id.py compares it with Python's % over many values.
 */
typedef unsigned __int128 pylb_bucket_magic_t;

static inline pylb_bucket_magic_t pylb_bucket_magic(uint32_t m)
{
    return ~(pylb_bucket_magic_t)0 / m + 1;
}

static inline uint32_t pylb_bucket_fast(uint64_t flow_id, uint32_t m, pylb_bucket_magic_t magic)
{
    pylb_bucket_magic_t frac = magic * flow_id;  /* modulo 2^128 */
    /* (frac * m) >> 128 from two 64x32-bit products, so nothing overflows:
     * the low half's carry into the high half is all that is kept of it. */
    pylb_bucket_magic_t low = (pylb_bucket_magic_t)(uint64_t)frac * m;
    pylb_bucket_magic_t high = (pylb_bucket_magic_t)(uint64_t)(frac >> 64) * m;
    return (uint32_t)((high + (low >> 64)) >> 64);
}

/* The flow id's mixing over any bytes (flow_id.c); Maglev hashes names with it. */
uint64_t pylb_hash_bytes(const uint8_t *data, size_t len, uint64_t seed);

/* 1 once pylb_eal_init succeeded (rte_malloc and mempools usable). */
int pylb_eal_running(void);


#endif
