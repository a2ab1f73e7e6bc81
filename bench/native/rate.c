/*
 * pylb_rate - the native packet-rate runner (bench/README.md).
 *
 * Modes, each printing one JSON object:
 *   fastpath  the hit path (cache hit, encapsulation) for each --encap, in
 *             slices interleaved with io-forward through the same harness
 *             (rx burst -> tx burst, no processing: the harness's limit).
 *             --workers 2: one lane per lcore sharing one flow cache; the
 *             slices then alternate io (2 lanes), the hit path on 1 lane and
 *             on 2 lanes, so the scaling is read from one run.
 *   syn       new flows on the SYN path: every packet a TCP SYN of a flow the
 *             cache does not hold, with state notices off (stable buckets)
 *             and on (every bucket moved: each new flow is cached and a
 *             notice for its owner is handed up), interleaved with io.
 *   swap      table swap under load (swap.c).
 *   lookup    the flow cache alone: single lookups against bursts (lookup.c).
 * Usage:
 *   pylb_rate --mode fastpath [--flows N] [--encap ipip,vxlan] [--workers 1|2]
 *             [--slices K] [--slice-ms MS] [--capacity C]
 *   pylb_rate --mode syn [--flows N] [--capacity C] [--slices K] [--slice-ms MS]
 *   pylb_rate --mode swap [--flows N] [--backends B] [--seconds S] [--swap-ms MS]
 *   pylb_rate --mode lookup [--flows N] [--slices K] [--slice-ms MS]
 * EAL arguments are chosen here: hugepages when enough are free, else
 * --no-huge (the JSON says which).
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "bench.h"
#include "swap.h"

#define BACKENDS 16
#define MAX_ENCAPS 3
#define SYN_CAPACITY (1ull << 21)
#define SYN_WARM_UP (16 * IN_FLIGHT)

struct opts {
    const char *mode;
    uint64_t flows;
    uint64_t capacity;
    uint8_t encaps[MAX_ENCAPS];
    const char *encap_names[MAX_ENCAPS];
    uint32_t n_encaps;
    uint32_t workers;
    uint32_t slices;
    double slice_ms;
    uint32_t backends;
    double seconds;
    double swap_ms;
};

static void usage(void)
{
    fprintf(stderr, "usage: pylb_rate --mode fastpath|syn|swap|lookup [--flows N] "
            "[--encap ipip,vxlan] [--workers 1|2] [--slices K] [--slice-ms MS] [--capacity C] [--backends B] "
            "[--seconds S] [--swap-ms MS]\n");
    exit(2);
}

static void parse_encaps(struct opts *o, char *list)
{
    o->n_encaps = 0;
    for (char *tok = strtok(list, ","); tok; tok = strtok(NULL, ",")) {
        if (o->n_encaps == MAX_ENCAPS)
            usage();
        uint8_t kind = strcmp(tok, "ipip") == 0 ? PYLB_ENCAP_IPIP
                     : strcmp(tok, "vxlan") == 0 ? PYLB_ENCAP_VXLAN
                     : strcmp(tok, "gue") == 0 ? PYLB_ENCAP_GUE : 0;
        if (!kind)
            usage();
        o->encaps[o->n_encaps] = kind;
        o->encap_names[o->n_encaps++] = kind == PYLB_ENCAP_IPIP ? "ipip"
                                        : kind == PYLB_ENCAP_VXLAN ? "vxlan" : "gue";
    }
}

static void parse_opts(int argc, char **argv, struct opts *o)
{
    static const struct option longopts[] = {
        {"mode", required_argument, 0, 'm'}, {"flows", required_argument, 0, 'f'},
        {"encap", required_argument, 0, 'e'}, {"workers", required_argument, 0, 'w'},
        {"slices", required_argument, 0, 'k'}, {"slice-ms", required_argument, 0, 'l'},
        {"capacity", required_argument, 0, 'c'}, {"backends", required_argument, 0, 'b'},
        {"seconds", required_argument, 0, 's'}, {"swap-ms", required_argument, 0, 'i'},
        {0}};
    static char default_encaps[] = "ipip,vxlan";
    memset(o, 0, sizeof(*o));
    o->mode = "fastpath";
    o->flows = 100000;
    o->workers = 1;
    o->slices = 8;
    o->slice_ms = 100;
    o->seconds = 1.0;
    o->swap_ms = 10;
    parse_encaps(o, default_encaps);
    int c;
    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (c) {
        case 'm': o->mode = optarg; break;
        case 'f': o->flows = strtoull(optarg, NULL, 10); break;
        case 'e': parse_encaps(o, optarg); break;
        case 'w': o->workers = (uint32_t)atoi(optarg); break;
        case 'k': o->slices = (uint32_t)atoi(optarg); break;
        case 'l': o->slice_ms = atof(optarg); break;
        case 'c': o->capacity = strtoull(optarg, NULL, 10); break;
        case 'b': o->backends = (uint32_t)atoi(optarg); break;
        case 's': o->seconds = atof(optarg); break;
        case 'i': o->swap_ms = atof(optarg); break;
        default: usage();
        }
    }
    if (o->flows == 0 || o->flows > bench_max_flows() || o->workers < 1 ||
        o->workers > MAX_LANES || o->slices < 1 || o->slices > MAX_SLICES || o->slice_ms <= 0 ||
        o->seconds <= 0 || o->swap_ms <= 0 || o->n_encaps == 0) {
        fprintf(stderr, "pylb_rate: --flows 1..%llu, --workers 1..%d, --slices 1..%d, "
                "positive times\n", (unsigned long long)bench_max_flows(), MAX_LANES, MAX_SLICES);
        exit(2);
    }
    /* docs/flow-cache.md: two to four times the flows the cache holds. On the
     * SYN path flows end within milliseconds, so what it holds is what
     * arrives in that time, whatever the flow space. */
    if (o->capacity == 0)
        o->capacity = strcmp(o->mode, "syn") == 0 && o->flows > SYN_CAPACITY / 2 ? SYN_CAPACITY
                                                                               : o->flows * 2;
}

