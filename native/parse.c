/* parse.c - placeholder until implemented. */
#include "internal.h"
PYLB_API int pylb_parse(const uint8_t *frame, uint32_t len, struct pylb_parsed *out)
{ return PYLB_PARSE_TRUNCATED; }
