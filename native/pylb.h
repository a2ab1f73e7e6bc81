/*
 * pylb.h - the whole C interface of the pylb data-plane shim.
 *
 * Python reaches the shim only through this header: pylb/_build_ffi.py feeds
 * the part between the "cffi:begin" and "cffi:end" markers to cffi's cdef.
 * No DPDK type appears here; handles are opaque and every call that can fail
 * returns a pylb_status (0 = ok, negative = error) with a message available
 * from pylb_last_error().
 *
 * Modules (one concept each, same name as the Python module that wraps it):
 *   eal.c        EAL start and stop
 *   port.c       ports from a vdev string or PCI address, queues, mempools
 *   flow_id.c    the seeded 5-tuple hash (reference: pylb/flow_id.py)
 *   parse.c      Ethernet/VLAN/ARP/IPv4/IPv6/TCP/UDP/ICMP parsing of a buffer
 *   maglev.c     Maglev destination tables (reference: pylb/maglev.py)
 *   ownership.c  owner and backup of every bucket (reference: pylb/ownership.py)
 *   flow_cache.c lock-free, bounded, aging flow cache with no pointers inside
 *   encap.c      IPIP (RFC 2003/2473), VXLAN (RFC 7348), GUE (variant 1)
 *   neigh.c      ARP / neighbour discovery: answers and next-hop resolution
 *   dataplane.c  a compiled, immutable forwarding configuration
 *   worker.c     the burst loop: rx, classify, cache, table, encap, tx
 *   stats.h      counters (equations in the comment on struct pylb_stats)
 */
#ifndef PYLB_H
#define PYLB_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* cffi:begin */

#define PYLB_BURST 32
#define PYLB_TABLE_SIZE_DEFAULT 65537
#define PYLB_NO_BACKEND 4294967295
#define PYLB_MAX_VIPS 1024
#define PYLB_FLOW_CACHE_WAYS 8
#define PYLB_LOOKUP_BURST_MAX 64

enum pylb_status {
    PYLB_OK = 0,
    PYLB_EINVAL = -1,   /* an argument or configuration is wrong */
    PYLB_ENOMEM = -2,   /* memory (hugepages, mempool) could not be had */
    PYLB_EDPDK = -3,    /* a DPDK call failed; the message says which */
    PYLB_ESTATE = -4,   /* the call is not allowed in the current state */
    PYLB_ENOTFOUND = -5,
    PYLB_EFULL = -6,    /* no room: flow cache set full, queue full */
    PYLB_ETOOBIG = -7   /* the result would not fit the buffer or MTU */
};

/* The message of the last failing call on this thread ("" if none). */
const char *pylb_last_error(void);
/* SHA-256 (hex) of the pylb.h the library was built from: Python compares it
 * with the header its cffi module was built from. */
const char *pylb_header_sha256(void);

/* ------------------------------------------------------------------ eal */

/* Starts DPDK's EAL with the given arguments (argv[0] included). Once per
 * process; a second call returns PYLB_ESTATE. */
int pylb_eal_init(int argc, char **argv);
/* Releases EAL memory (hugepage files). No pylb call may follow. */
int pylb_eal_cleanup(void);
/* 1 when the EAL runs on hugepages, 0 with --no-huge. */
int pylb_eal_hugepages(void);
/* The shim's clock, in the flow cache's unit: monotonic ms, 32 bits. */
uint32_t pylb_now_ms(void);

/* ------------------------------------------------------------------ addresses and keys */

/* An IP address: IPv6 as is, IPv4 as ::ffff:a.b.c.d (v4-mapped). */
struct pylb_ip {
    uint8_t b[16];
};

/* A flow key, 40 bytes, the input of the flow id. Ports in host order. */
struct pylb_flow_key {
    struct pylb_ip src;
    struct pylb_ip dst;
    uint16_t sport;
    uint16_t dport;
    uint8_t proto;
    uint8_t pad[3];     /* always zero */
};

/* ------------------------------------------------------------------ flow_id */

/* The flow id: a seeded 64-bit hash of the key, identical on every balancer
 * given the same seed. Specified in docs/flow-id.md. */
uint64_t pylb_flow_id(const struct pylb_flow_key *key, uint64_t seed);
/* Bucket of a flow id in a table of size m. */
uint32_t pylb_bucket(uint64_t flow_id, uint32_t m);
/* pylb_bucket of n flow ids, by the reduction the fast path uses: a
 * multiply by a constant precomputed from m instead of a 64-bit division,
 * exact for every flow id and m (docs/flow-id.md). m must not be 0. */
int pylb_bucket_burst(const uint64_t *flow_ids, uint32_t n, uint32_t m, uint32_t *buckets);

/* ------------------------------------------------------------------ parse */

