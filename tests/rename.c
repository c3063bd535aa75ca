// uffdx-rename: faults of threads that change name, and of a process that execs itself: the
// tracer takes a thread's name and address space once, at its first fault, and must follow a
// rename (prctl, or another thread writing its /proc comm file) and an exec. For
// tests/test_rename.py. Every fault is a MISSING fault on anonymous memory, resolved with
// UFFDIO_ZEROPAGE by a handler thread that reads messages with UFFD_FEATURE_THREAD_ID.
//
//   uffdx-rename          faults named rn-first, rn-second (prctl), rn-third (renamed by the
//                         main thread), rn-leader (the main thread), then exec: one more
//   uffdx-rename exec     fault of the main thread, named uffdx-rename by the exec
#define _GNU_SOURCE
#include <fcntl.h>
#include <limits.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#define PAGE 4096
#define PAGES 4

static int uffd;
static char *area;
static int renamed[2];  // main -> toucher: "you have been renamed"
static int touched[2];  // toucher -> main: "rename me now"

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void *handler(void *unused) {
    (void)unused;
    for (;;) {
        struct uffd_msg msg;
        if (read(uffd, &msg, sizeof(msg)) != sizeof(msg))
            die("read");
        struct uffdio_zeropage zero = {
            .range = {.start = msg.arg.pagefault.address & ~(PAGE - 1UL), .len = PAGE}};
        if (ioctl(uffd, UFFDIO_ZEROPAGE, &zero))
            die("UFFDIO_ZEROPAGE");
    }
    return NULL;
}

static void touch(int page) {
    (void)*(volatile char *)(area + page * PAGE);
}

static void setup(void) {
    uffd = syscall(SYS_userfaultfd, O_CLOEXEC);
    struct uffdio_api api = {.api = UFFD_API, .features = UFFD_FEATURE_THREAD_ID};
    area = mmap(NULL, PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (uffd < 0 || ioctl(uffd, UFFDIO_API, &api) || area == MAP_FAILED)
        die("userfaultfd");
    struct uffdio_register reg = {.range = {.start = (unsigned long)area, .len = PAGES * PAGE},
                                  .mode = UFFDIO_REGISTER_MODE_MISSING};
    if (ioctl(uffd, UFFDIO_REGISTER, &reg))
        die("UFFDIO_REGISTER");
    pthread_t t;
    if (pthread_create(&t, NULL, handler, NULL))
        die("pthread_create");
    pthread_setname_np(t, "rn-handler");
}

static void *toucher(void *unused) {
    (void)unused;
    char go;
    prctl(PR_SET_NAME, "rn-first");
    touch(0);
    prctl(PR_SET_NAME, "rn-second");
    touch(1);
    if (write(touched[1], "x", 1) != 1 || read(renamed[0], &go, 1) != 1)
        die("pipe");
    touch(2);  // as rn-third
    return NULL;
}

int main(int argc, char **argv) {
    setup();
    if (argc > 1 && !strcmp(argv[1], "exec")) {
        touch(0);
        return 0;
    }
    pthread_t t;
    char go;
    if (pipe(renamed) || pipe(touched) || pthread_create(&t, NULL, toucher, NULL))
        die("setup");
    if (read(touched[0], &go, 1) != 1)
        die("pipe");
    pthread_setname_np(t, "rn-third");  // writes /proc/self/task/TID/comm
    if (write(renamed[1], "x", 1) != 1 || pthread_join(t, NULL))
        die("pipe");
    prctl(PR_SET_NAME, "rn-leader");
    touch(3);
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
    if (n < 0)
        die("readlink");
    self[n] = 0;
    execl(self, self, "exec", (char *)NULL);  // renames the thread uffdx-rename, a new mm
    die("execl");
}
