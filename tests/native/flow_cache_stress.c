/*
 * flow_cache_stress.c - races native/flow_cache.c from several threads.
 * Built and run by tests/test_flow_cache.py, once under ThreadSanitizer and
 * once optimised (which races harder). Usage: flow_cache_stress ROUNDS
 *
 * All flows share one set (capacity 8, one flow id), so every writer races
 * every other for the same 8 lines.
 *   phase 1: threads insert at once, then one checks count() equals the
 *            number of distinct keys: a duplicate of a key would exceed it
 *            (no sleeping barrier between: that would serialise the inserts).
 *   phase 2: writers insert/remove while readers look up; a backend must
 *            name the key it was found under (key * 256 + writer).
 * The active-flow counters, kept by the racing writers through one shared
 * handle, must match: after each round of phase 1 the cache holds only the
 * filler, and after phase 2 (timed-out entries freed) the live entries.
 */
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include "pylb.h"

/* flow_cache.c runs here without EAL, so these are never reached. */
int pylb_eal_running(void) { return 0; }
void *rte_zmalloc(const char *type, size_t size, unsigned align) { abort(); }
void rte_free(void *p) { abort(); }

#define MAX_THREADS 4
#define KEYS 7
#define FLOW_ID 0x5eedULL
#define FILLER_TIMEOUT 1000u

static struct pylb_flow_cache *cache;
static struct pylb_flow_key keys[KEYS + 1];  /* the last: phase 1's filler */
static int threads;  /* no more than CPUs: the barrier spins */
static unsigned arrived, generation;
static int inserted[MAX_THREADS];
static long rounds;
static long failures;
static long contended;  /* allowed: a writer preempted mid-write stalls others */

static void fail(const char *what, long round, long value)
{
    __atomic_fetch_add(&failures, 1, __ATOMIC_RELAXED);
    fprintf(stderr, "round %ld: %s (%ld)\n", round, what, value);
}

/* Spinning, not sleeping: threads leave it within nanoseconds of each other,
 * so their inserts overlap (after a futex wake-up they would not). */
static void barrier(void)
{
    unsigned gen = __atomic_load_n(&generation, __ATOMIC_ACQUIRE);
    if (__atomic_add_fetch(&arrived, 1, __ATOMIC_ACQ_REL) == (unsigned)threads) {
        __atomic_store_n(&arrived, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&generation, gen + 1, __ATOMIC_RELEASE);
        return;
    }
    for (long spin = 0; __atomic_load_n(&generation, __ATOMIC_ACQUIRE) == gen; spin++)
        if (spin > 100000)
            sched_yield();
}

static int key_of_round(long r, int t)
{
    return r % 3 == 0 ? (int)(r % KEYS) : (int)((r + t) % KEYS);
}

/*
 * Way 0 holds a filler flow that thread 0's clock finds live and the others'
 * (1 ms later) expired: thread 0 then puts its key in way 1 and the others in
 * way 0, so two threads inserting one key really do claim two different ways.
 */
static void *same_time_inserts(void *arg)
{
    int t = (int)(long)arg;
    unsigned seed = (unsigned)t + 1;
    for (long r = 0; r < rounds; r++) {
        barrier();
        /* Jitter sweeps the threads' offsets across the race window. */
        for (int spin = rand_r(&seed) % 256; spin > 0; spin--)
            __asm__ volatile("" ::: "memory");
        int rc = pylb_flow_cache_insert(cache, &keys[key_of_round(r, t)], FLOW_ID, t,
                                        FILLER_TIMEOUT - 1 + (t > 0), PYLB_TO_TCP);
        inserted[t] = rc == PYLB_OK;
        if (rc == PYLB_EFULL)
            __atomic_fetch_add(&contended, 1, __ATOMIC_RELAXED);
        else if (rc != PYLB_OK)
            fail("insert failed", r, rc);
        barrier();
        if (t == 0) {
            int distinct = 0;
            for (int k = 0; k < KEYS; k++)
                for (int u = 0; u < threads; u++)
                    if (inserted[u] && key_of_round(r, u) == k) {
                        distinct++;
                        break;
                    }
            long live = (long)pylb_flow_cache_count(cache, FILLER_TIMEOUT);
            if (live != distinct)
                fail("live entries != distinct keys", r, live);
            for (int k = 0; k < KEYS; k++)
                pylb_flow_cache_remove(cache, &keys[k], FLOW_ID);
            pylb_flow_cache_remove(cache, &keys[KEYS], FLOW_ID);
            pylb_flow_cache_insert(cache, &keys[KEYS], FLOW_ID, 0, 0, PYLB_TO_OTHER);
            uint64_t total = 0, filler = 0;
            pylb_flow_cache_active_flows(cache, &filler, 1, &total);
            if (total != 1 || filler != 1)
                fail("active flows after the reset != the filler alone", r, (long)total);
        }
    }
    return NULL;
}

static void *mixed(void *arg)
{
    int t = (int)(long)arg;
    unsigned seed = (unsigned)t * 7919u + 1;
    for (long r = 0; r < rounds * 4; r++) {
        int k = rand_r(&seed) % KEYS;
        uint32_t now = (uint32_t)r;
        if (t % 2 == 0) {
            if (r % 4 == 3)
                pylb_flow_cache_remove(cache, &keys[k], FLOW_ID);
            else if (pylb_flow_cache_insert(cache, &keys[k], FLOW_ID, (uint32_t)(k * 256 + t),
                                            now, r % 4) != PYLB_OK)
                __atomic_fetch_add(&contended, 1, __ATOMIC_RELAXED);
        } else {
            uint32_t backend;
            if (pylb_flow_cache_lookup(cache, &keys[k], FLOW_ID, now, r % 5 ? 0x10 : 0x01,
                                       &backend)
                && (backend >> 8) != (uint32_t)k)
                fail("backend of another key", r, backend);
        }
    }
    return NULL;
}

static void run(void *(*body)(void *))
{
    pthread_t ids[MAX_THREADS];
    for (long t = 0; t < threads; t++)
        pthread_create(&ids[t], NULL, body, (void *)t);
    for (int t = 0; t < threads; t++)
        pthread_join(ids[t], NULL);
}

int main(int argc, char **argv)
{
    rounds = argc > 1 ? atol(argv[1]) : 10000;
    const uint32_t timeouts[4] = {1u << 30, 1u << 30, 1u << 30, FILLER_TIMEOUT};
    if (pylb_flow_cache_create(8, timeouts, &cache) != PYLB_OK) {
        fprintf(stderr, "create: %s\n", pylb_last_error());
        return 2;
    }
    for (int k = 0; k <= KEYS; k++) {
        keys[k].src.b[15] = (uint8_t)k;
        keys[k].sport = (uint16_t)(1000 + k);
        keys[k].proto = 6;
    }
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    threads = cpus < 2 ? 2 : cpus > MAX_THREADS ? MAX_THREADS : (int)cpus;
    pylb_flow_cache_insert(cache, &keys[KEYS], FLOW_ID, 0, 0, PYLB_TO_OTHER);
    run(same_time_inserts);
    run(mixed);
    uint32_t end = (uint32_t)(rounds * 4);
    pylb_flow_cache_age(cache, end, pylb_flow_cache_sets(cache));
    uint64_t total = 0;
    pylb_flow_cache_active_flows(cache, NULL, 0, &total);
    if (total != pylb_flow_cache_count(cache, end))
        fail("active flows != live entries after phase 2", 0, (long)total);
    pylb_flow_cache_destroy(cache);
    printf("%ld failures, %ld contended inserts\n", failures, contended);
    return failures ? 1 : 0;
}
