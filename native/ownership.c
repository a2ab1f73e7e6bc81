/*
 * ownership.c - owner and backup of buckets, by rendezvous hashing
 * (docs/ownership.md; reference pylb/ownership.py, whose vectors this matches).
 *
 * Blocks of buckets at once: a member change needs every bucket's holders
 * before and after (the handoff), and a miss needs its bucket's at once. In
 * Python a table of 65,537 buckets and three balancers took a third of a
 * second, during which the worker's Python side did nothing else.
 */
#include "internal.h"

#define OWNERSHIP_SEED 0x6e776f2d626c7970ULL   /* "pylb-own", little-endian */

static uint64_t bucket_seed(uint32_t bucket)
{
    uint8_t le[8] = {0};
    for (int i = 0; i < 4; i++)
        le[i] = (uint8_t)(bucket >> (8 * i));
    return pylb_hash_bytes(le, sizeof le, OWNERSHIP_SEED);
}

PYLB_API int pylb_ownership_fill(const char *const *names, const uint32_t *name_lens, uint32_t n,
                                 uint32_t table_size, uint32_t first_bucket, uint32_t count,
                                 uint32_t *codes)
{
    if (names == NULL || name_lens == NULL || codes == NULL || n == 0 || table_size == 0)
        return pylb_fail(PYLB_EINVAL, "ownership_fill: names, codes, n and table_size required");
    if ((uint64_t)n * n >= UINT32_MAX)
        return pylb_fail(PYLB_EINVAL, "ownership_fill: %u balancers do not fit a code", n);
    if (first_bucket >= table_size || count > table_size - first_bucket)
        return pylb_fail(PYLB_EINVAL, "ownership_fill: buckets %u+%u outside a table of %u",
                         first_bucket, count, table_size);
    for (uint32_t b = first_bucket; b < first_bucket + count; b++) {
        uint64_t seed = bucket_seed(b), best = 0, runner_up = 0;
        int64_t first = -1, second = -1;
        /* Strictly greater replaces: among equal scores the earlier name
         * (the caller gives them in byte order) keeps its place. */
        for (uint32_t rank = 0; rank < n; rank++) {
            uint64_t s = pylb_hash_bytes((const uint8_t *)names[rank], name_lens[rank], seed);
            if (first < 0 || s > best) {
                second = first, runner_up = best;
                first = rank, best = s;
            } else if (second < 0 || s > runner_up) {
                second = rank, runner_up = s;
            }
        }
        codes[b] = (uint32_t)(first * n + (second < 0 ? 0 : second) + 1);
    }
    return PYLB_OK;
}
