/* eal.c */
#include "internal.h"
PYLB_API int pylb_eal_init(int argc, char **argv)
{ return pylb_fail(PYLB_EINVAL, "pylb_eal_init: not implemented"); }

PYLB_API int pylb_eal_cleanup(void)
{ return pylb_fail(PYLB_EINVAL, "pylb_eal_cleanup: not implemented"); }

PYLB_API int pylb_eal_hugepages(void)
{ return pylb_fail(PYLB_EINVAL, "pylb_eal_hugepages: not implemented"); }

int pylb_eal_running(void) { return 0; }
