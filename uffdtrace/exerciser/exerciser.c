/* uffdtrace workload exerciser: userfaultfd faulting threads and handlers, with ground truth.
 *
 * One memfd (shmem or 2 MiB hugetlb) is mapped twice: `plain` (never registered; used to
 * populate and refresh contents) and `reg` (registered with the userfaultfd). With anon
 * backing there is only `reg`, private anonymous memory (missing mode: each page's bytes
 * come from a private COPY source buffer, or ZEROPAGE). Faulting threads touch pages of
 * `reg` once each; handler threads (here, or in a forked handler process that receives the
 * uffd over a unix socket) read the fault messages and resolve them with CONTINUE (minor
 * mode) or COPY/ZEROPAGE (missing mode). Every touch, message and ioctl is recorded into
 * preallocated arrays in a MAP_SHARED region, so records made in the handler process reach
 * the caller too. Nothing here aborts: failures are returned as errno + step, and a failing
 * handler unregisters the range so no thread stays blocked.
 *
 * Nothing here relies on the message's ptid (it is 0 when UFFD_FEATURE_THREAD_ID is not
 * requested): handlers need only the address, and the faulting thread of each message is
 * known from the touch records.
 */
#ifndef _GNU_SOURCE  /* cffi's prelude (Python.h) may have defined it */
#define _GNU_SOURCE
#endif
#include "exerciser.h"
#include "native_util.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef MFD_HUGE_2MB
#define MFD_HUGE_2MB (21U << 26)
#endif

#define BATCH_MAX 64             /* messages read at once by the batch policy */
#define WATCH_MS 50              /* how often the main thread checks progress */
#define READY_TIMEOUT_MS 10000   /* handler process set-up */
#define REAP_TIMEOUT_MS 5000     /* handler process exit after being told to stop */
#define REUSE_FILE "/proc/meminfo"  /* reuse_fd: the ordinary file put at the uffd's number */
#define REUSE_READS 10
#define REUSE_READ_LEN 4096

static const char *const op_names[] = {
    [UFFDX_OP_CONTINUE] = "UFFDIO_CONTINUE",
    [UFFDX_OP_COPY] = "UFFDIO_COPY",
    [UFFDX_OP_ZEROPAGE] = "UFFDIO_ZEROPAGE",
    [UFFDX_OP_WAKE] = "UFFDIO_WAKE",
};

/* The deliberately wrong ioctl of each misuse scenario. */
static const int misuse_ops[] = {
    [UFFDX_MISUSE_CONTINUE_ON_MISSING] = UFFDX_OP_CONTINUE,
    [UFFDX_MISUSE_COPY_ON_MINOR] = UFFDX_OP_COPY,
    [UFFDX_MISUSE_ZEROPAGE_ON_MINOR] = UFFDX_OP_ZEROPAGE,
};

/* State written by both processes: lives at the start of the MAP_SHARED region. */
struct shared {
    /* Written per fault by the handlers. */
    int64_t n_msgs, n_ops, overflows;
    int32_t err;                 /* first failure wins */
    char step[64];
    /* Written once at the end by whichever process holds the uffd (reuse_fd). */
    int32_t reuse_fd, reuse_pid, reuse_verified, reuse_moved, reuse_reads;
    int64_t reuse_bytes, reuse_start_ns, reuse_end_ns;
    /* Written and read per touch by the faulting threads: a cache line of their own. */
    int64_t touched __attribute__((aligned(64)));  /* progress, for the watchdog */
    int32_t abort;               /* faulting threads should stop touching */
    int32_t go;                  /* futex gate: faulting and prefetching may start */
    int32_t stop;                /* handlers and prefetcher should return */
};

struct toucher {
    struct run *r;
    int32_t index;
    pthread_t thread;
};

struct run {
    const struct uffdx_config *cfg;
    size_t ps;                   /* page size */
    size_t len;                  /* bytes of each mapping */
    struct shared *sh;           /* `local` until the region exists */
    struct shared local;
    void *region;
    size_t region_len;
    struct uffdx_touch *touches;
    struct uffdx_msg *msgs;
    struct uffdx_op *ops;
    int64_t n_touches, cap_msgs, cap_ops;
    uint8_t *version;            /* [pages] content version a page must hold (0: zeros) */
    uint8_t *resolved;           /* [pages] an ioctl has mapped the page */
    int memfd;
    char *plain, *reg;
    int uffd;
    uint64_t features;
    int stop_fd;                 /* readable once the handlers should return */
    int sock;                    /* parent's end of the socket to the handler process */
    pid_t child;                 /* the handler process while it runs */
    pid_t handler_pid;
    bool killed_child;           /* we killed it (and recorded why) */
    cpu_set_t cpus;
    struct toucher *touchers;
    int n_touchers;
    int touchers_done;
    bool gate_opened;
    pthread_t *helpers;          /* handler threads, then the prefetcher */
    int n_helpers;
    int64_t pages_verified, mismatches, first_mismatch;
};

