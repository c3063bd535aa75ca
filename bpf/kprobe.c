// uffdtrace kernel-function hooks (kprobe and fentry backends), on top of the tracepoint
// programs.
//
// Appended to bpf/tracepoint.c and compiled with KPROBE_BACKEND defined. The functions here
// take the kernel function's arguments as plain values; uffdtrace/probes/hooks.py generates
// the thin entry points that call them, as kprobes/kretprobes or as fentry/fexit programs,
// for the first symbol of each hook that this kernel has (names change across kernels). A
// hook with no symbol gets no entry point and that part of the record comes from the
// tracepoints, or stays empty.
//
// Only register arguments are read, and kernel structs only at offsets taken from the running
// kernel's BTF: the headers BCC compiles with may belong to another kernel.

// Calibration: handle_userfault's reason values seen in process `calibrating[0]`.
struct reason_key { u64 reason; };
BPF_ARRAY(calibrating, u32, 1);
BPF_HASH(reasons_seen, struct reason_key, u64, 64);

// handle_userfault(vmf, reason): T's fault is a uffd fault.
static __always_inline int uffd_fault(u64 reason) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    struct fault_state *st = state_of(tid);
    if (!is_active(st))
        return 0;
    st->reason = reason;
    set_flags(st, F_UFFD);
    int zero = 0;
    u32 *cal = calibrating.lookup(&zero);
    if (cal && *cal == (u32)(id >> 32)) {
        struct reason_key key = {.reason = reason};
        reasons_seen.increment(key);
    }
    return 0;
}

static __always_inline int fault_path(u16 flag) {
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct fault_state *st = state_of(tid);
    // Before handle_userfault only: the handlers' CONTINUE looks pages up through shmem too.
    if (is_active(st) && !(st->flags & F_UFFD))
        set_flags(st, flag);
    return 0;
}

// userfaultfd_ioctl(file, cmd, arg): the file's private_data is the uffd context.
static __always_inline int ioctl_enter(void *file, u32 cmd, u64 arg) {
    u64 id = bpf_get_current_pid_tgid();
    if (!is_tracked(id >> 32))
        return 0;
    enter_ioctl((u32)id, cmd, arg, read_ptr(file, FILE_PRIVATE_OFF));
    return 0;
}

static __always_inline int ioctl_return(long ret) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    struct ioctl_state *io = ioctl_in_flight(tid);
    if (io)
        exit_ioctl(id >> 32, tid, io, ret);
    return 0;
}

// The mcopy/mfill function of a CONTINUE, COPY or ZEROPAGE: the work without the ioctl's
// argument handling and wakeup.
static __always_inline int mfill_enter(void) {
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct ioctl_state *io = ioctl_in_flight(tid);
    if (io) {
        io->mfill_enter_ns = bpf_ktime_get_ns();
        io->flags |= IO_MFILL;
    }
    return 0;
}

static __always_inline int mfill_return(void) {
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct ioctl_state *io = ioctl_in_flight(tid);
    if (io && io->mfill_enter_ns) {
        io->mfill_ns += bpf_ktime_get_ns() - io->mfill_enter_ns;
        io->mfill_enter_ns = 0;
    }
    return 0;
}

// PTE-install functions, once per page. They nest (shmem's calls the generic one): only the
// outermost is timed.
static __always_inline int install_enter(u16 flag) {
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct ioctl_state *io = ioctl_in_flight(tid);
    if (!io)
        return 0;
    io->flags |= flag;
    if (io->install_depth++ == 0)
        io->install_enter_ns = bpf_ktime_get_ns();
    return 0;
}

static __always_inline int install_return(void) {
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct ioctl_state *io = ioctl_in_flight(tid);
    if (io && io->install_depth && --io->install_depth == 0)
        io->install_ns += bpf_ktime_get_ns() - io->install_enter_ns;
    return 0;
}
