/* How often this (virtual) CPU loses time that the guest kernel never sees: the witness for
 * the accuracy bench. Times WINDOWS back-to-back windows of WIDTH_NS of plain user-mode
 * spinning with CLOCK_MONOTONIC and counts those that took more than 1 us longer. No fault,
 * no syscall: whatever stretches a window is an interrupt or the host.
 * Prints one JSON line.
 *
 *   host_noise WINDOWS WIDTH_NS [CPU]     (CPU: pin to it)
 */
#define _GNU_SOURCE
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: host_noise WINDOWS WIDTH_NS [CPU]\n");
        return 2;
    }
    long windows = atol(argv[1]);
    int64_t width = atol(argv[2]);
    if (argc > 3) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(atoi(argv[3]), &set);
        if (sched_setaffinity(0, sizeof set, &set) < 0) {
            perror("sched_setaffinity");
            return 1;
        }
    }
    long over_1us = 0;
    for (long i = 0; i < windows; i++) {
        int64_t start = now_ns(), end;
        do
            end = now_ns();
        while (end - start < width);
        over_1us += end - start - width > 1000;
    }
    printf("{\"windows\": %ld, \"width_ns\": %lld, \"over_1us\": %ld}\n", windows,
           (long long)width, over_1us);
    return 0;
}