/* Record the first failure of the run; always returns -1. */
static int fail(struct run *r, const char *step, int err)
{
    int32_t none = 0;
    if (__atomic_compare_exchange_n(&r->sh->err, &none, err ? err : EIO, false,
                                    __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
        snprintf(r->sh->step, sizeof r->sh->step, "%s", step);
    return -1;
}

static bool failed(const struct run *r)
{
    return __atomic_load_n(&r->sh->err, __ATOMIC_SEQ_CST) != 0;
}

/* Page contents: 64-bit words encoding (version, page, word index); version 0 is zeros. */
static inline uint64_t content_word(int64_t page, unsigned version, uint64_t i)
{
    return version ? (uint64_t)version << 56 | (uint64_t)page << 24 | i : 0;
}

static void fill_page(char *dst, int64_t page, unsigned version, size_t ps)
{
    uint64_t *w = (uint64_t *)dst;
    for (size_t i = 0; i < ps / sizeof *w; i++)
        w[i] = content_word(page, version, i);
}

static bool page_holds(const char *src, int64_t page, unsigned version, size_t ps)
{
    const uint64_t *w = (const uint64_t *)src;
    for (size_t i = 0; i < ps / sizeof *w; i++)
        if (w[i] != content_word(page, version, i))
            return false;
    return true;
}

static uint64_t page_addr(const struct run *r, int64_t page)
{
    return (uintptr_t)r->reg + (uint64_t)page * r->ps;
}

static void set_version(struct run *r, int64_t page, unsigned version)
{
    __atomic_store_n(&r->version[page], (uint8_t)version, __ATOMIC_RELAXED);
}

static void mark_resolved(struct run *r, int64_t page)
{
    __atomic_store_n(&r->resolved[page], 1, __ATOMIC_RELAXED);
}

/* --- records ---------------------------------------------------------------------- */

static void record_msg(struct run *r, int32_t tid, int64_t t, uint64_t addr,
                       const struct uffd_msg *m)
{
    int64_t i = __atomic_fetch_add(&r->sh->n_msgs, 1, __ATOMIC_RELAXED);
    if (i >= r->cap_msgs) {
        __atomic_fetch_add(&r->sh->overflows, 1, __ATOMIC_RELAXED);
        return;
    }
    r->msgs[i] = (struct uffdx_msg){
        .msg_ns = t, .addr = addr, .flags = m->arg.pagefault.flags,
        .handler_tid = tid, .ptid = m->arg.pagefault.feat.ptid,
    };
}

static void record_op(struct run *r, const struct uffdx_op *op)
{
    int64_t i = __atomic_fetch_add(&r->sh->n_ops, 1, __ATOMIC_RELAXED);
    if (i >= r->cap_ops) {
        __atomic_fetch_add(&r->sh->overflows, 1, __ATOMIC_RELAXED);
        return;
    }
    r->ops[i] = *op;
}

/* One timed and recorded UFFDIO_* ioctl over [addr, addr + len). Returns 0 or errno. */
static int uffd_ioctl(struct run *r, int32_t tid, int op, int role, uint64_t addr,
                      uint64_t len, bool dontwake, const void *src)
{
    union {
        struct uffdio_continue cont;
        struct uffdio_copy copy;
        struct uffdio_zeropage zero;
        struct uffdio_range range;
    } a;
    unsigned long request;
    __s64 *result = NULL;

    memset(&a, 0, sizeof a);
    switch (op) {
    case UFFDX_OP_CONTINUE:
        a.cont.range = (struct uffdio_range){.start = addr, .len = len};
        a.cont.mode = dontwake ? UFFDIO_CONTINUE_MODE_DONTWAKE : 0;
        request = UFFDIO_CONTINUE;
        result = &a.cont.mapped;
        break;
    case UFFDX_OP_COPY:
        a.copy = (struct uffdio_copy){
            .dst = addr, .src = (uintptr_t)src, .len = len,
            .mode = dontwake ? UFFDIO_COPY_MODE_DONTWAKE : 0,
        };
        request = UFFDIO_COPY;
        result = &a.copy.copy;
        break;
    case UFFDX_OP_ZEROPAGE:
        a.zero.range = (struct uffdio_range){.start = addr, .len = len};
        a.zero.mode = dontwake ? UFFDIO_ZEROPAGE_MODE_DONTWAKE : 0;
        request = UFFDIO_ZEROPAGE;
        result = &a.zero.zeropage;
        break;
    default:
        a.range = (struct uffdio_range){.start = addr, .len = len};
        request = UFFDIO_WAKE;
        break;
    }
    int64_t start = now_ns();
    int rc = ioctl(r->uffd, request, &a);
    int err = rc < 0 ? errno : 0;
    int64_t end = now_ns();
    record_op(r, &(struct uffdx_op){
        .start_ns = start, .end_ns = end, .addr = addr, .len = len,
        .mapped = result ? *result : 0, .handler_tid = tid, .op = op, .role = role,
        .err = err,
    });
    return err;
}

/* --- handlers --------------------------------------------------------------------- */

/* The ioctl that correctly resolves a fault on `page` in this run. */
static int resolving_op(const struct run *r, int64_t page)
{
    if (r->cfg->mode == UFFDX_MINOR)
        return UFFDX_OP_CONTINUE;
    return r->cfg->page_zero[page] ? UFFDX_OP_ZEROPAGE : UFFDX_OP_COPY;
}

/* Map `page` with `op`; on success note the contents the page now holds. Returns errno. */
static int map_page(struct run *r, int32_t tid, int role, int op, int64_t page,
                    bool dontwake, char *src)
{
    if (op == UFFDX_OP_COPY)
        fill_page(src, page, 1, r->ps);
    int err = uffd_ioctl(r, tid, op, role, page_addr(r, page), r->ps, dontwake, src);
    if (err)
        return err;
    if (op == UFFDX_OP_COPY)
        set_version(r, page, 1);
    else if (op == UFFDX_OP_ZEROPAGE)
        set_version(r, page, 0);
    mark_resolved(r, page);
    return 0;
}

/* Sleep `ns`, cut short when the handlers are told to stop. Returns true if told to. */
static bool pause_unless_stopped(struct run *r, int64_t ns)
{
    struct pollfd p = {.fd = r->stop_fd, .events = POLLIN};
    struct timespec ts = {.tv_sec = ns / 1000000000, .tv_nsec = ns % 1000000000};
    return ppoll(&p, 1, &ts, NULL) > 0;
}

/* Serve one fault message for the page at `addr`. */
static int handle_fault(struct run *r, int32_t tid, uint64_t addr, bool dontwake, char *src)
{
    const struct uffdx_config *c = r->cfg;
    int64_t page = (int64_t)((addr - (uintptr_t)r->reg) / r->ps);

    if (addr < (uintptr_t)r->reg || page >= c->pages)
        return fail(r, "fault outside the registered range", EFAULT);
    if (c->fetch_delay_ns > 0)
        pause_unless_stopped(r, c->fetch_delay_ns);  /* if stopped, still finish this fault */
    if (c->misuse != UFFDX_MISUSE_NONE)
        map_page(r, tid, UFFDX_ROLE_MISUSE, misuse_ops[c->misuse], page, false, src);
    if (c->policy == UFFDX_POLICY_COPY && c->page_stale[page]) {
        /* Live-migration case: newer bytes arrived; refresh the page cache, then map. */
        fill_page(r->plain + (size_t)page * r->ps, page, 2, r->ps);
        set_version(r, page, 2);
    }
    int op = resolving_op(r, page);
    int err = map_page(r, tid, UFFDX_ROLE_RESOLVE, op, page, dontwake, src);
    if (err == 0 && op == UFFDX_OP_CONTINUE && c->continue_twice) {
        /* As the kernel's selftests do: the same CONTINUE again. The page is mapped now, so
         * it must fail with EEXIST (mapped = -EEXIST) and wake no one. */
        int again = uffd_ioctl(r, tid, UFFDX_OP_CONTINUE, UFFDX_ROLE_REPEAT, addr, r->ps,
                               false, NULL);
        if (again != EEXIST)
            return again ? fail(r, "UFFDIO_CONTINUE (repeat)", again)
                         : fail(r, "UFFDIO_CONTINUE (repeat) succeeded, not EEXIST", EPROTO);
    }
    if (err == EEXIST) {
        /* Someone else (prefetcher, another handler) mapped it first: the faulting thread
         * may still sleep, so wake it - unless a batch WAKE follows anyway. */
        op = UFFDX_OP_WAKE;
        err = dontwake ? 0 : uffd_ioctl(r, tid, op, UFFDX_ROLE_EEXIST_WAKE, addr, r->ps,
                                        false, NULL);
    }
    return err ? fail(r, op_names[op], err) : 0;
}

/* Serve the messages of one read. */
static int handle_msgs(struct run *r, int32_t tid, const struct uffd_msg *m, size_t n,
                       int64_t t, bool batch, char *src)
{
    uint64_t lo = UINT64_MAX, hi = 0;

    for (size_t i = 0; i < n; i++) {
        if (m[i].event != UFFD_EVENT_PAGEFAULT)
            continue;
        uint64_t addr = m[i].arg.pagefault.address & ~(uint64_t)(r->ps - 1);
        record_msg(r, tid, t, addr, &m[i]);
        if (handle_fault(r, tid, addr, batch, src) < 0)
            return -1;
        lo = addr < lo ? addr : lo;
        hi = addr + r->ps > hi ? addr + r->ps : hi;
    }
    if (batch && hi > lo) {
        int err = uffd_ioctl(r, tid, UFFDX_OP_WAKE, UFFDX_ROLE_BATCH_WAKE, lo, hi - lo,
                             false, NULL);
        if (err)
            return fail(r, "UFFDIO_WAKE", err);
    }
    return 0;
}

/* After a handler failure: stop the faulting threads, unregister the range and wake every
 * blocked thread (UNREGISTER itself wakes only MISSING waiters); they retry without
 * userfaultfd. */
static void release(struct run *r)
{
    struct uffdio_range range = {.start = (uintptr_t)r->reg, .len = r->len};
    __atomic_store_n(&r->sh->abort, 1, __ATOMIC_RELAXED);
    ioctl(r->uffd, UFFDIO_UNREGISTER, &range);
    ioctl(r->uffd, UFFDIO_WAKE, &range);
}

/* A page-sized buffer for UFFDIO_COPY sources. */
static char *source_page(struct run *r)
{
    void *p = mmap(NULL, r->ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p != MAP_FAILED)
        return p;
    fail(r, "mmap(copy source)", errno);
    release(r);
    return NULL;
}

static void *handler_main(void *arg)
{
    struct run *r = arg;
    bool batch = r->cfg->policy == UFFDX_POLICY_BATCH;
    struct uffd_msg msgs[BATCH_MAX];
    size_t want = batch ? sizeof msgs : sizeof msgs[0];
    int32_t tid = gettid();
    char *src = source_page(r);
    struct pollfd pfd[2] = {
        {.fd = r->uffd, .events = POLLIN},
        {.fd = r->stop_fd, .events = POLLIN},
    };
    int rc = 0;

    pthread_setname_np(pthread_self(), "uffdx-handler");
    prctl(PR_SET_TIMERSLACK, 1UL);  /* precise fetch delays */
    if (!src)
        return NULL;
    while (rc == 0) {
        if (poll(pfd, 2, -1) < 0) {
            rc = errno == EINTR ? 0 : fail(r, "poll(uffd)", errno);
        } else if (pfd[0].revents & POLLIN) {
            ssize_t n = read(r->uffd, msgs, want);
            int64_t t = now_ns();
            if (n >= 0)
                rc = handle_msgs(r, tid, msgs, (size_t)n / sizeof msgs[0], t, batch, src);
            else if (errno != EAGAIN)  /* EAGAIN: another handler thread took it */
                rc = fail(r, "read(uffd)", errno);
        } else if (pfd[0].revents & (POLLERR | POLLNVAL)) {
            rc = fail(r, "poll(uffd)", EBADF);
        } else if (pfd[1].revents) {
            rc = 1;
        }
    }
    if (rc < 0)
        release(r);
    munmap(src, r->ps);
    return NULL;
}

/* Map pages in order, ahead of the faulting threads, while the handlers serve faults. */
static void *prefetch_main(void *arg)
{
    struct run *r = arg;
    int32_t tid = gettid();
    char *src = source_page(r);

    pthread_setname_np(pthread_self(), "uffdx-prefetch");
    prctl(PR_SET_TIMERSLACK, 1UL);  /* precise pacing */
    if (!src)
        return NULL;
    gate_wait(&r->sh->go);
    for (int64_t page = 0; page < r->cfg->pages; page++) {
        if (__atomic_load_n(&r->sh->stop, __ATOMIC_RELAXED)
            || __atomic_load_n(&r->sh->abort, __ATOMIC_RELAXED))
            break;
        if (__atomic_load_n(&r->resolved[page], __ATOMIC_RELAXED))
            continue;
        if (r->cfg->prefetch_interval_ns > 0
            && pause_unless_stopped(r, r->cfg->prefetch_interval_ns))
            break;
        int op = resolving_op(r, page);
        int err = map_page(r, tid, UFFDX_ROLE_PREFETCH, op, page, false, src);
        if (err && err != EEXIST) {  /* EEXIST: a demand handler won the race */
            fail(r, op_names[op], err);
            release(r);
            break;
        }
    }
    munmap(src, r->ps);
    return NULL;
}

/* --- faulting threads ------------------------------------------------------------- */

static void *toucher_main(void *arg)
{
    struct toucher *w = arg;
    struct run *r = w->r;
    const struct uffdx_config *c = r->cfg;
    int32_t tid = gettid();
    char name[16];

    snprintf(name, sizeof name, "uffdx-touch%d", w->index);
    pthread_setname_np(pthread_self(), name);
    gate_wait(&r->sh->go);
    for (int64_t i = c->thread_start[w->index]; i < c->thread_start[w->index + 1]; i++) {
        if (__atomic_load_n(&r->sh->abort, __ATOMIC_RELAXED))
            break;
        int64_t page = c->touch_page[i];
        char *a = r->reg + (size_t)page * r->ps;
        int64_t start = now_ns();
        if (c->touch_write[i])
            __atomic_fetch_add((uint64_t *)a, 0, __ATOMIC_RELAXED);  /* write, same bytes */
        else
            (void)*(volatile uint64_t *)a;
        int64_t end = now_ns();
        r->touches[i] = (struct uffdx_touch){
            .start_ns = start, .end_ns = end, .addr = (uintptr_t)a, .page = page,
            .tid = tid, .thread = w->index, .write = c->touch_write[i],
        };
        __atomic_fetch_add(&r->sh->touched, 1, __ATOMIC_RELAXED);
    }
    __atomic_fetch_add(&r->touchers_done, 1, __ATOMIC_RELEASE);
    return NULL;
}

/* --- set-up ----------------------------------------------------------------------- */

/* Start a thread pinned to the configured CPUs, with all signals blocked (they belong to
 * the caller's main thread). */
static int spawn(struct run *r, pthread_t *thread, void *(*fn)(void *), void *arg)
{
    pthread_attr_t attr;
    sigset_t all, old;
    int err = pthread_attr_init(&attr);

    if (!err && r->cfg->ncpus)
        err = pthread_attr_setaffinity_np(&attr, sizeof r->cpus, &r->cpus);
    if (!err) {
        sigfillset(&all);
        pthread_sigmask(SIG_BLOCK, &all, &old);
        err = pthread_create(thread, &attr, fn, arg);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
    }
    pthread_attr_destroy(&attr);
    return err ? fail(r, "pthread_create", err) : 0;
}

static size_t align64(size_t n)
{
    return (n + 63) & ~(size_t)63;
}

/* One MAP_SHARED region for all records and per-page state (sizes known from cfg). */
static int region_setup(struct run *r)
{
    const struct uffdx_config *c = r->cfg;
    size_t pages = (size_t)c->pages;

    r->n_touches = c->thread_start[c->threads];
    r->cap_msgs = 2 * r->n_touches + BATCH_MAX;  /* retried faults can repeat a message */
    r->cap_ops = 4 * r->cap_msgs + c->pages;
    size_t off_touches = align64(sizeof(struct shared));
    size_t off_msgs = off_touches + align64(r->n_touches * sizeof *r->touches);
    size_t off_ops = off_msgs + align64(r->cap_msgs * sizeof *r->msgs);
    size_t off_version = off_ops + align64(r->cap_ops * sizeof *r->ops);
    size_t off_resolved = off_version + align64(pages);
    r->region_len = off_resolved + align64(pages);
    char *p = mmap(NULL, r->region_len, PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
        return fail(r, "mmap(records)", errno);
    r->region = p;
    r->sh = (struct shared *)p;
    r->touches = (struct uffdx_touch *)(p + off_touches);
    r->msgs = (struct uffdx_msg *)(p + off_msgs);
    r->ops = (struct uffdx_op *)(p + off_ops);
    r->version = (uint8_t *)(p + off_version);
    r->resolved = (uint8_t *)(p + off_resolved);

    /* Fault in the part of the records a run normally fills, so that storing a record
     * does not take a page fault inside the measured round trips. */
    int64_t per_touch = 1 + (c->misuse != UFFDX_MISUSE_NONE) + (c->continue_twice != 0);
    int64_t used_ops = r->n_touches * per_touch + c->pages;
    memset(r->touches, 0, r->n_touches * sizeof *r->touches);
    memset(r->msgs, 0, r->n_touches * sizeof *r->msgs);
    memset(r->ops, 0, (size_t)(used_ops < r->cap_ops ? used_ops : r->cap_ops) * sizeof *r->ops);
    memset(r->version, 0, 2 * align64(pages));  /* version and resolved */

    r->touchers = calloc((size_t)c->threads, sizeof *r->touchers);
    r->helpers = calloc((size_t)c->handler_threads + 1, sizeof *r->helpers);
    if (!r->touchers || !r->helpers)
        return fail(r, "calloc", ENOMEM);
    return 0;
}

static char *map_file(struct run *r)
{
    void *p = mmap(NULL, r->len, PROT_READ | PROT_WRITE, MAP_SHARED, r->memfd, 0);
    if (p != MAP_FAILED)
        return p;
    fail(r, "mmap(memfd)", errno);
    return NULL;
}

/* Anon backing: one private anonymous mapping, registered as it is (missing mode only). */
static int anon_setup(struct run *r)
{
    void *p = mmap(NULL, r->len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return fail(r, "mmap(anon)", errno);
    r->reg = p;
    /* 4 KiB faults only, as QEMU does for postcopy RAM (THP off on the range). A kernel
     * without THP refuses the advice, and then there is nothing to turn off. */
    if (madvise(p, r->len, MADV_NOHUGEPAGE) < 0 && errno != EINVAL)
        return fail(r, "madvise(MADV_NOHUGEPAGE)", errno);
    return 0;
}

/* The memfd, its two mappings, and (minor mode) every page populated through `plain`. */
static int memory_setup(struct run *r)
{
    const struct uffdx_config *c = r->cfg;
    bool hugetlb = c->backing == UFFDX_HUGETLB;

    if (c->backing == UFFDX_ANON)
        return anon_setup(r);
    r->memfd = memfd_create(hugetlb ? "uffdx-hugetlb" : "uffdx-shmem",
                            MFD_CLOEXEC | (hugetlb ? MFD_HUGETLB | MFD_HUGE_2MB : 0));
    if (r->memfd < 0)
        return fail(r, "memfd_create", errno);
    if (ftruncate(r->memfd, (off_t)r->len) < 0)
        return fail(r, "ftruncate(memfd)", errno);
    /* Allocate up front, so a shortage is an error here and not a SIGBUS later. Missing
     * mode leaves the file empty: its pages are what the faults are about. */
    if (c->mode == UFFDX_MINOR && fallocate(r->memfd, 0, 0, (off_t)r->len) < 0)
        return fail(r, "fallocate(memfd)", errno);
    r->plain = map_file(r);
    if (!r->plain)
        return -1;
    r->reg = map_file(r);
    if (!r->reg)
        return -1;
    if (c->mode == UFFDX_MINOR)
        for (int64_t page = 0; page < c->pages; page++) {
            fill_page(r->plain + (size_t)page * r->ps, page, 1, r->ps);
            set_version(r, page, 1);
        }
    return 0;
}

static int uffd_setup(struct run *r)
{
    const struct uffdx_config *c = r->cfg;
    bool hugetlb = c->backing == UFFDX_HUGETLB, minor = c->mode == UFFDX_MINOR;
    uint64_t feature = minor ? (hugetlb ? UFFD_FEATURE_MINOR_HUGETLBFS : UFFD_FEATURE_MINOR_SHMEM)
                             : (hugetlb ? UFFD_FEATURE_MISSING_HUGETLBFS
                                        : UFFD_FEATURE_MISSING_SHMEM);
    if (c->backing == UFFDX_ANON)
        feature = 0;  /* missing faults on anonymous memory need no feature */
    struct uffdio_api api = {
        .api = UFFD_API, .features = feature | (c->no_thread_id ? 0 : UFFD_FEATURE_THREAD_ID),
    };
    struct uffdio_register reg = {
        .range = {.start = (uintptr_t)r->reg, .len = r->len},
        .mode = minor ? UFFDIO_REGISTER_MODE_MINOR : UFFDIO_REGISTER_MODE_MISSING,
    };

    r->uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
    if (r->uffd < 0)
        return fail(r, "userfaultfd", errno);
    if (ioctl(r->uffd, UFFDIO_API, &api) < 0)
        return fail(r, "UFFDIO_API", errno);
    r->features = api.features;
    if (ioctl(r->uffd, UFFDIO_REGISTER, &reg) < 0)
        return fail(r, "UFFDIO_REGISTER", errno);
    return 0;
}

/* Handler threads (+ prefetcher) in the calling process. */
static int start_helpers(struct run *r)
{
    for (int i = 0; i < r->cfg->handler_threads; i++) {
        if (spawn(r, &r->helpers[r->n_helpers], handler_main, r) < 0)
            return -1;
        r->n_helpers++;
    }
    if (r->cfg->policy == UFFDX_POLICY_PREFETCH) {
        if (spawn(r, &r->helpers[r->n_helpers], prefetch_main, r) < 0)
            return -1;
        r->n_helpers++;
    }
    return 0;
}

static void join_helpers(struct run *r)
{
    for (int i = 0; i < r->n_helpers; i++)
        pthread_join(r->helpers[i], NULL);
    r->n_helpers = 0;
}

/* --- reuse_fd ----------------------------------------------------------------------- */

/* Does /proc/self/fd/`fd` point at `target`? */
static bool fd_is(int fd, const char *target)
{
    char link[64], path[PATH_MAX];

    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n < 0)
        return false;
    path[n] = '\0';
    return strcmp(path, target) == 0;
}

/* All faults resolved: close the uffd, as a program done with it would, and put an ordinary
 * file at the same fd number (open() lands there when it is the lowest free number; else
 * F_DUPFD_CLOEXEC moves it there: like dup2, but it never replaces an fd another thread may
 * have taken meanwhile, in which case the run fails). Then read() that number REUSE_READS
 * times: to a tracer that keys on fd numbers, these look like reads of the uffd. */
static int reuse_fd(struct run *r)
{
    struct shared *sh = r->sh;
    int n = r->uffd, fd;
    char buf[REUSE_READ_LEN];
    int64_t bytes = 0;
    int reads = 0;
    bool moved = false;

    if (!fd_is(n, "anon_inode:[userfaultfd]"))
        return fail(r, "reuse fd: /proc/self/fd does not show the uffd", EBADF);
    int64_t start = now_ns();
    close(n);  /* the last reference: unregisters the range */
    r->uffd = -1;
    fd = open(REUSE_FILE, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return fail(r, "open(" REUSE_FILE ")", errno);
    if (fd != n) {
        int dup = fcntl(fd, F_DUPFD_CLOEXEC, n), err = errno;
        close(fd);
        if (dup < 0)
            return fail(r, "fcntl(F_DUPFD_CLOEXEC)", err);
        if (dup != n) {
            close(dup);
            return fail(r, "reuse fd: the uffd's number was taken by another thread", EBUSY);
        }
        fd = dup;
        moved = true;
    }
    bool verified = fd_is(fd, REUSE_FILE);
    for (int i = 0; i < REUSE_READS; i++) {
        ssize_t got = lseek(fd, 0, SEEK_SET) < 0 ? -1 : read(fd, buf, sizeof buf);
        if (got < 0) {
            int err = errno;
            close(fd);
            return fail(r, "read(" REUSE_FILE ")", err);
        }
        reads++;
        bytes += got;
    }
    close(fd);
    sh->reuse_end_ns = now_ns();
    sh->reuse_start_ns = start;
    sh->reuse_fd = n;
    sh->reuse_pid = getpid();
    sh->reuse_verified = verified;
    sh->reuse_moved = moved;
    sh->reuse_reads = reads;
    sh->reuse_bytes = bytes;
    return verified ? 0 : fail(r, "reuse fd: /proc/self/fd does not show " REUSE_FILE, EBADF);
}

/* --- the handler process ---------------------------------------------------------- */

static int send_fd(int sock, int fd)
{
    char byte = 0;
    struct iovec iov = {.iov_base = &byte, .iov_len = 1};
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int))];
    } control;
    struct msghdr m = {
        .msg_iov = &iov, .msg_iovlen = 1,
        .msg_control = control.buf, .msg_controllen = sizeof control.buf,
    };
    struct cmsghdr *cm = CMSG_FIRSTHDR(&m);

    memset(&control, 0, sizeof control);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cm), &fd, sizeof fd);
    return sendmsg(sock, &m, MSG_NOSIGNAL) < 0 ? -1 : 0;
}

