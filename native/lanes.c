/* lanes.c - the rings between the worker processes of one balancer: each
 * lane has a ring of frames and a ring of notices that every other lane may
 * write and only it reads (pylb.h, "Lanes"; docs/architecture.md).
 *
 * Order. A flow's frames come in on one queue (RSS); those a lane hands to
 * the flow's lane wait on that lane's ring. Once the flow is cached, a frame
 * that comes in next must not leave before them: the handing lane remembers
 * each flow it handed over (sticky) with the ring position after its last
 * frame, and hands on its cache hits too until the flow's lane has published
 * (done) that it took, handled and sent everything up to that position. */
#include <stdio.h>
#include <stdlib.h>
#include <rte_errno.h>
#include <rte_memzone.h>
#include <rte_ring.h>
#include <rte_ring_elem.h>
#include "worker.h"

#define LANES_NAME_MAX 20
#define DONE_STRIDE 64          /* one cache line per lane's done position */

static int ring_name(char *out, size_t size, const char *name, char kind, uint16_t lane)
{
    if (name == NULL || name[0] == '\0' || strlen(name) > LANES_NAME_MAX)
        return pylb_fail(PYLB_EINVAL, "lanes: name of 1 to %d characters required",
                         LANES_NAME_MAX);
    snprintf(out, size, "%s_%c%u", name, kind, lane);
    return PYLB_OK;
}

PYLB_API int pylb_lanes_create(const char *name, uint16_t lanes, uint32_t ring_size)
{
    if (lanes < 2 || lanes > PYLB_MAX_LANES)
        return pylb_fail(PYLB_EINVAL, "lanes: 2 to %d lanes", PYLB_MAX_LANES);
    if (ring_size < PYLB_BURST || (ring_size & (ring_size - 1)))
        return pylb_fail(PYLB_EINVAL, "lanes: ring size must be a power of two >= %d",
                         PYLB_BURST);
    char rname[RTE_RING_NAMESIZE];
    int rc = ring_name(rname, sizeof(rname), name, 'd', 0);
    if (rc != PYLB_OK)
        return rc;
    const struct rte_memzone *done = rte_memzone_reserve(rname, (size_t)lanes * DONE_STRIDE,
                                                         SOCKET_ID_ANY, 0);
    if (done == NULL)
        return pylb_fail(PYLB_ENOMEM, "lanes %s: done positions: %s", name,
                         rte_strerror(rte_errno));
    /* Rings start at position 0: so does what each lane has done (a zone
     * reused from an earlier balancer may hold anything). */
    memset(done->addr, 0, (size_t)lanes * DONE_STRIDE);
    for (uint16_t k = 0; k < lanes; k++) {
        rc = ring_name(rname, sizeof(rname), name, 'f', k);
        if (rc != PYLB_OK)
            return rc;
        /* Many writers (the other lanes), one reader: the lane itself. */
        struct rte_ring *f = rte_ring_create(rname, ring_size, SOCKET_ID_ANY, RING_F_SC_DEQ);
        ring_name(rname, sizeof(rname), name, 'n', k);
        struct rte_ring *n = rte_ring_create_elem(rname, sizeof(struct pylb_punt), ring_size,
                                                  SOCKET_ID_ANY, RING_F_SC_DEQ);
        if (f == NULL || n == NULL) {
            int err = rte_errno;
            rte_ring_free(f);
            rte_ring_free(n);
            pylb_lanes_free(name, k);
            return pylb_fail(PYLB_ENOMEM, "lanes %s: ring of lane %u: %s", name, k,
                             rte_strerror(err));
        }
    }
    return PYLB_OK;
}

PYLB_API void pylb_lanes_free(const char *name, uint16_t lanes)
{
    char rname[RTE_RING_NAMESIZE];
    for (uint16_t k = 0; k < lanes; k++) {
        if (ring_name(rname, sizeof(rname), name, 'f', k) != PYLB_OK)
            return;
        struct rte_ring *f = rte_ring_lookup(rname);
        if (f != NULL) {
            free_ring_mbufs(f);
            rte_ring_free(f);
        }
        ring_name(rname, sizeof(rname), name, 'n', k);
        rte_ring_free(rte_ring_lookup(rname));
    }
    if (ring_name(rname, sizeof(rname), name, 'd', 0) == PYLB_OK)
        rte_memzone_free(rte_memzone_lookup(rname));
}

int lanes_attach(struct pylb_worker *w, const char *name, uint16_t lane, uint16_t lanes)
{
    w->lane = lane;
    w->lanes = lanes > 1 ? lanes : 1;
    if (w->lanes == 1)
        return PYLB_OK;
    if (lanes > PYLB_MAX_LANES || lane >= lanes)
        return pylb_fail(PYLB_EINVAL, "worker: lane %u of %u lanes (at most %d)", lane, lanes,
                         PYLB_MAX_LANES);
    char rname[RTE_RING_NAMESIZE];
    int rc = ring_name(rname, sizeof(rname), name, 'd', 0);
    if (rc != PYLB_OK)
        return rc;
    const struct rte_memzone *done = rte_memzone_lookup(rname);
    w->sticky = calloc(STICKY_SETS * STICKY_WAYS, sizeof(*w->sticky));
    if (done == NULL || w->sticky == NULL)
        return pylb_fail(done ? PYLB_ENOMEM : PYLB_ENOTFOUND, "worker: lanes %s: no done "
                         "positions or no memory (create the lanes first)", name);
    for (uint16_t k = 0; k < lanes; k++) {
        w->lane_done[k] = (uint32_t *)((uint8_t *)done->addr + (size_t)k * DONE_STRIDE);
        rc = ring_name(rname, sizeof(rname), name, 'f', k);
        if (rc != PYLB_OK)
            return rc;
        w->lane_frames[k] = rte_ring_lookup(rname);
        ring_name(rname, sizeof(rname), name, 'n', k);
        w->lane_notices[k] = rte_ring_lookup(rname);
        if (w->lane_frames[k] == NULL || w->lane_notices[k] == NULL)
            return pylb_fail(PYLB_ENOTFOUND, "worker: lanes %s: no rings for lane %u (create "
                             "them first: pylb_lanes_create)", name, k);
    }
    return PYLB_OK;
}

