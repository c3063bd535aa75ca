/* The simplest userfaultfd minor-fault round trip, as a yardstick for the exerciser.
 *
 * One thread first-touches every page of a MINOR-registered shmem mapping (timing each
 * touch with CLOCK_MONOTONIC); one handler thread loops poll -> read -> UFFDIO_CONTINUE.
 * Prints one JSON line: faults, p50_ns, p99_ns, rate_per_s.
 *
 *   minimal_loop PAGES [CPU]     (CPU: pin the whole process to it)
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static int uffd;
static long page_size;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static void *handler(void *arg)
{
    struct pollfd pfd = {.fd = uffd, .events = POLLIN};
    struct uffd_msg msg;

    (void)arg;
    for (;;) {
        if (poll(&pfd, 1, -1) < 0)
            die("poll");
        if (read(uffd, &msg, sizeof msg) != sizeof msg)
            continue;
        struct uffdio_continue cont = {
            .range = {.start = msg.arg.pagefault.address & ~(uint64_t)(page_size - 1),
                      .len = (uint64_t)page_size},
        };
        if (ioctl(uffd, UFFDIO_CONTINUE, &cont) < 0)
            die("UFFDIO_CONTINUE");
    }
    return NULL;
}

static int cmp(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return fprintf(stderr, "usage: %s PAGES [CPU]\n", argv[0]), 2;
    long pages = atol(argv[1]);
    if (argc > 2) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(atoi(argv[2]), &set);
        if (sched_setaffinity(0, sizeof set, &set) < 0)
            die("sched_setaffinity");
    }
    page_size = sysconf(_SC_PAGESIZE);
    size_t len = (size_t)pages * (size_t)page_size;

    int fd = memfd_create("minimal", MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, (off_t)len) < 0)
        die("memfd");
    char *plain = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    char *reg = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (plain == MAP_FAILED || reg == MAP_FAILED)
        die("mmap");
    memset(plain, 1, len);

    uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    struct uffdio_api api = {.api = UFFD_API, .features = UFFD_FEATURE_MINOR_SHMEM};
    struct uffdio_register reg_arg = {
        .range = {.start = (uintptr_t)reg, .len = len}, .mode = UFFDIO_REGISTER_MODE_MINOR,
    };
    if (uffd < 0 || ioctl(uffd, UFFDIO_API, &api) < 0
        || ioctl(uffd, UFFDIO_REGISTER, &reg_arg) < 0)
        die("userfaultfd");

    pthread_t th;
    if (pthread_create(&th, NULL, handler, NULL))
        die("pthread_create");

    int64_t *stall = malloc((size_t)pages * sizeof *stall);
    if (!stall)
        die("malloc");
    int64_t first = now_ns(), last = first;
    for (long i = 0; i < pages; i++) {
        int64_t t0 = now_ns();
        (void)*(volatile char *)(reg + i * page_size);
        last = now_ns();
        stall[i] = last - t0;
    }
    qsort(stall, (size_t)pages, sizeof *stall, cmp);
    printf("{\"faults\": %ld, \"p50_ns\": %lld, \"p99_ns\": %lld, \"rate_per_s\": %.1f}\n",
           pages, (long long)stall[pages / 2], (long long)stall[pages * 99 / 100],
           (double)pages * 1e9 / (double)(last - first));
    return 0;
}
