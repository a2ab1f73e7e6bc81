/* setup.c - EAL, frames, dataplanes and lanes of the native runner. */
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <rte_ethdev.h>
#include "bench.h"

#define BACKEND_NAME_LEN 16

void bench_die(const char *what)
{
    fprintf(stderr, "pylb_rate: %s: %s\n", what, pylb_last_error());
    exit(1);
}

/* Free 2 MiB pages on a mounted hugetlbfs, in MiB; 0 when there are none. */
static uint64_t free_hugepage_mb(void)
{
    FILE *f = fopen("/proc/mounts", "r");
    char line[512];
    int mounted = 0;
    if (f) {
        while (fgets(line, sizeof(line), f))
            mounted |= strstr(line, " hugetlbfs ") != NULL;
        fclose(f);
    }
    uint64_t pages = 0, size_kb = 0;
    f = fopen("/proc/meminfo", "r");
    if (f) {
        while (fgets(line, sizeof(line), f)) {
            unsigned long long v;
            if (sscanf(line, "HugePages_Free: %llu", &v) == 1)
                pages = v;
            else if (sscanf(line, "Hugepagesize: %llu kB", &v) == 1)
                size_kb = v;
        }
        fclose(f);
    }
    return mounted ? pages * size_kb / 1024 : 0;
}

int bench_eal_start(uint32_t lcores, uint64_t mb)
{
    /* The main lane runs on the last CPU this process may use, the second on
     * the first: pylb's own processes (tests, balancers) take the first CPU
     * by default, so on a shared machine the last is the quieter one. */
    cpu_set_t set;
    int first = 0, last = 0;
    if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0) {
        for (first = 0; !CPU_ISSET(first, &set); first++)
            ;
        for (last = CPU_SETSIZE - 1; !CPU_ISSET(last, &set); last--)
            ;
    }
    if (lcores > 1 && first == last) {
        fprintf(stderr, "pylb_rate: %u lanes need %u CPUs\n", lcores, lcores);
        exit(2);
    }
    char cores[32], main_lcore[16], mem[32];
    snprintf(cores, sizeof(cores), lcores > 1 ? "%d,%d" : "%d", lcores > 1 ? first : last, last);
    snprintf(main_lcore, sizeof(main_lcore), "%d", last);
    /* Hugepages only when all the run needs is free: a flow cache that falls
     * back to small pages would measure TLB misses, not the fast path.
     * PYLB_RATE_NO_HUGE=1 forces small pages (valgrind cannot map DPDK's
     * hugepage areas). */
    const char *no_huge = getenv("PYLB_RATE_NO_HUGE");
    int huge = !(no_huge && *no_huge == '1') && free_hugepage_mb() >= mb;
    snprintf(mem, sizeof(mem), "%llu", (unsigned long long)mb);
    char *args[16] = {"pylb_rate", "-l", cores, "--main-lcore", main_lcore, "--no-pci",
                      "--no-telemetry", "--log-level=*:warning", "--log-level=lib.eal:error",
                      "--log-level=pmd.net.ring:error"};
    int n = 10;
    if (huge) {
        args[n++] = "--in-memory";
    } else {
        args[n++] = "--no-huge";
        args[n++] = "-m";
        args[n++] = mem;
    }
    if (pylb_eal_init(n, args) != PYLB_OK)
        bench_die("EAL");
    return huge;
}

void bench_v4(struct pylb_ip *ip, uint8_t a, uint8_t b, uint8_t c, uint8_t d)
{
    memset(ip, 0, sizeof(*ip));
    ip->b[10] = ip->b[11] = 0xff;
    ip->b[12] = a, ip->b[13] = b, ip->b[14] = c, ip->b[15] = d;
}

uint64_t bench_max_flows(void)
{
    return 1ull << 24;
}

/* Flow i: source 198.18.(i >> 16).(i >> 8), port 1024 + (i & 0xff) * 251, so
 * 2^24 flows are distinct; written whole each time, as a NIC would. */
void bench_write_frame(uint8_t *f, uint64_t i, uint8_t tcp_flags)
{
    static const uint8_t head[34] = {
        2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 0xc1, 0x08, 0x00,
        0x45, 0, 0, 46, 0, 1, 0x40, 0, 64, 6, 0, 0, 198, 18, 0, 0, 192, 0, 2, 10};
    memcpy(f, head, sizeof(head));
    f[28] = (uint8_t)(i >> 16), f[29] = (uint8_t)(i >> 8);
    uint16_t sport = (uint16_t)(1024 + (i & 0xff) * 251);
    uint8_t *tcp = f + 34;
    memset(tcp, 0, FRAME_LEN - 34);
    tcp[0] = (uint8_t)(sport >> 8), tcp[1] = (uint8_t)sport;
    tcp[3] = 80;
    tcp[12] = 5 << 4;
    tcp[13] = tcp_flags;
}