enum pylb_l3 { PYLB_L3_NONE = 0, PYLB_L3_ARP = 1, PYLB_L3_IPV4 = 4, PYLB_L3_IPV6 = 6 };

enum pylb_parse_result {
    PYLB_PARSE_OK = 0,
    PYLB_PARSE_NOT_IP = 1,         /* valid, neither IP nor ARP */
    PYLB_PARSE_TRUNCATED = 2,      /* a header extends past the data */
    PYLB_PARSE_BAD_HEADER = 3      /* a field is impossible (IHL < 5, length, version) */
};

/* Parse flags. */
#define PYLB_PF_VLAN 1
#define PYLB_PF_FRAGMENT 2         /* any fragment (first or later) */
#define PYLB_PF_LATER_FRAGMENT 4   /* offset != 0: no L4 header */
#define PYLB_PF_IP_OPTIONS 8       /* IPv4 options or IPv6 extension headers */
#define PYLB_PF_HAS_L4 16          /* l4 ports valid */

/* What the parser learnt of one frame. Offsets are from the frame start. */
struct pylb_parsed {
    uint8_t l3;                /* enum pylb_l3 */
    uint8_t l4_proto;          /* IPPROTO_* of the transport header, 0 if none */
    uint8_t tcp_flags;         /* TCP flag byte (FIN=1 SYN=2 RST=4 ACK=16) */
    uint8_t ttl;               /* IPv4 TTL / IPv6 hop limit */
    uint16_t flags;            /* PYLB_PF_* */
    uint16_t vlan_tci;
    uint16_t l2_len;           /* Ethernet + VLAN */
    uint16_t l3_len;           /* IP header with options / extension headers */
    uint16_t l3_total;         /* IP total length (header + payload) */
    uint8_t tos;               /* IPv4 TOS / IPv6 traffic class */
    uint8_t df;                /* IPv4 DF bit */
    uint8_t icmp_type;
    uint8_t icmp_code;
    struct pylb_flow_key key;  /* src, dst, ports (0 if none), proto */
};

/* Parses one frame. Never reads past len. */
int pylb_parse(const uint8_t *frame, uint32_t len, struct pylb_parsed *out);

/* ------------------------------------------------------------------ maglev */

/* A backend as Maglev sees it: a stable name and a weight (0 = no buckets). */
struct pylb_maglev_backend {
    const char *name;
    uint32_t weight;
};

/* Fills table[0..m) with backend indices (or PYLB_NO_BACKEND when no backend
 * has weight). m must be prime. Algorithm in docs/maglev.md; reference in
 * pylb/maglev.py. */
int pylb_maglev_build(const struct pylb_maglev_backend *backends, uint32_t n,
                      uint32_t m, uint32_t *table);

/* ------------------------------------------------------------------ ownership */

/* Fills codes[first_bucket..first_bucket+count) of a table of table_size
 * buckets with each bucket's holders by rendezvous hashing (docs/ownership.md;
 * reference pylb/ownership.py): code = owner rank * n + backup rank + 1
 * (backup 0 when n is 1), ranks in the order names are given, which must be
 * the byte order of the names. codes is the whole table. */
int pylb_ownership_fill(const char *const *names, const uint32_t *name_lens, uint32_t n,
                        uint32_t table_size, uint32_t first_bucket, uint32_t count,
                        uint32_t *codes);

/* ------------------------------------------------------------------ flow_cache */

/* Timeout classes of a cached flow. */
enum pylb_timeout_class {
    PYLB_TO_TCP = 0,         /* established TCP */
    PYLB_TO_TCP_CLOSING = 1, /* TCP after FIN or RST */
    PYLB_TO_UDP = 2,
    PYLB_TO_OTHER = 3
};

struct pylb_flow_cache;

/* Bytes of memory a cache of `capacity` flows needs (rounded up to whole
 * sets of PYLB_FLOW_CACHE_WAYS). */
size_t pylb_flow_cache_footprint(uint64_t capacity);
/* Lays out a cache in caller-provided memory (e.g. a MAP_SHARED mapping or a
 * hugepage memzone) so several processes can use it; mem holds no pointers.
 * init=1 clears it, init=0 attaches to one laid out already. */
int pylb_flow_cache_attach(void *mem, size_t len, uint64_t capacity, int init,
                           const uint32_t timeouts_ms[4],
                           struct pylb_flow_cache **out);
/* Allocates process-local memory for a cache (hugepages when the EAL runs). */
int pylb_flow_cache_create(uint64_t capacity, const uint32_t timeouts_ms[4],
                           struct pylb_flow_cache **out);
/* A cache in a named hugepage memzone, for the worker processes of one
 * balancer (docs/architecture.md, process model): the primary creates it,
 * the others attach by name; destroy frees a handle, and the primary frees
 * the memzone with free_shared once every handle is gone. */