/* The fd passed over `sock`, or -1 with errno set (ECONNRESET: the peer closed). */
static int recv_fd(int sock)
{
    char byte;
    struct iovec iov = {.iov_base = &byte, .iov_len = 1};
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int))];
    } control;
    struct msghdr m = {
        .msg_iov = &iov, .msg_iovlen = 1,
        .msg_control = control.buf, .msg_controllen = sizeof control.buf,
    };
    int fd;

    ssize_t n = recvmsg(sock, &m, MSG_CMSG_CLOEXEC);
    if (n <= 0) {
        errno = n == 0 ? ECONNRESET : errno;
        return -1;
    }
    struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
    if (!cm || cm->cmsg_type != SCM_RIGHTS) {
        errno = EPROTO;
        return -1;
    }
    memcpy(&fd, CMSG_DATA(cm), sizeof fd);
    return fd;
}

/* The child: only C from here on, and it ends with _exit. It receives the uffd, runs the
 * handler threads until the parent shuts the socket, and leaves its records in the
 * shared region. */
static void __attribute__((noreturn)) handler_process(struct run *r, int sock, pid_t parent)
{
    char ready = 1;

    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent)
        _exit(1);
    prctl(PR_SET_NAME, "uffdx-hprocess");
    if (r->cfg->ncpus && sched_setaffinity(0, sizeof r->cpus, &r->cpus) < 0) {
        fail(r, "sched_setaffinity(handler process)", errno);
        _exit(1);
    }
    signal(SIGINT, SIG_DFL);  /* not the caller's (Python's) handlers */
    signal(SIGTERM, SIG_DFL);
    r->child = 0;
    r->sock = -1;
    r->stop_fd = sock;
    r->uffd = recv_fd(sock);
    if (r->uffd < 0) {
        fail(r, "recvmsg(uffd)", errno);
        _exit(1);
    }
    if (start_helpers(r) < 0)
        _exit(1);  /* exiting closes the uffd: nothing can block on it */
    send(sock, &ready, 1, MSG_NOSIGNAL);
    join_helpers(r);
    if (r->cfg->reuse_fd && !failed(r))
        reuse_fd(r);  /* with this process's copy of the uffd, the only one left */
    _exit(failed(r) ? 1 : 0);
}

