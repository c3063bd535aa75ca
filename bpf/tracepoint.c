// uffdtrace tracepoint backend: userfaultfd fault timelines from raw tracepoints only.
//
// Loaded by uffdtrace/probes/tracepoint.py, which defines at compile time:
//   TASK_PID_OFF, TASK_TGID_OFF,  offsets in struct task_struct, read from the running
//   TASK_STATE_OFF, TASK_MM_OFF,  kernel's BTF (headers here are for another kernel), and
//   TASK_FILES_OFF, FILES_FDT_OFF, the offsets on the way from an fd to its userfaultfd
//   FDT_MAX_FDS_OFF, FDT_FD_OFF,   context (file -> f_op -> unlocked_ioctl tells a uffd, its
//   FILE_F_OP_OFF, FILE_PRIVATE_OFF, private_data is the context, ctx->mm the address space
//   FOPS_IOCTL_OFF, UCTX_MM_OFF    whose faults it handles)
//   HUF_START, HUF_END            [start, end) of handle_userfault, from /proc/kallsyms
//   UWAKE_START, UWAKE_END        [start, end) of userfaultfd_wake_function
//   IRQENTRY_START, IRQENTRY_END  the interrupt entry stubs (__irqentry_text_start/_end)
//   UIOCTL_START, UIOCTL_END      [start, end) of userfaultfd_ioctl (a uffd file's unlocked_ioctl)
//   FULL_MODE                     also trace uffd ioctls (raw sys_enter/exit); message reads are
//                                 traced in both modes (raw sys_exit), except by the kprobe
//                                 backends' light mode, whose hooks see handle_userfault itself
//   MAPPINGS_TRACEPOINT           maple_tree:ma_write exists (Linux 6.1+): mapping generations
//   STATS_MODE                    --mode stats (with FULL_MODE): faults and ioctls are added
//                                 to aggregates (fault_stats per CPU, ioctl_stats shared),
//                                 not sent
//   STATS_PER_THREAD              ... one aggregate per thread (the vcpu label), not per process
//   STATS_KEYS                    ... at most this many aggregates of each kind
//   DISCOVER_UFFDS                a process that sets up a userfaultfd (UFFDIO_API) is traced
//   TRACE_ALL                     every process instead of the `tracked` set
//   FOLLOW_CHILDREN               children of tracked processes become tracked
//   RINGBUF_PAGES, MAX_THREADS    sizes
//   KPROBE_BACKEND                bpf/kprobe.c is appended: kernel-function hooks refine the
//                                 timeline (no stack sampling)
//   IOCTL_KPROBE                  uffd ioctls come from userfaultfd_ioctl's hooks (bpf/kprobe.c)
//
// Per fault of a tracked thread T (state in `inflight`, keyed by tid; a thread's entry lives
// from its first fault to its exit and is reused, F_ACTIVE while a fault is in flight):
//   page_fault_user                          -> fault_ns, address, error code (comm and
//                                               address space are taken at T's first fault,
//                                               and again when T is renamed, as exec does)
//   sched_waking in T's context              -> T notified a handler (handle_userfault's wake_up_poll)
//   sched_switch, T switched out             -> block_ns (asleep in handle_userfault, or preempted
//                                               right after notifying)
//   sched_waking of T                        -> wake_ns, the waker; in FULL_MODE the waker's
//                                               in-flight uffd ioctl (which CONTINUE/COPY/WAKE)
//   sched_switch, T switched in              -> resume_ns (again if T is switched out before
//                                               it leaves the fault, e.g. preempted in the retry)
//   rseq_update, T back to user space        -> return_ns: the FAULT record
// Without a return to user space seen, the record goes out once the fault has certainly
// ended: at T's next fault, when T is switched out outside the fault, or at T's exit (user
// space collects the rest at the end). A wakeup that lands before T switched out resumes it
// at once (resume = wake). A fault whose message a handler read but that was mapped before T
// slept (no switch, no wakeup: only the read shows it) is recorded too, without resume.
//
// Flags of a thread's state are changed from several CPUs at once (T's own, its waker's, the
// message reader's), so every change to them is an atomic OR / AND.
//
// No per-fault kernel stacks (they cost ~0.7 us each here): one stack is sampled per
// (process, 2 MiB region, generation of the process's mappings), the first time a fault there
// is seen inside handle_userfault (T notifying its handler, or switched out), and user space
// classifies the caller of handle_userfault (hugetlb / shmem / anon path) from it. The
// generation changes whenever the process's mappings do (ma_write), so memory mapped anew at
// the same addresses is classified anew.

#include <uapi/linux/ptrace.h>

#include "records.h"  // the records sent to user space, their flags and constants

#define TASK_INTERRUPTIBLE 1

// Handlers' reads of uffd messages. A fault mapped before its thread went to sleep fires no
// scheduler event: the read is the only trace of it, so the tracepoint backend needs them in
// both modes. The kprobe backends' handle_userfault hook sees such faults by itself.
#if defined(FULL_MODE) || !defined(KPROBE_BACKEND)
#define TRACE_READS
#endif

// Which in-flight faults are uffd faults, and get a record when they end.
#ifdef KPROBE_BACKEND
#define F_RECORDED F_UFFD             // handle_userfault itself says so
#define F_RECORDED_AT_EXIT F_UFFD
#else
#define F_RECORDED (F_WOKEN | F_MSG)  // woken inside the fault, or its message read
// At exit, still inside the fault: it slept in handle_userfault's state, was woken there or
// had its message read. (A notify alone proves nothing: an ordinary fault may wake a task.)
#define F_RECORDED_AT_EXIT (F_RECORDED | F_SLEPT)
#endif

struct fault_state {
    u64 fault_ns, block_ns, wake_ns, resume_ns, return_ns, msg_ns, ioctl_enter_ns;
    u64 addr, error_code, msg_flags;
    u64 regs, ip;  // T's saved user registers and the faulting instruction
    u64 reason;    // handle_userfault's reason (KPROBE_BACKEND)
    u64 sampled;   // 1 + the last 2 MiB region of T's seen in `regions` (kept across faults)
    u32 gen;       // ... under this generation of T's process's mappings
    u64 seq;       // ... checked when `mappings_changed` was this (kept across faults)
#ifdef STATS_MODE
    u64 path[3];   // ... whose stack's callers of handle_userfault are these (kept across faults)
#endif
    u64 mm;        // T's address space (kept across faults)
    u64 flags;     // F_*, changed with atomics only (several CPUs write them)
    u32 tgid, waker_pid, waker_tid, notify_tid, msg_tid;
    u8 ioctl_nr;
    char comm[16];
};

