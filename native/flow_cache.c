/*
 * flow_cache.c - lock-free, bounded, aging flow cache (docs/flow-cache.md).
 *
 * The table is position independent (no pointers) so that several processes
 * can map it at different addresses. Every entry is one cache line guarded by
 * its own sequence counter (a seqlock): readers never block, writers claim an
 * entry by CAS from even to odd and publish it by storing the next even value.
 *
 * All fields of shared entries are accessed through __atomic builtins, even
 * the relaxed ones: they are read while another thread may write them, which
 * would be a data race (undefined behaviour) with plain accesses. On x86 the
 * relaxed ones compile to ordinary loads and stores.
 */
#include <sched.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <rte_malloc.h>
#include "internal.h"

#define FC_MAGIC 0x31304346424c5950ull  /* "PYLBFC01" in memory order (little-endian) */
#define FC_VERSION 2u                   /* 2: active-flow counters after the sets */
#define FC_LINE 64u
#define FC_KEY_WORDS 5
#define FC_MAX_CAPACITY (1ull << 30)    /* 64 GiB of entries: beyond it, a typo */
#define FC_MAX_TIMEOUT 0x7fffffffu
/* A last-seen up to this far in the future is another thread's slightly newer
 * clock, not a wrapped old stamp (see fc_live). */
#define FC_SKEW_MS 65536u
/* Bounded patience with an entry held odd by a writer: a writer that died
 * mid-write must not hang everyone else, it only loses that entry. An insert
 * that still finds no way through reports PYLB_EFULL ("contended"). */
#define FC_SPINS 1024
#define FC_INSERT_ATTEMPTS 64
/* A hit whose refresh loses the entry to other writers this often is
 * reported as a miss: the slow path handles it, and the reader moves on. */
#define FC_LOOKUP_ATTEMPTS 8
/* Active-flow counters (docs/flow-cache.md, "Active flows"): one slot per
 * writer handle, so that writers on different cores never write one line. A
 * slot holds a counter per counted backend id and one for every other id,
 * padded to whole lines. More handles than slots share slots: the adds are
 * atomic, so sharing costs contention, never a count. */
#define FC_COUNT_SLOTS 16u
#define FC_COUNT_OTHER PYLB_FLOW_CACHE_COUNTED_BACKENDS
#define FC_COUNT_STRIDE (PYLB_FLOW_CACHE_COUNTED_BACKENDS + FC_LINE / 4)
_Static_assert(PYLB_FLOW_CACHE_COUNTED_BACKENDS % (FC_LINE / 4) == 0, "slots start on a line");

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

/* One flow, one cache line. Layout in docs/flow-cache.md. */
struct fc_entry {
    uint32_t seq;        /* even: stable, odd: a writer holds it */
    uint32_t backend;
    uint32_t last_seen;  /* ms, compared modulo 2^32 */
    uint8_t used;        /* 0: free */
    uint8_t tclass;      /* enum pylb_timeout_class */
    uint16_t reserved;
    uint64_t flow_id;    /* whole id: rejects other flows of the set in one compare */
    uint64_t key[FC_KEY_WORDS];
};
_Static_assert(sizeof(struct fc_entry) == FC_LINE, "one entry, one cache line");
_Static_assert(sizeof(struct pylb_flow_key) == 8 * FC_KEY_WORDS, "40-byte key");

/* Shared header: a read-mostly line, then the aging cursor on its own line so
 * that age() calls do not invalidate what every lookup reads. */
struct fc_header {
    uint64_t magic;      /* stored last by init, with release */
    uint32_t version;
    uint32_t ways;
    uint32_t entry_size;
    uint32_t reserved;
    uint64_t n_sets;     /* a power of two */
    uint64_t capacity;   /* n_sets * ways */
    uint32_t timeouts_ms[4];
    uint32_t count_slots;       /* FC_COUNT_SLOTS */
    uint32_t counted_backends;  /* PYLB_FLOW_CACHE_COUNTED_BACKENDS */
    uint64_t age_cursor; /* next set to age, shared by all handles */
    uint32_t next_count_slot;   /* handles take counter slots in turn */
    uint8_t pad1[FC_LINE - 12];
};
_Static_assert(sizeof(struct fc_header) == 2 * FC_LINE, "two header lines");

enum fc_owner { FC_CALLER = 0, FC_MMAP = 1, FC_RTE = 2 };

/* The process-local handle. */
struct pylb_flow_cache {
    struct fc_header *hdr;
    struct fc_entry *entries;
    uint32_t *counts;    /* this handle's counter slot (FC_COUNT_STRIDE counters) */
    uint32_t *all_counts;/* slot 0; FC_COUNT_SLOTS slots follow one another */
    uint64_t set_mask;
    void *mem;
    size_t len;
    enum fc_owner owner;
};

struct fc_snap {
    uint32_t seq, backend, last_seen;
    uint8_t used, tclass;
    uint64_t flow_id;
    uint64_t key[FC_KEY_WORDS];
};

#define LOAD(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)

