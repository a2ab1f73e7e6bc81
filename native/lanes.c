/* lanes.c - the rings between the worker processes of one balancer: each
 * lane has a ring of frames and a ring of notices that every other lane may
 * write and only it reads (pylb.h, "Lanes"; docs/architecture.md). */
#include <stdio.h>
#include <rte_errno.h>
#include <rte_ring.h>
#include <rte_ring_elem.h>
#include "worker.h"

#define LANES_NAME_MAX 20

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
    for (uint16_t k = 0; k < lanes; k++) {
        int rc = ring_name(rname, sizeof(rname), name, 'f', k);
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
    for (uint16_t k = 0; k < lanes; k++) {
        int rc = ring_name(rname, sizeof(rname), name, 'f', k);
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
