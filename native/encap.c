/* encap.c - placeholder until implemented. */
#include "internal.h"
PYLB_API uint32_t pylb_encap_overhead(const struct pylb_encap_params *p, uint8_t inner_l3) { return 0; }
PYLB_API int pylb_encap_write(const struct pylb_encap_params *p, uint8_t *buf, uint32_t off,
                              uint32_t inner_len, uint8_t inner_l3, uint64_t flow_id)
{ return pylb_fail(PYLB_EINVAL, "encap: not implemented"); }