void lane_pass_frame(struct pylb_worker *w, struct rte_mbuf *m, uint16_t lane)
{
    if (rte_ring_enqueue(w->lane_frames[lane], m) == 0)
        w->st.lane_out++;
    else
        worker_count_drop(w, &w->st.drop_lane_full, m);
}

static struct lane_sticky *sticky_set(struct pylb_worker *w, uint64_t flow_id)
{
    return &w->sticky[(flow_id & (STICKY_SETS - 1)) * STICKY_WAYS];
}

/* Whether the lane has sent everything up to ring position pos. */
static int lane_done_with(const struct pylb_worker *w, uint16_t lane, uint32_t pos)
{
    uint32_t done = __atomic_load_n(w->lane_done[lane], __ATOMIC_ACQUIRE);
    return (int32_t)(pos - done) <= 0;
}

void lane_pass_flow_frame(struct pylb_worker *w, struct rte_mbuf *m, uint64_t flow_id,
                          uint16_t lane)
{
    struct rte_ring *r = w->lane_frames[lane];
    if (rte_ring_enqueue(r, m) != 0) {
        worker_count_drop(w, &w->st.drop_lane_full, m);
        return;
    }
    w->st.lane_out++;
    /* After the enqueue, the producers' tail is past this frame. */
    uint32_t pos = __atomic_load_n(&r->prod.tail, __ATOMIC_ACQUIRE);
    struct lane_sticky *set = sticky_set(w, flow_id), *slot = NULL;
    for (int i = 0; i < STICKY_WAYS; i++) {
        struct lane_sticky *e = &set[i];
        if (e->used && e->flow_id == flow_id) {
            slot = e;
            break;
        }
        if (!e->used || lane_done_with(w, e->lane, e->pos)) {
            if (slot == NULL || slot->used)
                slot = e;       /* a free way, or one whose frames are all out */
        }
    }
    if (slot == NULL) {
        /* Every way still has frames out: the oldest position goes first
         * (its lane is likely done with it by the time its flow comes again). */
        slot = &set[0];
        for (int i = 1; i < STICKY_WAYS; i++)
            if ((int32_t)(set[i].pos - slot->pos) < 0)
                slot = &set[i];
        w->st.lane_sticky_evicted++;
    }
    w->sticky_live += !slot->used;
    slot->used = 1;
    slot->flow_id = flow_id;
    slot->lane = lane;
    slot->pos = pos;
}

int lane_keep_order(struct pylb_worker *w, struct rte_mbuf *m, uint64_t flow_id)
{
    struct lane_sticky *set = sticky_set(w, flow_id);
    for (int i = 0; i < STICKY_WAYS; i++) {
        struct lane_sticky *e = &set[i];
        if (!e->used || e->flow_id != flow_id)
            continue;
        if (lane_done_with(w, e->lane, e->pos)) {
            e->used = 0;        /* all its frames are out: this one may go now */
            w->sticky_live--;
            return 0;
        }
        lane_pass_flow_frame(w, m, flow_id, e->lane);
        w->st.lane_order_kept++;
        return 1;
    }
    return 0;
}

void lane_sweep_sticky(struct pylb_worker *w)
{
    /* A flow's memory goes once its lane sent all of it, even if the flow
     * never comes back: then sticky_live falls to 0 and hits skip the lookup. */
    for (uint32_t n = 0; n < STICKY_SWEEP_SETS && w->sticky_live; n++) {
        struct lane_sticky *set = &w->sticky[w->sticky_sweep * STICKY_WAYS];
        w->sticky_sweep = (w->sticky_sweep + 1) & (STICKY_SETS - 1);
        for (int i = 0; i < STICKY_WAYS; i++)
            if (set[i].used && lane_done_with(w, set[i].lane, set[i].pos)) {
                set[i].used = 0;
                w->sticky_live--;
            }
    }
}

void lane_publish_done(struct pylb_worker *w, uint32_t pos)
{
    __atomic_store_n(w->lane_done[w->lane], pos, __ATOMIC_RELEASE);
}

void lane_pass_notice(struct pylb_worker *w, const struct pylb_punt *notice, uint16_t lane)
{
    if (rte_ring_enqueue_elem(w->lane_notices[lane], (void *)notice, sizeof(*notice)) == 0)
        w->st.notices_lane_out++;
    else
        w->st.notices_lost++;
}

uint32_t lane_take_notices(struct pylb_worker *w, struct pylb_punt *punts, uint32_t room)
{
    uint32_t n = rte_ring_dequeue_burst_elem(w->lane_notices[w->lane], punts,
                                             sizeof(*punts), room, NULL);
    w->st.notices += n;
    w->st.notices_lane_in += n;
    return n;
}