static struct pylb_flow_cache *open_cache(const struct opts *o, uint32_t lanes,
                                          const uint32_t timeouts[4], int *huge)
{
    size_t footprint = pylb_flow_cache_footprint(o->capacity);
    if (footprint == 0) {
        fprintf(stderr, "pylb_rate: flow cache capacity %llu out of range\n",
                (unsigned long long)o->capacity);
        exit(2);
    }
    *huge = bench_eal_start(lanes, footprint / (1 << 20) + 64 * lanes + 320);
    struct pylb_flow_cache *cache;
    if (pylb_flow_cache_create(o->capacity, timeouts, &cache) != PYLB_OK)
        bench_die("flow cache");
    return cache;
}

static void print_head(const char *mode, const struct opts *o, struct pylb_flow_cache *cache,
                       int huge, const struct plan *p)
{
    uint64_t capacity = pylb_flow_cache_capacity(cache);
    size_t footprint = pylb_flow_cache_footprint(capacity);
    /* Per entry: what doubling the capacity adds, without the fixed part
     * (header, active-flow counters). */
    size_t entries_bytes = pylb_flow_cache_footprint(2 * capacity) - footprint;
    printf("{\"mode\": \"%s\", \"flows\": %llu, \"workers\": %u, \"hugepages\": %s, "
           "\"slices\": %u, \"slice_ms\": %.1f, "
           "\"cache\": {\"capacity\": %llu, \"footprint_bytes\": %zu, \"bytes_per_entry\": %.1f, "
           "\"bytes_per_flow\": %.1f, \"load\": %.3f}, ",
           mode, (unsigned long long)o->flows, p->n_lanes, huge ? "true" : "false", p->slices,
           p->slice_s * 1e3, (unsigned long long)capacity, footprint,
           (double)entries_bytes / (double)capacity,
           (double)footprint / (double)o->flows, (double)o->flows / (double)capacity);
}