struct ioctl_state {
    u64 enter_ns, arg, start, len, mode, mm;
    u64 mfill_enter_ns, mfill_ns, install_enter_ns, install_ns;  // KPROBE_BACKEND
    u32 cmd, woken;
    u16 flags;
    u8 install_depth;
    char comm[16];  // the thread's name, taken at its first uffd ioctl and on task_rename
};

struct region_key { u32 tgid; u32 gen; u64 region; };
struct region_stack { u64 frames[6]; };  // callers of handle_userfault, innermost first

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_PERCPU_ARRAY(lost, u64, LOST_REASONS);
BPF_HASH(tracked, u32, u8, 65536);                      // tgid -> ROLE_*
BPF_HASH(inflight, u32, struct fault_state, MAX_THREADS);
BPF_TABLE("lru_hash", struct region_key, struct region_stack, regions, 65536);
// tgid -> generation of its mappings: bumped when they change, so that a region mapped anew
// (other memory at the same addresses) is sampled anew.
BPF_TABLE("lru_hash", u32, u32, mapping_gen, 65536);
// Bumped with any traced process's generation: while it stays put, a thread's region is
// known to be sampled without a `mapping_gen` lookup.
BPF_ARRAY(mappings_changed, u64, 1);
BPF_HISTOGRAM(stall_hist, int, 64);                     // log2 us buckets, QEMU-style
BPF_HISTOGRAM(continue_hist, int, 64);
BPF_HASH(uffd_events, u64, u64, 4096);                  // (tgid << 32 | event) -> count (TRACE_READS)
#ifdef STATS_MODE
// Preallocated, so an insert never fails for want of memory while short-lived processes come
// and go faster than the allocator refills. Faults: per CPU (keys x CPUs x 448 bytes), as a
// process's threads fault on every CPU at once. Ioctls come from a few handler threads: one
// shared value each, added to atomically, and four times the keys (a short-lived process
// leaves a REGISTER, a resolving ioctl, maybe an error).
BPF_TABLE("percpu_hash", struct fault_stats_key, struct fault_stats, fault_stats, STATS_KEYS);
BPF_HASH(ioctl_stats, struct ioctl_stats_key, struct ioctl_stats, STATS_KEYS * 4);
BPF_PERCPU_ARRAY(blank_stats, struct fault_stats, 1);  // zeroes to insert (too big for the stack)
#endif
#ifdef DISCOVER_UFFDS
struct comm { char comm[16]; };
BPF_HASH(discovered_comms, u32, struct comm, 65536);  // tgid -> its name when discovered
#endif

// Which threads may have an `inflight` entry, one bit per tid (PID_MAX_LIMIT is 2^22): set
// when the entry is made, cleared at the thread's exit. Scheduler events of every other task
// stop at their bit, before any hash lookup. (A bit left set, as user space's untrack leaves
// it, costs a lookup, nothing more.)
#define TID_WORDS ((1 << 22) / 64)
BPF_ARRAY(has_state, u64, TID_WORDS);

static __always_inline u64 *state_word(u32 tid) {
    u32 word = tid / 64;
    return has_state.lookup(&word);
}

// The fault state of thread tid, if it has one.
static __always_inline struct fault_state *state_of(u32 tid) {
    u64 *bits = state_word(tid);
    if (!bits || !(*bits & (1ULL << (tid % 64))))
        return NULL;
    return inflight.lookup(&tid);
}

static __always_inline void count_lost(int reason) {
    u64 *n = lost.lookup(&reason);
    if (n)
        (*n)++;
}

// A zeroed record from (tgid, tid) whose type the caller sets, or NULL (counted) when the ring
// buffer is full. Every record takes a union record: one stride for user space.
static __always_inline union record *new_record(u32 tgid, u32 tid) {
    union record *r = events.ringbuf_reserve(sizeof(union record));
    if (!r) {
        count_lost(LOST_RINGBUF);
        return NULL;
    }
    __builtin_memset(r, 0, sizeof(*r));
    r->fault.pid = tgid;  // at the same offsets in both records
    r->fault.tid = tid;
    return r;
}

static __always_inline int log2_us_slot(u64 ns) {
    u64 us = ns / 1000;
    return us ? (int)bpf_log2l(us) - 1 : 0;  // bucket N holds [2^N, 2^(N+1)) us
}

static __always_inline bool is_tracked(u32 tgid) {
#ifdef TRACE_ALL
    return tgid != 0;
#else
    return tracked.lookup(&tgid) != NULL;
#endif
}

#ifdef DISCOVER_UFFDS
// A handler that joined through a discovered process not confirmed yet -> that process: user
// space confirms or refuses it with that process.
BPF_HASH(handler_of, u32, u32, 65536);
#endif

#ifndef TRACE_ALL
// A process handling a fault of process `of` becomes traced. (Looked up before any insert: an
// insert takes the bucket lock even when the key is there.)
static __always_inline void track_handler(u32 tgid, u32 of) {
    if (tgid == of || tracked.lookup(&tgid))
        return;  // traced already (a thread of the same process, most often)
    u8 *role = tracked.lookup(&of);
    if (!role)
        return;  // `of` is not traced (any more): a fault still in flight when it was let go
#ifdef DISCOVER_UFFDS
    if (*role == ROLE_DISCOVERED) {
        u8 pending = ROLE_PENDING_HANDLER;
        if (!tracked.insert(&tgid, &pending))
            handler_of.update(&tgid, &of);
        return;
    }
#endif
    u8 handler = ROLE_HANDLER;
    tracked.insert(&tgid, &handler);  // no-op if another CPU just did
}
#endif

static __always_inline u32 task_field(struct task_struct *t, int off) {
    u32 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), (char *)t + off);
    return v;
}

static __always_inline bool is_active(struct fault_state *st) {
    return st && (st->flags & F_ACTIVE);
}

static __always_inline void set_flags(struct fault_state *st, u64 f) {
    __sync_fetch_and_or(&st->flags, f);
}

static __always_inline void clear_flags(struct fault_state *st, u64 f) {
    __sync_fetch_and_and(&st->flags, ~f);
}

static __always_inline u64 read_ptr(void *base, int off) {
    u64 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), (char *)base + off);
    return v;
}

// The address space a userfaultfd context serves.
static __always_inline u64 uffd_mm(u64 ctx) {
    return ctx ? read_ptr((void *)ctx, UCTX_MM_OFF) : 0;
}

