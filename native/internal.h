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

/* The flow id's mixing over any bytes (flow_id.c); Maglev hashes names with it. */
uint64_t pylb_hash_bytes(const uint8_t *data, size_t len, uint64_t seed);

/* 1 once pylb_eal_init succeeded (rte_malloc and mempools usable). */
int pylb_eal_running(void);


#endif
