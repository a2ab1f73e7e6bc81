/* lanes.c - running lanes: the source/forwarder/sink round, warm-up, drain,
 * and plans of interleaved slices across lcores. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <rte_cycles.h>
#include <rte_ethdev.h>
#include <rte_launch.h>
#include <rte_lcore.h>
#include <rte_pause.h>
#include <rte_ring.h>
#include "bench.h"

/* Under `valgrind --tool=callgrind --collect-atstart=no`, only the measured
 * windows of the worker are counted: instructions per packet, repeatably. */
#if __has_include(<valgrind/callgrind.h>)
#include <valgrind/callgrind.h>
#define COLLECT_TOGGLE() CALLGRIND_TOGGLE_COLLECT
#else
#define COLLECT_TOGGLE() do { } while (0)
#endif

#define STEP_BURSTS 8
#define STALL_S 1.0
#define START_DELAY_US 1000   /* lets sleeping lanes wake before the window */
#define IDLE_SLEEP_NS 50000

/* Answers held packets as a standalone balancer's Python does
 * (pylb.balancer.Balancer.decide): an existing flow of a moved bucket keeps
 * the previous table's backend, and is cached. */
static void answer_holds(struct lane *l, uint32_t n)
{
    struct pylb_verdict v[MAX_PUNTS];
    uint32_t k = 0;
    for (uint32_t i = 0; i < n; i++) {
        const struct pylb_punt *p = &l->punts[i];
        if (p->slot == PYLB_NO_BACKEND)
            continue;  /* a notice: nothing is held */
        v[k].slot = p->slot;
        v[k].action = PYLB_VERDICT_FORWARD;
        v[k].cache = 1;
        v[k].pad = 0;
        v[k].backend = p->previous;
        k++;
    }
    if (k && pylb_worker_apply(l->worker, v, k) != PYLB_OK)
        bench_die("verdicts");
    l->answered += k;
}

static inline void lane_forward(struct lane *l, enum kind k)
{
    if (k == KIND_IO) {
        struct rte_mbuf *m[PYLB_BURST];
        for (int b = 0; b < STEP_BURSTS; b++) {
            uint16_t n = rte_eth_rx_burst(l->port->port_id, 0, m, PYLB_BURST);
            if (n == 0)
                break;
            uint16_t t = rte_eth_tx_burst(l->port->port_id, 0, m, n);
            if (t < n)
                rte_pktmbuf_free_bulk(m + t, n - t);
        }
        return;
    }
    uint32_t np = 0;
    if (pylb_worker_poll(l->worker, STEP_BURSTS, 0, l->punts, MAX_PUNTS, &np) != PYLB_OK)
        bench_die("poll");
    if (np && l->answer_holds)
        answer_holds(l, np);
}

static inline void lane_sink(struct lane *l)
{
    uint32_t got = rte_ring_dequeue_burst(l->port->tx_ring[0], (void **)(l->pool + l->n_free),
                                          IN_FLIGHT - l->n_free, NULL);
    l->n_free += got;
    l->returned += got;
}

void lane_step(struct lane *l, enum kind k)
{
    uint32_t n = RTE_MIN(l->n_free, (uint32_t)(STEP_BURSTS * PYLB_BURST));
    struct rte_mbuf **give = l->pool + l->n_free - n;
    uint64_t next = l->next;
    for (uint32_t i = 0; i < n; i++) {
        struct rte_mbuf *m = give[i];
        m->data_off = RTE_PKTMBUF_HEADROOM;
        m->data_len = m->pkt_len = FRAME_LEN;
        bench_write_frame(rte_pktmbuf_mtod(m, uint8_t *), l->first_flow + next * l->stride,
                          l->tcp_flags);
        next = next + 1 == l->n_flows ? 0 : next + 1;
    }
    /* The RX ring holds twice what is in flight: the enqueue takes all. */
    uint32_t put = rte_ring_enqueue_burst(l->port->rx_ring[0], (void **)give, n, NULL);
    l->next = next;
    l->n_free -= put;
    l->sent += put;
    lane_forward(l, k);
    lane_sink(l);
}

void lane_run_packets(struct lane *l, enum kind k, uint64_t packets)
{
    uint64_t target = l->returned + packets, hz = rte_get_tsc_hz();
    uint64_t last = l->returned, since = rte_rdtsc();
    while (l->returned < target) {
        lane_step(l, k);
        uint64_t now = rte_rdtsc();
        if (l->returned != last) {
            last = l->returned;
            since = now;
        } else if (now - since > (uint64_t)(STALL_S * hz)) {
            fprintf(stderr, "pylb_rate: lane %u: no packet came back for %.0f s "
                    "(packets are being lost)\n", l->id, STALL_S);
            exit(1);
        }
    }
}

