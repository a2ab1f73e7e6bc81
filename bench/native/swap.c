/*
 * swap.c - table swap under load. A control thread (as pylb's Python control
 * loop would) rebuilds a VIP's Maglev table of many backends, compiles a new
 * dataplane with the old table as the previous generation, and hands it to
 * the worker over an rte_ring; the worker swaps it in between polls and
 * hands the old one back to be freed. Traffic runs throughout; every packet
 * sent must come back.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <rte_lcore.h>
#include <rte_cycles.h>
#include <rte_ring.h>
#include "bench.h"
#include "swap.h"

#define RING_SIZE 64
#define MAX_GENERATIONS 100000

struct swap_msg {
    struct pylb_dataplane *dp;
    uint64_t sent_tsc;
};

static struct {
    uint32_t n_backends;
    double interval_s;
    struct rte_ring *to_worker, *to_control;
    volatile int stop;
    uint32_t generations;
    double build_ms[MAX_GENERATIONS], compile_ms[MAX_GENERATIONS];
    struct swap_msg msgs[MAX_GENERATIONS];
    uint32_t *tables[2];
} sw;

static double ms_since(uint64_t t0)
{
    return (double)(rte_rdtsc() - t0) * 1e3 / (double)rte_get_tsc_hz();
}

static void free_returned(void)
{
    struct swap_msg *m;
    while (rte_ring_dequeue(sw.to_control, (void **)&m) == 0)
        pylb_dataplane_free(m->dp);
}

/* Generation g drains backend g mod n (weight 0), so each swap moves the
 * buckets of two backends: the one that comes back and the one that goes. */
static void *control_main(void *arg)
{
    (void)arg;
    uint32_t g = 0;
    uint64_t interval = (uint64_t)(sw.interval_s * (double)rte_get_tsc_hz());
    while (!sw.stop && g + 2 < MAX_GENERATIONS) {
        uint64_t t0 = rte_rdtsc();
        uint32_t *cur = sw.tables[(g + 1) & 1], *prev = sw.tables[g & 1];
        bench_table(sw.n_backends, (g + 1) % sw.n_backends, cur);
        sw.build_ms[g] = ms_since(t0);
        uint64_t t1 = rte_rdtsc();
        struct dp_spec spec = {.generation = g + 2, .n_backends = sw.n_backends,
                               .encap = PYLB_ENCAP_IPIP, .current = cur, .previous = prev};
        struct swap_msg *m = &sw.msgs[g];
        m->dp = bench_dataplane(&spec);
        sw.compile_ms[g] = ms_since(t1);
        m->sent_tsc = rte_rdtsc();
        while (rte_ring_enqueue(sw.to_worker, m) != 0 && !sw.stop)
            free_returned();
        g++;
        sw.generations = g;
        while (!sw.stop && rte_rdtsc() - t0 < interval) {
            free_returned();
            struct timespec ts = {0, 200000};
            nanosleep(&ts, NULL);
        }
    }
    return NULL;
}

/* The thread inherits the main lcore's pinning; a control plane runs beside
 * the workers, not on their cores (when the machine has another). */
static void keep_off_worker_core(pthread_t t)
{
    rte_cpuset_t worker = rte_lcore_cpuset(rte_get_main_lcore());
    cpu_set_t others;
    CPU_ZERO(&others);
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    for (long c = 0; c < n && c < CPU_SETSIZE; c++)
        if (!CPU_ISSET(c, &worker))
            CPU_SET(c, &others);
    if (CPU_COUNT(&others) > 0)
        pthread_setaffinity_np(t, sizeof(others), &others);
}