static int fork_handler(struct run *r)
{
    int sv[2];
    pid_t parent = getpid();

    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0)
        return fail(r, "socketpair", errno);
    pid_t pid = fork();
    if (pid < 0) {
        close(sv[0]);
        close(sv[1]);
        return fail(r, "fork", errno);
    }
    if (pid == 0) {
        close(sv[0]);
        handler_process(r, sv[1], parent);
    }
    close(sv[1]);
    r->sock = sv[0];
    r->child = r->handler_pid = pid;
    return 0;
}

/* Wait until `fd` (-1: none) is readable, the abort fd is, or timeout_ms pass.
 * Returns 1 (fd ready), 0 (timeout) or -1 (abort requested). */
static int wait_for(struct run *r, int fd, int64_t timeout_ms)
{
    struct pollfd p[2] = {
        {.fd = fd, .events = POLLIN},
        {.fd = r->cfg->abort_fd, .events = POLLIN},
    };
    int64_t deadline = now_ns() + timeout_ms * 1000000;

    for (;;) {
        int64_t left = (deadline - now_ns()) / 1000000;
        int rc = poll(p, 2, left > 0 ? (int)(left < INT_MAX ? left : INT_MAX) : 0);
        if (rc > 0 && p[1].revents)
            return -1;
        if (rc > 0)
            return 1;
        if (rc == 0 && left <= 0)
            return 0;
    }
}