int pylb_flow_cache_create_shared(const char *name, uint64_t capacity,
                                  const uint32_t timeouts_ms[4], struct pylb_flow_cache **out);
int pylb_flow_cache_attach_shared(const char *name, uint64_t capacity,
                                  struct pylb_flow_cache **out);
void pylb_flow_cache_free_shared(const char *name);
void pylb_flow_cache_destroy(struct pylb_flow_cache *c);
int pylb_flow_cache_set_timeouts(struct pylb_flow_cache *c, const uint32_t timeouts_ms[4]);

/* Looks up one flow; on a hit writes the backend id, refreshes last-seen
 * (once it is 1/256 of the flow's timeout old: docs/flow-cache.md), and moves
 * TCP to closing on FIN/RST (tcp_flags). A SYN without ACK on a closing TCP
 * flow is a new connection reusing the 5-tuple: the entry is freed and the
 * lookup misses. Returns 1 hit, 0 miss. */
int pylb_flow_cache_lookup(struct pylb_flow_cache *c, const struct pylb_flow_key *key,
                           uint64_t flow_id, uint32_t now_ms, uint8_t tcp_flags,
                           uint32_t *backend);
/* Looks up n flows (n <= PYLB_LOOKUP_BURST_MAX) as n calls of
 * pylb_flow_cache_lookup would, in order, but prefetches the sets of all of
 * them first so that their memory latencies overlap. tcp_flags may be NULL
 * (no FIN/RST). Bit i of *hit_mask is set, and backends[i] written, when flow
 * i hit. Returns the number of hits, or a status. */
int pylb_flow_cache_lookup_burst(struct pylb_flow_cache *c,
                                 const struct pylb_flow_key *const *keys,
                                 const uint64_t *flow_ids, const uint8_t *tcp_flags,
                                 uint32_t n, uint32_t now_ms, uint32_t *backends,
                                 uint64_t *hit_mask);
/* Inserts or replaces a flow. PYLB_EFULL when its set holds only live flows
 * (the caller then forwards by the destination table; nothing is evicted). */
int pylb_flow_cache_insert(struct pylb_flow_cache *c, const struct pylb_flow_key *key,
                           uint64_t flow_id, uint32_t backend, uint32_t now_ms,
                           uint8_t timeout_class);
/* Like lookup, but changes nothing: 1 with the backend and the ms since the
 * flow was last seen, 0 when absent or expired (refreshes to owners). */
int pylb_flow_cache_peek(struct pylb_flow_cache *c, const struct pylb_flow_key *key,
                         uint64_t flow_id, uint32_t now_ms, uint32_t *backend, uint32_t *idle_ms);
int pylb_flow_cache_remove(struct pylb_flow_cache *c, const struct pylb_flow_key *key,
                           uint64_t flow_id);
/* A live entry as pylb_flow_cache_export copies it out. vip and bucket are
 * not the cache's: pylb_dataplane_keep_divergent fills them. */
struct pylb_cache_entry {
    struct pylb_flow_key key;
    uint64_t flow_id;
    uint32_t backend;
    uint32_t idle_ms;         /* since last seen */
    uint8_t timeout_class;    /* enum pylb_timeout_class */
    uint8_t pad[3];
    int32_t vip;
    uint32_t bucket;
    uint32_t pad2;
};
/* Copies the live entries of the sets from *cursor on into out, stopping
 * before a set whose live entries would not fit in what is left of max
 * (max >= PYLB_FLOW_CACHE_WAYS), and advances *cursor; *cursor equal to the
 * number of sets means the scan is over. Entries being written at that
 * instant may be missed; a flow freed and inserted again into a later way of
 * its set while the set is read may come twice. Returns the number copied,
 * or a status. */
int pylb_flow_cache_export(struct pylb_flow_cache *c, uint32_t now_ms, uint64_t *cursor,
                           struct pylb_cache_entry *out, uint32_t max);
/* Sets in the cache (the end value of an export's cursor). */
uint64_t pylb_flow_cache_sets(const struct pylb_flow_cache *c);
/* Frees expired entries in up to max_sets sets, continuing where the last call
 * stopped; returns the number freed. */
uint64_t pylb_flow_cache_age(struct pylb_flow_cache *c, uint32_t now_ms, uint64_t max_sets);
/* Live (unexpired) entries: an O(capacity) scan, for tests. */
uint64_t pylb_flow_cache_count(struct pylb_flow_cache *c, uint32_t now_ms);
uint64_t pylb_flow_cache_capacity(const struct pylb_flow_cache *c);

