/* uffdtrace post-copy migration emulator: source page server and target, over TCP.
 *
 * Source: guest memory in a memfd (shmem or 2 MiB hugetlb), vCPU threads dirtying pages at
 * a given rate (each write marks the page in a per-page dirty log), a control connection
 * serving precopy rounds, the switch-over and the background push of stale pages, and a
 * demand connection answering page requests.
 *
 * Target: its own memfd mapped twice, `plain` (written with received pages) and `reg`
 * (registered with userfaultfd in MINOR mode, touched by the vCPUs). Every page is in the
 * page cache from the start (fallocate), so every first touch is a minor fault. The demand
 * handler answers a fault on a fresh page with CONTINUE at once; on a stale page it claims
 * the page, fetches it over the demand connection, writes it through `plain`, CONTINUEs.
 * The prefetcher receives the pushed stale pages and maps each one it can claim. A page is
 * claimed by one side only (compare-and-swap per page), so it is written once, by its
 * claimer, before its CONTINUE: never torn, never lost. A fault on a page the prefetcher
 * claimed needs nothing from the handler: the prefetcher's CONTINUE wakes the thread.
 *
 * One-way delay: every message carries its send time; the receiver holds it until send
 * time + delay (the clock is shared by both namespaces of one machine).
 * Nothing here aborts: failures are returned as errno + step.
 */
#define _GNU_SOURCE
#include "migration.h"
#include "native_util.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
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
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef MFD_HUGE_2MB
#define MFD_HUGE_2MB (21U << 26)
#endif

#define DIRTY_TICK_NS 200000     /* vCPU dirtiers top up their quota this often */
#define WATCH_MS 50              /* target main thread checks progress this often */

enum msg_type {
    MSG_ROUND = 1,       /* T->S ctl: send a precopy round */
    MSG_SWITCH = 2,      /* T->S ctl: pause and switch over; arg = prefetch on */
    MSG_DONE = 3,        /* T->S ctl: migration finished */
    MSG_REQ = 4,         /* T->S demand: send page */
    MSG_PAGE = 5,        /* S->T: page, followed by page_size bytes */
    MSG_ROUND_END = 6,   /* S->T ctl: arg = pages dirty now */
    MSG_STALE_MAP = 7,   /* S->T ctl: arg = pause_ns, followed by one byte per page */
    MSG_PUSH_END = 8,    /* S->T ctl: no more pushed pages */
};

struct hdr {
    uint32_t type, pad;
    int64_t page, arg, sent_ns;
};

/* Per-page claim state of a stale page on the target. */
enum { PAGE_UNCLAIMED = 0, PAGE_DEMAND = 1, PAGE_PREFETCH = 2, PAGE_MAPPED = 3 };

static void sleep_until(int64_t t)
{
    struct timespec ts = {.tv_sec = t / 1000000000, .tv_nsec = t % 1000000000};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
        ;
}

/* Record the first failure into (err, step); always returns -1. */
static int fail_into(int32_t *err, char *step, const char *what, int e)
{
    int32_t none = 0;
    if (__atomic_compare_exchange_n(err, &none, e ? e : EIO, false, __ATOMIC_SEQ_CST,
                                    __ATOMIC_SEQ_CST))
        snprintf(step, 64, "%s", what);
    return -1;
}

static uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

/* --- messages ---------------------------------------------------------------------- */