static int wait_ready(struct run *r)
{
    char ready;
    int w = wait_for(r, r->sock, READY_TIMEOUT_MS);

    if (w < 0)
        return fail(r, "interrupted", EINTR);
    if (w == 0)
        return fail(r, "handler process set-up", ETIMEDOUT);
    ssize_t n = recv(r->sock, &ready, 1, 0);
    if (n == 1)
        return 0;
    return fail(r, "handler process exited during set-up", n < 0 ? errno : ECHILD);
}

static int start_handlers(struct run *r)
{
    bool process = r->cfg->handler_process;

    if (process && fork_handler(r) < 0)  /* before the uffd exists, as VMMs do */
        return -1;
    if (uffd_setup(r) < 0)
        return -1;
    if (process) {
        if (send_fd(r->sock, r->uffd) < 0)
            return fail(r, "sendmsg(uffd)", errno);
        /* The handler process now holds the only reference: if it dies, the uffd is
         * released and blocked threads retry without it instead of hanging. */
        close(r->uffd);
        r->uffd = -1;
        return wait_ready(r);
    }
    r->stop_fd = eventfd(0, EFD_CLOEXEC);
    if (r->stop_fd < 0)
        return fail(r, "eventfd", errno);
    return start_helpers(r);
}

static int start_touchers(struct run *r)
{
    for (int i = 0; i < r->cfg->threads; i++) {
        struct toucher *w = &r->touchers[i];
        *w = (struct toucher){.r = r, .index = i};
        if (spawn(r, &w->thread, toucher_main, w) < 0)
            return -1;
        r->n_touchers++;
    }
    return 0;
}