/* Active flows: the entries the cache holds (in use: live, or timed out and
 * not yet freed by age() or reused by an insert), per backend id. Counted as
 * entries are written, never by a scan: every insert, replace and free
 * counts, whichever handle or process makes it (docs/flow-cache.md, "Active
 * flows"). Ids from PYLB_FLOW_CACHE_COUNTED_BACKENDS on are counted only in
 * the total.
 *
 *   total == sum(per_backend[id] for every id) + entries of uncounted ids
 *   total == pylb_flow_cache_count(now) + timed-out entries not yet freed
 *
 * Both exact while no write is in flight. per_backend[i] for i < n (ids
 * not counted read 0); total may be NULL. Costs a read of the counters
 * (about 1 MiB for the total), never of the entries. */
#define PYLB_FLOW_CACHE_COUNTED_BACKENDS 16384
int pylb_flow_cache_active_flows(const struct pylb_flow_cache *c, uint64_t *per_backend,
                                 uint32_t n, uint64_t *total);

/* ------------------------------------------------------------------ encap */

enum pylb_encap_kind {
    PYLB_ENCAP_IPIP = 1,   /* 4in4 (RFC 2003), 6in6 / 4in6 / 6in4 (RFC 2473) */
    PYLB_ENCAP_VXLAN = 2,  /* RFC 7348, inner Ethernet to inner_mac */
    PYLB_ENCAP_GUE = 3     /* GUE variant 1: IP directly in UDP */
};

/* Everything the encapsulation needs besides the inner packet. */
struct pylb_encap_params {
    uint8_t kind;             /* enum pylb_encap_kind */
    uint8_t ttl;              /* outer TTL / hop limit */
    uint16_t udp_dport;       /* VXLAN / GUE destination port */
    uint32_t vni;             /* VXLAN network identifier */
    struct pylb_ip src;       /* outer source: the balancer's data address */
    struct pylb_ip dst;       /* outer destination: the backend */
    uint8_t src_mac[6];       /* outer Ethernet source */
    uint8_t dst_mac[6];       /* outer Ethernet destination: the next hop */
    uint8_t inner_mac[6];     /* VXLAN: inner Ethernet destination */
    uint8_t pad[2];
    uint16_t mtu;             /* largest outer IP packet allowed */
};

/* Bytes of outer headers (Ethernet included) the params add to an inner IP
 * packet of family inner_l3 (4 or 6). */
uint32_t pylb_encap_overhead(const struct pylb_encap_params *p, uint8_t inner_l3);

/* Writes the outer headers in front of the inner IP packet at buf[off ..
 * off+inner_len): they end at buf+off and start at buf+off-overhead.
 * flow_id seeds the UDP source port and the IPv6 flow label.
 * Returns the overhead (>0) or PYLB_EINVAL / PYLB_ETOOBIG (outer packet over
 * the MTU) / PYLB_EFULL (off < overhead). */
int pylb_encap_write(const struct pylb_encap_params *p, uint8_t *buf, uint32_t off,
                     uint32_t inner_len, uint8_t inner_l3, uint64_t flow_id);

/* ------------------------------------------------------------------ dataplane */

/* A backend in the compiled configuration; its index is its backend id. Ids
 * stay the same across configurations (flow caches hold them). */
struct pylb_dp_backend {
    struct pylb_ip addr;
    uint32_t vip;             /* index of its VIP (encapsulation), or PYLB_NO_BACKEND */
    uint8_t weight_zero;      /* drained: keeps established flows only */
    uint8_t pad[3];
};

/* VIP flags. */
#define PYLB_VIP_ANSWER_ARP 1     /* answer ARP / NS for the VIP address */
#define PYLB_VIP_TRACK_ALL 2      /* cache every flow, not only moved buckets */

/* A VIP: (address, protocol, port) -> tables of backend ids. */
struct pylb_dp_vip {
    struct pylb_ip addr;
    uint8_t proto;            /* 6 TCP, 17 UDP */
    uint8_t flags;            /* PYLB_VIP_* */
    uint16_t port;            /* 0 = all ports */
    struct pylb_encap_params encap;  /* kind, ttl, udp_dport, vni, inner_mac used */
    uint32_t table_size;      /* prime */
    const uint32_t *current;  /* table_size backend ids */
    /* Stateful buckets (docs/state-exchange.md): stateful[b] non-zero when a
     * change in force moved bucket b, whose flows may then hold state
     * anywhere; the fast path treats exactly these buckets as moved. previous[b]
     * is the backend b had before the oldest such change (rule 4 for a flow
     * nobody has state for). Both NULL when no bucket is stateful. */
    const uint32_t *previous;
    const uint8_t *stateful;  /* table_size flags, compiled into a bitmap */
};

/* Exception path for frames that are not for a VIP or the balancer. */
enum pylb_exception_policy { PYLB_EXC_DROP = 0, PYLB_EXC_TAP = 1 };

