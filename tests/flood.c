// flood N: N short-lived processes, one after the other, each with a userfaultfd of its own:
// one MISSING fault on an anonymous page (a thread touches it; the main thread reads the
// message and maps a zero page), then one REMOVE event (the thread drops the page with
// MADV_DONTNEED; the main thread reads the event), then exit. For tests/test_export.py: a flood
// of pids, each with exactly one fault and one non-fault event.
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define PAGE 4096

static void die(const char *what) {
    perror(what);
    _exit(1);
}

static void *toucher(void *page) {
    (void)*(volatile char *)page;                       // the fault
    if (madvise(page, PAGE, MADV_DONTNEED))             // the REMOVE event
        die("madvise");
    return NULL;
}

static void read_msg(int uffd, unsigned char event) {
    struct uffd_msg msg;
    if (read(uffd, &msg, sizeof(msg)) != sizeof(msg) || msg.event != event)
        die("read");
}

static void one_process(void) {
    int uffd = syscall(SYS_userfaultfd, O_CLOEXEC);
    struct uffdio_api api = {.api = UFFD_API, .features = UFFD_FEATURE_EVENT_REMOVE};
    if (uffd < 0 || ioctl(uffd, UFFDIO_API, &api))
        die("userfaultfd");
    char *page = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    struct uffdio_register reg = {.range = {(unsigned long)page, PAGE},
                                  .mode = UFFDIO_REGISTER_MODE_MISSING};
    if (page == MAP_FAILED || ioctl(uffd, UFFDIO_REGISTER, &reg))
        die("register");
    pthread_t thread;
    if (pthread_create(&thread, NULL, toucher, page))
        die("pthread_create");
    read_msg(uffd, UFFD_EVENT_PAGEFAULT);
    struct uffdio_zeropage zero = {.range = {(unsigned long)page, PAGE}};
    if (ioctl(uffd, UFFDIO_ZEROPAGE, &zero))
        die("zeropage");
    read_msg(uffd, UFFD_EVENT_REMOVE);
    pthread_join(thread, NULL);
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 1;
    for (int i = 0; i < n; i++) {
        pid_t pid = fork();
        if (pid < 0)
            die("fork");
        if (pid == 0) {
            one_process();
            _exit(0);
        }
        int status;
        if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status))
            return 1;
    }
    return 0;
}
