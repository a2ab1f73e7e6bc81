/* worker.c */
#include "internal.h"
PYLB_API int pylb_worker_create(const struct pylb_worker_conf *conf, struct pylb_worker **out)
{ return pylb_fail(PYLB_EINVAL, "pylb_worker_create: not implemented"); }

PYLB_API void pylb_worker_destroy(struct pylb_worker *w)
{}

PYLB_API int pylb_worker_set_dataplane(struct pylb_worker *w, struct pylb_dataplane *dp,
                              struct pylb_dataplane **old)
{ return pylb_fail(PYLB_EINVAL, "pylb_worker_set_dataplane: not implemented"); }

PYLB_API int pylb_worker_poll(struct pylb_worker *w, uint32_t max_bursts, uint32_t max_idle_us,
                     struct pylb_punt *punts, uint32_t max_punts, uint32_t *n_punts)
{ return pylb_fail(PYLB_EINVAL, "pylb_worker_poll: not implemented"); }

PYLB_API int pylb_worker_apply(struct pylb_worker *w, const struct pylb_verdict *v, uint32_t n)
{ return pylb_fail(PYLB_EINVAL, "pylb_worker_apply: not implemented"); }

PYLB_API int pylb_worker_flush(struct pylb_worker *w)
{ return pylb_fail(PYLB_EINVAL, "pylb_worker_flush: not implemented"); }

PYLB_API int pylb_worker_stats(const struct pylb_worker *w, struct pylb_stats *out)
{ return pylb_fail(PYLB_EINVAL, "pylb_worker_stats: not implemented"); }

PYLB_API int pylb_worker_backend_counts(const struct pylb_worker *w, uint64_t *packets,
                               uint64_t *bytes, uint32_t n)
{ return pylb_fail(PYLB_EINVAL, "pylb_worker_backend_counts: not implemented"); }

PYLB_API int pylb_worker_age_cache(struct pylb_worker *w, uint64_t max_sets, uint64_t *freed)
{ return pylb_fail(PYLB_EINVAL, "pylb_worker_age_cache: not implemented"); }