/* Input of pylb_dataplane_compile. All pointers are read during the call only:
 * the compiled result is one self-contained copy. */
struct pylb_dp_conf {
    uint64_t generation;          /* increases with every compile */
    uint64_t flow_seed;           /* seed of the flow id */
    struct pylb_ip local_v4;      /* data addresses: outer source, ARP/NS answers */
    struct pylb_ip local_v6;      /* all zero = none */
    uint8_t has_v4;
    uint8_t has_v6;
    uint8_t exception_policy;     /* enum pylb_exception_policy */
    uint8_t pad;
    struct pylb_ip gateway_v4;    /* next hop toward backends; zero = on-link */
    struct pylb_ip gateway_v6;
    uint16_t mtu;                 /* of the port toward backends */
    uint16_t peer_port;           /* UDP port of peer messages (0 = none) */
    uint32_t n_backends;
    const struct pylb_dp_backend *backends;
    uint32_t n_vips;
    const struct pylb_dp_vip *vips;
};

struct pylb_dataplane;
int pylb_dataplane_compile(const struct pylb_dp_conf *conf, struct pylb_dataplane **out);
void pylb_dataplane_free(struct pylb_dataplane *dp);
uint64_t pylb_dataplane_generation(const struct pylb_dataplane *dp);
/* The fast path's decision for a key, without a packet: vip index (or -1),
 * flow id, bucket, current and previous backend (the current one when the
 * bucket is not stateful), and whether it is stateful. For `pylb which`,
 * the miss path and tests. */
int pylb_dataplane_classify(const struct pylb_dataplane *dp, const struct pylb_flow_key *key,
                            int32_t *vip, uint64_t *flow_id, uint32_t *bucket,
                            uint32_t *current, uint32_t *previous, uint8_t *stateful);
/* Keeps, in place and in order, the cache entries whose flow lies in a
 * stateful bucket of its VIP and is cached with a backend other than the
 * bucket's current one: the flows whose state the owners must hold after a
 * change (rule 2 for flows older than it). Writes each kept entry's vip and
 * bucket. Returns the number kept. */
uint32_t pylb_dataplane_keep_divergent(const struct pylb_dataplane *dp,
                                       struct pylb_cache_entry *entries, uint32_t n);

/* ------------------------------------------------------------------ neigh */

struct pylb_neigh;
int pylb_neigh_create(uint32_t capacity, struct pylb_neigh **out);
void pylb_neigh_destroy(struct pylb_neigh *n);
/* A static entry (configuration override); never expires or changes. */
int pylb_neigh_set_static(struct pylb_neigh *n, const struct pylb_ip *ip, const uint8_t mac[6]);
/* 1 and the MAC if resolved, else 0. */
int pylb_neigh_lookup(struct pylb_neigh *n, const struct pylb_ip *ip, uint8_t mac[6]);
/* Records a MAC as if the wire had taught it: lane 0, which takes every ARP
 * and NDP frame, tells the balancer's other worker processes what it learnt.
 * Static entries keep theirs. PYLB_EFULL when the table is full. */
int pylb_neigh_learn(struct pylb_neigh *n, const struct pylb_ip *ip, const uint8_t mac[6]);

/* ------------------------------------------------------------------ port */

struct pylb_port_conf {
    const char *device;       /* "net_ring0", "net_pcap0,rx_pcap=a,tx_pcap=b", "0000:03:00.0" */
    uint16_t rx_queues;
    uint16_t tx_queues;
    uint16_t rx_desc;
    uint16_t tx_desc;
    uint32_t mbufs;           /* mempool size */
    uint16_t mtu;             /* 0 = leave as is */
    uint8_t promiscuous;
    uint8_t pad;
};

struct pylb_port;
int pylb_port_open(const struct pylb_port_conf *conf, struct pylb_port **out);
/* In a DPDK secondary process: the port the primary opened from the same
 * device string, with its mempool; close() leaves the device to the primary. */
int pylb_port_attach(const char *device, struct pylb_port **out);
void pylb_port_close(struct pylb_port *p);
int pylb_port_mac(const struct pylb_port *p, uint8_t mac[6]);
uint16_t pylb_port_id(const struct pylb_port *p);

struct pylb_port_info {
    char driver[32];
    uint16_t max_mtu;         /* as the driver reports it */
    uint16_t rx_queues_max;
    uint16_t tx_queues_max;
    uint16_t pad;
};
int pylb_port_info(const struct pylb_port *p, struct pylb_port_info *out);

struct pylb_port_stats {
    uint64_t ipackets, opackets, ibytes, obytes, imissed, ierrors, oerrors, rx_nombuf;
};
int pylb_port_stats(const struct pylb_port *p, struct pylb_port_stats *out);

