/* port.c - ports from a vdev string, a PCI address or "ring:NAME", with their
 * mempool and queues. */
#include <stdio.h>
#include <rte_bus_vdev.h>
#include <rte_dev.h>
#include <rte_errno.h>
#include <rte_ethdev.h>
#include <rte_eth_ring.h>
#include <rte_lcore.h>
#include <rte_malloc.h>
#include <rte_mbuf.h>
#include <rte_ring.h>
#include "internal.h"
#include "port_internal.h"

#define RING_PORT_NAME_MAX 19

/* A port's mempool is named after its port id, so that a secondary process
 * finds it (pylb_port_attach); a closed port's id is reused only after its
 * pool was freed. */
static void pool_name(uint16_t port_id, char *out, size_t size)
{
    snprintf(out, size, "pylb_mb_port%u", port_id);
}

static int looks_like_pci(const char *dev)
{
    unsigned a, b, c, d;
    return sscanf(dev, "%x:%x:%x.%x", &a, &b, &c, &d) == 4 || sscanf(dev, "%x:%x.%x", &b, &c, &d) == 3;
}

/* The ethdev name of a vdev string is everything before the first comma. */
static void vdev_name(const char *dev, char *name, size_t size)
{
    size_t n = strcspn(dev, ",");
    if (n >= size)
        n = size - 1;
    memcpy(name, dev, n);
    name[n] = '\0';
}

/* Ring names of a ring port's queue q: NAME_rxQ, NAME_txQ. */
static void ring_names(const char *name, uint16_t q, char *rx, char *tx, size_t size)
{
    snprintf(rx, size, "%.19s_rx%u", name, q);
    snprintf(tx, size, "%.19s_tx%u", name, q);
}

static void ring_port_mac(struct pylb_port *p)
{
    /* The ring PMD's MAC is all zeros and cannot be set: give the port a
     * locally administered one of ours so its frames are told apart. */
    const uint8_t mac[6] = {0x02, 'r', 'i', 'n', (uint8_t)(p->port_id >> 8), (uint8_t)p->port_id};
    memcpy(p->mac, mac, 6);
    p->has_own_mac = 1;
}

static int open_ring_port(struct pylb_port *p, const char *name, uint16_t queues)
{
    char rx[RTE_RING_NAMESIZE + 8], tx[RTE_RING_NAMESIZE + 8];
    /* The ring PMD names its device "net_ring_" + name within 28 bytes. */
    if (strlen(name) == 0 || strlen(name) > RING_PORT_NAME_MAX)
        return pylb_fail(PYLB_EINVAL, "ring port name '%s': 1 to %d characters", name,
                         RING_PORT_NAME_MAX);
    if (queues == 0 || queues > PYLB_MAX_LANES)
        return pylb_fail(PYLB_EINVAL, "ring port %s: 1 to %d queues", name, PYLB_MAX_LANES);
    p->n_rings = queues;
    for (uint16_t q = 0; q < queues; q++) {
        ring_names(name, q, rx, tx, sizeof(rx));
        p->rx_ring[q] = rte_ring_create(rx, 8192, rte_socket_id(), RING_F_SP_ENQ | RING_F_SC_DEQ);
        p->tx_ring[q] = rte_ring_create(tx, 8192, rte_socket_id(), RING_F_SP_ENQ | RING_F_SC_DEQ);
        if (p->rx_ring[q] == NULL || p->tx_ring[q] == NULL)
            return pylb_fail(PYLB_ENOMEM, "ring port %s: rings: %s", name, rte_strerror(rte_errno));
    }
    int id = rte_eth_from_rings(name, p->rx_ring, queues, p->tx_ring, queues, rte_socket_id());
    if (id < 0)
        return pylb_fail(PYLB_EDPDK, "ring port %s: %s", name, rte_strerror(rte_errno));
    p->port_id = (uint16_t)id;
    ring_port_mac(p);
    return PYLB_OK;
}

static int find_port(struct pylb_port *p, const char *dev, uint16_t queues)
{
    char name[RTE_ETH_NAME_MAX_LEN];
    uint16_t id;
    if (strncmp(dev, "ring:", 5) == 0) {
        p->is_ring = 1;
        snprintf(p->name, sizeof(p->name), "%s", dev + 5);
        return open_ring_port(p, p->name, queues);
    }
    if (looks_like_pci(dev)) {
        vdev_name(dev, name, sizeof(name));
        if (rte_eth_dev_get_port_by_name(name, &id) != 0 && rte_dev_probe(dev) != 0)
            return pylb_fail(PYLB_EDPDK, "PCI device %s: not found or not bound to a DPDK driver "
                             "(see docs/deployment.md)", name);
    } else {
        vdev_name(dev, name, sizeof(name));
        if (rte_dev_probe(dev) != 0)
            return pylb_fail(PYLB_EDPDK, "device %s: probe failed: %s", dev, rte_strerror(rte_errno));
        p->is_vdev = 1;
    }
    snprintf(p->name, sizeof(p->name), "%s", name);
    if (rte_eth_dev_get_port_by_name(name, &id) != 0)
        return pylb_fail(PYLB_EDPDK, "device %s: no ethdev port after probe", name);
    p->port_id = id;
    return PYLB_OK;
}