static int by_value(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void print_dist(const char *name, double *v, uint32_t n)
{
    if (n == 0) {
        printf("\"%s\": null", name);
        return;
    }
    qsort(v, n, sizeof(*v), by_value);
    printf("\"%s\": {\"median\": %.4f, \"p99\": %.4f, \"max\": %.4f}", name, v[n / 2],
           v[(uint32_t)((n - 1) * 0.99)], v[n - 1]);
}

/* Runs traffic for `seconds`; with swaps != NULL, takes every dataplane the
 * control thread sends. *in_worker follows the block the worker uses. */
static double run_phase(struct lane *l, double seconds, struct pylb_dataplane **in_worker,
                        double *swap_us, double *latency_us, uint32_t *swaps)
{
    uint64_t hz = rte_get_tsc_hz(), r0 = l->returned, t0 = rte_rdtsc(), t1;
    do {
        lane_step(l, KIND_WORKER);
        struct swap_msg *m;
        if (swaps && rte_ring_dequeue(sw.to_worker, (void **)&m) == 0) {
            /* The lane answered every held packet after its poll, so the
             * worker holds none and takes the swap. */
            struct pylb_dataplane *old;
            uint64_t s0 = rte_rdtsc();
            if (pylb_worker_set_dataplane(l->worker, m->dp, &old) != PYLB_OK)
                bench_die("swap");
            uint64_t s1 = rte_rdtsc();
            swap_us[*swaps] = (double)(s1 - s0) * 1e6 / (double)hz;
            latency_us[*swaps] = (double)(s1 - m->sent_tsc) * 1e6 / (double)hz;
            (*swaps)++;
            /* The old block goes back to the control thread in the message
             * that brought the new one. */
            *in_worker = m->dp;
            m->dp = old;
            while (rte_ring_enqueue(sw.to_control, m) != 0)
                ;
        }
    } while ((t1 = rte_rdtsc()) - t0 < (uint64_t)(seconds * (double)hz));
    return (double)(l->returned - r0) / ((double)(t1 - t0) / (double)hz) / 1e6;
}

int run_swap(const struct swap_opts *o)
{
    uint64_t capacity = o->flows * 2;
    bench_eal_start(1, pylb_flow_cache_footprint(capacity) / (1 << 20) + 384);
    uint32_t timeouts[4] = {300000, 10000, 30000, 30000};
    struct pylb_flow_cache *cache;
    if (pylb_flow_cache_create(capacity, timeouts, &cache) != PYLB_OK)
        bench_die("flow cache");
    sw.n_backends = o->backends;
    sw.interval_s = o->swap_ms / 1e3;
    for (int i = 0; i < 2; i++)
        sw.tables[i] = malloc(PYLB_TABLE_SIZE_DEFAULT * sizeof(uint32_t));
    sw.to_worker = rte_ring_create("swap_new", RING_SIZE, 0, RING_F_SP_ENQ | RING_F_SC_DEQ);
    sw.to_control = rte_ring_create("swap_old", RING_SIZE * 2, 0, RING_F_SP_ENQ | RING_F_SC_DEQ);
    if (!sw.tables[0] || !sw.tables[1] || !sw.to_worker || !sw.to_control)
        bench_die("swap setup");

    /* Generation 1, no previous: warm-up and the steady-state rate. */
    bench_table(sw.n_backends, 0, sw.tables[0]);
    struct dp_spec spec = {.generation = 1, .n_backends = sw.n_backends,
                           .encap = PYLB_ENCAP_IPIP, .current = sw.tables[0]};
    struct pylb_dataplane *first = bench_dataplane(&spec);
    /* One rebuild timed alone, with nothing else running. */
    uint32_t *scratch = malloc(PYLB_TABLE_SIZE_DEFAULT * sizeof(uint32_t));
    uint64_t b0 = rte_rdtsc();
    bench_table(sw.n_backends, 1, scratch);
    double build_alone_ms = ms_since(b0);
    free(scratch);

    static struct lane lane;
    lane_open(&lane, 0, 1, cache);
    lane_flows(&lane, 0, 1, o->flows, TCP_ACK);
    lane.answer_holds = 1;
    lane_set_dp(&lane, first);
    struct pylb_dataplane *in_worker = first;
    lane_run_packets(&lane, KIND_WORKER, o->flows + IN_FLIGHT);
    uint64_t lost = lane_drain(&lane, KIND_WORKER);

    struct pylb_stats s0, s1, d;
    pylb_worker_stats(lane.worker, &s0);
    double steady = run_phase(&lane, o->seconds, &in_worker, NULL, NULL, NULL);
    static double swap_us[MAX_GENERATIONS], latency_us[MAX_GENERATIONS];
    uint32_t swaps = 0;
    uint64_t sent0 = lane.sent;
    pthread_t control;
    if (pthread_create(&control, NULL, control_main, NULL) != 0)
        bench_die("control thread");
    keep_off_worker_core(control);
    double swapping = run_phase(&lane, o->seconds, &in_worker, swap_us, latency_us, &swaps);
    sw.stop = 1;
    pthread_join(control, NULL);
    uint64_t sent = lane.sent - sent0;
    lost += lane_drain(&lane, KIND_WORKER);
    pylb_worker_stats(lane.worker, &s1);
    stats_sub(&d, &s1, &s0);

    printf("{\"mode\": \"swap\", \"hugepages\": %s, \"backends\": %u, \"table_size\": %u, "
           "\"flows\": %llu, \"swap_interval_ms\": %.1f, \"swaps\": %u, \"generations\": %u, "
           "\"packets_while_swapping\": %llu, \"lost\": %llu, \"held_answered\": %llu, "
           "\"mpps_steady\": %.3f, \"mpps_swapping\": %.3f, \"ratio\": %.4f, "
           "\"rebuild_alone_ms\": %.4f, ",
           pylb_eal_hugepages() ? "true" : "false", sw.n_backends, PYLB_TABLE_SIZE_DEFAULT,
           (unsigned long long)o->flows, o->swap_ms, swaps, sw.generations,
           (unsigned long long)sent, (unsigned long long)lost,
           (unsigned long long)lane.answered, steady, swapping,
           steady > 0 ? swapping / steady : 0, build_alone_ms);
    print_dist("rebuild_ms", sw.build_ms, sw.generations);
    printf(", ");
    print_dist("compile_ms", sw.compile_ms, sw.generations);
    printf(", ");
    print_dist("swap_us", swap_us, swaps);
    printf(", ");
    print_dist("swap_latency_us", latency_us, swaps);
    printf(", ");
    print_stats("counters", &d);
    printf("}\n");

    /* Whatever the worker still uses, and what is still on the rings. */
    free_returned();
    struct swap_msg *m;
    while (rte_ring_dequeue(sw.to_worker, (void **)&m) == 0)
        pylb_dataplane_free(m->dp);
    lane_close(&lane);
    pylb_dataplane_free(in_worker);
    pylb_flow_cache_destroy(cache);
    free(sw.tables[0]);
    free(sw.tables[1]);
    return 0;
}