/* Test ports: a device "ring:NAME" is a port over rte_rings, one pair per
 * queue. inject puts frames on its RX rings (as if they arrived from the
 * wire), spread over the queues by a hash of their addresses and ports as a
 * NIC's RSS would; drain takes what the port transmitted from its TX rings,
 * queue by queue. Frames longer than stride are cut and counted in *cut.
 * PYLB_EINVAL on other ports. */
int pylb_port_inject(struct pylb_port *p, const uint8_t *const *frames, const uint32_t *lens,
                     uint32_t n, uint32_t *injected);
int pylb_port_drain(struct pylb_port *p, uint8_t *buf, uint32_t stride, uint32_t *lens,
                    uint32_t max, uint32_t *n, uint32_t *cut);

/* ------------------------------------------------------------------ worker */

/* Why a packet (or a notice) reaches Python. */
enum pylb_punt_reason {
    PYLB_PUNT_MOVED = 1,      /* held: existing flow, no state, moved bucket */
    PYLB_PUNT_NEW_STATE = 2,  /* notice: new flow in a moved bucket was cached; push its state */
    PYLB_PUNT_UDP_MOVED = 4   /* held: UDP flow with no state in a moved bucket */
};

/* One packet or notice handed to Python. Held packets stay in the worker
 * until a verdict names their slot. */
struct pylb_punt {
    uint32_t slot;            /* held packet slot, or PYLB_NO_BACKEND for a notice */
    uint8_t reason;           /* enum pylb_punt_reason */
    uint8_t tcp_flags;
    int16_t vip;              /* VIP index in the dataplane */
    uint64_t flow_id;
    uint32_t bucket;
    uint32_t current;         /* backend id in the current table */
    uint32_t previous;        /* backend id in the previous table */
    uint32_t backend;         /* for NEW_STATE: the backend chosen */
    struct pylb_flow_key key;
};

enum pylb_verdict_action {
    PYLB_VERDICT_FORWARD = 1,   /* encapsulate to backend (and cache if cache=1) */
    PYLB_VERDICT_DROP = 2,
    PYLB_VERDICT_PEER = 3       /* sent to the flow's owner by the peer protocol */
};

struct pylb_verdict {
    uint32_t slot;
    uint8_t action;           /* enum pylb_verdict_action */
    uint8_t cache;            /* FORWARD: also insert into the flow cache */
    uint16_t pad;
    uint32_t backend;         /* FORWARD: backend id */
};

struct pylb_worker_conf {
    struct pylb_port *port;
    uint16_t rx_queue;
    uint16_t tx_queue;
    struct pylb_flow_cache *cache;   /* may be shared by several workers */
    struct pylb_neigh *neigh;        /* next hops of this worker's process */
    struct pylb_port *exception_port;/* a net_tap port for the kernel, or NULL = drop */
    uint32_t tx_drain_us;            /* flush the TX buffer at least this often */
    uint32_t idle_sleep_max_us;      /* back-off ceiling when no packet arrives */
    uint32_t max_held;               /* held-packet slots for Python */
    uint16_t lane;                   /* this worker's lane, 0 .. lanes - 1 */
    uint16_t lanes;                  /* worker processes of the balancer; 0 or 1: alone */
    const char *lanes_name;          /* their rings' name (pylb_lanes_create); NULL if alone */
};

/*
 * Lanes: the worker processes of one balancer (one per core) share the data
 * port's queues and the flow cache, and split by flow what needs Python: the
 * flow with id f belongs to lane (f >> PYLB_LANE_KEY_SHIFT) % lanes. A worker hands a
 * frame that needs another lane's Python (a held packet of its flow, a peer
 * message for it, by the message's lane key) to that lane's frame ring, and
 * a new-state notice to its notice ring; lane 0 takes every frame that is
 * neither VIP traffic nor a peer message (ARP, NDP, the exception TAP). Each
 * lane reads its rings as it reads its RX queue. docs/architecture.md.
 */
#define PYLB_MAX_LANES 16
#define PYLB_LANE_KEYS 16
#define PYLB_LANE_KEY_SHIFT 60       /* lane key: the flow id's top 4 bits */
/* Creates the rings of `lanes` lanes named after `name` (at most 20 bytes),
 * each holding up to ring_size (a power of two) frames or notices. */
int pylb_lanes_create(const char *name, uint16_t lanes, uint32_t ring_size);
/* Frees them and any frame still on them (after every worker was destroyed). */
void pylb_lanes_free(const char *name, uint16_t lanes);

