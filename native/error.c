/* error.c - the last error message, per thread. */
#include <stdio.h>
#include <time.h>
#include "internal.h"

/* CMake defines it from native/pylb.h; a stand-alone build of this file (a
 * test harness) reports that it does not know. */
#ifndef PYLB_HEADER_SHA256
#define PYLB_HEADER_SHA256 "unknown"
#endif

static __thread char last_error[256];

PYLB_API const char *pylb_header_sha256(void)
{
    return PYLB_HEADER_SHA256;
}

PYLB_API const char *pylb_last_error(void)
{
    return last_error;
}

int pylb_fail(int status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof(last_error), fmt, ap);
    va_end(ap);
    return status;
}

PYLB_API uint32_t pylb_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (uint32_t)((uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u);
}
