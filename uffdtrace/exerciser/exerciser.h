/* uffdtrace workload exerciser: the C side's public interface.
 *
 * build.py feeds this file to cffi's cdef() with the lines starting with '#' removed, so
 * it holds only declarations cffi understands (no macros: constants are enums).
 * Times are CLOCK_MONOTONIC nanoseconds. */
#pragma once
#include <stdint.h>

enum { UFFDX_SHMEM = 0, UFFDX_HUGETLB = 1, UFFDX_ANON = 2 };
enum { UFFDX_MINOR = 0, UFFDX_MISSING = 1 };
enum { UFFDX_POLICY_CONTINUE = 0, UFFDX_POLICY_COPY = 1, UFFDX_POLICY_BATCH = 2,
       UFFDX_POLICY_PREFETCH = 3 };
enum { UFFDX_MISUSE_NONE = 0, UFFDX_MISUSE_CONTINUE_ON_MISSING = 1,
       UFFDX_MISUSE_COPY_ON_MINOR = 2, UFFDX_MISUSE_ZEROPAGE_ON_MINOR = 3 };
/* uffdx_op.op */
enum { UFFDX_OP_CONTINUE = 0, UFFDX_OP_COPY = 1, UFFDX_OP_ZEROPAGE = 2, UFFDX_OP_WAKE = 3 };
/* uffdx_op.role: why the ioctl was made */
enum { UFFDX_ROLE_RESOLVE = 0,     /* demand handler resolving a fault message */
       UFFDX_ROLE_PREFETCH = 1,    /* prefetch thread, ahead of the faulting threads */
       UFFDX_ROLE_MISUSE = 2,      /* the deliberately wrong ioctl of a misuse scenario */
       UFFDX_ROLE_EEXIST_WAKE = 3, /* WAKE after the resolving ioctl found the page mapped */
       UFFDX_ROLE_BATCH_WAKE = 4,  /* the one WAKE closing a batch of DONTWAKE ioctls */
       UFFDX_ROLE_REPEAT = 5       /* continue_twice: the resolving CONTINUE issued again */ };

struct uffdx_config {
    int32_t backing, mode, policy, misuse;
    int32_t no_thread_id;        /* 1: no UFFD_FEATURE_THREAD_ID (every message's ptid is 0) */
    int32_t continue_twice;      /* after each resolving CONTINUE, the same CONTINUE again */
    int32_t reuse_fd;            /* at the end: close the uffd, reopen its number on a file */
    int32_t handler_process;     /* 0: handler threads here; 1: in a forked handler process */
    int32_t threads, handler_threads;
    int32_t ncpus;               /* 0: no pinning */
    const int32_t *cpus;
    int64_t pages, page_size;
    /* Faulting thread t touches touch_page[thread_start[t] .. thread_start[t + 1]). */
    const int64_t *thread_start; /* [threads + 1] */
    const int64_t *touch_page;
    const uint8_t *touch_write;
    const uint8_t *page_stale;   /* [pages] policy copy: refresh the page before CONTINUE */
    const uint8_t *page_zero;    /* [pages] mode missing: ZEROPAGE instead of COPY */
    int64_t fetch_delay_ns;      /* demand handler: simulated fetch before resolving */
    int64_t prefetch_interval_ns; /* prefetcher: pause before each page (paced transfer) */
    int64_t delay_ns;            /* pause after set-up, before the first touch */
    int64_t stall_timeout_ns;    /* no touch completing for this long = hung handler */
    int32_t abort_fd;            /* readable = abort the run (a signal arrived); -1: none */
    int64_t corrupt_page;        /* test hook: damage this page before verifying; -1: none */
};

struct uffdx_touch {             /* one first touch by a faulting thread */
    int64_t start_ns, end_ns;
    uint64_t addr;
    int64_t page;
    int32_t tid, thread, write, pad;
};

struct uffdx_msg {               /* one uffd_msg a handler read */
    int64_t msg_ns;
    uint64_t addr, flags;
    int32_t handler_tid;
    uint32_t ptid;
};

struct uffdx_op {                /* one UFFDIO_* ioctl a handler or the prefetcher made */
    int64_t start_ns, end_ns;
    uint64_t addr, len;
    int64_t mapped;              /* the mapped / copy / zeropage field after the call */
    int32_t handler_tid, op, role, err;
};

struct uffdx_result {
    int32_t err;                 /* errno of the first failure, 0: success */
    char step[64];               /* what failed */
    int32_t pid, handler_pid;
    uint64_t features;           /* what UFFDIO_API reported */
    uint64_t base;               /* address of page 0 in the registered mapping */
    struct uffdx_touch *touches;
    int64_t n_touches;
    struct uffdx_msg *msgs;
    int64_t n_msgs, cap_msgs;
    struct uffdx_op *ops;
    int64_t n_ops, cap_ops;
    int64_t overflows;           /* records dropped for lack of room (never expected) */
    int64_t pages_verified, mismatches, first_mismatch;
    /* reuse_fd: the uffd's fd number, reopened on an ordinary file and read */
    int32_t reuse_fd;            /* the number; -1: not done */
    int32_t reuse_pid;           /* the process that did it (the handler process, if any) */
    int32_t reuse_verified;      /* /proc/self/fd showed the uffd, then the file, at it */
    int32_t reuse_moved;         /* open() landed elsewhere: moved there with F_DUPFD */
    int32_t reuse_reads;         /* read() calls on the file */
    int32_t reuse_pad;
    int64_t reuse_bytes;         /* bytes they returned */
    int64_t reuse_start_ns;      /* just before close(uffd) */
    int64_t reuse_end_ns;        /* just after close(file) */
    void *region;                /* owner of the arrays above: release with uffdx_free() */
    uint64_t region_len;
};

/* Run one workload. Blocks until done; returns 0, or -1 with res->err and res->step set.
 * Either way the caller must call uffdx_free(res) afterwards. */
int uffdx_run(const struct uffdx_config *cfg, struct uffdx_result *res);
void uffdx_free(struct uffdx_result *res);