/*
 * Counters of one worker. Every received frame ends in exactly one outcome
 * (or is still held for Python), so whenever no call is running:
 *
 *   rx + lane_in == fwd_cache_hit + fwd_new + fwd_table + fwd_fragment
 *         + fwd_verdict + verdict_peer + peer_rx + arp_replied + nd_replied
 *         + neigh_learned + exception_tap + lane_out + drop_total + held_now
 *   (lane_order_kept counts frames also counted in lane_out)
 *   held == verdict_forward + verdict_drop + verdict_peer + held_now
 *   verdict_forward == fwd_verdict + (verdict forwards dropped by a drop_* reason)
 *   drop_total == drop_parse_truncated + drop_parse_bad + drop_not_ip
 *                 + drop_no_vip + drop_no_backend + drop_no_neighbor
 *                 + drop_too_big + drop_encap + drop_icmp + drop_arp_other
 *                 + drop_exception + drop_verdict + drop_peer_ring_full + drop_local
 *                 + drop_lane_full
 *   drop_verdict == verdict_drop
 *   tx_ok + tx_dropped == fwd_cache_hit + fwd_new + fwd_table + fwd_fragment
 *         + fwd_verdict + fwd_for_peer + peer_sent + arp_replied + nd_replied
 *         + neigh_requests + tap_to_wire + health_steered + icmp_too_big_sent
 *         (after a flush)
 *   tap_rx == tap_to_wire + health_steered + health_steer_failed
 *
 * Notices (PYLB_PUNT_NEW_STATE) are not rx outcomes: notices - notices_lane_in
 * + notices_lane_out + notices_lost counts the new flows in moved buckets this
 * worker forwarded (summed over a balancer's lanes, notices + notices_lost).
 */
struct pylb_stats {
    uint64_t rx;
    uint64_t rx_bytes;
    uint64_t fwd_cache_hit;     /* flow found in the flow cache */
    uint64_t fwd_new;           /* TCP SYN or UDP, by the current table */
    uint64_t fwd_table;         /* existing flow, stable bucket, by the table */
    uint64_t fwd_fragment;      /* IP fragment, by the 3-tuple */
    uint64_t fwd_verdict;       /* held, then forwarded by Python's verdict */
    uint64_t fwd_for_peer;      /* forwarded by Python as owner: a peer's, or kept while deciding */
    uint64_t fwd_for_peer_failed; /* of those, not sent (no neighbour, too big...) */
    uint64_t peer_sent;         /* peer protocol datagrams sent */
    uint64_t peer_rx;           /* peer protocol datagrams put on the peer ring */
    uint64_t held;              /* handed to Python and held */
    uint64_t held_now;
    uint64_t verdict_forward;
    uint64_t verdict_drop;
    uint64_t verdict_peer;
    uint64_t notices;
    uint64_t notices_lost;      /* no room in the punt array: state not pushed */
    uint64_t arp_replied;
    uint64_t nd_replied;
    uint64_t neigh_learned;     /* ARP replies / NAs that taught a MAC */
    uint64_t neigh_requests;    /* ARP requests / NSs sent */
    uint64_t icmp_too_big_sent; /* "fragmentation needed" / "packet too big" to clients */
    uint64_t exception_tap;     /* wire to kernel through the TAP */
    uint64_t tap_rx;            /* frames the kernel sent through the TAP */
    uint64_t tap_to_wire;       /* kernel to wire through the TAP */
    uint64_t health_steered;    /* kernel to a backend: health checks through the encapsulation */
    uint64_t health_steer_failed; /* health check frames not sent (no neighbour, too big...) */
    uint64_t drop_total;
    uint64_t drop_parse_truncated;
    uint64_t drop_parse_bad;
    uint64_t drop_not_ip;
    uint64_t drop_no_vip;
    uint64_t drop_no_backend;
    uint64_t drop_no_neighbor;
    uint64_t drop_too_big;
    uint64_t drop_encap;
    uint64_t drop_icmp;
    uint64_t drop_arp_other;
    uint64_t drop_exception;
    uint64_t drop_verdict;
    uint64_t drop_peer_ring_full; /* Python did not read the peer ring in time */
    uint64_t drop_local;        /* to the balancer's address, neither peer message nor check answer */
    uint64_t cache_insert;
    uint64_t cache_full;        /* set full: forwarded by the table, not cached */
    uint64_t tx_ok;
    uint64_t tx_dropped;
    uint64_t polls;
    uint64_t idle_sleeps;
    uint64_t lane_in;           /* frames taken from this lane's ring: received, as rx */
    uint64_t lane_out;          /* frames handed to another lane: an outcome */
    uint64_t notices_lane_in;   /* notices from other lanes (counted in notices too) */
    uint64_t notices_lane_out;  /* notices handed to the flow's lane */
    uint64_t drop_lane_full;    /* another lane's ring was full */
    uint64_t lane_order_kept;   /* cache hits handed to their flow's lane behind its frames there */
    uint64_t lane_sticky_evicted; /* a flow forgotten with frames still on a lane's ring */
};