// Two 8-byte fields of one kernel object at offsets a and b: one probe read when b is close after a
// (a probe read costs as much as a hash lookup here). a and b are compile-time constants.
static __always_inline void read_two(void *base, int a, int b, u64 *va, u64 *vb) {
    if (a < b && b - a < 64 && (b - a) % 8 == 0) {
        u64 span[8] = {};
        bpf_probe_read_kernel(span, b - a + 8, (char *)base + a);
        *va = span[0];
        *vb = span[(b - a) / 8];
    } else {
        *va = read_ptr(base, a);
        *vb = read_ptr(base, b);
    }
}

// userfaultfd_fops, once a file has shown it is a uffd's (not in kallsyms without
// CONFIG_KALLSYMS_ALL): then a file is known by its f_op alone.
BPF_ARRAY(uffd_fops, u64, 1);

// The userfaultfd context behind the current task's fd, or 0 when fd is not a userfaultfd:
// asked of the kernel at each use, so closed, reused, dup'ed, inherited and received fds are
// all seen as they are now.
static __always_inline u64 uffd_of_fd(u32 fd) {
    void *task = (void *)bpf_get_current_task();
    void *fdt = (void *)read_ptr((void *)read_ptr(task, TASK_FILES_OFF), FILES_FDT_OFF);
    if (!fdt)
        return 0;
    u64 max_fds, fds;  // max_fds is an unsigned int: the low half of its 8 bytes
    read_two(fdt, FDT_MAX_FDS_OFF, FDT_FD_OFF, &max_fds, &fds);
    if (fd >= (u32)max_fds)
        return 0;
    void *file = (void *)read_ptr((void *)fds, fd * 8);
    if (!file)
        return 0;
    u64 fops, private;
    read_two(file, FILE_F_OP_OFF, FILE_PRIVATE_OFF, &fops, &private);
    int zero = 0;
    u64 *known = uffd_fops.lookup(&zero);
    if (!fops || !known)
        return 0;
    if (fops != *known) {
        if (read_ptr((void *)fops, FOPS_IOCTL_OFF) != UIOCTL_START)
            return 0;
        *known = fops;
    }
    return private;
}

static __always_inline void emit_fault(struct fault_state *st, u32 pid, u32 tid, bool returning);

#ifdef TRACE_READS
// Fault messages that named no thread (handlers without UFFD_FEATURE_THREAD_ID), or none in
// flight, held by (address space, address as the message gives it) until a fault of that page
// ends and claims them: a message read after the fault began is that fault's.
struct loose_key { u64 mm, addr; };
struct loose_msg { u64 msg_ns, flags; u32 reader_tid; };
BPF_TABLE("lru_hash", struct loose_key, struct loose_msg, loose_msgs, 65536);
enum loose_counter { LOOSE_HELD = 0, LOOSE_CLAIMED = 1 };
BPF_ARRAY(loose, u64, 2);  // messages held now (checked before any lookup), claimed so far

static __always_inline void count_loose(int which, s64 delta) {
    u64 *n = loose.lookup(&which);
    if (n)
        __sync_fetch_and_add(n, delta);
}

// st's fault has ended: give it its held message, if one was read while it was in flight.
static __always_inline void claim_msg(struct fault_state *st) {
    int held = LOOSE_HELD;
    u64 *n = loose.lookup(&held);
    if (!n || !*n || (st->flags & F_MSG))
        return;
    // the message names the base page, the huge page, or (UFFD_FEATURE_EXACT_ADDRESS) the address
    u64 addrs[3] = {st->addr & ~0xfffULL, st->addr & ~0x1fffffULL, st->addr};
#pragma unroll
    for (int i = 0; i < 3; i++) {
        struct loose_key key = {.mm = st->mm, .addr = addrs[i]};
        struct loose_msg *m = loose_msgs.lookup(&key);
        if (!m || m->msg_ns < st->fault_ns)
            continue;
        struct loose_msg msg = *m;
        if (loose_msgs.delete(&key))
            continue;  // claimed by another CPU meanwhile
        count_loose(LOOSE_HELD, -1);
        count_loose(LOOSE_CLAIMED, 1);
        st->msg_ns = msg.msg_ns;
        st->msg_flags = msg.flags;
        st->msg_tid = msg.reader_tid;
        set_flags(st, F_MSG);
        return;
    }
}
#else
static __always_inline void claim_msg(struct fault_state *st) {}
#endif

// st's fault has ended: is it one to record?
static __always_inline bool ended_recorded(struct fault_state *st) {
    claim_msg(st);
    return st->flags & F_RECORDED;
}

// page fault in user mode: (unsigned long address, struct pt_regs *regs, unsigned long error_code)
RAW_TRACEPOINT_PROBE(page_fault_user) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    // A thread with an entry is tracked: one lookup for the common case.
    struct fault_state *prev = state_of(tid);
    if (!prev && !is_tracked(id >> 32))
        return 0;
    struct fault_state st = {.fault_ns = bpf_ktime_get_ns(), .flags = F_ACTIVE};
    if (prev) {
        if (is_active(prev) && ended_recorded(prev))
            emit_fault(prev, id >> 32, tid, false);  // a new fault: the last one has certainly ended
        st.sampled = prev->sampled;
        st.gen = prev->gen;
        st.seq = prev->seq;
#ifdef STATS_MODE
        __builtin_memcpy(st.path, prev->path, sizeof(st.path));
#endif
        __builtin_memcpy(st.comm, prev->comm, sizeof(st.comm));  // kept up by task_rename
        st.mm = prev->mm;
    } else {
        bpf_get_current_comm(&st.comm, sizeof(st.comm));
        st.mm = read_ptr((void *)bpf_get_current_task(), TASK_MM_OFF);
    }
    st.tgid = id >> 32;
    st.addr = ctx->args[0];
    st.error_code = ctx->args[2];
    st.regs = ctx->args[1];
    bpf_probe_read_kernel(&st.ip, sizeof(st.ip), &((struct pt_regs *)st.regs)->ip);
    if (prev) {
        *prev = st;  // in place: no map update on the hot path
        return 0;
    }
    u64 *bits = state_word(tid);
    if (inflight.update(&tid, &st))
        count_lost(LOST_INFLIGHT_FULL);
    else if (bits)
        __sync_fetch_and_or(bits, 1ULL << (tid % 64));
    return 0;
}

