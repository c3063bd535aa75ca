// The records uffdtrace's BPF programs send to user space through the `events` ring buffer,
// with their flags, and the in-kernel aggregates of --mode stats: the one contract between
// bpf/*.c and Python. uffdtrace/probes/records.py
// parses this file for its numpy dtypes and constants (plain #defines, enums and structs of
// u8..u64 / s64 / char arrays only), and a unit test compiles it to check the layout.

// UFFDIO_* ioctls by _IOC_NR of their command (uapi/linux/userfaultfd.h)
#define UFFDIO_TYPE 0xAA
#define UFFDIO_NR_REGISTER 0x00
#define UFFDIO_NR_UNREGISTER 0x01
#define UFFDIO_NR_WAKE 0x02
#define UFFDIO_NR_COPY 0x03
#define UFFDIO_NR_ZEROPAGE 0x04
#define UFFDIO_NR_MOVE 0x05
#define UFFDIO_NR_WRITEPROTECT 0x06
#define UFFDIO_NR_CONTINUE 0x07
#define UFFDIO_NR_POISON 0x08
#define UFFDIO_NR_API 0x3F

// uffd_msg events and page-fault flags (uapi/linux/userfaultfd.h)
#define UFFD_EVENT_PAGEFAULT 0x12
#define UFFD_EVENT_FORK 0x13
#define UFFD_EVENT_REMAP 0x14
#define UFFD_EVENT_REMOVE 0x15
#define UFFD_EVENT_UNMAP 0x16
#define UFFD_PAGEFAULT_FLAG_WRITE 1
#define UFFD_PAGEFAULT_FLAG_WP 2
#define UFFD_PAGEFAULT_FLAG_MINOR 4

enum record_type { EV_FAULT = 1, EV_IOCTL = 2 };

// Values of the `tracked` map (tgid -> role): why a process is traced.
enum tracked_role {
    ROLE_TARGET = 1,      // given by the user (or a child of a traced command)
    ROLE_HANDLER = 2,     // it handles a traced process's faults
    ROLE_DISCOVERED = 3,  // it set up a userfaultfd (DISCOVER_UFFDS); user space confirms it
    ROLE_PENDING_HANDLER = 4  // it handles a discovered process's faults: confirmed with it
};

// fault_record.flags
#define F_NOTIFIED 1       // T woke a task while in the fault (the uffd notify)
#define F_BLOCKED 2        // T was switched out while in the fault
#define F_WOKEN 4          // T was woken
#define F_WOKEN_ON_CPU 8   // the wakeup came before T switched out
#define F_EXITED 16        // T exited with the fault in flight
#define F_MSG 32           // a handler read T's message (message reads traced)
#define F_SLEPT 64         // T slept interruptibly (handle_userfault's blocking state)
#define F_OTHER_SLEEP 128  // T is asleep in the fault for another reason (e.g. I/O, a lock)
#define F_RESUMED 256      // T ran again after the wakeup; resume_ns is its latest return
#define F_OFF_AGAIN 512    // ... and was switched out again before leaving the fault
#define F_UFFD 1024        // T entered handle_userfault (KPROBE_BACKEND); reason in `reason`
#define F_HUGETLB 2048     // T's fault went through hugetlb_fault (KPROBE_BACKEND)
#define F_SHMEM 4096       // ... through shmem's fault handler (KPROBE_BACKEND)
#define F_ACTIVE 8192      // BPF state only: a fault in flight (never in a record)
#define F_BLOCKED_AT_END 16384  // set by user space: still asleep in the fault when tracing ended
#define F_RELEASED 32768   // woken by its userfaultfd's release (closed, or its last holder
                           // exited), not by an ioctl (ioctls traced)
#define F_SIGNALLED 65536  // woken by neither a uffd ioctl nor the release: a signal (ioctls traced)

// ioctl_record.flags (KPROBE_BACKEND): kernel functions the ioctl went through
#define IO_MFILL 1         // the mcopy/mfill function of its command (mfill_ns: time inside)
#define IO_HUGETLB 2       // a hugetlb PTE-install function       } install_ns: time inside the
#define IO_SHMEM 4         // shmem's PTE install (COPY, ZEROPAGE) } outermost PTE-install
#define IO_PTE 8           // the generic PTE install              } functions, over all pages

// Indices of the per-CPU `lost` counters: records not sent.
enum lost_reason {
    LOST_RINGBUF = 0,        // the ring buffer was full
    LOST_INFLIGHT_FULL = 1,  // no room for a thread's fault state
    LOST_IOCTL_FULL = 2,     // no room for a thread's ioctl state
    LOST_STATS_FULL = 3,     // --mode stats: no room for a new aggregate (its fault or ioctl
                             // is not counted)
    LOST_REASONS = 4
};

