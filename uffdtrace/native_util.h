/* Small helpers shared by the C sides of the exerciser and the migration emulator. */
#ifndef UFFDTRACE_NATIVE_UTIL_H
#define UFFDTRACE_NATIVE_UTIL_H

#include <limits.h>
#include <linux/futex.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* CLOCK_MONOTONIC in ns: the clock of bpf_ktime_get_ns, so the tracer's times compare. */
static inline int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* A one-shot start gate: threads wait until it opens. */
static inline void gate_wait(int32_t *gate)
{
    while (!__atomic_load_n(gate, __ATOMIC_ACQUIRE))
        syscall(SYS_futex, gate, FUTEX_WAIT, 0, NULL, NULL, 0);
}

static inline void gate_open(int32_t *gate)
{
    __atomic_store_n(gate, 1, __ATOMIC_RELEASE);
    syscall(SYS_futex, gate, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

#endif