static int start_port(struct pylb_port *p, const struct pylb_port_conf *c)
{
    struct rte_eth_conf conf;
    struct rte_eth_dev_info info;
    memset(&conf, 0, sizeof(conf));
    int rc = rte_eth_dev_info_get(p->port_id, &info);
    if (rc != 0)
        return pylb_fail(PYLB_EDPDK, "%s: device info: %s", p->name, rte_strerror(-rc));
    if (c->rx_queues > info.max_rx_queues || c->tx_queues > info.max_tx_queues)
        return pylb_fail(PYLB_EINVAL, "%s: %u rx / %u tx queues asked, device has %u / %u",
                         p->name, c->rx_queues, c->tx_queues, info.max_rx_queues, info.max_tx_queues);
    if (c->rx_queues > 1)
        conf.rxmode.mq_mode = RTE_ETH_MQ_RX_RSS;
    conf.rx_adv_conf.rss_conf.rss_hf = info.flow_type_rss_offloads &
        (RTE_ETH_RSS_IP | RTE_ETH_RSS_TCP | RTE_ETH_RSS_UDP);
    rc = rte_eth_dev_configure(p->port_id, c->rx_queues, c->tx_queues, &conf);
    if (rc != 0)
        return pylb_fail(PYLB_EDPDK, "%s: configure: %s", p->name, rte_strerror(-rc));
    if (c->mtu && (rc = rte_eth_dev_set_mtu(p->port_id, c->mtu)) != 0)
        return pylb_fail(PYLB_EDPDK, "%s: MTU %u: %s", p->name, c->mtu, rte_strerror(-rc));
    uint16_t rxd = c->rx_desc ? c->rx_desc : 1024, txd = c->tx_desc ? c->tx_desc : 1024;
    rte_eth_dev_adjust_nb_rx_tx_desc(p->port_id, &rxd, &txd);
    int socket = rte_eth_dev_socket_id(p->port_id);
    for (uint16_t q = 0; q < c->rx_queues; q++)
        if ((rc = rte_eth_rx_queue_setup(p->port_id, q, rxd, socket, NULL, p->pool)) != 0)
            return pylb_fail(PYLB_EDPDK, "%s: rx queue %u: %s", p->name, q, rte_strerror(-rc));
    for (uint16_t q = 0; q < c->tx_queues; q++)
        if ((rc = rte_eth_tx_queue_setup(p->port_id, q, txd, socket, NULL)) != 0)
            return pylb_fail(PYLB_EDPDK, "%s: tx queue %u: %s", p->name, q, rte_strerror(-rc));
    if ((rc = rte_eth_dev_start(p->port_id)) != 0)
        return pylb_fail(PYLB_EDPDK, "%s: start: %s", p->name, rte_strerror(-rc));
    p->started = 1;
    if (c->promiscuous)
        rte_eth_promiscuous_enable(p->port_id);
    return PYLB_OK;
}

PYLB_API int pylb_port_open(const struct pylb_port_conf *c, struct pylb_port **out)
{
    if (!pylb_eal_running())
        return pylb_fail(PYLB_ESTATE, "start the EAL before opening ports");
    if (c == NULL || c->device == NULL || out == NULL || c->rx_queues == 0 || c->tx_queues == 0)
        return pylb_fail(PYLB_EINVAL, "port: device and at least one rx and tx queue are required");
    struct pylb_port *p = calloc(1, sizeof(*p));
    if (p == NULL)
        return pylb_fail(PYLB_ENOMEM, "port: out of memory");
    p->port_id = UINT16_MAX;
    int rc = find_port(p, c->device, RTE_MAX(c->rx_queues, c->tx_queues));
    if (rc == PYLB_OK) {
        char pname[RTE_MEMPOOL_NAMESIZE];
        pool_name(p->port_id, pname, sizeof(pname));
        uint32_t n = c->mbufs ? c->mbufs : 8191;
        p->pool = rte_pktmbuf_pool_create(pname, n, 256, 0, RTE_MBUF_DEFAULT_BUF_SIZE,
                                          rte_eth_dev_socket_id(p->port_id) < 0 ? 0 :
                                          rte_eth_dev_socket_id(p->port_id));
        rc = p->pool ? start_port(p, c)
                     : pylb_fail(PYLB_ENOMEM, "%s: mempool of %u mbufs: %s", p->name, n,
                                 rte_strerror(rte_errno));
    }
    if (rc != PYLB_OK) {
        char msg[256];
        snprintf(msg, sizeof(msg), "%s", pylb_last_error());
        pylb_port_close(p);
        return pylb_fail(rc, "%s", msg);
    }
    *out = p;
    return PYLB_OK;
}