// Both records begin with type, flags, pid and tid at the same offsets, and both take
// sizeof(union record) in the ring buffer, so user space reads it at one stride.

// A fault of thread T (tid) of process pid, when it has ended.
struct fault_record {
    u8 type;            // EV_FAULT
    u8 waker_nr;        // _IOC_NR of the waker's in-flight uffd ioctl (with waker_ioctl_ns)
    u16 unused;
    u32 flags;          // F_*
    u32 pid;
    u32 tid;
    u32 waker_pid;      // who woke T
    u32 waker_tid;
    u32 notify_tid;     // the task T woke while faulting (its handler)
    u32 gen;            // mapping generation of the sampled stack of its region (`regions` key)
    u64 fault_ns;       // page_fault_user
    u64 block_ns;       // first switched out in handle_userfault's state
    u64 wake_ns;        // woken
    u64 resume_ns;      // back on a CPU after the wakeup (the latest time, see F_OFF_AGAIN)
    u64 msg_ns;         // a handler's read returned its message (F_MSG)
    u64 waker_ioctl_ns; // entry of the waker's in-flight uffd ioctl
    u64 return_ns;      // back to user space (rseq_update), when seen
    u64 addr;           // the faulting address
    u64 error_code;     // x86 page-fault error code
    u64 msg_flags;      // uffd_msg.pagefault.flags of its message (F_MSG)
    u64 reason;         // handle_userfault's reason (KPROBE_BACKEND)
    u64 mm;             // T's address space
    u32 msg_tid;        // the thread whose read returned its message (F_MSG)
    char comm[16];
};

// A uffd ioctl of a traced thread, when it has returned.
struct ioctl_record {
    u8 type;            // EV_IOCTL
    u8 nr;              // _IOC_NR of its command
    u16 woken;          // faults of traced threads it woke
    u32 flags;          // IO_*
    u32 pid;
    u32 tid;
    u64 enter_ns;
    u64 exit_ns;
    u64 mfill_ns;       // time inside the mcopy/mfill function (IO_MFILL)
    u64 install_ns;     // time inside PTE-install functions (IO_HUGETLB / IO_SHMEM / IO_PTE)
    u64 start;          // range start (UFFDIO_API: api)
    u64 len;            // range length (UFFDIO_API: features)
    u64 mode;           // mode word (UFFDIO_API: ioctls)
    s64 ret;            // return value
    s64 mapped;         // the mapped / copy / zeropage / updated / move result field
    u64 mm;             // the address space the userfaultfd serves
    char comm[16];
};

union record {
    struct fault_record fault;
    struct ioctl_record ioctl;
};

// --mode stats: no record per fault; BPF keeps aggregates that user space reads (faults per
// CPU; ioctls shared, added to atomically).
#define STATS_BUCKETS 26   // log2 µs: bucket N holds [2^N, 2^(N+1)) µs (0 also < 1 µs; the last, more)

// A fault's kind as far as BPF knows it: from its message's flags, or its error code (a write
// to a present page is a write-protect fault). 0: user space tells it from the call site.
enum stats_kind { KIND_UNKNOWN = 0, KIND_MISSING = 1, KIND_WP = 2, KIND_MINOR = 3 };

// What faults are aggregated by: process (and thread, for the vcpu label), kernel path, kind.
struct fault_stats_key {
    u32 pid;
    u32 tid;            // 0 unless threads are told apart (STATS_PER_THREAD)
    u64 path[3];        // tracepoint backend: the callers of handle_userfault in the stack
                        // sampled for the fault's region (0: none); kprobe backends:
                        // handle_userfault's reason, 0, 0
    u32 kind;           // stats_kind
    u32 hooks;          // F_UFFD | F_HUGETLB | F_SHMEM of the fault (kprobe backends)
};

struct fault_stats {
    u64 faults;
    u64 stall_ns;                  // the stalls' sum: time blocked in faults
    u32 stall[STATS_BUCKETS];      // fault -> return (or resume); u32 counters wrap: user space
    u32 wake_to_run[STATS_BUCKETS];  // reads them far more often than 2^32 counts of a CPU
    u32 notify[STATS_BUCKETS];     // block -> message read
    u32 handler[STATS_BUCKETS];    // message read -> the waking ioctl's entry
    char comm[16];
};

// uffd ioctls by process, command and errno (0: success).
struct ioctl_stats_key {
    u32 pid;
    u32 nr;             // _IOC_NR of the command
    u32 err;            // -ret of a failed ioctl, else 0
    u32 unused;
};

struct ioctl_stats {
    u64 calls;
    u64 total_ns;
    u32 latency[STATS_BUCKETS];
    char comm[16];
};