// Is T still inside the fault recorded in st? A normal fault leaves no trace when it ends, so
// check T's saved user registers: during the exception they hold the faulting ip and orig_ax
// is -1 (the entry code moved the error code out); in a later syscall they hold the syscall's
// ip and number.
static __always_inline bool still_in_fault(struct fault_state *st) {
    struct pt_regs *regs = (struct pt_regs *)st->regs;
    u64 orig_ax_ip[2] = {};  // adjacent in struct pt_regs: one read
    bpf_probe_read_kernel(orig_ax_ip, sizeof(orig_ax_ip), &regs->orig_ax);
    return orig_ax_ip[1] == st->ip && orig_ax_ip[0] == (u64)-1;
}

#define STACK_FRAMES 16
#define WAKER_FRAMES 12  // a uffd wakeup's frames are few (and fewer keep the verifier's work down)

// The current kernel stack, innermost first, into stack[frames]; the number of frames.
// (A stack costs ~0.7 us: taken on rare paths only.)
static __always_inline int kernel_stack(void *ctx, u64 *stack, int frames) {
    long bytes = bpf_get_stack(ctx, stack, frames * sizeof(u64), 0);
    return bytes > 0 ? (u64)bytes / 8 : 0;
}

// The index of handle_userfault's frame in stack, or -1.
static __always_inline int huf_frame(u64 *stack, int n) {
    int found = -1;
#pragma unroll
    for (int i = 0; i < STACK_FRAMES; i++) {
        if (found < 0 && i < n && stack[i] >= HUF_START && stack[i] < HUF_END)
            found = i;
    }
    return found;
}

// Make sure T's fault region has a sampled stack; in T's context, inside its fault. st->gen and
// st->sampled name a `regions` entry that exists (the record's key), or are left as they were.
static __always_inline void sample_region(void *ctx, struct fault_state *st) {
    u64 region = st->addr >> 21;
    int zero = 0;
    u64 *changed = mappings_changed.lookup(&zero);
    u64 seq = changed ? *changed : 0;
    if (st->sampled == region + 1 && st->seq == seq)
        return;  // no process's mappings changed since T's region was checked
    u32 *current_gen = mapping_gen.lookup(&st->tgid);
    u32 gen = current_gen ? *current_gen : 0;
    if (st->sampled == region + 1 && st->gen == gen) {
        st->seq = seq;
        return;
    }
    struct region_key key = {.tgid = st->tgid, .gen = gen, .region = region};
    struct region_stack *found_rs = regions.lookup(&key);
    if (!found_rs) {
        u64 stack[STACK_FRAMES] = {};
        int n = kernel_stack(ctx, stack, STACK_FRAMES);
        int found = huf_frame(stack, n);
        if (found < 0)
            return;  // not in handle_userfault (e.g. waiting for a lock in the retry): no sample
        struct region_stack rs = {};
#pragma unroll
        for (int j = 0; j < 6; j++) {
            int i = found + 1 + j;
            if (i < STACK_FRAMES && i < n)
                rs.frames[j] = stack[i];
        }
        if (regions.update(&key, &rs))
            return;
#ifdef STATS_MODE
        __builtin_memcpy(st->path, rs.frames, sizeof(st->path));
#endif
    } else {
#ifdef STATS_MODE
        __builtin_memcpy(st->path, found_rs->frames, sizeof(st->path));
#endif
    }
    st->gen = gen;
    st->sampled = region + 1;
    st->seq = seq;
}

// The end of st's stall. `returning`: T is on its way back to user space now; taken after the
// record is written, so that the stall includes that work, which T waits for too.
static __always_inline void end_stall(struct fault_state *st, bool returning) {
    if (returning)
        st->return_ns = bpf_ktime_get_ns();
    u64 end = st->return_ns ? st->return_ns : st->resume_ns;
    if (end)
        stall_hist.increment(log2_us_slot(end - st->fault_ns));
}

// The FAULT record of st. (One NULL check of the record only: Linux 6.1's verifier cannot
// tell that a reserved record checked once is not NULL, and then sees it leak.)
#ifdef STATS_MODE
static __always_inline int stats_slot(u64 ns) {
    int slot = log2_us_slot(ns);
    return slot < STATS_BUCKETS ? slot : STATS_BUCKETS - 1;
}

// What st's fault is aggregated by (struct fault_stats_key in records.h).
static __always_inline void fault_stats_key(struct fault_state *st, u32 pid, u32 tid,
                                            struct fault_stats_key *key) {
    key->pid = pid;
#ifdef STATS_PER_THREAD
    key->tid = tid;
#endif
#ifdef KPROBE_BACKEND
    key->path[0] = st->reason;
    key->hooks = st->flags & (F_UFFD | F_HUGETLB | F_SHMEM);
#else
    if (st->sampled == (st->addr >> 21) + 1)  // the path sampled for this fault's region
        __builtin_memcpy(key->path, st->path, sizeof(key->path));
#endif
    if (st->flags & F_MSG)
        key->kind = st->msg_flags & UFFD_PAGEFAULT_FLAG_MINOR ? KIND_MINOR
                  : st->msg_flags & UFFD_PAGEFAULT_FLAG_WP    ? KIND_WP
                                                              : KIND_MISSING;
    else if (st->error_code & 1)  // the page was present: a write-protect fault
        key->kind = KIND_WP;
}

// st's fault into its aggregate, with the durations pipeline._durations gives a row.
static __always_inline void add_fault_stats(struct fault_state *st, u32 pid, u32 tid) {
    struct fault_stats_key key = {};
    fault_stats_key(st, pid, tid, &key);
    struct fault_stats *v = fault_stats.lookup(&key);
    if (!v) {
        int zero = 0;
        struct fault_stats *blank = blank_stats.lookup(&zero);
        if (blank)
            fault_stats.insert(&key, blank);  // no-op if another CPU just inserted it
        v = fault_stats.lookup(&key);
        if (!v) {
            count_lost(LOST_STATS_FULL);
            return;
        }
        bpf_probe_read_kernel(v->comm, sizeof(v->comm), st->comm);
    }
    v->faults++;  // this CPU's value: no other CPU writes it
    u64 end = st->return_ns ? st->return_ns : st->resume_ns;
    if (end) {
        v->stall_ns += end - st->fault_ns;
        v->stall[stats_slot(end - st->fault_ns)]++;
    }
    if (st->resume_ns && st->wake_ns)
        v->wake_to_run[stats_slot(st->resume_ns - st->wake_ns)]++;
    if (st->msg_ns && st->block_ns && st->msg_ns >= st->block_ns)
        v->notify[stats_slot(st->msg_ns - st->block_ns)]++;
    if (st->ioctl_enter_ns && st->msg_ns && st->ioctl_enter_ns >= st->msg_ns)
        v->handler[stats_slot(st->ioctl_enter_ns - st->msg_ns)]++;
}
#endif