static void print_steps(const struct plan *p)
{
    printf("\"steps\": {");
    for (uint32_t s = 0; s < p->n_steps; s++) {
        printf(s ? ", " : "");
        print_step(&p->steps[s], s ? &p->steps[0] : NULL, p->slices);
    }
    printf("}");
}

static void add_step(struct plan *p, const char *name, enum kind k, struct pylb_dataplane *dp,
                     uint32_t lanes)
{
    struct step *s = &p->steps[p->n_steps++];
    memset(s, 0, sizeof(*s));
    s->name = name;
    s->kind = k;
    s->dp = dp;
    s->lanes = lanes;
}

static struct lane lanes[MAX_LANES];

static void open_lanes(struct plan *p, const struct opts *o, struct pylb_flow_cache *cache,
                       uint32_t n, uint8_t tcp_flags)
{
    p->n_lanes = n;
    p->slices = o->slices;
    p->slice_s = o->slice_ms / 1e3;
    if (n > 1 && pylb_lanes_create(BENCH_LANES, (uint16_t)n, 4096) != PYLB_OK)
        bench_die("lanes");
    for (uint32_t i = 0; i < n; i++) {
        lane_open(&lanes[i], i, n, cache);
        lane_flows(&lanes[i], i, n, o->flows / n, tcp_flags);
        p->lanes[i] = &lanes[i];
    }
}

static void close_lanes(struct plan *p)
{
    plan_quit(p);
    for (uint32_t i = 0; i < p->n_lanes; i++)
        lane_close(p->lanes[i]);
    if (p->n_lanes > 1)
        pylb_lanes_free(BENCH_LANES, (uint16_t)p->n_lanes);
}

/* Every flow once through the worker, so the cache holds them all. */
static uint64_t warm_up(struct plan *p, struct pylb_dataplane *dp)
{
    uint64_t lost = 0;
    for (uint32_t i = 0; i < p->n_lanes; i++) {
        lane_set_dp(p->lanes[i], dp);
        lane_run_packets(p->lanes[i], KIND_WORKER, p->lanes[i]->n_flows + IN_FLIGHT);
        lost += lane_drain(p->lanes[i], KIND_WORKER);
    }
    return lost;
}

static int run_fastpath(const struct opts *o)
{
    static const uint32_t timeouts[4] = {300000, 10000, 30000, 30000};
    int huge;
    struct pylb_flow_cache *cache = open_cache(o, o->workers, timeouts, &huge);
    static uint32_t table[PYLB_TABLE_SIZE_DEFAULT];
    bench_table(BACKENDS, UINT32_MAX, table);
    struct pylb_dataplane *dps[MAX_ENCAPS];
    for (uint32_t e = 0; e < o->n_encaps; e++) {
        struct dp_spec spec = {.generation = 1, .n_backends = BACKENDS, .encap = o->encaps[e],
                               .vip_flags = PYLB_VIP_TRACK_ALL, .current = table};
        dps[e] = bench_dataplane(&spec);
    }
    static struct plan p;
    open_lanes(&p, o, cache, o->workers, TCP_ACK);
    uint64_t lost = warm_up(&p, dps[0]);
    char one_worker[32];
    add_step(&p, "io", KIND_IO, NULL, p.n_lanes);
    if (p.n_lanes == 1) {
        for (uint32_t e = 0; e < o->n_encaps; e++)
            add_step(&p, o->encap_names[e], KIND_WORKER, dps[e], 1);
    } else {
        snprintf(one_worker, sizeof(one_worker), "%s_1", o->encap_names[0]);
        add_step(&p, one_worker, KIND_WORKER, dps[0], 1);
        add_step(&p, o->encap_names[0], KIND_WORKER, dps[0], p.n_lanes);
    }
    plan_run(&p);
    lost += plan_drain(&p, KIND_WORKER);
    print_head("fastpath", o, cache, huge, &p);
    if (p.n_lanes > 1)
        printf("\"scaling\": %.4f, ", step_ratio(&p.steps[2], &p.steps[1], p.slices));
    printf("\"lost\": %llu, ", (unsigned long long)lost);
    print_steps(&p);
    printf("}\n");
    close_lanes(&p);
    for (uint32_t e = 0; e < o->n_encaps; e++)
        pylb_dataplane_free(dps[e]);
    pylb_flow_cache_destroy(cache);
    return 0;
}