static inline void fc_pause(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static uint64_t fc_sets_for(uint64_t capacity)
{
    uint64_t sets = (capacity + PYLB_FLOW_CACHE_WAYS - 1) / PYLB_FLOW_CACHE_WAYS;
    uint64_t pow2 = 1;
    while (pow2 < sets)
        pow2 <<= 1;
    return pow2;
}

static size_t fc_sets_bytes(uint64_t n_sets)
{
    return n_sets * PYLB_FLOW_CACHE_WAYS * sizeof(struct fc_entry);
}

static size_t fc_counts_bytes(void)
{
    return (size_t)FC_COUNT_SLOTS * FC_COUNT_STRIDE * sizeof(uint32_t);
}

PYLB_API size_t pylb_flow_cache_footprint(uint64_t capacity)
{
    if (capacity == 0 || capacity > FC_MAX_CAPACITY)
        return 0;
    return sizeof(struct fc_header) + fc_sets_bytes(fc_sets_for(capacity)) + fc_counts_bytes();
}

static int fc_check_timeouts(const uint32_t t[4])
{
    if (!t)
        return pylb_fail(PYLB_EINVAL, "flow_cache: timeouts is NULL");
    for (int i = 0; i < 4; i++)
        if (t[i] == 0 || t[i] > FC_MAX_TIMEOUT)
            return pylb_fail(PYLB_EINVAL, "flow_cache: timeout %d is %u ms (1..%u)", i,
                             t[i], FC_MAX_TIMEOUT);
    return PYLB_OK;
}

/*
 * Live while 0 <= now - last_seen < timeout, modulo 2^32. A stamp slightly in
 * the future (another thread wrote a newer now than ours) stays live: adding
 * the skew first turns both conditions into one unsigned compare.
 */
static inline int fc_live(const struct fc_header *h, uint32_t last_seen, uint8_t tclass,
                          uint32_t now)
{
    uint32_t timeout = LOAD(&h->timeouts_ms[tclass & 3]);
    return (uint32_t)(now - last_seen + FC_SKEW_MS) < timeout + FC_SKEW_MS;
}

static inline void fc_load_key(uint64_t out[FC_KEY_WORDS], const struct pylb_flow_key *key)
{
    memcpy(out, key, sizeof(*key));  /* the caller's key need not be 8-aligned */
}

static inline int fc_key_eq(const uint64_t a[FC_KEY_WORDS], const uint64_t b[FC_KEY_WORDS])
{
    uint64_t diff = 0;
    for (int i = 0; i < FC_KEY_WORDS; i++)
        diff |= a[i] ^ b[i];
    return diff == 0;
}

/*
 * A consistent copy of an entry, or 0 if a writer kept it odd for FC_SPINS
 * tries. The acquire load of seq pairs with the writer's release publish, so
 * the fields read after it are at least that new; the acquire fence keeps the
 * field loads before the second seq load, which tells whether a writer came in
 * between (it stored odd before touching any field, see fc_claim).
 */
static int fc_snapshot(struct fc_entry *e, struct fc_snap *s)
{
    for (int spin = 0; spin < FC_SPINS; spin++) {
        uint32_t seq = __atomic_load_n(&e->seq, __ATOMIC_ACQUIRE);
        if (seq & 1) {
            fc_pause();
            continue;
        }
        s->backend = LOAD(&e->backend);
        s->last_seen = LOAD(&e->last_seen);
        s->used = LOAD(&e->used);
        s->tclass = LOAD(&e->tclass);
        s->flow_id = LOAD(&e->flow_id);
        for (int i = 0; i < FC_KEY_WORDS; i++)
            s->key[i] = LOAD(&e->key[i]);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (LOAD(&e->seq) == seq) {
            s->seq = seq;
            return 1;
        }
    }
    return 0;
}

/*
 * Takes an entry from the state a snapshot saw (seq even) to odd. Success
 * means nobody wrote it since, so the snapshot is its current content. The
 * acquire makes the previous writer's fields visible to us; the release fence
 * keeps our field stores after the odd seq, so a reader that sees any of them
 * also sees seq changed and retries.
 */
static inline int fc_claim(struct fc_entry *e, uint32_t seq)
{
    if (!__atomic_compare_exchange_n(&e->seq, &seq, seq + 1, 0, __ATOMIC_ACQUIRE,
                                     __ATOMIC_RELAXED))
        return 0;
    __atomic_thread_fence(__ATOMIC_RELEASE);
    return 1;
}

/* From the odd seq we claimed to the next even one: every field store above
 * becomes visible before it. */
static inline void fc_publish(struct fc_entry *e, uint32_t odd_seq)
{
    __atomic_store_n(&e->seq, odd_seq + 1, __ATOMIC_RELEASE);
}

static inline struct fc_entry *fc_set(const struct pylb_flow_cache *c, uint64_t flow_id)
{
    return c->entries + (flow_id & c->set_mask) * PYLB_FLOW_CACHE_WAYS;
}

/* A handle's pointers into the memory, and its counter slot: each new handle
 * takes the next slot, so handles in different processes (one per worker)
 * count in different lines. */
static void fc_layout(struct pylb_flow_cache *c, void *mem, uint64_t n_sets)
{
    c->hdr = mem;
    c->entries = (struct fc_entry *)((char *)mem + sizeof(struct fc_header));
    c->set_mask = n_sets - 1;
    c->all_counts = (uint32_t *)((char *)c->entries + fc_sets_bytes(n_sets));
    uint32_t slot = __atomic_fetch_add(&c->hdr->next_count_slot, 1, __ATOMIC_RELAXED);
    c->counts = c->all_counts + (size_t)(slot % FC_COUNT_SLOTS) * FC_COUNT_STRIDE;
}

static void fc_init(void *mem, uint64_t n_sets, const uint32_t timeouts[4])
{
    struct fc_header *h = mem;
    memset(mem, 0, sizeof(*h) + fc_sets_bytes(n_sets) + fc_counts_bytes());
    h->version = FC_VERSION;
    h->ways = PYLB_FLOW_CACHE_WAYS;
    h->entry_size = sizeof(struct fc_entry);
    h->n_sets = n_sets;
    h->capacity = n_sets * PYLB_FLOW_CACHE_WAYS;
    h->count_slots = FC_COUNT_SLOTS;
    h->counted_backends = PYLB_FLOW_CACHE_COUNTED_BACKENDS;
    memcpy(h->timeouts_ms, timeouts, sizeof(h->timeouts_ms));
    /* Last, with release: a process attaching meanwhile sees either no magic
     * or the complete layout. */
    __atomic_store_n(&h->magic, FC_MAGIC, __ATOMIC_RELEASE);
}

PYLB_API int pylb_flow_cache_attach(void *mem, size_t len, uint64_t capacity, int init,
                                    const uint32_t timeouts_ms[4],
                                    struct pylb_flow_cache **out)
{
    if (!mem || !out)
        return pylb_fail(PYLB_EINVAL, "flow_cache_attach: mem or out is NULL");
    size_t need = pylb_flow_cache_footprint(capacity);
    if (need == 0)
        return pylb_fail(PYLB_EINVAL, "flow_cache_attach: capacity %llu not in 1..%llu",
                         (unsigned long long)capacity, FC_MAX_CAPACITY);
    if (len < need)
        return pylb_fail(PYLB_EINVAL, "flow_cache_attach: %zu bytes, capacity %llu needs %zu",
                         len, (unsigned long long)capacity, need);
    if ((uintptr_t)mem % FC_LINE)
        return pylb_fail(PYLB_EINVAL, "flow_cache_attach: mem not %u-byte aligned", FC_LINE);
    if ((init || timeouts_ms) && fc_check_timeouts(timeouts_ms) != PYLB_OK)
        return PYLB_EINVAL;

    uint64_t n_sets = fc_sets_for(capacity);
    struct fc_header *h = mem;
    if (init) {
        fc_init(mem, n_sets, timeouts_ms);
    } else if (__atomic_load_n(&h->magic, __ATOMIC_ACQUIRE) != FC_MAGIC
               || h->version != FC_VERSION || h->ways != PYLB_FLOW_CACHE_WAYS
               || h->entry_size != sizeof(struct fc_entry) || h->n_sets != n_sets
               || h->capacity != n_sets * PYLB_FLOW_CACHE_WAYS
               || h->count_slots != FC_COUNT_SLOTS
               || h->counted_backends != PYLB_FLOW_CACHE_COUNTED_BACKENDS) {
        return pylb_fail(PYLB_EINVAL, "flow_cache_attach: no flow cache of capacity %llu "
                         "(version %u) in this memory", (unsigned long long)capacity,
                         FC_VERSION);
    }

    struct pylb_flow_cache *c = calloc(1, sizeof(*c));
    if (!c)
        return pylb_fail(PYLB_ENOMEM, "flow_cache_attach: no memory for the handle");
    fc_layout(c, mem, n_sets);
    c->owner = FC_CALLER;
    if (!init && timeouts_ms)
        pylb_flow_cache_set_timeouts(c, timeouts_ms);
    *out = c;
    return PYLB_OK;
}

PYLB_API int pylb_flow_cache_create(uint64_t capacity, const uint32_t timeouts_ms[4],
                                    struct pylb_flow_cache **out)
{
    if (!out)
        return pylb_fail(PYLB_EINVAL, "flow_cache_create: out is NULL");
    size_t len = pylb_flow_cache_footprint(capacity);
    if (len == 0)
        return pylb_fail(PYLB_EINVAL, "flow_cache_create: capacity %llu not in 1..%llu",
                         (unsigned long long)capacity, FC_MAX_CAPACITY);
    if (fc_check_timeouts(timeouts_ms) != PYLB_OK)
        return PYLB_EINVAL;

    void *mem;
    enum fc_owner owner;
    if (pylb_eal_running()) {
        mem = rte_zmalloc("pylb_flow_cache", len, FC_LINE);
        owner = FC_RTE;
    } else {
        /* Page-aligned and zero-filled lazily; transparent huge pages, where
         * allowed, spare the TLB misses of a table that is read at random. */
        mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (mem == MAP_FAILED)
            mem = NULL;
        else
            madvise(mem, len, MADV_HUGEPAGE);
        owner = FC_MMAP;
    }
    if (!mem)
        return pylb_fail(PYLB_ENOMEM, "flow_cache_create: cannot allocate %zu bytes", len);

    struct pylb_flow_cache *c;
    int rc = pylb_flow_cache_attach(mem, len, capacity, 1, timeouts_ms, &c);
    if (rc != PYLB_OK) {
        if (owner == FC_RTE)
            rte_free(mem);
        else
            munmap(mem, len);
        return rc;
    }
    c->mem = mem;
    c->len = len;
    c->owner = owner;
    *out = c;
    return PYLB_OK;
}

PYLB_API void pylb_flow_cache_destroy(struct pylb_flow_cache *c)
{
    if (!c)
        return;
    if (c->owner == FC_RTE)
        rte_free(c->mem);
    else if (c->owner == FC_MMAP)
        munmap(c->mem, c->len);
    free(c);
}

PYLB_API int pylb_flow_cache_set_timeouts(struct pylb_flow_cache *c, const uint32_t timeouts_ms[4])
{
    if (!c)
        return pylb_fail(PYLB_EINVAL, "flow_cache_set_timeouts: cache is NULL");
    if (fc_check_timeouts(timeouts_ms) != PYLB_OK)
        return PYLB_EINVAL;
    /* Each class changes atomically; a lookup may briefly mix old and new
     * classes, which only moves an expiry by the difference. */
    for (int i = 0; i < 4; i++)
        STORE(&c->hdr->timeouts_ms[i], timeouts_ms[i]);
    return PYLB_OK;
}

/*
 * How stale a hit may leave last_seen before it writes the shared line: 1/256
 * of the class's timeout (about 1.2 s of TCP's 300 s). A busy flow then
 * costs a write (a locked CAS, and a dirty line other cores must fetch
 * again) about once per slack rather than once per clock tick, and it
 * expires at most that much early.
 */
static inline uint32_t fc_refresh_slack(uint32_t timeout)
{
    return timeout >> 8;
}

/* Differences between an entry's key and ours, 0 when equal: five words
 * compared at once, read straight from the caller's key (x86 and arm64 load
 * unaligned words at no cost). */
static inline uint64_t fc_key_diff(const struct fc_entry *e, const struct pylb_flow_key *key)
{
    uint64_t k[FC_KEY_WORDS];
    memcpy(k, key, sizeof(k));
    return (LOAD(&e->key[0]) ^ k[0]) | (LOAD(&e->key[1]) ^ k[1]) | (LOAD(&e->key[2]) ^ k[2])
           | (LOAD(&e->key[3]) ^ k[3]) | (LOAD(&e->key[4]) ^ k[4]);
}

/*
 * Counts an entry in use for backend (delta +1) or no longer (-1), in this
 * handle's slot. Called by the writer that made the change, after it held
 * the entry's claim: each change is counted once, by the one thread that
 * made it. The counters wrap modulo 2^32; the sum over the slots is exact
 * (a slot alone may go "negative": another slot's writer freed what this
 * one inserted) because the true count never exceeds the capacity (< 2^32).
 * A relaxed atomic add on a line only this handle writes: never contended
 * unless threads share the handle.
 */
static inline void fc_count(const struct pylb_flow_cache *c, uint32_t backend, int32_t delta)
{
    uint32_t i = backend < PYLB_FLOW_CACHE_COUNTED_BACKENDS ? backend : FC_COUNT_OTHER;
    __atomic_fetch_add(&c->counts[i], (uint32_t)delta, __ATOMIC_RELAXED);
}

/* Frees an entry in use for backend, read at even seq, unless a writer came
 * in since. */
static int fc_free(const struct pylb_flow_cache *c, struct fc_entry *e, uint32_t seq,
                   uint32_t backend)
{
    if (!fc_claim(e, seq))
        return 0;
    STORE(&e->used, 0);
    fc_publish(e, seq + 1);
    fc_count(c, backend, -1);
    return 1;
}

enum fc_way {
    FC_NOT_HERE = 0,
    FC_HIT = 1,
    FC_BUSY = -1,       /* a writer holds the entry (odd), or wrote it during our read */
    FC_CLAIM_LOST = -2  /* our flow, but a writer came in before our refresh */
};

/*
 * One way of a lookup, in a single pass: a seqlock read of what a hit needs
 * (the entry is not copied), then the refresh if one is due. On contention
 * the caller takes fc_lookup_way, which waits and tries again.
 */
static inline enum fc_way fc_try_way(struct pylb_flow_cache *c, struct fc_entry *e,
                                     const struct pylb_flow_key *key, uint64_t flow_id,
                                     uint32_t now_ms, uint8_t tcp_flags, uint32_t *backend)
{
    uint32_t seq = __atomic_load_n(&e->seq, __ATOMIC_ACQUIRE);
    if (PYLB_UNLIKELY(seq & 1))
        return FC_BUSY;
    uint64_t diff = (LOAD(&e->flow_id) ^ flow_id) | fc_key_diff(e, key);
    uint8_t used = LOAD(&e->used), tclass = LOAD(&e->tclass);
    uint32_t be = LOAD(&e->backend), last_seen = LOAD(&e->last_seen);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (PYLB_UNLIKELY(LOAD(&e->seq) != seq))
        return FC_BUSY;
    if (diff || !used)
        return FC_NOT_HERE;
    uint32_t timeout = LOAD(&c->hdr->timeouts_ms[tclass & 3]);
    uint32_t age = now_ms - last_seen;
    /* Live as in fc_live; an expired copy: a live one may sit in a later way. */
    if (age + FC_SKEW_MS >= timeout + FC_SKEW_MS)
        return FC_NOT_HERE;
    if (PYLB_UNLIKELY(tclass == PYLB_TO_TCP_CLOSING
                      && (tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN)) {
        /* A SYN on the 5-tuple of a connection that closed: the client reused
         * the port for a new connection, which the tables decide, not the old
         * connection's backend (it may be drained or gone). The entry is freed
         * so that the miss path decides and caches afresh (docs/flow-cache.md). */
        return fc_free(c, e, seq, be) ? FC_NOT_HERE : FC_CLAIM_LOST;
    }
    uint8_t new_class = tclass == PYLB_TO_TCP && (tcp_flags & (TCP_FIN | TCP_RST))
                            ? PYLB_TO_TCP_CLOSING : tclass;
    /* Write the shared line only for a stamp older than the slack, or a new
     * class: most packets of a busy flow change neither. */
    int stale = (int32_t)age > 0 && age >= fc_refresh_slack(timeout);
    if (PYLB_UNLIKELY(stale || new_class != tclass)) {
        if (!fc_claim(e, seq))
            return FC_CLAIM_LOST;
        if (stale)
            STORE(&e->last_seen, now_ms);
        STORE(&e->tclass, new_class);
        fc_publish(e, seq + 1);
    }
    *backend = be;
    return FC_HIT;
}

/* A contended way, tried again with bounded patience: an entry a writer
 * keeps odd (or rewrites under us) for FC_SPINS tries is skipped, and a hit
 * whose refresh loses the entry to other writers FC_LOOKUP_ATTEMPTS times is
 * reported as a miss: the slow path handles it, and the reader moves on. */
static __attribute__((noinline)) int fc_lookup_way(struct pylb_flow_cache *c, struct fc_entry *e,
                                                   const struct pylb_flow_key *key,
                                                   uint64_t flow_id, uint32_t now_ms,
                                                   uint8_t tcp_flags, uint32_t *backend,
                                                   enum fc_way r)
{
    int spins = 0, attempts = 0;
    for (;;) {
        if (r == FC_BUSY) {
            if (++spins >= FC_SPINS)
                return 0;
            fc_pause();
        } else if (r == FC_CLAIM_LOST) {
            if (++attempts >= FC_LOOKUP_ATTEMPTS)
                return 0;
        } else {
            return r == FC_HIT;
        }
        if (LOAD(&e->flow_id) != flow_id)
            return 0;
        r = fc_try_way(c, e, key, flow_id, now_ms, tcp_flags, backend);
    }
}

/* Looks a flow up in its set (prefetched or not); see pylb_flow_cache_lookup. */
static inline int fc_lookup(struct pylb_flow_cache *c, struct fc_entry *set,
                            const struct pylb_flow_key *key, uint64_t flow_id, uint32_t now_ms,
                            uint8_t tcp_flags, uint32_t *backend)
{
    for (int w = 0; w < PYLB_FLOW_CACHE_WAYS; w++) {
        struct fc_entry *e = set + w;
        /* No state of an entry with another flow id can be our flow now:
         * refresh and replace never rewrite flow_id. */
        if (LOAD(&e->flow_id) != flow_id)
            continue;
        enum fc_way r = fc_try_way(c, e, key, flow_id, now_ms, tcp_flags, backend);
        if (r == FC_HIT ||
            (r < 0 && fc_lookup_way(c, e, key, flow_id, now_ms, tcp_flags, backend, r)))
            return 1;
    }
    return 0;
}

static inline void fc_prefetch_set(const struct fc_entry *set)
{
    /* The whole set is 8 adjacent lines: ask for all now, so a miss costs one
     * memory latency rather than eight. Read intent: a write-intent prefetch
     * would take the lines away from the other cores that read them. */
    for (int w = 0; w < PYLB_FLOW_CACHE_WAYS; w++)
        __builtin_prefetch(set + w, 0, 3);
}

PYLB_API int pylb_flow_cache_lookup(struct pylb_flow_cache *c, const struct pylb_flow_key *key,
                                    uint64_t flow_id, uint32_t now_ms, uint8_t tcp_flags,
                                    uint32_t *backend)
{
    if (PYLB_UNLIKELY(!c || !key || !backend))
        return pylb_fail(PYLB_EINVAL, "flow_cache_lookup: NULL argument");
    struct fc_entry *set = fc_set(c, flow_id);
    fc_prefetch_set(set);
    return fc_lookup(c, set, key, flow_id, now_ms, tcp_flags, backend);
}

PYLB_API int pylb_flow_cache_lookup_burst(struct pylb_flow_cache *c,
                                          const struct pylb_flow_key *const *keys,
                                          const uint64_t *flow_ids, const uint8_t *tcp_flags,
                                          uint32_t n, uint32_t now_ms, uint32_t *backends,
                                          uint64_t *hit_mask)
{
    if (PYLB_UNLIKELY(!c || !hit_mask || (n && (!keys || !flow_ids || !backends))))
        return pylb_fail(PYLB_EINVAL, "flow_cache_lookup_burst: NULL argument");
    if (PYLB_UNLIKELY(n > PYLB_LOOKUP_BURST_MAX))
        return pylb_fail(PYLB_EINVAL, "flow_cache_lookup_burst: %u flows, at most %d", n,
                         PYLB_LOOKUP_BURST_MAX);
    /* Every set first: their memory latencies overlap instead of adding up,
     * which is what a table larger than the CPU's caches is bound by. */
    struct fc_entry *sets[PYLB_LOOKUP_BURST_MAX];
    for (uint32_t i = 0; i < n; i++) {
        sets[i] = fc_set(c, flow_ids[i]);
        fc_prefetch_set(sets[i]);
    }
    uint64_t mask = 0;
    int hits = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (PYLB_UNLIKELY(!keys[i]))
            return pylb_fail(PYLB_EINVAL, "flow_cache_lookup_burst: key %u is NULL", i);
        if (fc_lookup(c, sets[i], keys[i], flow_ids[i], now_ms, tcp_flags ? tcp_flags[i] : 0,
                      &backends[i])) {
            mask |= 1ull << i;
            hits++;
        }
    }
    *hit_mask = mask;
    return hits;
}

/*
 * After writing our key into a claimed entry: is the same key live, or being
 * written, in another way of the set? The seq_cst fence before this scan and
 * the one of a concurrent inserter form a Dekker pair: of two writers putting
 * the same key into two ways, at least one sees the other's whole key.
 * Returns 1 when we must back off.
 */
static int fc_conflict(const struct pylb_flow_cache *c, struct fc_entry *set, int mine,
                       const uint64_t k[FC_KEY_WORDS], uint64_t flow_id, uint32_t now_ms)
{
    for (int w = 0; w < PYLB_FLOW_CACHE_WAYS; w++) {
        struct fc_entry *e = set + w;
        if (w == mine)
            continue;
        for (int spin = 0;; spin++) {
            uint32_t seq = LOAD(&e->seq);
            uint64_t other[FC_KEY_WORDS];
            for (int i = 0; i < FC_KEY_WORDS; i++)
                other[i] = LOAD(&e->key[i]);
            if (LOAD(&e->flow_id) != flow_id || !fc_key_eq(other, k))
                break;
            if (!(seq & 1)) {
                if (LOAD(&e->used)
                    && fc_live(c->hdr, LOAD(&e->last_seen), LOAD(&e->tclass), now_ms))
                    return 1;
                break;
            }
            /* Odd with our key: a writer on the same flow. The lower way
             * wins: we yield to it, and wait for a higher one, which yields
             * to us if it saw us, or else publishes and we then yield. */
            if (w < mine || spin >= FC_SPINS)
                return 1;
            fc_pause();
        }
    }
    return 0;
}

PYLB_API int pylb_flow_cache_insert(struct pylb_flow_cache *c, const struct pylb_flow_key *key,
                                    uint64_t flow_id, uint32_t backend, uint32_t now_ms,
                                    uint8_t timeout_class)
{
    if (!c || !key)
        return pylb_fail(PYLB_EINVAL, "flow_cache_insert: NULL argument");
    if (timeout_class > PYLB_TO_OTHER)
        return pylb_fail(PYLB_EINVAL, "flow_cache_insert: timeout class %u", timeout_class);
    struct fc_entry *set = fc_set(c, flow_id);
    /* The first pass reads all 8 ways: one memory latency, not eight. */
    fc_prefetch_set(set);
    uint64_t k[FC_KEY_WORDS];
    fc_load_key(k, key);

    for (int attempt = 0; attempt < FC_INSERT_ATTEMPTS; attempt++) {
        int free_way = -1, busy = 0;
        uint32_t free_seq = 0, free_backend = 0;
        uint8_t free_used = 0;  /* an expired entry: its flow leaves the count */
        for (int w = 0; w < PYLB_FLOW_CACHE_WAYS; w++) {
            struct fc_snap s;
            if (!fc_snapshot(set + w, &s)) {
                busy++;
                continue;
            }
            int same = s.flow_id == flow_id && fc_key_eq(s.key, k);
            if (s.used && fc_live(c->hdr, s.last_seen, s.tclass, now_ms)) {
                if (!same)
                    continue;
                /* Replace in place: the key is already there, no new copy. */
                if (!fc_claim(set + w, s.seq))
                    goto retry;
                STORE(&set[w].backend, backend);
                STORE(&set[w].tclass, timeout_class);
                STORE(&set[w].last_seen, now_ms);
                fc_publish(set + w, s.seq + 1);
                if (s.backend != backend) {
                    fc_count(c, s.backend, -1);
                    fc_count(c, backend, +1);
                }
                return PYLB_OK;
            }
            /* Prefer our own expired copy, so no stale twin lingers. */
            if (free_way < 0 || same) {
                free_way = w;
                free_seq = s.seq;
                free_used = s.used;
                free_backend = s.backend;
            }
        }
        if (free_way < 0) {
            if (busy)
                goto retry;
            return pylb_fail(PYLB_EFULL, "flow_cache_insert: set %llu holds %d live flows",
                             (unsigned long long)(flow_id & c->set_mask), PYLB_FLOW_CACHE_WAYS);
        }

        struct fc_entry *e = set + free_way;
        if (!fc_claim(e, free_seq))
            goto retry;
        STORE(&e->flow_id, flow_id);
        for (int i = 0; i < FC_KEY_WORDS; i++)
            STORE(&e->key[i], k[i]);
        STORE(&e->backend, backend);
        STORE(&e->last_seen, now_ms);
        STORE(&e->tclass, timeout_class);
        STORE(&e->used, 1);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        int conflict = fc_conflict(c, set, free_way, k, flow_id, now_ms);
        if (conflict)
            STORE(&e->used, 0);
        fc_publish(e, free_seq + 1);
        /* The expired flow we wrote over is gone either way. */
        if (free_used)
            fc_count(c, free_backend, -1);
        if (conflict)
            goto retry;
        fc_count(c, backend, +1);
        return PYLB_OK;
retry:
        /* The holder of an odd entry may be a preempted thread (cores can
         * be shared): after a few quick tries, let it run. */
        if (attempt < 4)
            fc_pause();
        else
            sched_yield();
    }
    return pylb_fail(PYLB_EFULL, "flow_cache_insert: set %llu contended",
                     (unsigned long long)(flow_id & c->set_mask));
}

PYLB_API int pylb_flow_cache_remove(struct pylb_flow_cache *c, const struct pylb_flow_key *key,
                                    uint64_t flow_id)
{
    if (!c || !key)
        return pylb_fail(PYLB_EINVAL, "flow_cache_remove: NULL argument");
    struct fc_entry *set = fc_set(c, flow_id);
    uint64_t k[FC_KEY_WORDS];
    fc_load_key(k, key);
    int removed = 0;
    /* Every copy, expired ones included: none may come back to life through
     * a clock that runs backwards relative to its stamp. */
    for (int w = 0; w < PYLB_FLOW_CACHE_WAYS; w++) {
        for (int attempt = 0; attempt < FC_SPINS; attempt++) {
            struct fc_snap s;
            if (!fc_snapshot(set + w, &s) || !s.used || s.flow_id != flow_id
                || !fc_key_eq(s.key, k))
                break;
            if (fc_free(c, set + w, s.seq, s.backend)) {
                removed = 1;
                break;
            }
        }
    }
    return removed ? PYLB_OK : pylb_fail(PYLB_ENOTFOUND, "flow_cache_remove: no such flow");
}

PYLB_API uint64_t pylb_flow_cache_age(struct pylb_flow_cache *c, uint32_t now_ms, uint64_t max_sets)
{
    if (!c || max_sets == 0)
        return 0;
    uint64_t n_sets = c->set_mask + 1;
    if (max_sets > n_sets)
        max_sets = n_sets;
    /* Handles in several processes share the cursor and so split the sweep
     * instead of repeating it. */
    uint64_t first = __atomic_fetch_add(&c->hdr->age_cursor, max_sets, __ATOMIC_RELAXED);
    uint64_t freed = 0;
    for (uint64_t i = 0; i < max_sets; i++) {
        struct fc_entry *set = c->entries + ((first + i) & c->set_mask) * PYLB_FLOW_CACHE_WAYS;
        for (int w = 0; w < PYLB_FLOW_CACHE_WAYS; w++) {
            struct fc_snap s;
            if (LOAD(&set[w].used) && fc_snapshot(set + w, &s) && s.used
                && !fc_live(c->hdr, s.last_seen, s.tclass, now_ms))
                freed += (uint64_t)fc_free(c, set + w, s.seq, s.backend);
        }
    }
    return freed;
}

PYLB_API uint64_t pylb_flow_cache_count(struct pylb_flow_cache *c, uint32_t now_ms)
{
    if (!c)
        return 0;
    uint64_t live = 0, n = (c->set_mask + 1) * PYLB_FLOW_CACHE_WAYS;
    for (uint64_t i = 0; i < n; i++) {
        struct fc_snap s;
        if (LOAD(&c->entries[i].used) && fc_snapshot(c->entries + i, &s) && s.used
            && fc_live(c->hdr, s.last_seen, s.tclass, now_ms))
            live++;
    }
    return live;
}

/*
 * Sums the writers' slots. Each slot counts modulo 2^32 and so does the sum
 * (see fc_count). Relaxed loads: a change in flight may show half done (a
 * replace's -1 before its +1); with no write in flight the sums are exact.
 */
/* The slots' sum, modulo 2^32. Reading the slots is no snapshot: a writer's
 * -1 may be seen before another's +1 for the same entry, so a count can
 * read just below zero, which wraps to near 2^32. True counts stay at most
 * the capacity (<= 2^31), so such values read as 0. */
static uint64_t fc_count_value(uint32_t sum)
{
    return sum >= 0xF0000000u ? 0 : sum;
}

PYLB_API int pylb_flow_cache_active_flows(const struct pylb_flow_cache *c, uint64_t *per_backend,
                                          uint32_t n, uint64_t *total)
{
    if (!c || (n && !per_backend))
        return pylb_fail(PYLB_EINVAL, "flow_cache_active_flows: NULL argument");
    for (uint32_t i = 0; i < n; i++) {
        uint32_t sum = 0;
        if (i < PYLB_FLOW_CACHE_COUNTED_BACKENDS)
            for (uint32_t slot = 0; slot < FC_COUNT_SLOTS; slot++)
                sum += LOAD(&c->all_counts[(size_t)slot * FC_COUNT_STRIDE + i]);
        per_backend[i] = fc_count_value(sum);
    }
    if (total) {
        uint32_t sum = 0;
        for (uint32_t slot = 0; slot < FC_COUNT_SLOTS; slot++)
            for (uint32_t i = 0; i <= FC_COUNT_OTHER; i++)
                sum += LOAD(&c->all_counts[(size_t)slot * FC_COUNT_STRIDE + i]);
        *total = fc_count_value(sum);
    }
    return PYLB_OK;
}

PYLB_API uint64_t pylb_flow_cache_capacity(const struct pylb_flow_cache *c)
{
    return c ? c->hdr->capacity : 0;
}

PYLB_API int pylb_flow_cache_peek(struct pylb_flow_cache *c, const struct pylb_flow_key *key,
                                  uint64_t flow_id, uint32_t now_ms, uint32_t *backend,
                                  uint32_t *idle_ms)
{
    if (!c || !key || !backend || !idle_ms)
        return pylb_fail(PYLB_EINVAL, "flow_cache_peek: NULL argument");
    struct fc_entry *set = fc_set(c, flow_id);
    uint64_t k[FC_KEY_WORDS];
    fc_load_key(k, key);
    for (int w = 0; w < PYLB_FLOW_CACHE_WAYS; w++) {
        struct fc_snap s;
        if (!fc_snapshot(set + w, &s))
            continue;
        if (s.used && s.flow_id == flow_id && fc_key_eq(s.key, k) &&
            fc_live(c->hdr, s.last_seen, s.tclass, now_ms)) {
            *backend = s.backend;
            *idle_ms = (int32_t)(now_ms - s.last_seen) > 0 ? now_ms - s.last_seen : 0;
            return 1;
        }
    }
    return 0;
}

PYLB_API uint64_t pylb_flow_cache_sets(const struct pylb_flow_cache *c)
{
    return c ? c->set_mask + 1 : 0;
}

/* The export's count is returned as an int. */
_Static_assert(FC_MAX_CAPACITY <= INT32_MAX, "an export of the whole cache fits an int");

/*
 * Whole sets only: a set is gathered in full before any of it is copied out,
 * so the cursor can stop between sets and a chunked scan neither splits nor
 * repeats one. Reads only: an entry a writer keeps odd past fc_snapshot's
 * bounded wait is skipped, as the header allows.
 */
PYLB_API int pylb_flow_cache_export(struct pylb_flow_cache *c, uint32_t now_ms, uint64_t *cursor,
                                    struct pylb_cache_entry *out, uint32_t max)
{
    if (!c || !cursor || !out)
        return pylb_fail(PYLB_EINVAL, "flow_cache_export: NULL argument");
    if (max < PYLB_FLOW_CACHE_WAYS)
        return pylb_fail(PYLB_EINVAL, "flow_cache_export: room for %u entries, a set needs %d",
                         max, PYLB_FLOW_CACHE_WAYS);
    uint64_t n_sets = c->set_mask + 1, set_no = *cursor;
    /* Past the end is a caller's bug that a loop "until cursor == sets"
     * would never leave. */
    if (set_no > n_sets)
        return pylb_fail(PYLB_EINVAL, "flow_cache_export: cursor %llu past %llu sets",
                         (unsigned long long)set_no, (unsigned long long)n_sets);
    uint32_t copied = 0;
    for (; set_no < n_sets; set_no++) {
        struct fc_entry *set = c->entries + set_no * PYLB_FLOW_CACHE_WAYS;
        struct pylb_cache_entry live[PYLB_FLOW_CACHE_WAYS];
        uint32_t n = 0;
        for (int w = 0; w < PYLB_FLOW_CACHE_WAYS; w++) {
            struct fc_snap s;
            if (!LOAD(&set[w].used) || !fc_snapshot(set + w, &s) || !s.used
                || !fc_live(c->hdr, s.last_seen, s.tclass, now_ms))
                continue;
            uint32_t age = now_ms - s.last_seen;
            struct pylb_cache_entry *e = &live[n++];
            memset(e, 0, sizeof(*e));
            memcpy(&e->key, s.key, sizeof(e->key));
            e->flow_id = s.flow_id;
            e->backend = s.backend;
            /* A stamp up to the skew ahead is another thread's newer clock
             * (fc_live): idle for no time, not for almost 2^32 ms. */
            e->idle_ms = (uint32_t)(age + FC_SKEW_MS) < FC_SKEW_MS ? 0 : age;
            e->timeout_class = s.tclass;
            e->vip = -1;
        }
        if (n > max - copied)
            break;
        memcpy(out + copied, live, n * sizeof(*live));
        copied += n;
    }
    *cursor = set_no;
    return (int)copied;
}
