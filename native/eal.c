/* eal.c - starting and stopping DPDK's EAL from the Python process. */
#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_lcore.h>
#include "internal.h"

/* 0 before init, 1 running, 2 cleaned up (the EAL cannot start again). */
static int eal_state;

PYLB_API int pylb_eal_init(int argc, char **argv)
{
    if (eal_state != 0)
        return pylb_fail(PYLB_ESTATE, "the EAL was already started in this process");
    if (argc < 1 || argv == NULL)
        return pylb_fail(PYLB_EINVAL, "EAL arguments must include argv[0]");
    int rc = rte_eal_init(argc, argv);
    if (rc < 0)
        return pylb_fail(PYLB_EDPDK, "rte_eal_init: %s", rte_strerror(rte_errno));
    eal_state = 1;
    return PYLB_OK;
}

PYLB_API int pylb_eal_cleanup(void)
{
    if (eal_state != 1)
        return pylb_fail(PYLB_ESTATE, "the EAL is not running");
    eal_state = 2;
    if (rte_eal_cleanup() != 0)
        return pylb_fail(PYLB_EDPDK, "rte_eal_cleanup: %s", rte_strerror(rte_errno));
    return PYLB_OK;
}

PYLB_API int pylb_eal_hugepages(void)
{
    return eal_state == 1 ? rte_eal_has_hugepages() : 0;
}

int pylb_eal_running(void)
{
    return eal_state == 1;
}