PYLB_API void pylb_port_close(struct pylb_port *p)
{
    if (p == NULL)
        return;
    if (p->attached) {
        free(p);    /* the device, its rings and its pool are the primary's */
        return;
    }
    if (p->port_id != UINT16_MAX) {
        struct rte_eth_dev_info info;
        struct rte_device *dev = NULL;
        if (rte_eth_dev_is_valid_port(p->port_id) && rte_eth_dev_info_get(p->port_id, &info) == 0)
            dev = info.device;
        if (p->started)
            rte_eth_dev_stop(p->port_id);
        if (dev != NULL) {
            rte_eth_dev_close(p->port_id);
            if (p->is_vdev || p->is_ring)
                rte_dev_remove(dev);
        }
    }
    for (uint16_t q = 0; q < p->n_rings; q++) {
        if (p->rx_ring[q]) {
            free_ring_mbufs(p->rx_ring[q]);
            rte_ring_free(p->rx_ring[q]);
        }
        if (p->tx_ring[q]) {
            free_ring_mbufs(p->tx_ring[q]);
            rte_ring_free(p->tx_ring[q]);
        }
    }
    rte_mempool_free(p->pool);
    free(p);
}

PYLB_API int pylb_port_mac(const struct pylb_port *p, uint8_t mac[6])
{
    if (p->has_own_mac) {
        memcpy(mac, p->mac, 6);
        return PYLB_OK;
    }
    struct rte_ether_addr a;
    int rc = rte_eth_macaddr_get(p->port_id, &a);
    if (rc != 0)
        return pylb_fail(PYLB_EDPDK, "%s: MAC address: %s", p->name, rte_strerror(-rc));
    memcpy(mac, a.addr_bytes, 6);
    return PYLB_OK;
}

PYLB_API uint16_t pylb_port_id(const struct pylb_port *p)
{
    return p->port_id;
}

PYLB_API int pylb_port_info(const struct pylb_port *p, struct pylb_port_info *out)
{
    struct rte_eth_dev_info info;
    int rc = rte_eth_dev_info_get(p->port_id, &info);
    if (rc != 0)
        return pylb_fail(PYLB_EDPDK, "%s: device info: %s", p->name, rte_strerror(-rc));
    memset(out, 0, sizeof(*out));
    snprintf(out->driver, sizeof(out->driver), "%s", info.driver_name ? info.driver_name : "?");
    out->max_mtu = info.max_mtu;
    out->rx_queues_max = info.max_rx_queues;
    out->tx_queues_max = info.max_tx_queues;
    return PYLB_OK;
}

PYLB_API int pylb_port_stats(const struct pylb_port *p, struct pylb_port_stats *out)
{
    struct rte_eth_stats s;
    int rc = rte_eth_stats_get(p->port_id, &s);
    if (rc != 0)
        return pylb_fail(PYLB_EDPDK, "%s: stats: %s", p->name, rte_strerror(-rc));
    out->ipackets = s.ipackets;
    out->opackets = s.opackets;
    out->ibytes = s.ibytes;
    out->obytes = s.obytes;
    out->imissed = s.imissed;
    out->ierrors = s.ierrors;
    out->oerrors = s.oerrors;
    out->rx_nombuf = s.rx_nombuf;
    return PYLB_OK;
}

/* The queue a NIC's RSS might pick: a hash of the frame's addresses and
 * ports, independent of pylb's flow ids (a NIC's key is not ours). */
static uint16_t rss_queue(const struct rte_mbuf *m, uint16_t queues)
{
    struct pylb_parsed pp;
    if (pylb_parse(rte_pktmbuf_mtod(m, const uint8_t *), m->data_len, &pp) != PYLB_PARSE_OK ||
        (pp.l3 != 4 && pp.l3 != 6))
        return 0;
    uint64_t h = pylb_flow_id(&pp.key, 0x5253535253535253ull);   /* "RSS" */
    return (uint16_t)((h >> 32) % queues);
}