/* --- running and stopping --------------------------------------------------------- */

/* Faults are not being resolved (or the caller wants out): free the blocked threads. */
static void rescue(struct run *r, const char *why, int err)
{
    fail(r, why, err);
    __atomic_store_n(&r->sh->abort, 1, __ATOMIC_RELAXED);
    if (r->child > 0) {
        kill(r->child, SIGKILL);  /* closes the uffd: blocked threads retry without it */
        r->killed_child = true;
    } else
        release(r);
}

/* Open the gate and wait for the faulting threads, as a watchdog. */
static void run_workload(struct run *r)
{
    const struct uffdx_config *c = r->cfg;
    int64_t seen = -1, since = now_ns();
    bool rescued = false;

    if (c->delay_ns > 0 && wait_for(r, -1, c->delay_ns / 1000000) < 0) {
        fail(r, "interrupted", EINTR);
        return;
    }
    gate_open(&r->sh->go);
    r->gate_opened = true;
    while (__atomic_load_n(&r->touchers_done, __ATOMIC_ACQUIRE) < r->n_touchers) {
        if (rescued) {
            poll(NULL, 0, WATCH_MS);
            continue;
        }
        if (wait_for(r, -1, WATCH_MS) < 0) {
            rescue(r, "interrupted", EINTR);
            rescued = true;
            continue;
        }
        int64_t touched = __atomic_load_n(&r->sh->touched, __ATOMIC_RELAXED);
        if (touched != seen) {
            seen = touched;
            since = now_ns();
        } else if (now_ns() - since > c->stall_timeout_ns) {
            rescue(r, "faults not resolved in time (handler hung)", ETIMEDOUT);
            rescued = true;
        }
    }
}

