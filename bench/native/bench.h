/*
 * bench.h - the native packet-rate runner's shared pieces (bench/native/).
 *
 * A "lane" is one worker as a deployment runs it: its own ring: test port,
 * neighbour table and pylb worker, on its own lcore, fed by a recycling
 * source on that same lcore. Lanes share the flow cache and the compiled
 * dataplane, as 16 workers of one balancer would. Every figure is measured
 * in slices that alternate with the io-forward baseline of the same lanes,
 * so a noisy neighbour slows both alike and the ratio stays meaningful.
 */
#ifndef PYLB_BENCH_H
#define PYLB_BENCH_H

#include <stdint.h>
#include <rte_mbuf.h>
#include "pylb.h"
#include "port_internal.h"

#define IN_FLIGHT 4096          /* mbufs a lane's source keeps in circulation */
#define FRAME_LEN 60            /* 64 bytes on the wire with the FCS */
#define MAX_LANES 2
#define MAX_PUNTS 1024          /* as pylb.worker.Worker hands the shim */
#define MAX_SLICES 256
#define TCP_ACK 0x10
#define TCP_SYN 0x02

/* What a slice runs on each lane. */
enum kind {
    KIND_IO = 0,        /* rx burst -> tx burst, no processing: the harness's limit */
    KIND_WORKER = 1     /* pylb_worker_poll with the kind's dataplane */
};

struct lane {
    unsigned id;
    struct pylb_port *port;
    struct pylb_neigh *neigh;
    struct pylb_worker *worker;
    struct rte_mbuf *pool[IN_FLIGHT];   /* mbufs the source holds */
    uint32_t n_free;
    /* This lane's flows, first + k * stride for k < n_flows: lanes split the
     * flows as RSS would, so no flow is seen by two workers. */
    uint64_t first_flow, stride, n_flows, next;
    uint8_t tcp_flags;                  /* of every frame the source writes */
    int answer_holds;                   /* answer held packets as a standalone balancer */
    uint64_t sent, returned, answered;
    struct pylb_punt punts[MAX_PUNTS];
};

/* One measured step of a plan: every lane below `lanes` runs `kind` with
 * dataplane `dp` (KIND_WORKER) for the same window of time. */
struct step {
    const char *name;
    enum kind kind;
    struct pylb_dataplane *dp;
    uint32_t lanes;
    double mpps[MAX_SLICES];            /* all lanes together, one per slice */
    struct pylb_stats delta;            /* worker counters over the step's slices, all lanes */
};

struct plan {
    struct lane *lanes[MAX_LANES];
    uint32_t n_lanes;
    struct step steps[8];
    uint32_t n_steps;
    uint32_t slices;
    double slice_s;
};

/* ---------------------------------------------------------------- setup.c */

void bench_die(const char *what);
/* EAL arguments for a run needing `mb` MiB of DPDK memory on `lcores` lcores:
 * hugepages when enough are free, else --no-huge with -m. */
int bench_eal_start(uint32_t lcores, uint64_t mb);
void bench_v4(struct pylb_ip *ip, uint8_t a, uint8_t b, uint8_t c, uint8_t d);
/* The frame of flow i: TCP from 198.18.x.y:port to the VIP 192.0.2.10:80. */
void bench_write_frame(uint8_t *f, uint64_t i, uint8_t tcp_flags);
uint64_t bench_max_flows(void);

/* A Maglev table for backends 0..n-1, named "be-<i>", weight 1, except
 * `left_out` (weight 0: a drained backend), or UINT32_MAX for none. */
void bench_table(uint32_t n_backends, uint32_t left_out, uint32_t *table);

struct dp_spec {
    uint64_t generation;
    uint32_t n_backends;
    uint8_t encap;                  /* PYLB_ENCAP_* */
    uint8_t vip_flags;              /* PYLB_VIP_* */
    const uint32_t *current;        /* PYLB_TABLE_SIZE_DEFAULT backend ids */
    const uint32_t *previous;       /* NULL: no previous generation */
};
struct pylb_dataplane *bench_dataplane(const struct dp_spec *s);

/* Opens lane i's ring port and worker on `cache`. */
/* Lane id of `workers` (> 1: as a balancer's workers, on BENCH_LANES' rings). */
void lane_open(struct lane *l, unsigned id, unsigned workers, struct pylb_flow_cache *cache);
#define BENCH_LANES "rate"
void lane_close(struct lane *l);
void lane_flows(struct lane *l, uint64_t first, uint64_t stride, uint64_t n, uint8_t tcp_flags);

/* ---------------------------------------------------------------- lanes.c */

/* One round of a lane: source, forwarder (io or worker), sink. */
void lane_step(struct lane *l, enum kind k);
/* Runs kind until `packets` more came back (warm-up). */
void lane_run_packets(struct lane *l, enum kind k, uint64_t packets);
/* Swaps dp into the lane's worker (the runner owns every dataplane). */
void lane_set_dp(struct lane *l, struct pylb_dataplane *dp);
/* Stops the source and forwards until everything in flight came back or
 * stopped moving; returns the packets that never came back, and tops the
 * source up again from the mempool (the worker freed what it dropped). */
uint64_t lane_drain(struct lane *l, enum kind k);

/* Runs every step of the plan `slices` times, round-robin; lanes above 0 run
 * on their own lcores. Fills each step's per-slice rates and counters. */
void plan_run(struct plan *p);
/* Median and best of a step's rates; median of per-slice ratios to `base`. */
double step_median(const struct step *s, uint32_t slices);
double step_best(const struct step *s, uint32_t slices);
double step_ratio(const struct step *s, const struct step *base, uint32_t slices);
/* Drains every lane with forwarder k; returns the packets lost. */
uint64_t plan_drain(struct plan *p, enum kind k);
void plan_quit(struct plan *p);

/* JSON helpers: stats of interest as "name": value pairs. */
void print_stats(const char *name, const struct pylb_stats *s);
void print_step(const struct step *s, const struct step *base, uint32_t slices);
void stats_sub(struct pylb_stats *out, const struct pylb_stats *a, const struct pylb_stats *b);
void stats_add(struct pylb_stats *acc, const struct pylb_stats *d);

#endif