PYLB_API int pylb_port_attach(const char *device, struct pylb_port **out)
{
    if (!pylb_eal_running())
        return pylb_fail(PYLB_ESTATE, "start the EAL before attaching ports");
    if (device == NULL || out == NULL)
        return pylb_fail(PYLB_EINVAL, "port attach: device required");
    struct pylb_port *p = calloc(1, sizeof(*p));
    if (p == NULL)
        return pylb_fail(PYLB_ENOMEM, "port: out of memory");
    p->attached = 1;
    char name[RTE_ETH_NAME_MAX_LEN];
    if (strncmp(device, "ring:", 5) == 0) {
        p->is_ring = 1;
        snprintf(p->name, sizeof(p->name), "%s", device + 5);
        snprintf(name, sizeof(name), "net_ring_%s", device + 5);
    } else {
        vdev_name(device, name, sizeof(name));
        snprintf(p->name, sizeof(p->name), "%s", name);
    }
    uint16_t id;
    char pname[RTE_MEMPOOL_NAMESIZE];
    if (rte_eth_dev_get_port_by_name(name, &id) != 0) {
        free(p);
        return pylb_fail(PYLB_ENOTFOUND, "port %s: the primary process has no such port", name);
    }
    p->port_id = id;
    pool_name(id, pname, sizeof(pname));
    p->pool = rte_mempool_lookup(pname);
    if (p->pool == NULL) {
        free(p);
        return pylb_fail(PYLB_ENOTFOUND, "port %s: mempool %s not found", name, pname);
    }
    if (p->is_ring) {
        char rx[RTE_RING_NAMESIZE + 8], tx[RTE_RING_NAMESIZE + 8];
        for (uint16_t q = 0; q < PYLB_MAX_LANES; q++) {
            ring_names(p->name, q, rx, tx, sizeof(rx));
            p->rx_ring[q] = rte_ring_lookup(rx);
            p->tx_ring[q] = rte_ring_lookup(tx);
            if (p->rx_ring[q] == NULL || p->tx_ring[q] == NULL)
                break;
            p->n_rings = q + 1;
        }
        ring_port_mac(p);
    }
    p->started = 1;
    *out = p;
    return PYLB_OK;
}

PYLB_API int pylb_port_inject(struct pylb_port *p, const uint8_t *const *frames, const uint32_t *lens,
                              uint32_t n, uint32_t *injected)
{
    if (!p->is_ring)
        return pylb_fail(PYLB_EINVAL, "%s: inject works on ring: ports only", p->name);
    uint32_t done = 0;
    while (done < n) {
        struct rte_mbuf *m[PYLB_BURST];
        uint32_t k = RTE_MIN(n - done, (uint32_t)PYLB_BURST);
        if (rte_pktmbuf_alloc_bulk(p->pool, m, k) != 0)
            break;
        for (uint32_t i = 0; i < k; i++) {
            uint32_t len = lens[done + i];
            char *d = rte_pktmbuf_append(m[i], (uint16_t)RTE_MIN(len, rte_pktmbuf_tailroom(m[i])));
            memcpy(d, frames[done + i], rte_pktmbuf_data_len(m[i]));
        }
        uint32_t q = 0;
        for (uint32_t i = 0; i < k; i++, q++) {
            struct rte_ring *r = p->rx_ring[p->n_rings > 1 ? rss_queue(m[i], p->n_rings) : 0];
            if (rte_ring_enqueue(r, m[i]) != 0)
                break;
        }
        if (q < k)
            rte_pktmbuf_free_bulk(m + q, k - q);
        done += q;
        if (q < k)
            break;
    }
    *injected = done;
    return PYLB_OK;
}

PYLB_API int pylb_port_drain(struct pylb_port *p, uint8_t *buf, uint32_t stride, uint32_t *lens,
                             uint32_t max, uint32_t *n, uint32_t *cut)
{
    if (!p->is_ring)
        return pylb_fail(PYLB_EINVAL, "%s: drain works on ring: ports only", p->name);
    uint32_t got = 0, short_copies = 0;
    while (got < max) {
        struct rte_mbuf *m[PYLB_BURST];
        uint32_t k = 0;
        for (uint16_t q = 0; q < p->n_rings && k == 0; q++)
            k = rte_ring_dequeue_burst(p->tx_ring[q], (void **)m,
                                       RTE_MIN(max - got, (uint32_t)PYLB_BURST), NULL);
        if (k == 0)
            break;
        for (uint32_t i = 0; i < k; i++, got++) {
            uint32_t len = rte_pktmbuf_pkt_len(m[i]);
            uint32_t take = RTE_MIN(len, stride);
            const void *src = rte_pktmbuf_read(m[i], 0, take, buf + (size_t)got * stride);
            if (src != buf + (size_t)got * stride)
                memcpy(buf + (size_t)got * stride, src, take);
            lens[got] = take;
            short_copies += take < len;
        }
        rte_pktmbuf_free_bulk(m, k);
    }
    *n = got;
    if (cut)
        *cut = short_copies;
    return PYLB_OK;
}