/* Send a header and an optional payload; returns 0 or errno. */
static int send_msg(int fd, uint32_t type, int64_t page, int64_t arg, const void *data,
                    size_t len, int64_t *bytes)
{
    struct hdr h = {.type = type, .page = page, .arg = arg, .sent_ns = now_ns()};
    struct iovec iov[2] = {{&h, sizeof h}, {(void *)data, len}};
    struct msghdr m = {.msg_iov = iov, .msg_iovlen = len ? 2 : 1};
    size_t left = sizeof h + len;

    while (left) {
        ssize_t n = sendmsg(fd, &m, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        left -= (size_t)n;
        while (n > 0 && m.msg_iovlen) {   /* skip what was sent */
            size_t step = (size_t)n < m.msg_iov->iov_len ? (size_t)n : m.msg_iov->iov_len;
            m.msg_iov->iov_base = (char *)m.msg_iov->iov_base + step;
            m.msg_iov->iov_len -= step;
            n -= (ssize_t)step;
            if (!m.msg_iov->iov_len) {
                m.msg_iov++;
                m.msg_iovlen--;
            }
        }
    }
    __atomic_fetch_add(bytes, (int64_t)(sizeof h + len), __ATOMIC_RELAXED);
    return 0;
}

/* Receive exactly `len` bytes; returns 0, errno, or ECONNRESET at end of stream. */
static int recv_all(int fd, void *buf, size_t len)
{
    char *p = buf;
    while (len) {
        ssize_t n = recv(fd, p, len, MSG_WAITALL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return errno;
        if (n == 0)
            return ECONNRESET;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Receive a header and hold it until its send time + the one-way delay. */
static int recv_hdr(int fd, struct hdr *h, int64_t delay_ns)
{
    int err = recv_all(fd, h, sizeof *h);
    if (!err && delay_ns > 0)
        sleep_until(h->sent_ns + delay_ns);
    return err;
}

/* --- memory ------------------------------------------------------------------------ */

/* A memfd of `len` bytes with every page allocated. Returns fd or -errno. */
static int open_memory(int32_t backing, size_t len)
{
    unsigned flags = MFD_CLOEXEC | (backing == MIG_HUGETLB ? MFD_HUGETLB | MFD_HUGE_2MB : 0);
    int fd = memfd_create(backing == MIG_HUGETLB ? "mig-guest-huge" : "mig-guest", flags);
    if (fd < 0)
        return -errno;
    if (fallocate(fd, 0, 0, (off_t)len) < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    return fd;
}

/* Page visiting order of one vCPU over its share [lo, hi). */
static int64_t *touch_order(int32_t pattern, int64_t lo, int64_t hi, uint64_t seed)
{
    int64_t n = hi - lo;
    int64_t *order = malloc((size_t)(n ? n : 1) * sizeof *order);
    if (!order)
        return NULL;
    for (int64_t i = 0; i < n; i++)
        order[i] = lo + i;
    if (pattern != MIG_SEQ)
        for (int64_t i = n - 1; i > 0; i--) {
            int64_t j = (int64_t)(xorshift(&seed) % (uint64_t)(i + 1));
            int64_t t = order[i];
            order[i] = order[j];
            order[j] = t;
        }
    return order;
}

/* === source ======================================================================== */

struct source {
    const struct mig_source_config *cfg;
    struct mig_source_result *res;
    size_t ps, len;
    char *mem;
    uint8_t *dirty, *requested;
    int32_t stop;
    pthread_t vcpu[MIG_MAX_VCPUS];
    int n_vcpus;
};

struct dirtier {
    struct source *s;
    int index;
};

static int source_fail(struct source *s, const char *what, int e)
{
    return fail_into(&s->res->err, s->res->step, what, e);
}

static int64_t dirty_page(struct source *s, uint64_t *rng, int64_t *seq)
{
    int64_t pages = s->cfg->pages;
    switch (s->cfg->pattern) {
    case MIG_SEQ:
        return (*seq)++ % pages;
    case MIG_HOT: {
        int64_t hot = pages / 10 ? pages / 10 : 1;
        return (int64_t)(xorshift(rng) % (uint64_t)hot);
    }
    default:
        return (int64_t)(xorshift(rng) % (uint64_t)pages);
    }
}

/* Write pages at this vCPU's share of the dirty rate until paused. */
static void *dirtier_main(void *arg)
{
    struct dirtier *d = arg;
    struct source *s = d->s;
    double rate = s->cfg->dirty_rate / s->cfg->vcpus;
    uint64_t rng = s->cfg->seed * 0x9e3779b97f4a7c15ULL + (uint64_t)d->index + 1;
    int64_t seq = s->cfg->pages * d->index / s->cfg->vcpus;
    int64_t start = now_ns(), done = 0;
    uint64_t words = s->ps / sizeof(uint64_t);
    char name[16];

    snprintf(name, sizeof name, "mig-dirty%d", d->index);
    pthread_setname_np(pthread_self(), name);
    prctl(PR_SET_TIMERSLACK, 1UL);
    while (rate > 0 && !__atomic_load_n(&s->stop, __ATOMIC_SEQ_CST)) {
        int64_t due = (int64_t)((double)(now_ns() - start) * rate / 1e9);
        for (; done < due && !__atomic_load_n(&s->stop, __ATOMIC_RELAXED); done++) {
            int64_t page = dirty_page(s, &rng, &seq);
            uint64_t *w = (uint64_t *)(s->mem + (size_t)page * s->ps);
            uint64_t value = (uint64_t)d->index << 56 | (uint64_t)done;
            __atomic_store_n(&w[xorshift(&rng) % words], value, __ATOMIC_RELAXED);
            __atomic_store_n(&s->dirty[page], 1, __ATOMIC_SEQ_CST);  /* after the write */
            __atomic_fetch_add(&s->res->dirtied, 1, __ATOMIC_RELAXED);
        }
        sleep_until(now_ns() + DIRTY_TICK_NS);
    }
    free(d);
    return NULL;
}

static void stop_dirtiers(struct source *s)
{
    __atomic_store_n(&s->stop, 1, __ATOMIC_SEQ_CST);
    for (int i = 0; i < s->n_vcpus; i++)
        pthread_join(s->vcpu[i], NULL);
    s->n_vcpus = 0;
}

/* Answer page requests until the target closes the demand connection. */
static void *demand_server_main(void *arg)
{
    struct source *s = arg;
    struct hdr h;
    int err;

    pthread_setname_np(pthread_self(), "mig-demand");
    while (!(err = recv_hdr(s->cfg->demand_fd, &h, s->cfg->delay_ns))) {
        if (h.type != MSG_REQ || h.page < 0 || h.page >= s->cfg->pages) {
            source_fail(s, "bad demand request", EPROTO);
            return NULL;
        }
        __atomic_store_n(&s->requested[h.page], 1, __ATOMIC_SEQ_CST);
        s->res->demand_requests++;
        err = send_msg(s->cfg->demand_fd, MSG_PAGE, h.page, 0, s->mem + (size_t)h.page * s->ps,
                       s->ps, &s->res->bytes_demand);
        if (err) {
            source_fail(s, "send(demand page)", err);
            return NULL;
        }
    }
    if (err != ECONNRESET)
        source_fail(s, "recv(demand)", err);
    return NULL;
}

static int send_round(struct source *s)
{
    struct mig_source_result *res = s->res;
    int64_t sent = 0, dirty = 0;

    for (int64_t p = 0; p < s->cfg->pages; p++) {
        if (!__atomic_exchange_n(&s->dirty[p], 0, __ATOMIC_SEQ_CST))  /* before the read */
            continue;
        int err = send_msg(s->cfg->ctl_fd, MSG_PAGE, p, 0, s->mem + (size_t)p * s->ps, s->ps,
                           &res->bytes_precopy);
        if (err)
            return source_fail(s, "send(precopy page)", err);
        sent++;
    }
    for (int64_t p = 0; p < s->cfg->pages; p++)
        dirty += __atomic_load_n(&s->dirty[p], __ATOMIC_RELAXED);
    if (res->rounds < MIG_MAX_ROUNDS) {
        res->round_pages[res->rounds] = sent;
        res->round_dirty[res->rounds] = dirty;
    }
    res->rounds++;
    int err = send_msg(s->cfg->ctl_fd, MSG_ROUND_END, 0, dirty, NULL, 0, &res->bytes_precopy);
    return err ? source_fail(s, "send(round end)", err) : 0;
}

/* Pause the vCPUs, send the stale map, then push the stale pages not yet requested. */
static int switch_over(struct source *s, bool push)
{
    struct mig_source_result *res = s->res;
    int fd = s->cfg->ctl_fd;

    res->pause_ns = now_ns();
    stop_dirtiers(s);
    for (int64_t p = 0; p < s->cfg->pages; p++)
        res->stale_pages += s->dirty[p];
    int err = send_msg(fd, MSG_STALE_MAP, 0, res->pause_ns, s->dirty, (size_t)s->cfg->pages,
                       &res->bytes_switch);
    if (err)
        return source_fail(s, "send(stale map)", err);
    if (!push)
        return 0;
    for (int64_t p = 0; p < s->cfg->pages; p++) {
        if (!s->dirty[p])
            continue;
        if (__atomic_load_n(&s->requested[p], __ATOMIC_SEQ_CST)) {
            res->push_skipped++;
            continue;
        }
        err = send_msg(fd, MSG_PAGE, p, 0, s->mem + (size_t)p * s->ps, s->ps, &res->bytes_push);
        if (err)
            return source_fail(s, "send(pushed page)", err);
        res->pushed_pages++;
    }
    err = send_msg(fd, MSG_PUSH_END, 0, 0, NULL, 0, &res->bytes_push);
    return err ? source_fail(s, "send(push end)", err) : 0;
}

static int serve(struct source *s)
{
    struct hdr h;
    int err;

    while (!(err = recv_hdr(s->cfg->ctl_fd, &h, s->cfg->delay_ns))) {
        if (h.type == MSG_ROUND && s->res->pause_ns)
            return source_fail(s, "precopy round after switch-over", EPROTO);
        if (h.type == MSG_ROUND) {
            if (send_round(s) < 0)
                return -1;
        } else if (h.type == MSG_SWITCH) {
            if (switch_over(s, h.arg != 0) < 0)
                return -1;
        } else if (h.type == MSG_DONE) {
            return 0;
        } else {
            return source_fail(s, "bad control message", EPROTO);
        }
    }
    return source_fail(s, "recv(control)", err);
}

int mig_source_run(const struct mig_source_config *cfg, struct mig_source_result *res)
{
    struct source s = {.cfg = cfg, .res = res, .ps = (size_t)cfg->page_size};
    pthread_t demand;
    bool demand_started = false;
    int rc = -1;

    memset(res, 0, sizeof *res);
    res->memfd = -1;
    s.len = s.ps * (size_t)cfg->pages;
    int fd = open_memory(cfg->backing, s.len);
    if (fd < 0)
        return source_fail(&s, "memfd_create/fallocate", -fd);
    res->memfd = fd;
    s.mem = mmap(NULL, s.len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
    s.dirty = malloc((size_t)cfg->pages);
    s.requested = calloc((size_t)cfg->pages, 1);
    if (s.mem == MAP_FAILED || !s.dirty || !s.requested) {
        source_fail(&s, "mmap/malloc", s.mem == MAP_FAILED ? errno : ENOMEM);
        goto out;
    }
    for (int64_t p = 0; p < cfg->pages; p++) {   /* initial contents: all pages to send */
        uint64_t *w = (uint64_t *)(s.mem + (size_t)p * s.ps);
        for (size_t i = 0; i < s.ps / sizeof *w; i++)
            w[i] = (uint64_t)p << 24 | i;
    }
    memset(s.dirty, 1, (size_t)cfg->pages);
    for (int i = 0; i < cfg->vcpus; i++) {
        struct dirtier *d = malloc(sizeof *d);
        if (!d) {
            source_fail(&s, "malloc", ENOMEM);
            goto out;
        }
        *d = (struct dirtier){.s = &s, .index = i};
        int e = pthread_create(&s.vcpu[i], NULL, dirtier_main, d);
        if (e) {
            free(d);
            source_fail(&s, "pthread_create(vcpu)", e);
            goto out;
        }
        s.n_vcpus++;
    }
    int e = pthread_create(&demand, NULL, demand_server_main, &s);
    if (e) {
        source_fail(&s, "pthread_create(demand)", e);
        goto out;
    }
    demand_started = true;
    rc = serve(&s);
out:
    stop_dirtiers(&s);
    if (demand_started) {
        if (rc < 0)   /* unblock the demand server */
            shutdown(cfg->demand_fd, SHUT_RDWR);
        pthread_join(demand, NULL);
    }
    if (s.mem != MAP_FAILED && s.mem)
        munmap(s.mem, s.len);
    free(s.dirty);
    free(s.requested);
    return res->err ? -1 : rc;
}

/* === target ======================================================================== */

struct target;

struct vcpu {
    struct target *t;
    int index;
    pthread_t thread;
};

struct target {
    const struct mig_target_config *cfg;
    struct mig_target_result *res;
    size_t ps, len;
    char *plain, *reg;
    int uffd, stop_fd;
    uint8_t *stale, *state;
    int32_t go, abort;
    int64_t touched, vcpus_done;
    struct vcpu vcpu[MIG_MAX_VCPUS];
};

static int target_fail(struct target *t, const char *what, int e)
{
    return fail_into(&t->res->err, t->res->step, what, e);
}

/* After a failure: stop the vCPUs, unregister and wake every blocked thread. */
static void release(struct target *t)
{
    struct uffdio_range range = {.start = (uintptr_t)t->reg, .len = t->len};
    __atomic_store_n(&t->abort, 1, __ATOMIC_SEQ_CST);
    ioctl(t->uffd, UFFDIO_UNREGISTER, &range);
    ioctl(t->uffd, UFFDIO_WAKE, &range);
}

/* CONTINUE `page` (waking its waiters); EEXIST means already mapped: wake instead. */
static int continue_page(struct target *t, int64_t page, bool *mapped)
{
    struct uffdio_continue c = {
        .range = {.start = (uintptr_t)t->reg + (uint64_t)page * t->ps, .len = t->ps},
    };
    *mapped = true;
    if (ioctl(t->uffd, UFFDIO_CONTINUE, &c) == 0)
        return 0;
    if (errno != EEXIST)
        return errno;
    *mapped = false;
    __atomic_fetch_add(&t->res->eexist, 1, __ATOMIC_RELAXED);
    return ioctl(t->uffd, UFFDIO_WAKE, &c.range) ? errno : 0;
}

static int fetch_page(struct target *t, int64_t page)
{
    const struct mig_target_config *c = t->cfg;
    struct hdr h;
    int64_t start = now_ns();
    int err = send_msg(c->demand_fd, MSG_REQ, page, 0, NULL, 0, &t->res->bytes_demand);
    if (err)
        return target_fail(t, "send(page request)", err);
    err = recv_hdr(c->demand_fd, &h, c->delay_ns);
    if (!err && (h.type != MSG_PAGE || h.page != page))
        err = EPROTO;
    if (!err)
        err = recv_all(c->demand_fd, t->plain + (size_t)page * t->ps, t->ps);
    if (err)
        return target_fail(t, "recv(demand page)", err);
    t->res->bytes_demand += (int64_t)(sizeof h + t->ps);
    int64_t took = now_ns() - start;
    t->res->demand_fetch_total_ns += took;
    if (took > t->res->demand_fetch_max_ns)
        t->res->demand_fetch_max_ns = took;
    return 0;
}

static int handle_fault(struct target *t, uint64_t addr)
{
    struct mig_target_result *res = t->res;
    int64_t page = (int64_t)((addr - (uintptr_t)t->reg) / t->ps);
    uint8_t unclaimed = PAGE_UNCLAIMED;
    bool mapped;
    int err;

    if (addr < (uintptr_t)t->reg || page >= t->cfg->pages)
        return target_fail(t, "fault outside the guest memory", EFAULT);
    res->messages++;
    if (!t->stale[page]) {
        res->fresh++;
    } else if (__atomic_compare_exchange_n(&t->state[page], &unclaimed, PAGE_DEMAND, false,
                                           __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
        if (fetch_page(t, page) < 0)
            return -1;
        res->demand_fetched++;
    } else {
        /* The prefetcher claimed it: its CONTINUE, after the page is written, wakes us. */
        res->prefetch_waits++;
        return 0;
    }
    if ((err = continue_page(t, page, &mapped)))
        return target_fail(t, "UFFDIO_CONTINUE (demand)", err);
    res->handler_continues += mapped;
    __atomic_store_n(&t->state[page], PAGE_MAPPED, __ATOMIC_SEQ_CST);
    return 0;
}

static void *handler_main(void *arg)
{
    struct target *t = arg;
    struct pollfd pfd[2] = {{.fd = t->uffd, .events = POLLIN}, {.fd = t->stop_fd, .events = POLLIN}};
    struct uffd_msg m;
    int rc = 0;

    pthread_setname_np(pthread_self(), "mig-handler");
    t->res->handler_tid = gettid();
    while (rc == 0) {
        if (poll(pfd, 2, -1) < 0) {
            rc = errno == EINTR ? 0 : target_fail(t, "poll(uffd)", errno);
        } else if (pfd[0].revents & POLLIN) {
            ssize_t n = read(t->uffd, &m, sizeof m);
            if (n == (ssize_t)sizeof m && m.event == UFFD_EVENT_PAGEFAULT)
                rc = handle_fault(t, m.arg.pagefault.address & ~(uint64_t)(t->ps - 1));
            else if (n < 0 && errno != EAGAIN)
                rc = target_fail(t, "read(uffd)", errno);
        } else if (pfd[0].revents & (POLLERR | POLLNVAL)) {
            rc = target_fail(t, "poll(uffd)", EBADF);
        } else if (pfd[1].revents) {
            rc = 1;
        }
    }
    if (rc < 0)
        release(t);
    return NULL;
}

/* Receive pushed stale pages; map each one the demand handler has not claimed. */
static void *prefetch_main(void *arg)
{
    struct target *t = arg;
    const struct mig_target_config *c = t->cfg;
    struct mig_target_result *res = t->res;
    char *scratch = malloc(t->ps);
    struct hdr h;
    int err = scratch ? 0 : ENOMEM;

    pthread_setname_np(pthread_self(), "mig-prefetch");
    res->prefetch_tid = gettid();
    while (!err && !(err = recv_hdr(c->ctl_fd, &h, c->delay_ns)) && h.type != MSG_PUSH_END) {
        uint8_t unclaimed = PAGE_UNCLAIMED;
        bool mapped;
        if (h.type != MSG_PAGE || h.page < 0 || h.page >= c->pages) {
            err = EPROTO;
            break;
        }
        res->bytes_push += (int64_t)(sizeof h + t->ps);
        if (!t->stale[h.page] || !__atomic_compare_exchange_n(
                &t->state[h.page], &unclaimed, PAGE_PREFETCH, false, __ATOMIC_SEQ_CST,
                __ATOMIC_SEQ_CST)) {
            err = recv_all(c->ctl_fd, scratch, t->ps);   /* the demand handler has it */
            res->prefetch_discarded++;
            continue;
        }
        if ((err = recv_all(c->ctl_fd, t->plain + (size_t)h.page * t->ps, t->ps)))
            break;
        if ((err = continue_page(t, h.page, &mapped))) {
            target_fail(t, "UFFDIO_CONTINUE (prefetch)", err);
            break;
        }
        __atomic_store_n(&t->state[h.page], PAGE_MAPPED, __ATOMIC_SEQ_CST);
        res->prefetched++;
    }
    if (err) {
        target_fail(t, "prefetch stream", err);
        release(t);
    } else {
        res->bytes_push += (int64_t)sizeof h;
    }
    free(scratch);
    return NULL;
}

/* Touch every page of this vCPU's share once, timing each touch. */
static void *vcpu_main(void *arg)
{
    struct vcpu *v = arg;
    struct target *t = v->t;
    const struct mig_target_config *c = t->cfg;
    int64_t lo = c->pages * v->index / c->vcpus, hi = c->pages * (v->index + 1) / c->vcpus;
    int64_t *order = touch_order(c->pattern, lo, hi, c->seed + (uint64_t)v->index + 1);
    int64_t total = 0, worst = 0;
    char name[16];

    snprintf(name, sizeof name, "mig-vcpu%d", v->index);
    pthread_setname_np(pthread_self(), name);
    t->res->vcpu_tid[v->index] = gettid();
    if (!order)
        target_fail(t, "malloc(touch order)", ENOMEM);
    gate_wait(&t->go);
    for (int64_t i = 0; order && i < hi - lo && !__atomic_load_n(&t->abort, __ATOMIC_RELAXED); i++) {
        volatile uint64_t *w = (volatile uint64_t *)(t->reg + (size_t)order[i] * t->ps);
        int64_t start = now_ns();
        (void)*w;
        int64_t took = now_ns() - start;
        total += took;
        worst = took > worst ? took : worst;
        __atomic_fetch_add(&t->touched, 1, __ATOMIC_RELAXED);
    }
    int64_t end = now_ns(), seen = __atomic_load_n(&t->res->end_ns, __ATOMIC_RELAXED);
    while (end > seen && !__atomic_compare_exchange_n(&t->res->end_ns, &seen, end, false,
                                                      __ATOMIC_SEQ_CST, __ATOMIC_RELAXED))
        ;   /* end_ns = when the last vCPU finished */
    t->res->vcpu_stall_ns[v->index] = total;
    t->res->vcpu_max_stall_ns[v->index] = worst;
    __atomic_fetch_add(&t->vcpus_done, 1, __ATOMIC_SEQ_CST);
    free(order);
    return NULL;
}

static int setup_uffd(struct target *t)
{
    uint64_t feature = t->cfg->backing == MIG_HUGETLB ? UFFD_FEATURE_MINOR_HUGETLBFS
                                                      : UFFD_FEATURE_MINOR_SHMEM;
    struct uffdio_api api = {.api = UFFD_API, .features = feature | UFFD_FEATURE_THREAD_ID};
    struct uffdio_register reg = {
        .range = {.start = (uintptr_t)t->reg, .len = t->len},
        .mode = UFFDIO_REGISTER_MODE_MINOR,
    };

    t->uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
    if (t->uffd < 0)
        return target_fail(t, "userfaultfd", errno);
    if (ioctl(t->uffd, UFFDIO_API, &api) < 0)
        return target_fail(t, "UFFDIO_API", errno);
    if (ioctl(t->uffd, UFFDIO_REGISTER, &reg) < 0)
        return target_fail(t, "UFFDIO_REGISTER", errno);
    return 0;
}

/* Precopy rounds until converged or the round limit, then switch over and take the map. */
static int precopy(struct target *t)
{
    const struct mig_target_config *c = t->cfg;
    struct mig_target_result *res = t->res;
    struct hdr h;
    int err;

    res->precopy_start_ns = now_ns();
    bool rounds = c->max_rounds > 0;
    err = send_msg(c->ctl_fd, rounds ? MSG_ROUND : MSG_SWITCH, 0, c->prefetch, NULL, 0,
                   rounds ? &res->bytes_precopy : &res->bytes_switch);
    if (!rounds)
        res->switch_ns = now_ns();
    while (!err && !(err = recv_hdr(c->ctl_fd, &h, c->delay_ns))) {
        if (h.type == MSG_PAGE && h.page >= 0 && h.page < c->pages) {
            err = recv_all(c->ctl_fd, t->plain + (size_t)h.page * t->ps, t->ps);
            res->bytes_precopy += (int64_t)(sizeof h + t->ps);
        } else if (h.type == MSG_ROUND_END) {
            res->bytes_precopy += (int64_t)sizeof h;
            bool again = ++res->rounds < c->max_rounds && h.arg > c->converge_pages;
            err = send_msg(c->ctl_fd, again ? MSG_ROUND : MSG_SWITCH, 0, c->prefetch, NULL, 0,
                           again ? &res->bytes_precopy : &res->bytes_switch);
            if (!again)
                res->switch_ns = now_ns();
        } else if (h.type == MSG_STALE_MAP) {
            res->pause_ns = h.arg;
            err = recv_all(c->ctl_fd, t->stale, (size_t)c->pages);
            res->bytes_switch += (int64_t)(sizeof h + (size_t)c->pages);
            for (int64_t p = 0; !err && p < c->pages; p++)
                res->stale_pages += t->stale[p] != 0;
            return err ? target_fail(t, "recv(stale map)", err) : 0;
        } else {
            err = EPROTO;
        }
    }
    return target_fail(t, "precopy", err);
}

/* Wait for the vCPUs, watching for a stall (a hung handler or a dead source). */
static void watch_vcpus(struct target *t)
{
    int64_t last = -1, since = now_ns();
    while (__atomic_load_n(&t->vcpus_done, __ATOMIC_SEQ_CST) < t->cfg->vcpus) {
        poll(NULL, 0, WATCH_MS);
        int64_t touched = __atomic_load_n(&t->touched, __ATOMIC_RELAXED);
        if (touched != last) {
            last = touched;
            since = now_ns();
        } else if (now_ns() - since > t->cfg->stall_timeout_ns && !t->abort) {
            target_fail(t, "vCPUs stalled (no page arrived)", ETIMEDOUT);
            release(t);
        }
    }
}

static int postcopy(struct target *t)
{
    const struct mig_target_config *c = t->cfg;
    pthread_t handler, prefetcher;
    int started = 0, e;
    uint64_t one = 1;

    if ((e = pthread_create(&handler, NULL, handler_main, t)))
        return target_fail(t, "pthread_create(handler)", e);
    if (c->prefetch && (e = pthread_create(&prefetcher, NULL, prefetch_main, t))) {
        target_fail(t, "pthread_create(prefetcher)", e);
        release(t);
    }
    for (; started < c->vcpus; started++) {
        t->vcpu[started] = (struct vcpu){.t = t, .index = started};
        if ((e = pthread_create(&t->vcpu[started].thread, NULL, vcpu_main, &t->vcpu[started]))) {
            target_fail(t, "pthread_create(vcpu)", e);
            __atomic_store_n(&t->abort, 1, __ATOMIC_SEQ_CST);
            __atomic_store_n(&t->vcpus_done, c->vcpus - started, __ATOMIC_SEQ_CST);
            break;
        }
    }
    t->res->resume_ns = now_ns();
    gate_open(&t->go);
    watch_vcpus(t);
    for (int i = 0; i < started; i++)
        pthread_join(t->vcpu[i].thread, NULL);
    if (c->prefetch) {
        if (t->res->err)   /* unblock the prefetcher's recv */
            shutdown(c->ctl_fd, SHUT_RDWR);
        pthread_join(prefetcher, NULL);
    }
    if (write(t->stop_fd, &one, sizeof one) != sizeof one)
        target_fail(t, "write(stop eventfd)", errno);
    pthread_join(handler, NULL);
    return t->res->err ? -1 : 0;
}

int mig_target_run(const struct mig_target_config *cfg, struct mig_target_result *res)
{
    struct target t = {.cfg = cfg, .res = res, .ps = (size_t)cfg->page_size, .uffd = -1,
                       .plain = MAP_FAILED, .reg = MAP_FAILED};
    int rc = -1;

    memset(res, 0, sizeof *res);
    res->memfd = -1;
    t.len = t.ps * (size_t)cfg->pages;
    t.stop_fd = eventfd(0, EFD_CLOEXEC);
    int fd = open_memory(cfg->backing, t.len);
    if (fd < 0) {
        target_fail(&t, "memfd_create/fallocate", -fd);
        goto out;
    }
    res->memfd = fd;
    t.plain = mmap(NULL, t.len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    t.reg = mmap(NULL, t.len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    t.stale = calloc((size_t)cfg->pages, 1);
    t.state = calloc((size_t)cfg->pages, 1);
    if (t.stop_fd < 0 || t.plain == MAP_FAILED || t.reg == MAP_FAILED || !t.stale || !t.state) {
        target_fail(&t, "set-up (eventfd/mmap/calloc)", errno ? errno : ENOMEM);
        goto out;
    }
    if (setup_uffd(&t) < 0 || precopy(&t) < 0)
        goto out;
    if (postcopy(&t) < 0)
        goto out;
    shutdown(cfg->demand_fd, SHUT_WR);   /* the source's demand server ends */
    int err = send_msg(cfg->ctl_fd, MSG_DONE, 0, 0, NULL, 0, &res->bytes_switch);
    rc = err ? target_fail(&t, "send(done)", err) : 0;
out:
    if (t.uffd >= 0)
        close(t.uffd);
    if (t.stop_fd >= 0)
        close(t.stop_fd);
    if (t.plain != MAP_FAILED)
        munmap(t.plain, t.len);
    if (t.reg != MAP_FAILED)
        munmap(t.reg, t.len);
    free(t.stale);
    free(t.state);
    return res->err ? -1 : rc;
}