static __always_inline void emit_fault(struct fault_state *st, u32 pid, u32 tid, bool returning) {
#ifdef STATS_MODE
    end_stall(st, returning);
    add_fault_stats(st, pid, tid);
    return;
#endif
    union record *r = new_record(pid, tid);
    if (!r) {
        end_stall(st, returning);
        return;
    }
    struct fault_record *e = &r->fault;
    e->type = EV_FAULT;
    e->flags = st->flags & ~F_ACTIVE;
    e->waker_nr = st->ioctl_nr;
    e->waker_pid = st->waker_pid;
    e->waker_tid = st->waker_tid;
    e->notify_tid = st->notify_tid;
    e->gen = st->gen;
    e->fault_ns = st->fault_ns;
    e->block_ns = st->block_ns;
    e->wake_ns = st->wake_ns;
    e->resume_ns = st->resume_ns;
    e->msg_ns = st->msg_ns;
    e->waker_ioctl_ns = st->ioctl_enter_ns;
    e->addr = st->addr;
    e->error_code = st->error_code;
    e->msg_flags = st->msg_flags;
    e->msg_tid = st->msg_tid;
    e->reason = st->reason;
    e->mm = st->mm;
    __builtin_memcpy(e->comm, st->comm, sizeof(e->comm));
    end_stall(st, returning);
    e->return_ns = st->return_ns;
    events.ringbuf_submit(r, BPF_RB_NO_WAKEUP);
}

// (bool preempt, struct task_struct *prev, struct task_struct *next, unsigned int prev_state)
// Fires in prev's context.
RAW_TRACEPOINT_PROBE(sched_switch) {
    // Only tracked threads have in-flight state, so one lookup filters both prev and next.
    u64 id = bpf_get_current_pid_tgid();
    u32 prev_tid = (u32)id;
    struct fault_state *st = state_of(prev_tid);
    if (is_active(st)) {
        if (!still_in_fault(st)) {
            // The fault has ended (T is off CPU for something else now).
            if (ended_recorded(st))
                emit_fault(st, id >> 32, prev_tid, false);
            clear_flags(st, F_ACTIVE);
        } else if (st->flags & F_RESUMED) {
            set_flags(st, F_OFF_AGAIN);  // preempted or asleep again while retrying the fault
#ifndef KPROBE_BACKEND
            sample_region(ctx, st);  // keeps it only if in handle_userfault
#endif
        } else if (!(st->flags & F_WOKEN)) {
            // handle_userfault sets TASK_INTERRUPTIBLE before it notifies and sleeps, and
            // prev_state keeps it when T is preempted in between. A notify alone proves
            // nothing: another fault may wake a task (an I/O worker, kcompactd from an
            // interrupt), then sleep on I/O or a lock and be woken from there.
            bool uffd_state = (ctx->args[3] & 0xff) == TASK_INTERRUPTIBLE;
            bool slept = uffd_state && !ctx->args[0];
            if (uffd_state) {
                if (!st->block_ns)
                    st->block_ns = bpf_ktime_get_ns();
                set_flags(st, slept ? F_BLOCKED | F_SLEPT : F_BLOCKED);
#ifndef KPROBE_BACKEND
                sample_region(ctx, st);
#endif
            } else if ((ctx->args[3] & 0xff) && !ctx->args[0]) {
                set_flags(st, F_OTHER_SLEEP);
            }
        }
    }
    struct task_struct *next = (struct task_struct *)ctx->args[2];
    u32 next_tid = task_field(next, TASK_PID_OFF);
    st = state_of(next_tid);
    if (!is_active(st))
        return 0;
    if (st->flags & F_OTHER_SLEEP)
        clear_flags(st, F_OTHER_SLEEP);
    if (!(st->flags & (F_BLOCKED | F_OFF_AGAIN)))
        return 0;
    if (st->flags & F_WOKEN) {
        if (!(st->flags & F_RESUMED) || (st->flags & F_OFF_AGAIN))
            st->resume_ns = bpf_ktime_get_ns();
        set_flags(st, F_RESUMED);
        clear_flags(st, F_OFF_AGAIN);
    } else {
        // Back on the CPU without a wakeup (it had only been preempted): still in the fault,
        // and the next switch-out (its real sleep) marks it blocked again.
        clear_flags(st, F_BLOCKED);
    }
    return 0;
}

// Per-thread syscall state, like `inflight`: an entry lives until its thread exits and is
// reused (no map update on the hot path); enter_ns / fdkey 0 means nothing in flight.
#if defined(FULL_MODE) || defined(KPROBE_BACKEND)
#define TRACK_IOCTLS
BPF_HASH(ioctls, u32, struct ioctl_state, MAX_THREADS);  // tid -> uffd ioctl

static __always_inline struct ioctl_state *ioctl_in_flight(u32 tid) {
    struct ioctl_state *io = ioctls.lookup(&tid);
    return io && io->enter_ns ? io : NULL;
}
#endif

// Who is waking a thread, from the current kernel stack: a uffd ioctl (CONTINUE, COPY, WAKE...
// through userfaultfd_ioctl), the uffd's release (userfaultfd_wake_function without an ioctl:
// closed, or its last holder exited), or something else (a signal).
enum waker { WAKER_OTHER = 0, WAKER_RELEASE = 1, WAKER_IOCTL = 2 };
static __always_inline int uffd_waker(void *ctx) {
    u64 stack[WAKER_FRAMES] = {};
    int n = kernel_stack(ctx, stack, WAKER_FRAMES);
    bool wake = false, ioctl = false;
#pragma unroll
    for (int i = 0; i < WAKER_FRAMES; i++) {
        wake |= i < n && stack[i] >= UWAKE_START && stack[i] < UWAKE_END;
        ioctl |= i < n && stack[i] >= UIOCTL_START && stack[i] < UIOCTL_END;
    }
    return ioctl ? WAKER_IOCTL : wake ? WAKER_RELEASE : WAKER_OTHER;
}