static void stop_touchers(struct run *r)
{
    if (!r->gate_opened) {
        __atomic_store_n(&r->sh->abort, 1, __ATOMIC_RELAXED);
        gate_open(&r->sh->go);
    }
    for (int i = 0; i < r->n_touchers; i++)
        pthread_join(r->touchers[i].thread, NULL);
}

static void reap_child(struct run *r)
{
    int status;
    int64_t deadline = now_ns() + (int64_t)REAP_TIMEOUT_MS * 1000000;
    pid_t pid;
    char what[64];

    while ((pid = waitpid(r->child, &status, WNOHANG)) == 0 && now_ns() < deadline)
        poll(NULL, 0, 5);
    if (pid == 0) {
        rescue(r, "handler process did not stop", ETIMEDOUT);
        pid = waitpid(r->child, &status, 0);
    }
    r->child = 0;
    if (pid < 0 || r->killed_child || (WIFEXITED(status) && WEXITSTATUS(status) == 0))
        return;
    if (WIFSIGNALED(status))
        snprintf(what, sizeof what, "handler process killed by signal %d", WTERMSIG(status));
    else
        snprintf(what, sizeof what, "handler process exited with status %d",
                 WEXITSTATUS(status));
    fail(r, what, ECHILD);  /* a no-op if the handler process recorded its own failure */
}

