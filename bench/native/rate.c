/*
 * pylb_rate - the native packet-rate runner.
 *
 * A recycling source feeds 64-byte TCP frames of N distinct flows into a
 * ring: test port and takes back what the port transmitted, on the same
 * core. Two modes share that harness so their ratio is meaningful:
 *   io  rx burst -> tx burst, no processing: the limit of this harness
 *   lb  the worker's fast path (cache hit, Maglev, encapsulation)
 * Prints one JSON line. Usage:
 *   pylb_rate [--mode io|lb] [--flows N] [--seconds S] [--encap ipip|vxlan] [-- EAL args]
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <rte_cycles.h>
#include <rte_ethdev.h>
#include <rte_mbuf.h>
#include <rte_ring.h>
#include "pylb.h"
#include "port_internal.h"

#define IN_FLIGHT 4096
#define FRAME_LEN 60
#define BACKENDS 16

struct opts {
    int io;
    uint32_t flows;
    double seconds;
    int vxlan;
};

static void die(const char *what)
{
    fprintf(stderr, "pylb_rate: %s: %s\n", what, pylb_last_error());
    exit(1);
}

static void v4(struct pylb_ip *ip, uint8_t a, uint8_t b, uint8_t c, uint8_t d)
{
    memset(ip, 0, sizeof(*ip));
    ip->b[10] = ip->b[11] = 0xff;
    ip->b[12] = a, ip->b[13] = b, ip->b[14] = c, ip->b[15] = d;
}

/* Frame for flow i: TCP ACK from 198.18.x.y:port to 192.0.2.10:80. */
static void write_frame(uint8_t *f, uint32_t i)
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
    tcp[13] = 0x10;
}

static struct pylb_dataplane *make_dataplane(int vxlan)
{
    struct pylb_maglev_backend mb[BACKENDS];
    struct pylb_dp_backend be[BACKENDS];
    char names[BACKENDS][16];
    memset(be, 0, sizeof(be));
    for (int i = 0; i < BACKENDS; i++) {
        snprintf(names[i], sizeof(names[i]), "be-%d", i);
        mb[i].name = names[i];
        mb[i].weight = 1;
        v4(&be[i].addr, 203, 0, 113, (uint8_t)(10 + i));
        be[i].vip = 0;
    }
    static uint32_t table[PYLB_TABLE_SIZE_DEFAULT];
    if (pylb_maglev_build(mb, BACKENDS, PYLB_TABLE_SIZE_DEFAULT, table) != PYLB_OK)
        die("maglev");
    struct pylb_dp_vip vip;
    memset(&vip, 0, sizeof(vip));
    v4(&vip.addr, 192, 0, 2, 10);
    vip.proto = 6;
    vip.port = 80;
    vip.flags = PYLB_VIP_TRACK_ALL;
    vip.encap.kind = vxlan ? PYLB_ENCAP_VXLAN : PYLB_ENCAP_IPIP;
    vip.encap.ttl = 64;
    vip.encap.udp_dport = 4789;
    vip.encap.vni = 7;
    vip.table_size = PYLB_TABLE_SIZE_DEFAULT;
    vip.current = table;
    struct pylb_dp_conf conf;
    memset(&conf, 0, sizeof(conf));
    conf.generation = 1;
    conf.flow_seed = 42;
    v4(&conf.local_v4, 203, 0, 113, 1);
    conf.has_v4 = 1;
    v4(&conf.gateway_v4, 203, 0, 113, 254);
    conf.mtu = 1500;
    conf.n_backends = BACKENDS;
    conf.backends = be;
    conf.n_vips = 1;
    conf.vips = &vip;
    struct pylb_dataplane *dp;
    if (pylb_dataplane_compile(&conf, &dp) != PYLB_OK)
        die("dataplane");
    return dp;
}

static void parse_opts(int argc, char **argv, struct opts *o)
{
    static const struct option longopts[] = {
        {"mode", required_argument, 0, 'm'}, {"flows", required_argument, 0, 'f'},
        {"seconds", required_argument, 0, 's'}, {"encap", required_argument, 0, 'e'}, {0}};
    o->io = 0, o->flows = 100000, o->seconds = 2.0, o->vxlan = 0;
    int c;
    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        if (c == 'm')
            o->io = strcmp(optarg, "io") == 0;
        else if (c == 'f')
            o->flows = (uint32_t)strtoul(optarg, NULL, 10);
        else if (c == 's')
            o->seconds = atof(optarg);
        else if (c == 'e')
            o->vxlan = strcmp(optarg, "vxlan") == 0;
        else
            exit(2);
    }
    if (o->flows == 0 || o->flows > (1u << 24) || o->seconds <= 0) {
        fprintf(stderr, "pylb_rate: --flows 1..16777216, --seconds > 0\n");
        exit(2);
    }
}

