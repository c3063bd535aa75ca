// uffdtrace kprobe backend: kernel-function hooks on top of the tracepoint programs.
//
// Appended to bpf/tracepoint.c and compiled with KPROBE_BACKEND defined. Each function here
// is attached by uffdtrace/probes/kprobe.py to the first symbol of its hook that this kernel
// has (uffdtrace/probes/hooks.py: names change across kernels); a hook with no symbol is
// simply not attached and that part of the record comes from the tracepoints, or stays empty.
//
// Only register arguments are read: the headers BCC compiles with may belong to another
// kernel, so no kernel struct is dereferenced here.

// Calibration: handle_userfault's reason values seen in process `calibrating[0]`.
struct reason_key { u64 reason; };
BPF_ARRAY(calibrating, u32, 1);
BPF_HASH(reasons_seen, struct reason_key, u64, 64);

// handle_userfault(struct vm_fault *vmf, unsigned long reason): T's fault is a uffd fault.
int on_uffd_fault(struct pt_regs *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    struct fault_state *st = inflight.lookup(&tid);
    if (!st)
        return 0;
    st->flags |= F_UFFD;
    st->reason = PT_REGS_PARM2(ctx);
    int zero = 0;
    u32 *cal = calibrating.lookup(&zero);
    if (cal && *cal == (u32)(id >> 32)) {
        struct reason_key key = {.reason = st->reason};
        reasons_seen.increment(key);
    }
    return 0;
}

static __always_inline int fault_path(u16 flag) {
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct fault_state *st = inflight.lookup(&tid);
    // Before handle_userfault only: the handlers' CONTINUE looks pages up through shmem too.
    if (st && !(st->flags & F_UFFD))
        st->flags |= flag;
    return 0;
}

int on_hugetlb_fault(struct pt_regs *ctx) { return fault_path(F_HUGETLB); }
int on_shmem_fault(struct pt_regs *ctx) { return fault_path(F_SHMEM); }

// userfaultfd_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
int on_ioctl_enter(struct pt_regs *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    if (!is_tracked(id >> 32))
        return 0;
    enter_ioctl((u32)id, PT_REGS_PARM2(ctx), PT_REGS_PARM3(ctx));
    return 0;
}

int on_ioctl_return(struct pt_regs *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    struct ioctl_state *io = ioctls.lookup(&tid);
    if (!io)
        return 0;
    exit_ioctl(id >> 32, tid, io, PT_REGS_RC(ctx));
    ioctls.delete(&tid);
    return 0;
}

// The mcopy/mfill function of a CONTINUE, COPY or ZEROPAGE: the work without the ioctl's
// argument handling and wakeup.
int on_mfill_enter(struct pt_regs *ctx) {
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct ioctl_state *io = ioctls.lookup(&tid);
    if (io) {
        io->mfill_enter_ns = bpf_ktime_get_ns();
        io->flags |= IO_MFILL;
    }
    return 0;
}

int on_mfill_return(struct pt_regs *ctx) {
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct ioctl_state *io = ioctls.lookup(&tid);
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
    struct ioctl_state *io = ioctls.lookup(&tid);
    if (!io)
        return 0;
    io->flags |= flag;
    if (io->install_depth++ == 0)
        io->install_enter_ns = bpf_ktime_get_ns();
    return 0;
}

int on_hugetlb_install(struct pt_regs *ctx) { return install_enter(IO_HUGETLB); }
int on_shmem_install(struct pt_regs *ctx) { return install_enter(IO_SHMEM); }
int on_pte_install(struct pt_regs *ctx) { return install_enter(IO_PTE); }

int on_install_return(struct pt_regs *ctx) {
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct ioctl_state *io = ioctls.lookup(&tid);
    if (io && io->install_depth && --io->install_depth == 0)
        io->install_ns += bpf_ktime_get_ns() - io->install_enter_ns;
    return 0;
}
