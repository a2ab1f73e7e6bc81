/* maglev.c - placeholder until implemented. */
#include "internal.h"
PYLB_API int pylb_maglev_build(const struct pylb_maglev_backend *b, uint32_t n, uint32_t m, uint32_t *t)
{ return pylb_fail(PYLB_EINVAL, "maglev: not implemented"); }
