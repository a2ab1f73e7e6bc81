/* flow_id.c - placeholder until implemented. */
#include "internal.h"
PYLB_API uint64_t pylb_flow_id(const struct pylb_flow_key *key, uint64_t seed) { return 0; }
PYLB_API uint32_t pylb_bucket(uint64_t flow_id, uint32_t m) { return (uint32_t)(flow_id % m); }