uint64_t lane_drain(struct lane *l, enum kind k)
{
    uint64_t hz = rte_get_tsc_hz(), since = rte_rdtsc(), last = l->returned;
    while (l->returned < l->sent) {
        lane_forward(l, k);
        lane_sink(l);
        uint64_t now = rte_rdtsc();
        if (l->returned != last) {
            last = l->returned;
            since = now;
        } else if (now - since > hz / 10) {
            break;
        }
    }
    uint64_t lost = l->sent - l->returned;
    /* What the worker dropped went back to the mempool. */
    if (l->n_free < IN_FLIGHT &&
        rte_pktmbuf_alloc_bulk(l->port->pool, l->pool + l->n_free, IN_FLIGHT - l->n_free) == 0)
        l->n_free = IN_FLIGHT;
    l->sent = l->returned;
    return lost;
}

/* ---------------------------------------------------------------- plans */

enum op { OP_WINDOW, OP_DRAIN, OP_QUIT };

/* Orders from the main lcore to every lane: fields are written before seq
 * is published with release, and read after it is seen with acquire. */
static struct {
    uint32_t seq;
    uint32_t done[MAX_LANES];
    enum op op;
    enum kind kind;
    struct pylb_dataplane *dp;
    uint32_t lanes;
    uint64_t start, end;
    double mpps[MAX_LANES];
    struct pylb_stats delta[MAX_LANES];
    uint64_t lost[MAX_LANES];
} ctl;

static struct pylb_dataplane *lane_dp[MAX_LANES];

void lane_set_dp(struct lane *l, struct pylb_dataplane *dp)
{
    if (lane_dp[l->id] == dp)
        return;
    struct pylb_dataplane *old;
    if (pylb_worker_set_dataplane(l->worker, dp, &old) != PYLB_OK)
        bench_die("set dataplane");
    lane_dp[l->id] = dp;
}

static void lane_window(struct lane *l)
{
    if (ctl.kind == KIND_WORKER)
        lane_set_dp(l, ctl.dp);
    struct pylb_stats before, after;
    pylb_worker_stats(l->worker, &before);
    while (rte_rdtsc() < ctl.start)
        rte_pause();
    uint64_t r0 = l->returned, t0 = rte_rdtsc(), t1;
    if (ctl.kind == KIND_WORKER)
        COLLECT_TOGGLE();
    do {
        lane_step(l, ctl.kind);
    } while ((t1 = rte_rdtsc()) < ctl.end);
    if (ctl.kind == KIND_WORKER)
        COLLECT_TOGGLE();
    double secs = (double)(t1 - t0) / (double)rte_get_tsc_hz();
    ctl.mpps[l->id] = (double)(l->returned - r0) / secs / 1e6;
    pylb_worker_stats(l->worker, &after);
    stats_sub(&ctl.delta[l->id], &after, &before);
}

static void lane_exec(struct lane *l)
{
    if (l->id >= ctl.lanes)
        return;
    if (ctl.op == OP_WINDOW)
        lane_window(l);
    else if (ctl.op == OP_DRAIN)
        ctl.lost[l->id] = lane_drain(l, ctl.kind);
}

static int lane_main(void *arg)
{
    struct lane *l = arg;
    uint32_t seen = 0;
    for (;;) {
        uint32_t seq;
        /* Waiting lanes sleep: on a shared machine, another tenant then
         * takes this idle core rather than the core of a lane measuring. */
        while ((seq = __atomic_load_n(&ctl.seq, __ATOMIC_ACQUIRE)) == seen) {
            struct timespec ts = {0, IDLE_SLEEP_NS};
            nanosleep(&ts, NULL);
        }
        seen = seq;
        if (ctl.op == OP_QUIT)
            return 0;
        lane_exec(l);
        __atomic_store_n(&ctl.done[l->id], seq, __ATOMIC_RELEASE);
    }
}

/* Runs the current order on every lane (lane 0 here) and waits for all. */
static void plan_order(struct plan *p)
{
    uint32_t seq = ctl.seq + 1;
    __atomic_store_n(&ctl.seq, seq, __ATOMIC_RELEASE);
    if (ctl.op == OP_QUIT)
        return;
    lane_exec(p->lanes[0]);
    for (uint32_t i = 1; i < p->n_lanes; i++)
        while (__atomic_load_n(&ctl.done[i], __ATOMIC_ACQUIRE) != seq)
            rte_pause();
}

static int launched;

static void plan_launch(struct plan *p)
{
    if (launched)
        return;
    launched = 1;
    unsigned lcore = rte_get_next_lcore(-1, 1, 0);
    for (uint32_t i = 1; i < p->n_lanes; i++, lcore = rte_get_next_lcore(lcore, 1, 0)) {
        if (lcore >= RTE_MAX_LCORE || rte_eal_remote_launch(lane_main, p->lanes[i], lcore) != 0) {
            fprintf(stderr, "pylb_rate: %u lanes need %u lcores\n", p->n_lanes, p->n_lanes);
            exit(1);
        }
    }
}

