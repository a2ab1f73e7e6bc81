/* dataplane.c */
#include "internal.h"
PYLB_API int pylb_dataplane_compile(const struct pylb_dp_conf *conf, struct pylb_dataplane **out)
{ return pylb_fail(PYLB_EINVAL, "pylb_dataplane_compile: not implemented"); }

PYLB_API void pylb_dataplane_free(struct pylb_dataplane *dp)
{}

PYLB_API uint64_t pylb_dataplane_generation(const struct pylb_dataplane *dp)
{ return 0; }

PYLB_API int pylb_dataplane_classify(const struct pylb_dataplane *dp, const struct pylb_flow_key *key,
                            int32_t *vip, uint64_t *flow_id, uint32_t *bucket,
                            uint32_t *current, uint32_t *previous)
{ return pylb_fail(PYLB_EINVAL, "pylb_dataplane_classify: not implemented"); }
