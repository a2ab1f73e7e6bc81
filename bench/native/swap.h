/* swap.h - the runner's modes beyond the interleaved plans (swap.c, lookup.c). */
#ifndef PYLB_BENCH_SWAP_H
#define PYLB_BENCH_SWAP_H

#include <stdint.h>

struct swap_opts {
    uint64_t flows;
    uint32_t backends;
    double seconds;      /* each phase: steady, then swapping */
    double swap_ms;      /* a new table this often */
};

/* Prints one JSON object; returns the exit status. */
int run_swap(const struct swap_opts *o);

struct lookup_opts {
    uint64_t flows;
    uint32_t slices;
    double slice_ms;
};

/* lookup.c: the flow cache alone, single lookups against bursts. */
int run_lookup(const struct lookup_opts *o);

#endif