/* Tell the handlers to return, and wait for them (thread or process). */
static void stop_handlers(struct run *r)
{
    __atomic_store_n(&r->sh->stop, 1, __ATOMIC_RELAXED);
    gate_open(&r->sh->go);  /* a prefetcher may still wait at the gate */
    if (r->child > 0) {
        shutdown(r->sock, SHUT_RDWR);  /* the handlers see EOF on their stop fd */
        reap_child(r);
    } else {
        if (r->stop_fd >= 0)
            eventfd_write(r->stop_fd, 1);
        join_helpers(r);
    }
}

/* Read every page through the registered mapping (no longer registered) and compare. */
static void verify(struct run *r)
{
    const struct uffdx_config *c = r->cfg;

    if (c->corrupt_page >= 0 && c->corrupt_page < c->pages)
        (r->plain ? r->plain : r->reg)[(size_t)c->corrupt_page * r->ps] ^= 0x5a;
    r->first_mismatch = -1;
    for (int64_t page = 0; page < c->pages; page++) {
        if (!page_holds(r->reg + (size_t)page * r->ps, page, r->version[page], r->ps)) {
            r->mismatches++;
            if (r->first_mismatch < 0)
                r->first_mismatch = page;
        }
        r->pages_verified++;
    }
}

static void close_fd(int *fd)
{
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

static void teardown(struct run *r)
{
    if (r->reg)
        munmap(r->reg, r->len);
    if (r->plain)
        munmap(r->plain, r->len);
    close_fd(&r->memfd);
    close_fd(&r->stop_fd);
    close_fd(&r->sock);
    free(r->touchers);
    free(r->helpers);
}

static void fill_result(const struct run *r, struct uffdx_result *res)
{
    const struct shared *sh = r->sh;

    res->err = sh->err;
    memcpy(res->step, sh->step, sizeof res->step);
    res->pid = getpid();
    res->handler_pid = r->handler_pid ? r->handler_pid : getpid();
    res->features = r->features;
    res->base = (uintptr_t)r->reg;
    res->touches = r->touches;
    res->n_touches = r->touches ? r->n_touches : 0;
    res->msgs = r->msgs;
    res->cap_msgs = r->cap_msgs;
    res->n_msgs = sh->n_msgs < r->cap_msgs ? sh->n_msgs : r->cap_msgs;
    res->ops = r->ops;
    res->cap_ops = r->cap_ops;
    res->n_ops = sh->n_ops < r->cap_ops ? sh->n_ops : r->cap_ops;
    res->overflows = sh->overflows;
    res->pages_verified = r->pages_verified;
    res->mismatches = r->mismatches;
    res->first_mismatch = r->first_mismatch;
    res->reuse_fd = sh->reuse_pid ? sh->reuse_fd : -1;
    res->reuse_pid = sh->reuse_pid;
    res->reuse_verified = sh->reuse_verified;
    res->reuse_moved = sh->reuse_moved;
    res->reuse_reads = sh->reuse_reads;
    res->reuse_bytes = sh->reuse_bytes;
    res->reuse_start_ns = sh->reuse_start_ns;
    res->reuse_end_ns = sh->reuse_end_ns;
    res->region = r->region;
    res->region_len = r->region_len;
}

int uffdx_run(const struct uffdx_config *cfg, struct uffdx_result *res)
{
    struct run r = {
        .cfg = cfg, .ps = (size_t)cfg->page_size, .len = (size_t)(cfg->pages * cfg->page_size),
        .memfd = -1, .uffd = -1, .stop_fd = -1, .sock = -1, .first_mismatch = -1,
    };

    r.sh = &r.local;
    CPU_ZERO(&r.cpus);
    for (int i = 0; i < cfg->ncpus; i++)
        CPU_SET(cfg->cpus[i], &r.cpus);
    memset(res, 0, sizeof *res);

    if (region_setup(&r) == 0 && memory_setup(&r) == 0 && start_handlers(&r) == 0
        && start_touchers(&r) == 0)
        run_workload(&r);
    stop_touchers(&r);
    stop_handlers(&r);
    if (cfg->reuse_fd && r.uffd >= 0 && !failed(&r))
        reuse_fd(&r);  /* handler threads: this process holds the uffd */
    close_fd(&r.uffd);  /* the last reference: unregisters the range */
    if (!failed(&r))
        verify(&r);
    teardown(&r);
    fill_result(&r, res);
    return res->err ? -1 : 0;
}

void uffdx_free(struct uffdx_result *res)
{
    if (res->region)
        munmap(res->region, res->region_len);
    res->region = NULL;
}