struct pylb_worker;
int pylb_worker_create(const struct pylb_worker_conf *conf, struct pylb_worker **out);
/* Drops every held packet, flushes TX and frees the worker. */
void pylb_worker_destroy(struct pylb_worker *w);
/* Swaps in a compiled configuration; *old receives the one it replaced (the
 * caller frees it: the worker no longer uses it once this returns). */
int pylb_worker_set_dataplane(struct pylb_worker *w, struct pylb_dataplane *dp,
                              struct pylb_dataplane **old);
/*
 * Runs the burst loop until max_bursts bursts were received, or no frame came
 * for max_idle_us, or max_idle_us passed since the call (when it is not 0),
 * or the punt array may not hold another burst, or a punt or peer frame has
 * waited 500 us for Python. Idle periods back off (sleeping up to
 * idle_sleep_max_us at a time) so that several balancers can share cores.
 * Writes *n_punts punts.
 */
int pylb_worker_poll(struct pylb_worker *w, uint32_t max_bursts, uint32_t max_idle_us,
                     struct pylb_punt *punts, uint32_t max_punts, uint32_t *n_punts);
/* Applies Python's decisions to held packets. */
int pylb_worker_apply(struct pylb_worker *w, const struct pylb_verdict *v, uint32_t n);
/* Flushes the TX buffer now. */
int pylb_worker_flush(struct pylb_worker *w);
int pylb_worker_stats(const struct pylb_worker *w, struct pylb_stats *out);
/* Packets, bytes and new flows forwarded per backend id since the worker
 * started (ids are stable across dataplanes); new flows are those fwd_new
 * counts, so they sum to it. Entries past the known ids read zero. */
int pylb_worker_backend_counts(const struct pylb_worker *w, uint64_t *packets,
                               uint64_t *bytes, uint64_t *new_flows, uint32_t n);
/* Sends an ARP request / neighbour solicitation for ip now. */
int pylb_worker_solicit(struct pylb_worker *w, const struct pylb_ip *ip);
/* ------------------------------------------------------------------ peer
 * What the peer protocol (pylb/cluster.py, docs/peer-protocol.md) needs of
 * the data path; the protocol itself is Python's. */

/* Takes up to max peer-protocol frames (UDP to this balancer's data address
 * and peer port) from the worker's peer ring, copying each into buf + i*stride
 * (length in lens[i]; longer frames are cut and counted in *cut). */
int pylb_worker_peer_recv(struct pylb_worker *w, uint8_t *buf, uint32_t stride, uint32_t *lens,
                          uint32_t max, uint32_t *n, uint32_t *cut);
/* Copies the IP packet of a held packet (slot from a punt) into buf: its
 * frame without the L2 header. */
int pylb_worker_held_ip(const struct pylb_worker *w, uint32_t slot, uint8_t *buf,
                        uint32_t size, uint32_t *len);
/* Sends payload in a UDP datagram from the balancer's data address of the
 * peer's family to the peer, both ports dataplane.peer_port. */
int pylb_worker_send_peer(struct pylb_worker *w, const struct pylb_ip *peer,
                          const uint8_t *payload, uint32_t len);
/* Forwards an IP packet (no Ethernet header) to backend id, encapsulated as
 * the fast path does: the owner forwarding a packet another balancer sent. */
int pylb_worker_forward_ip(struct pylb_worker *w, const uint8_t *ip_packet, uint32_t len,
                           uint32_t backend, uint64_t flow_id);

/* Health checks through the encapsulation (docs/operations.md). The kernel's
 * check connects from local TCP port `port` (family 4 or 6) to a VIP through
 * the exception TAP; while steered, its frames to any VIP go, encapsulated,
 * to backend id instead of leaving unchanged, and TCP from the wire to the
 * balancer's address and that port (the answers) goes to the TAP, where
 * nothing else to the balancer's address goes (drop_local). backend
 * UINT32_MAX ends the steering. Safe to call from any thread of the worker's
 * process (one store the burst loop reads). */
int pylb_worker_steer_health(struct pylb_worker *w, uint8_t family, uint16_t port,
                             uint32_t backend);

/* Frames waiting for this worker: on its peer ring and its lane's rings, and
 * on its RX queue where a ring port shows it (tests wait for it to empty). */
uint32_t pylb_worker_backlog(const struct pylb_worker *w);

/* Ages the flow cache: call now and then from the control loop. */
int pylb_worker_age_cache(struct pylb_worker *w, uint64_t max_sets, uint64_t *freed);

/* cffi:end */

#ifdef __cplusplus
}
#endif

#endif /* PYLB_H */