void plan_run(struct plan *p)
{
    plan_launch(p);
    uint64_t hz = rte_get_tsc_hz();
    for (uint32_t s = 0; s < p->n_steps; s++)
        memset(&p->steps[s].delta, 0, sizeof(p->steps[s].delta));
    for (uint32_t r = 0; r < p->slices; r++) {
        for (uint32_t s = 0; s < p->n_steps; s++) {
            struct step *st = &p->steps[s];
            ctl.op = OP_WINDOW;
            ctl.kind = st->kind;
            ctl.dp = st->dp;
            ctl.lanes = st->lanes;
            /* One window for every lane, from a common start. */
            ctl.start = rte_rdtsc() + hz / 1000000 * START_DELAY_US;
            ctl.end = ctl.start + (uint64_t)(p->slice_s * (double)hz);
            plan_order(p);
            st->mpps[r] = 0;
            for (uint32_t i = 0; i < st->lanes; i++) {
                st->mpps[r] += ctl.mpps[i];
                stats_add(&st->delta, &ctl.delta[i]);
            }
        }
    }
}

uint64_t plan_drain(struct plan *p, enum kind k)
{
    ctl.op = OP_DRAIN;
    ctl.kind = k;
    ctl.lanes = p->n_lanes;
    plan_order(p);
    uint64_t lost = 0;
    for (uint32_t i = 0; i < p->n_lanes; i++)
        lost += ctl.lost[i];
    return lost;
}

void plan_quit(struct plan *p)
{
    if (!launched)
        return;
    ctl.op = OP_QUIT;
    plan_order(p);
    rte_eal_mp_wait_lcore();
    launched = 0;
}

/* ---------------------------------------------------------------- figures */

static int by_value(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, uint32_t n)
{
    qsort(v, n, sizeof(*v), by_value);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

double step_median(const struct step *s, uint32_t slices)
{
    double v[MAX_SLICES];
    memcpy(v, s->mpps, slices * sizeof(double));
    return median(v, slices);
}

double step_best(const struct step *s, uint32_t slices)
{
    double best = 0;
    for (uint32_t i = 0; i < slices; i++)
        best = s->mpps[i] > best ? s->mpps[i] : best;
    return best;
}

/* Each slice is compared with the baseline slice next to it, which saw about
 * the same interference from other tenants. */
double step_ratio(const struct step *s, const struct step *base, uint32_t slices)
{
    double v[MAX_SLICES];
    for (uint32_t i = 0; i < slices; i++)
        v[i] = base->mpps[i] > 0 ? s->mpps[i] / base->mpps[i] : 0;
    return median(v, slices);
}

#define STAT_FIELDS(X) X(rx) X(fwd_cache_hit) X(fwd_new) X(fwd_table) X(fwd_verdict) \
    X(held) X(held_now) X(notices) X(notices_lost) X(cache_insert) X(cache_full) \
    X(drop_total) X(tx_ok) X(tx_dropped)

void stats_sub(struct pylb_stats *out, const struct pylb_stats *a, const struct pylb_stats *b)
{
    const uint64_t *x = (const uint64_t *)a, *y = (const uint64_t *)b;
    uint64_t *o = (uint64_t *)out;
    for (size_t i = 0; i < sizeof(*out) / sizeof(uint64_t); i++)
        o[i] = x[i] - y[i];
}

void stats_add(struct pylb_stats *acc, const struct pylb_stats *d)
{
    uint64_t *o = (uint64_t *)acc;
    const uint64_t *x = (const uint64_t *)d;
    for (size_t i = 0; i < sizeof(*acc) / sizeof(uint64_t); i++)
        o[i] += x[i];
}

void print_stats(const char *name, const struct pylb_stats *s)
{
    printf("\"%s\": {", name);
    const char *sep = "";
#define PRINT_FIELD(f) printf("%s\"" #f "\": %llu", sep, (unsigned long long)s->f), sep = ", ";
    STAT_FIELDS(PRINT_FIELD)
#undef PRINT_FIELD
    printf("}");
}

void print_step(const struct step *s, const struct step *base, uint32_t slices)
{
    printf("\"%s\": {\"lanes\": %u, \"mpps\": %.3f, \"mpps_best\": %.3f, \"ratio\": %.4f, "
           "\"slices\": [", s->name, s->lanes, step_median(s, slices), step_best(s, slices),
           base ? step_ratio(s, base, slices) : 1.0);
    for (uint32_t i = 0; i < slices; i++)
        printf("%s%.3f", i ? ", " : "", s->mpps[i]);
    printf("], ");
    print_stats("counters", &s->delta);
    printf("}");
}