// T, woken before it was seen to switch out: is this the wakeup of its uffd wait? It must be
// in the fault in handle_userfault's state (try_to_wake_up checked the state just before
// sched_waking). T may have left that state meanwhile by itself (it found the page mapped by
// the very ioctl now waking it, and set TASK_RUNNING): then only the waker's stack can tell.
static __always_inline bool woken_in_uffd_wait(void *ctx, struct task_struct *p,
                                               struct fault_state *st) {
    if ((st->flags & F_OTHER_SLEEP) || !still_in_fault(st))
        return false;
    u32 state = task_field(p, TASK_STATE_OFF);
    return state == TASK_INTERRUPTIBLE || (state == 0 && uffd_waker(ctx) != WAKER_OTHER);
}

// T, inside a fault, wakes a task of process `tgid`: handle_userfault notifying its handler,
// or an interrupt that came meanwhile (a timer waking any task on this CPU)? Tracing starts
// for the handler's process, so a process not traced yet is only taken on the evidence of the
// stack: handle_userfault's wake_up_poll, with no interrupt entry above it. (A stack: once
// per new handler process, and per interrupt wakeup of an untraced task.)
static __always_inline bool is_notify(void *ctx, u32 tgid) {
#ifdef TRACE_ALL
    return true;
#else
    if (is_tracked(tgid))
        return true;
    u64 stack[STACK_FRAMES] = {};
    int n = kernel_stack(ctx, stack, STACK_FRAMES);
    bool found = false, irq = false;
#pragma unroll
    for (int i = 0; i < STACK_FRAMES; i++) {
        if (!found && i < n) {
            found = stack[i] >= HUF_START && stack[i] < HUF_END;
            irq |= stack[i] >= IRQENTRY_START && stack[i] < IRQENTRY_END;
        }
    }
    return found && !irq;
#endif
}

// (struct task_struct *p). sched_waking, unlike sched_wakeup, always fires in the waker's
// context (a remote wakeup completes later, in an IPI on the wakee's CPU).
RAW_TRACEPOINT_PROBE(sched_waking) {
    u64 id = bpf_get_current_pid_tgid();
    u32 cur_tid = (u32)id;
    struct task_struct *p = (struct task_struct *)ctx->args[0];
    u32 p_tid = task_field(p, TASK_PID_OFF);

    // T waking a task from inside its fault: handle_userfault notifying a handler, which
    // sleeps interruptibly in read or poll (a kworker woken by I/O the fault issued is idle).
    struct fault_state *me = state_of(cur_tid);
    if (is_active(me) && !(me->flags & (F_NOTIFIED | F_BLOCKED | F_WOKEN)) && still_in_fault(me) &&
        (task_field(p, TASK_STATE_OFF) & 0xff) == TASK_INTERRUPTIBLE) {
        u32 p_tgid = task_field(p, TASK_TGID_OFF);
        if (is_notify(ctx, p_tgid)) {
            me->notify_tid = p_tid;
            set_flags(me, F_NOTIFIED);
#ifndef TRACE_ALL
            // The task waiting for this uffd's messages: its handler. Its process is traced
            // from this instant, before the handler can run (its read and ioctl of this very
            // fault included), wherever it lives.
            track_handler(p_tgid, me->tgid);
#endif
#ifndef KPROBE_BACKEND
            sample_region(ctx, me);  // keeps it only if in handle_userfault
#endif
        }
    }

    struct fault_state *st = state_of(p_tid);
    if (!is_active(st) || (st->flags & F_WOKEN))
        return 0;
    // Woken in the fault: after a block we saw, or (no switch-out yet) from handle_userfault's
    // TASK_INTERRUPTIBLE — not out of another kind of wait (a lock or I/O sleeps
    // uninterruptibly; sched_waking fires before the state changes).
    if (!(st->flags & F_BLOCKED) && !woken_in_uffd_wait(ctx, p, st))
        return 0;
    u64 now = bpf_ktime_get_ns();
    st->wake_ns = now;
    st->waker_pid = id >> 32;
    st->waker_tid = cur_tid;
    u64 woken_by = F_WOKEN;
#ifdef TRACK_IOCTLS
    struct ioctl_state *io = ioctl_in_flight(cur_tid);
    if (io) {
        st->ioctl_enter_ns = io->enter_ns;
        st->ioctl_nr = io->cmd & 0xff;
        io->woken++;  // the waker's own state: no other CPU writes it
    } else {
        // No traced uffd ioctl (rare: no stack on the hot path). An ioctl of a process not
        // traced yet still resolves it (its details unseen); else the uffd's release or a signal.
        int waker = uffd_waker(ctx);
        if (waker == WAKER_RELEASE)
            woken_by |= F_RELEASED;
        else if (waker == WAKER_OTHER)
            woken_by |= F_SIGNALLED;
    }
#endif
#ifndef TRACE_ALL
    if (!(woken_by & F_SIGNALLED))
        track_handler(id >> 32, st->tgid);  // the resolver's process (it may live elsewhere) joins
#endif
    if (!(st->flags & F_BLOCKED)) {
        // Resolved before T ever left the CPU: it runs on from here.
        st->resume_ns = now;
        set_flags(st, woken_by | F_WOKEN_ON_CPU | F_RESUMED);
    } else {
        set_flags(st, woken_by);
    }
    return 0;
}

// (struct task_struct *t), on the way back to user space after T was scheduled (for threads
// with rseq registered, as glibc >= 2.35 does by default): the true end of a resumed fault.
RAW_TRACEPOINT_PROBE(rseq_update) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    struct fault_state *st = state_of(tid);
    // Woken and now back in user space. (Rarely no switch-in of T was seen after its wakeup,
    // about once in a million faults here: the fault still ends here, without resume_ns.)
    if (!is_active(st) || !(st->flags & F_WOKEN))
        return 0;
    if (ended_recorded(st))
        emit_fault(st, id >> 32, tid, true);
    clear_flags(st, F_ACTIVE);
    return 0;
}

#ifdef MAPPINGS_TRACEPOINT
// (const char *fn, struct ma_state *mas, unsigned long piv, void *val): a maple tree written,
// as a process's VMA tree is by mmap, munmap, mprotect... (other trees only cost a re-sample).
RAW_TRACEPOINT_PROBE(ma_write) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!is_tracked(tgid))
        return 0;
    u32 first = 1;
    u32 *gen = mapping_gen.lookup_or_try_init(&tgid, &first);
    if (gen)
        __sync_fetch_and_add(gen, 1);
    int zero = 0;
    u64 *changed = mappings_changed.lookup(&zero);
    if (changed)
        __sync_fetch_and_add(changed, 1);  // after the generation: a reader of both is never stale
    return 0;
}
#endif