void bench_table(uint32_t n_backends, uint32_t left_out, uint32_t *table)
{
    struct pylb_maglev_backend *mb = calloc(n_backends, sizeof(*mb));
    char (*names)[BACKEND_NAME_LEN] = calloc(n_backends, BACKEND_NAME_LEN);
    if (!mb || !names) {
        fprintf(stderr, "pylb_rate: out of memory\n");
        exit(1);
    }
    for (uint32_t i = 0; i < n_backends; i++) {
        snprintf(names[i], BACKEND_NAME_LEN, "be-%u", i);
        mb[i].name = names[i];
        mb[i].weight = i == left_out ? 0 : 1;
    }
    if (pylb_maglev_build(mb, n_backends, PYLB_TABLE_SIZE_DEFAULT, table) != PYLB_OK)
        bench_die("maglev");
    free(mb);
    free(names);
}

struct pylb_dataplane *bench_dataplane(const struct dp_spec *s)
{
    struct pylb_dp_backend *be = calloc(s->n_backends, sizeof(*be));
    if (!be) {
        fprintf(stderr, "pylb_rate: out of memory\n");
        exit(1);
    }
    for (uint32_t i = 0; i < s->n_backends; i++) {
        bench_v4(&be[i].addr, 10, (uint8_t)(i >> 16), (uint8_t)(i >> 8), (uint8_t)i);
        be[i].vip = 0;
    }
    struct pylb_dp_vip vip;
    memset(&vip, 0, sizeof(vip));
    bench_v4(&vip.addr, 192, 0, 2, 10);
    vip.proto = 6;
    vip.port = 80;
    vip.flags = s->vip_flags;
    vip.encap.kind = s->encap;
    vip.encap.ttl = 64;
    vip.encap.udp_dport = 4789;
    vip.encap.vni = 7;
    vip.table_size = PYLB_TABLE_SIZE_DEFAULT;
    vip.current = s->current;
    vip.previous = s->previous;
    /* The benchmarks' changes are one generation deep: a bucket is stateful
     * where the two tables differ. */
    uint8_t stateful[PYLB_TABLE_SIZE_DEFAULT];   /* read by compile only */
    if (s->previous) {
        for (uint32_t b = 0; b < PYLB_TABLE_SIZE_DEFAULT; b++)
            stateful[b] = s->current[b] != s->previous[b];
        vip.stateful = stateful;
    }
    struct pylb_dp_conf conf;
    memset(&conf, 0, sizeof(conf));
    conf.generation = s->generation;
    conf.flow_seed = 42;
    bench_v4(&conf.local_v4, 203, 0, 113, 1);
    conf.has_v4 = 1;
    bench_v4(&conf.gateway_v4, 203, 0, 113, 254);
    conf.mtu = 1500;
    conf.n_backends = s->n_backends;
    conf.backends = be;
    conf.n_vips = 1;
    conf.vips = &vip;
    struct pylb_dataplane *dp;
    if (pylb_dataplane_compile(&conf, &dp) != PYLB_OK)
        bench_die("dataplane");
    free(be);
    return dp;
}

void lane_open(struct lane *l, unsigned id, unsigned workers, struct pylb_flow_cache *cache)
{
    char device[32];
    memset(l, 0, sizeof(*l));
    l->id = id;
    snprintf(device, sizeof(device), "ring:rate%u", id);
    struct pylb_port_conf pc = {.device = device, .rx_queues = 1, .tx_queues = 1,
                                .mbufs = IN_FLIGHT * 2};
    if (pylb_port_open(&pc, &l->port) != PYLB_OK)
        bench_die("port");
    struct pylb_ip gw;
    bench_v4(&gw, 203, 0, 113, 254);
    const uint8_t gw_mac[6] = {2, 0, 0, 0, 0, 0xfe};
    if (pylb_neigh_create(64, &l->neigh) != PYLB_OK || pylb_neigh_set_static(l->neigh, &gw, gw_mac))
        bench_die("neighbours");
    /* No idle sleep: a lane never waits for traffic, it makes its own. */
    /* Several workers run as a balancer's would: each its lane, the lanes'
     * rings looked at on every loop (pylb_lanes_create made them). */
    struct pylb_worker_conf wc = {.port = l->port, .cache = cache, .neigh = l->neigh,
                                  .max_held = 4096, .lane = (uint16_t)id,
                                  .lanes = (uint16_t)workers,
                                  .lanes_name = workers > 1 ? BENCH_LANES : NULL};
    if (pylb_worker_create(&wc, &l->worker) != PYLB_OK)
        bench_die("worker");
    if (rte_pktmbuf_alloc_bulk(l->port->pool, l->pool, IN_FLIGHT) != 0)
        bench_die("mbufs");
    l->n_free = IN_FLIGHT;
}

void lane_flows(struct lane *l, uint64_t first, uint64_t stride, uint64_t n, uint8_t tcp_flags)
{
    l->first_flow = first;
    l->stride = stride;
    l->n_flows = n;
    l->next = 0;
    l->tcp_flags = tcp_flags;
}

void lane_close(struct lane *l)
{
    rte_pktmbuf_free_bulk(l->pool, l->n_free);
    l->n_free = 0;
    pylb_worker_destroy(l->worker);
    pylb_neigh_destroy(l->neigh);
    pylb_port_close(l->port);
}