static int run_syn(const struct opts *o)
{
    /* Flows end 1 ms after their SYN (4 ms with the coarse clock's ticks):
     * with a flow space far larger than what arrives in that time, every
     * packet is the SYN of a flow the cache does not hold, and its insert
     * finds the set as a busy cache leaves it (ways in use, or expired). */
    static const uint32_t timeouts[4] = {1, 1, 1, 1};
    int huge;
    struct pylb_flow_cache *cache = open_cache(o, 1, timeouts, &huge);
    static uint32_t table[PYLB_TABLE_SIZE_DEFAULT], moved[PYLB_TABLE_SIZE_DEFAULT];
    bench_table(BACKENDS, UINT32_MAX, table);
    /* A previous generation that differs in every bucket: every SYN lands in
     * a moved bucket, so every new flow's state goes to its owner. */
    for (uint32_t b = 0; b < PYLB_TABLE_SIZE_DEFAULT; b++)
        moved[b] = (table[b] + 1) % BACKENDS;
    struct dp_spec off = {.generation = 1, .n_backends = BACKENDS, .encap = PYLB_ENCAP_IPIP,
                          .vip_flags = PYLB_VIP_TRACK_ALL, .current = table};
    struct dp_spec on = off;
    on.generation = 2;
    on.previous = moved;
    struct pylb_dataplane *dp_off = bench_dataplane(&off), *dp_on = bench_dataplane(&on);
    static struct plan p;
    open_lanes(&p, o, cache, 1, TCP_SYN);
    lane_set_dp(&lanes[0], dp_off);
    lane_run_packets(&lanes[0], KIND_WORKER, SYN_WARM_UP);
    uint64_t lost = lane_drain(&lanes[0], KIND_WORKER);
    add_step(&p, "io", KIND_IO, NULL, 1);
    add_step(&p, "pushes_off", KIND_WORKER, dp_off, 1);
    add_step(&p, "pushes_on", KIND_WORKER, dp_on, 1);
    plan_run(&p);
    lost += plan_drain(&p, KIND_WORKER);
    print_head("syn", o, cache, huge, &p);
    printf("\"lost\": %llu, ", (unsigned long long)lost);
    print_steps(&p);
    printf("}\n");
    close_lanes(&p);
    pylb_dataplane_free(dp_off);
    pylb_dataplane_free(dp_on);
    pylb_flow_cache_destroy(cache);
    return 0;
}

int main(int argc, char **argv)
{
    struct opts o;
    parse_opts(argc, argv, &o);
    setvbuf(stdout, NULL, _IOFBF, 1 << 16);
    int rc;
    if (strcmp(o.mode, "fastpath") == 0) {
        rc = run_fastpath(&o);
    } else if (strcmp(o.mode, "syn") == 0) {
        rc = run_syn(&o);
    } else if (strcmp(o.mode, "lookup") == 0) {
        struct lookup_opts lo = {.flows = o.flows, .slices = o.slices, .slice_ms = o.slice_ms};
        rc = run_lookup(&lo);
    } else if (strcmp(o.mode, "swap") == 0) {
        struct swap_opts so = {.flows = o.flows, .backends = o.backends ? o.backends : 1000,
                               .seconds = o.seconds, .swap_ms = o.swap_ms};
        rc = run_swap(&so);
    } else {
        usage();
        return 2;
    }
    fflush(stdout);
    pylb_eal_cleanup();
    return rc;
}