// (struct task_struct *parent, struct task_struct *child). Threads share the tgid, so only new
// processes need adding.
RAW_TRACEPOINT_PROBE(sched_process_fork) {
#ifdef DISCOVER_UFFDS
    // A child of a traced process may handle its faults (it holds the userfaultfds the parent
    // had): traced from its first instant, and confirmed or refused with its parent.
    u32 parent = bpf_get_current_pid_tgid() >> 32;
    if (!is_tracked(parent))
        return 0;
    struct task_struct *forked = (struct task_struct *)ctx->args[1];
    u32 forked_tgid = task_field(forked, TASK_TGID_OFF);
    u8 pending = ROLE_PENDING_HANDLER;
    if (forked_tgid != parent && !tracked.insert(&forked_tgid, &pending))
        handler_of.update(&forked_tgid, &parent);
#endif
#if defined(FOLLOW_CHILDREN) && !defined(TRACE_ALL)
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!is_tracked(tgid))
        return 0;
    struct task_struct *child = (struct task_struct *)ctx->args[1];
    u32 child_tgid = task_field(child, TASK_TGID_OFF);
    u8 target = ROLE_TARGET;
    tracked.insert(&child_tgid, &target);
#endif
    return 0;
}

// Fires in the exiting task's context: close its in-flight state.
RAW_TRACEPOINT_PROBE(sched_process_exit) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    struct fault_state *st = state_of(tid);
    if (is_active(st)) {
        // Still inside the fault (it never returned to user space): whatever woke T (a fatal
        // signal, the process's exit) did not resolve it, even if it ran again.
        bool recorded = ended_recorded(st);
        if (still_in_fault(st)) {
            if (st->flags & F_RECORDED_AT_EXIT) {
                set_flags(st, F_EXITED);
                emit_fault(st, id >> 32, tid, false);
            }
        } else if (recorded) {
            emit_fault(st, id >> 32, tid, false);
        }
    }
    if (st) {
        inflight.delete(&tid);
        u64 *bits = state_word(tid);
        if (bits)
            __sync_fetch_and_and(bits, ~(1ULL << (tid % 64)));
    }
#ifdef TRACK_IOCTLS
    ioctls.delete(&tid);
#endif
    return 0;
}

// (struct task_struct *task, const char *comm): a thread renamed (prctl, its /proc comm file,
// exec), in whichever task's context did it. Its per-thread states keep its name for the
// records, and its address space: exec renames the thread after it replaced that.
RAW_TRACEPOINT_PROBE(task_rename) {
    struct task_struct *task = (struct task_struct *)ctx->args[0];
    u32 tid = task_field(task, TASK_PID_OFF);
    char name[16] = {};  // NUL-padded, as bpf_get_current_comm gives it
    bpf_probe_read_kernel_str(name, sizeof(name), (void *)ctx->args[1]);
    struct fault_state *st = state_of(tid);
    if (st) {
        __builtin_memcpy(st->comm, name, sizeof(name));
        st->mm = read_ptr(task, TASK_MM_OFF);
    }
#ifdef TRACK_IOCTLS
    struct ioctl_state *io = ioctls.lookup(&tid);
    if (io)
        __builtin_memcpy(io->comm, name, sizeof(name));
#endif
    return 0;
}

#ifdef TRACK_IOCTLS
// A uffd ioctl entered (cmd, its user argument, the uffd's context): remember it until it
// returns.
static __always_inline void enter_ioctl(u32 tid, u32 cmd, u64 arg, u64 ctx) {
    struct ioctl_state io = {.enter_ns = bpf_ktime_get_ns(), .cmd = cmd, .arg = arg,
                             .mm = uffd_mm(ctx)};
    // Every uffdio_* argument starts with a range {start, len} followed by a mode word,
    // except uffdio_copy and uffdio_move {dst, src, len, mode, result}.
    u64 a[4] = {};
    bpf_probe_read_user(a, sizeof(a), (void *)arg);
    if ((cmd & 0xff) == UFFDIO_NR_COPY || (cmd & 0xff) == UFFDIO_NR_MOVE) {
        io.start = a[0];
        io.len = a[2];
        io.mode = a[3];
    } else {
        io.start = a[0];
        io.len = a[1];
        io.mode = a[2];
    }
    struct ioctl_state *slot = ioctls.lookup(&tid);
    if (slot) {
        __builtin_memcpy(io.comm, slot->comm, sizeof(io.comm));
        *slot = io;  // reused in place
        return;
    }
    bpf_get_current_comm(&io.comm, sizeof(io.comm));
    if (ioctls.update(&tid, &io))
        count_lost(LOST_IOCTL_FULL);
}

static __always_inline void exit_ioctl(u32 tgid, u32 tid, struct ioctl_state *io, long ret) {
    u64 now = bpf_ktime_get_ns();
    u32 nr = io->cmd & 0xff;
    s64 mapped = 0;
    // the result field: mapped / zeropage / updated, or copy / move
    if (nr == UFFDIO_NR_CONTINUE || nr == UFFDIO_NR_ZEROPAGE || nr == UFFDIO_NR_POISON)
        bpf_probe_read_user(&mapped, 8, (void *)(io->arg + 24));
    else if (nr == UFFDIO_NR_COPY || nr == UFFDIO_NR_MOVE)
        bpf_probe_read_user(&mapped, 8, (void *)(io->arg + 32));
    u64 enter_ns = io->enter_ns;
    if (nr == UFFDIO_NR_CONTINUE)
        continue_hist.increment(log2_us_slot(now - enter_ns));
    io->enter_ns = 0;  // no ioctl in flight any more
#ifdef STATS_MODE
    struct ioctl_stats_key key = {.pid = tgid, .nr = nr, .err = ret < 0 ? -ret : 0};
    struct ioctl_stats *v = ioctl_stats.lookup(&key);
    if (!v) {
        struct ioctl_stats blank = {};
        __builtin_memcpy(blank.comm, io->comm, sizeof(blank.comm));
        ioctl_stats.insert(&key, &blank);
        v = ioctl_stats.lookup(&key);
        if (!v) {
            count_lost(LOST_STATS_FULL);
            return;
        }
    }
    __sync_fetch_and_add(&v->calls, 1);  // shared by every CPU
    __sync_fetch_and_add(&v->total_ns, now - enter_ns);
    __sync_fetch_and_add(&v->latency[stats_slot(now - enter_ns)], 1);
    return;
#endif
    union record *r = new_record(tgid, tid);
    if (!r)
        return;
    struct ioctl_record *e = &r->ioctl;
    e->type = EV_IOCTL;
    e->nr = nr;
    e->flags = io->flags;
    e->woken = io->woken;
    e->enter_ns = enter_ns;
    e->exit_ns = now;
    e->mfill_ns = io->mfill_ns;
    e->install_ns = io->install_ns;
    e->start = io->start;
    e->len = io->len;
    e->mode = io->mode;
    e->ret = ret;
    e->mapped = mapped;
    e->mm = io->mm;
    __builtin_memcpy(e->comm, io->comm, sizeof(e->comm));
    events.ringbuf_submit(r, BPF_RB_NO_WAKEUP);
}
#endif

