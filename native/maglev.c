/*
 * maglev.c - Maglev destination tables (docs/maglev.md; reference pylb/maglev.py).
 *
 * Every balancer must build the same table from the same backend set, so
 * nothing here depends on the order backends are given in, on the host, or on
 * floating point: backends are ranked by name and weights compared exactly.
 */
#include <stdlib.h>
#include "internal.h"

#define OFFSET_SEED 0x6f2d76656c67616dULL   /* "maglev-o", little-endian */
#define SKIP_SEED 0x732d76656c67616dULL     /* "maglev-s" */

/* A backend waiting for its next bucket. */
struct turn {
    const char *name;
    uint32_t index;       /* in the caller's array: what the table holds */
    uint32_t rank;        /* in name order: breaks ties */
    uint32_t weight;
    uint64_t taken;       /* buckets it has so far */
    uint64_t position;    /* next bucket of its permutation to try */
    uint64_t skip;
};

static int is_prime(uint32_t m)
{
    if (m < 2)
        return 0;
    if (m % 2 == 0 || m % 3 == 0)
        return m <= 3;
    for (uint64_t d = 5; d * d <= m; d += 6)
        if (m % d == 0 || m % (d + 2) == 0)
            return 0;
    return 1;
}

static int by_name(const void *a, const void *b)
{
    return strcmp(((const struct turn *)a)->name, ((const struct turn *)b)->name);
}

/* Turns are served in order of (2*taken+1)/weight (the Sainte-Laguë
 * sequence), so bucket counts follow weights and equal weights take turns
 * round-robin. Cross-multiplied in 128 bits: exact, no floating point. */
static int goes_first(const struct turn *a, const struct turn *b)
{
    unsigned __int128 mine = (unsigned __int128)(2 * a->taken + 1) * b->weight;
    unsigned __int128 theirs = (unsigned __int128)(2 * b->taken + 1) * a->weight;
    return mine < theirs || (mine == theirs && a->rank < b->rank);
}

static void sift_down(struct turn *heap, uint32_t n, uint32_t i)
{
    for (;;) {
        uint32_t first = i, left = 2 * i + 1, right = left + 1;
        if (left < n && goes_first(&heap[left], &heap[first]))
            first = left;
        if (right < n && goes_first(&heap[right], &heap[first]))
            first = right;
        if (first == i)
            return;
        struct turn t = heap[i];
        heap[i] = heap[first];
        heap[first] = t;
        i = first;
    }
}

static int check_args(const struct pylb_maglev_backend *backends, uint32_t n, uint32_t m,
                      const uint32_t *table)
{
    if (!table || (n && !backends))
        return pylb_fail(PYLB_EINVAL, "maglev: NULL %s", table ? "backends" : "table");
    if (!is_prime(m))
        return pylb_fail(PYLB_EINVAL, "maglev: table size %u is not a prime", m);
    for (uint32_t i = 0; i < n; i++)
        if (!backends[i].name || !backends[i].name[0])
            return pylb_fail(PYLB_EINVAL, "maglev: backend %u has no name", i);
    return PYLB_OK;
}

/* Ranks every backend by name (rejecting duplicates, weight 0 included, so
 * that draining a backend never changes what is valid), then keeps those with
 * weight. Returns how many are kept or a status. */
static int64_t rank_backends(const struct pylb_maglev_backend *backends, uint32_t n, uint32_t m,
                             struct turn *turns)
{
    for (uint32_t i = 0; i < n; i++)
        turns[i] = (struct turn){.name = backends[i].name, .index = i,
                                 .weight = backends[i].weight};
    qsort(turns, n, sizeof(*turns), by_name);
    uint32_t kept = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (i > 0 && strcmp(turns[i - 1].name, turns[i].name) == 0)
            return pylb_fail(PYLB_EINVAL, "maglev: duplicate backend name \"%s\"", turns[i].name);
        if (turns[i].weight == 0)
            continue;
        struct turn *t = &turns[kept];
        *t = turns[i];
        t->rank = kept++;
        size_t len = strlen(t->name);
        t->position = pylb_hash_bytes((const uint8_t *)t->name, len, OFFSET_SEED) % m;
        t->skip = pylb_hash_bytes((const uint8_t *)t->name, len, SKIP_SEED) % (m - 1) + 1;
    }
    return kept;
}

PYLB_API int pylb_maglev_build(const struct pylb_maglev_backend *backends, uint32_t n,
                               uint32_t m, uint32_t *table)
{
    int status = check_args(backends, n, m, table);
    if (status != PYLB_OK)
        return status;
    struct turn *turns = calloc(n ? n : 1, sizeof(*turns));
    if (!turns)
        return pylb_fail(PYLB_ENOMEM, "maglev: no memory for %u backends", n);
    int64_t kept = rank_backends(backends, n, m, turns);
    if (kept < 0) {
        free(turns);
        return (int)kept;
    }
    for (uint32_t b = 0; b < m; b++)
        table[b] = PYLB_NO_BACKEND;
    for (uint32_t i = (uint32_t)kept / 2; i-- > 0;)
        sift_down(turns, (uint32_t)kept, i);
    for (uint32_t filled = 0; kept > 0 && filled < m; filled++) {
        struct turn *t = &turns[0];
        /* m is prime, so each permutation visits every bucket: one is empty. */
        while (table[t->position] != PYLB_NO_BACKEND) {
            t->position += t->skip;
            if (t->position >= m)
                t->position -= m;
        }
        table[t->position] = t->index;
        t->taken++;
        sift_down(turns, (uint32_t)kept, 0);
    }
    free(turns);
    return PYLB_OK;
}
