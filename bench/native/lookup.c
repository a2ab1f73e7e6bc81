/*
 * lookup.c - the flow cache alone: hits of N random flows, looked up one at a
 * time (pylb_flow_cache_lookup) and in bursts of 32 (lookup_burst), in
 * interleaved slices. The single lookup is the burst's same-run baseline: at
 * table sizes past the CPU's caches the difference is memory latency hidden.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <rte_cycles.h>
#include "bench.h"
#include "swap.h"

#define ROUND 4096            /* lookups between clock reads */

static void make_key(struct pylb_flow_key *k, uint64_t i)
{
    memset(k, 0, sizeof(*k));
    bench_v4(&k->src, 198, 18, (uint8_t)(i >> 16), (uint8_t)(i >> 8));
    bench_v4(&k->dst, 192, 0, 2, 10);
    k->sport = (uint16_t)(1024 + (i & 0xff) * 251);
    k->dport = 80;
    k->proto = 6;
}

/* Deterministic pseudo-random order over the flows (xorshift). */
static inline uint64_t next_index(uint64_t *state, uint64_t n)
{
    uint64_t x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    return x % n;
}

int run_lookup(const struct lookup_opts *o)
{
    uint64_t capacity = o->flows * 2;
    int huge = bench_eal_start(1, pylb_flow_cache_footprint(capacity) / (1 << 20) + 256);
    static const uint32_t timeouts[4] = {300000, 10000, 30000, 30000};
    struct pylb_flow_cache *cache;
    if (pylb_flow_cache_create(capacity, timeouts, &cache) != PYLB_OK)
        bench_die("flow cache");
    uint64_t fill_start = rte_rdtsc(), hz = rte_get_tsc_hz();
    uint64_t cached = 0;
    uint32_t now = pylb_now_ms();
    for (uint64_t i = 0; i < o->flows; i++) {
        struct pylb_flow_key k;
        make_key(&k, i);
        cached += pylb_flow_cache_insert(cache, &k, pylb_flow_id(&k, 42), (uint32_t)(i & 1023),
                                         now, PYLB_TO_TCP) == PYLB_OK;
    }
    double fill_s = (double)(rte_rdtsc() - fill_start) / (double)hz;

    double single[MAX_SLICES], burst[MAX_SLICES], ratio[MAX_SLICES];
    uint64_t state = 88172645463325252ull, hits = 0, asked = 0;
    for (uint32_t s = 0; s < o->slices; s++) {
        for (int mode = 0; mode < 2; mode++) {
            uint64_t t0 = rte_rdtsc(), done = 0;
            uint64_t end = t0 + (uint64_t)(o->slice_ms / 1e3 * (double)hz);
            now = pylb_now_ms();
            while (rte_rdtsc() < end) {
                for (int r = 0; r < ROUND; r += PYLB_BURST) {
                    struct pylb_flow_key keys[PYLB_BURST];
                    const struct pylb_flow_key *kp[PYLB_BURST];
                    uint64_t ids[PYLB_BURST];
                    uint32_t be[PYLB_BURST];
                    /* Keys and ids made alike for both: only the lookups differ. */
                    for (int j = 0; j < PYLB_BURST; j++) {
                        make_key(&keys[j], next_index(&state, o->flows));
                        kp[j] = &keys[j];
                        ids[j] = pylb_flow_id(&keys[j], 42);
                    }
                    if (mode == 0) {
                        for (int j = 0; j < PYLB_BURST; j++)
                            hits += (uint64_t)pylb_flow_cache_lookup(cache, &keys[j], ids[j], now,
                                                                     0, &be[j]);
                    } else {
                        uint64_t mask;
                        hits += (uint64_t)pylb_flow_cache_lookup_burst(cache, kp, ids, NULL,
                                                                       PYLB_BURST, now, be, &mask);
                    }
                }
                done += ROUND;
            }
            asked += done;
            double secs = (double)(rte_rdtsc() - t0) / (double)hz;
            (mode ? burst : single)[s] = (double)done / secs / 1e6;
        }
        ratio[s] = burst[s] / single[s];
    }
    /* Medians. */
    double *sets[3] = {single, burst, ratio}, med[3];
    for (int k = 0; k < 3; k++) {
        double v[MAX_SLICES];
        memcpy(v, sets[k], o->slices * sizeof(double));
        for (uint32_t a = 0; a < o->slices; a++)
            for (uint32_t b = a + 1; b < o->slices; b++)
                if (v[b] < v[a]) {
                    double t = v[a];
                    v[a] = v[b];
                    v[b] = t;
                }
        med[k] = o->slices % 2 ? v[o->slices / 2] : (v[o->slices / 2 - 1] + v[o->slices / 2]) / 2;
    }
    printf("{\"mode\": \"lookup\", \"flows\": %llu, \"hugepages\": %s, \"cached\": %llu, "
           "\"footprint_bytes\": %zu, \"fill_s\": %.3f, \"hit_fraction\": %.5f, "
           "\"single_mlookups\": %.3f, \"burst_mlookups\": %.3f, \"ratio\": %.4f, "
           "\"single_ns\": %.2f, \"burst_ns\": %.2f}\n",
           (unsigned long long)o->flows, huge ? "true" : "false", (unsigned long long)cached,
           pylb_flow_cache_footprint(capacity), fill_s, asked ? (double)hits / (double)asked : 0,
           med[0], med[1], med[2], 1e3 / med[0], 1e3 / med[1]);
    pylb_flow_cache_destroy(cache);
    return 0;
}
