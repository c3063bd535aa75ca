/* uffdtrace post-copy migration emulator: the C side's public interface.
 *
 * build.py feeds this file to cffi's cdef() with the lines starting with '#' removed, so
 * it holds only declarations cffi understands (no macros: constants are enums).
 * Times are CLOCK_MONOTONIC nanoseconds (one clock for both namespaces of one machine). */
#pragma once
#include <stdint.h>

enum { MIG_SHMEM = 0, MIG_HUGETLB = 1 };
enum { MIG_SEQ = 0, MIG_RANDOM = 1, MIG_HOT = 2 };   /* page patterns */
enum { MIG_MAX_VCPUS = 64, MIG_MAX_ROUNDS = 64 };

struct mig_source_config {
    int32_t backing, pattern, vcpus;
    int64_t pages, page_size;
    double dirty_rate;           /* pages/s written by all vCPUs together */
    int64_t delay_ns;            /* one-way delay of each message this side receives */
    int32_t ctl_fd, demand_fd;   /* connected TCP sockets to the target */
    uint64_t seed;
};

struct mig_source_result {
    int32_t err;                 /* errno of the first failure, 0: success */
    char step[64];               /* what failed */
    int32_t memfd;               /* the guest memory (kept open for verification) */
    int32_t rounds;
    int64_t round_pages[MIG_MAX_ROUNDS];      /* pages sent per precopy round */
    int64_t round_dirty[MIG_MAX_ROUNDS];      /* pages dirty at the end of each round */
    int64_t dirtied;             /* page writes by the vCPUs */
    int64_t pause_ns;            /* vCPUs told to stop (downtime starts) */
    int64_t stale_pages;         /* dirty at the pause = stale on the target */
    int64_t demand_requests, pushed_pages, push_skipped;
    int64_t bytes_precopy, bytes_switch, bytes_demand, bytes_push;
};

struct mig_target_config {
    int32_t backing, pattern, vcpus, prefetch;
    int64_t pages, page_size;
    int32_t max_rounds;          /* precopy rounds at most (0: straight to post-copy) */
    int64_t converge_pages;      /* switch over once at most this many pages are dirty */
    int64_t delay_ns;            /* one-way delay of each message this side receives */
    int32_t ctl_fd, demand_fd;
    uint64_t seed;
    int64_t stall_timeout_ns;    /* no vCPU progress for this long: give up */
};

struct mig_target_result {
    int32_t err;
    char step[64];
    int32_t memfd;
    int32_t rounds;
    int32_t handler_tid, prefetch_tid;
    int32_t vcpu_tid[MIG_MAX_VCPUS];
    int64_t vcpu_stall_ns[MIG_MAX_VCPUS];     /* sum of touch times per vCPU (blocktime) */
    int64_t vcpu_max_stall_ns[MIG_MAX_VCPUS];
    int64_t precopy_start_ns, switch_ns, pause_ns, resume_ns;
    int64_t end_ns;              /* the last vCPU finished touching its pages */
    int64_t stale_pages;
    /* Demand handler: every uffd message read, by how it was resolved. */
    int64_t messages;            /* = fresh + demand_fetched + prefetch_waits */
    int64_t fresh;               /* page up to date: CONTINUE at once */
    int64_t demand_fetched;      /* stale: fetched from the source, then CONTINUE */
    int64_t prefetch_waits;      /* stale, claimed by the prefetcher: its CONTINUE woke us */
    int64_t handler_continues;   /* successful CONTINUE ioctls by the demand handler */
    int64_t eexist;              /* CONTINUE found the page mapped (then UFFDIO_WAKE) */
    int64_t prefetched, prefetch_discarded;
    int64_t demand_fetch_total_ns, demand_fetch_max_ns;
    int64_t bytes_precopy, bytes_switch, bytes_demand, bytes_push;
};

/* Both block until the migration ends; 0, or -1 with res->err and res->step set. */
int mig_source_run(const struct mig_source_config *cfg, struct mig_source_result *res);
int mig_target_run(const struct mig_target_config *cfg, struct mig_target_result *res);