#define SYSCALL_READ 0
#define SYSCALL_IOCTL 16
#define MAX_MSGS 16

// uffd ioctls from the syscall tracepoints, unless userfaultfd_ioctl's own hooks see them
#if defined(FULL_MODE) && !defined(IOCTL_KPROBE)
// (struct pt_regs *regs, long id): a uffd ioctl's entry (reads need only their exit)
RAW_TRACEPOINT_PROBE(sys_enter) {
    u64 id = bpf_get_current_pid_tgid();
    if (ctx->args[1] != SYSCALL_IOCTL)
        return 0;
    bool tracked_now = is_tracked(id >> 32);
#ifndef DISCOVER_UFFDS
    if (!tracked_now)
        return 0;
#endif
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    u64 dx_si_di[3] = {};  // the third, second and first arguments, adjacent in pt_regs
    bpf_probe_read_kernel(dx_si_di, sizeof(dx_si_di), &regs->dx);
    if ((((u32)dx_si_di[1] >> 8) & 0xff) != UFFDIO_TYPE)
        return 0;
#ifdef DISCOVER_UFFDS
    if (!tracked_now) {
        // UFFDIO_API, the first ioctl of every userfaultfd (from userfaultfd(2) or
        // /dev/userfaultfd): its process is traced from now on; user space confirms it.
        if ((dx_si_di[1] & 0xff) == UFFDIO_NR_API) {
            u32 tgid = id >> 32;
            u8 discovered = ROLE_DISCOVERED;
            struct comm name = {};
            bpf_get_current_comm(&name.comm, sizeof(name.comm));
            discovered_comms.update(&tgid, &name);  // in case it is gone before user space looks
            tracked.insert(&tgid, &discovered);
        }
        return 0;
    }
#endif
    u64 uffd = uffd_of_fd((u32)dx_si_di[2]);
    if (uffd)
        enter_ioctl((u32)id, (u32)dx_si_di[1], dx_si_di[0], uffd);
    return 0;
}
#endif

#ifdef TRACE_READS
// Does a fault message's address name st's page? (masked to the base or huge page, or exact
// with UFFD_FEATURE_EXACT_ADDRESS)
static __always_inline bool msg_names(struct fault_state *st, u64 addr) {
    return addr == (st->addr & ~0xfffULL) || addr == (st->addr & ~0x1fffffULL) || addr == st->addr;
}

// One message of a handler's read. A fault's goes to its in-flight state when it names its
// thread (UFFD_FEATURE_THREAD_ID) and page, else it is held for the fault of its page to claim
// when it ends; other events are counted per process.
static __always_inline void take_msg(u32 tgid, u32 tid, u64 now, u64 mm, u64 *m) {
    u8 event = m[0] & 0xff;
    if (event != UFFD_EVENT_PAGEFAULT) {
        u64 key = ((u64)tgid << 32) | event;
        uffd_events.increment(key);
        return;
    }
    u32 ptid = (u32)m[3];
    struct fault_state *st = ptid ? state_of(ptid) : NULL;
    if (is_active(st) && !st->msg_ns && st->mm == mm && msg_names(st, m[2])) {
        st->msg_ns = now;
        st->msg_flags = m[1];
        st->msg_tid = tid;
        set_flags(st, F_MSG);
        return;
    }
    struct loose_key key = {.mm = mm, .addr = m[2]};
    struct loose_msg msg = {.msg_ns = now, .flags = m[1], .reader_tid = tid};
    if (!loose_msgs.insert(&key, &msg))
        count_loose(LOOSE_HELD, 1);
    else
        loose_msgs.update(&key, &msg);  // a newer message of the same page replaces the held one
}

// The `ret / 32` messages a read of the uffd context `uffd` returned into buf.
// Fully unrolled, without early exits: older verifiers (Linux 6.1) give up on the same code
// as a loop ("sequence of jumps is too complex").
static __always_inline void exit_read(u32 tgid, u32 tid, u64 buf, u64 uffd, long ret) {
    u64 now = bpf_ktime_get_ns();
    u64 mm = uffd_mm(uffd);
    int n = (u64)ret / 32;
#pragma unroll
    for (int i = 0; i < MAX_MSGS; i++) {
        u64 m[4] = {};
        if (i < n && !bpf_probe_read_user(m, sizeof(m), (void *)(buf + 32 * i)))
            take_msg(tgid, tid, now, mm, m);
    }
}

// (struct pt_regs *regs, long ret): a uffd ioctl's return (FULL_MODE), or a read that returned
// messages. The saved registers still hold the syscall's number and arguments.
// Every syscall of every task comes here: what is not ours is sent away before any map lookup.
RAW_TRACEPOINT_PROBE(sys_exit) {
    long ret = ctx->args[1];
#if defined(FULL_MODE) && !defined(IOCTL_KPROBE)
#define EXIT_IOCTLS
#else
    if (ret < 32)
        return 0;  // not a read that returned a message
#endif
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    u64 si_di_nr[3] = {};  // the second and first arguments and orig_ax, adjacent in pt_regs
    bpf_probe_read_kernel(si_di_nr, sizeof(si_di_nr), &regs->si);
    bool read = si_di_nr[2] == SYSCALL_READ && ret >= 32;
#ifdef EXIT_IOCTLS
    if (!read && si_di_nr[2] != SYSCALL_IOCTL)
        return 0;
#else
    if (!read)
        return 0;
#endif
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (!is_tracked(tgid))
        return 0;
    u32 tid = (u32)id;
#ifdef EXIT_IOCTLS
    if (!read) {
        struct ioctl_state *io = ioctl_in_flight(tid);
        if (io)
            exit_ioctl(tgid, tid, io, ret);
        return 0;
    }
#endif
    u64 uffd = uffd_of_fd((u32)si_di_nr[1]);
    if (uffd)
        exit_read(tgid, tid, si_di_nr[0], uffd, ret);
    return 0;
}
#endif