int main(int argc, char **argv)
{
    struct opts o;
    int split = argc;
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--") == 0) {
            split = i;
            break;
        }
    parse_opts(split, argv, &o);
    char *defaults[] = {"pylb_rate", "-l", "0", "--in-memory", "--no-pci", "--no-telemetry",
                        "--log-level=*:warning", "--log-level=lib.eal:error"};
    char **eal = defaults;
    int n_eal = 8;
    if (split < argc) {
        eal = argv + split;
        eal[0] = "pylb_rate";
        n_eal = argc - split;
    }
    if (pylb_eal_init(n_eal, eal) != PYLB_OK)
        die("EAL");
    struct pylb_port_conf pc = {.device = "ring:rate0", .rx_queues = 1, .tx_queues = 1,
                                .mbufs = IN_FLIGHT * 2};
    struct pylb_port *port;
    if (pylb_port_open(&pc, &port) != PYLB_OK)
        die("port");
    uint32_t timeouts[4] = {300000, 10000, 30000, 30000};
    struct pylb_flow_cache *cache;
    struct pylb_neigh *neigh;
    struct pylb_worker *w = NULL;
    struct pylb_dataplane *dp = make_dataplane(o.vxlan);
    struct pylb_ip gw;
    v4(&gw, 203, 0, 113, 254);
    const uint8_t gw_mac[6] = {2, 0, 0, 0, 0, 0xfe};
    if (pylb_flow_cache_create((uint64_t)o.flows * 2, timeouts, &cache) != PYLB_OK)
        die("flow cache");
    if (pylb_neigh_create(64, &neigh) != PYLB_OK || pylb_neigh_set_static(neigh, &gw, gw_mac))
        die("neighbours");
    struct pylb_worker_conf wc = {.port = port, .cache = cache, .neigh = neigh, .max_held = 4096};
    if (pylb_worker_create(&wc, &w) != PYLB_OK || pylb_worker_set_dataplane(w, dp, NULL))
        die("worker");

    struct rte_mbuf *pool[IN_FLIGHT];
    if (rte_pktmbuf_alloc_bulk(port->pool, pool, IN_FLIGHT) != 0)
        die("mbufs");
    uint32_t next_flow = 0, n_free = IN_FLIGHT;
    struct pylb_punt punts[256];
    uint64_t done = 0, warm = (uint64_t)o.flows + IN_FLIGHT;
    uint64_t hz = rte_get_tsc_hz(), start = 0, end = 0;
    for (;;) {
        /* Source: give every free mbuf the next flow's frame. */
        uint32_t k = RTE_MIN(n_free, 8u * PYLB_BURST);
        for (uint32_t i = 0; i < k; i++) {
            struct rte_mbuf *m = pool[n_free - 1 - i];
            m->data_off = RTE_PKTMBUF_HEADROOM;
            m->data_len = m->pkt_len = FRAME_LEN;
            write_frame(rte_pktmbuf_mtod(m, uint8_t *), next_flow);
            next_flow = next_flow + 1 == o.flows ? 0 : next_flow + 1;
        }
        n_free -= rte_ring_enqueue_burst(port->rx_ring, (void **)(pool + n_free - k), k, NULL);
        if (o.io) {
            struct rte_mbuf *m[PYLB_BURST];
            for (int b = 0; b < 8; b++) {
                uint16_t n = rte_eth_rx_burst(port->port_id, 0, m, PYLB_BURST);
                uint16_t t = rte_eth_tx_burst(port->port_id, 0, m, n);
                if (t < n)
                    rte_pktmbuf_free_bulk(m + t, n - t);
            }
        } else {
            uint32_t np;
            pylb_worker_poll(w, 8, 0, punts, 256, &np);
        }
        /* Sink: take back what was sent. */
        uint32_t got = rte_ring_dequeue_burst(port->tx_ring, (void **)(pool + n_free),
                                              IN_FLIGHT - n_free, NULL);
        n_free += got;
        done += got;
        if (start == 0 && done >= warm) {
            start = rte_rdtsc();
            done = 0;
        } else if (start && (end = rte_rdtsc()) - start >= (uint64_t)(o.seconds * hz)) {
            break;
        }
        if (got == 0 && n_free < IN_FLIGHT / 2) {
            fprintf(stderr, "pylb_rate: packets are being lost (check the counters)\n");
            break;
        }
    }
    double secs = (double)(end - start) / (double)hz;
    struct pylb_stats st;
    pylb_worker_stats(w, &st);
    printf("{\"mode\": \"%s\", \"encap\": \"%s\", \"flows\": %u, \"packets\": %llu, "
           "\"seconds\": %.3f, \"mpps\": %.3f, \"cache_hits\": %llu, \"drops\": %llu}\n",
           o.io ? "io" : "lb", o.vxlan ? "vxlan" : "ipip", o.flows, (unsigned long long)done,
           secs, (double)done / secs / 1e6, (unsigned long long)st.fwd_cache_hit,
           (unsigned long long)st.drop_total);
    rte_pktmbuf_free_bulk(pool, n_free);
    pylb_worker_destroy(w);
    pylb_dataplane_free(dp);
    pylb_neigh_destroy(neigh);
    pylb_flow_cache_destroy(cache);
    pylb_port_close(port);
    pylb_eal_cleanup();
    return 0;
}
