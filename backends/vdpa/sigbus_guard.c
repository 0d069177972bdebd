/* The SIGBUS handler of backends/vdpa/sigbus_guard.py (read its docstring first).
 *
 * A fault inside a registered shared mapping (a guest-memory region whose file can shrink)
 * gets anonymous zero pages mapped over the part of the mapping past the file's end (at least
 * from the faulting page on), is counted for that mapping, and the handler returns: the access
 * completes on throw-away memory. Any other SIGBUS restores the action that was in place before
 * ours (SIG_DFL or, e.g., Python's faulthandler) and re-raises it, so it kills as before.
 *
 * Async-signal-safe: fstat, mmap, sigaction, raise and plain loads/stores on a static table.
 * The table is written only by the thread holding the GIL (sigbus_guard_register/unregister);
 * a fault that touches guest memory happens under the GIL too, so the handler never sees a
 * half-written slot (the `active` flag is published last, with a barrier).
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>

#define SLOTS 1024

struct slot {
    volatile int active;
    uintptr_t start;      /* the mapping's address */
    uintptr_t len;        /* its length (a multiple of the page size) */
    int fd;               /* our duplicate of the backing fd (fstat only), -1 if none */
    uint64_t file_offset; /* file offset the mapping starts at */
    uintptr_t gran;       /* page size of the mapping (huge page size on hugetlbfs) */
    volatile uint64_t faults;     /* SIGBUS caught in this mapping */
    volatile uintptr_t zero_from; /* lowest address replaced by zero pages, 0 if none */
};

static struct slot slots[SLOTS];
static volatile uint64_t total_faults;
static volatile int installed;
static struct sigaction previous;

static void reraise(void)
{
    sigaction(SIGBUS, &previous, NULL);
    installed = 0;
    raise(SIGBUS); /* delivered when the handler returns (SIGBUS is blocked in it) */
}

static void handler(int sig, siginfo_t *info, void *ctx)
{
    (void)sig;
    (void)ctx;
    if (info == NULL || info->si_code <= 0) { /* sent by kill/raise: not a memory fault */
        reraise();
        return;
    }
    uintptr_t addr = (uintptr_t)info->si_addr;
    for (int i = 0; i < SLOTS; i++) {
        struct slot *s = &slots[i];
        if (!s->active || addr < s->start || addr - s->start >= s->len)
            continue;
        uintptr_t gran = s->gran;
        uintptr_t end = s->start + s->len;
        uintptr_t lo = (addr & ~(gran - 1));
        struct stat st;
        if (s->fd >= 0 && fstat(s->fd, &st) == 0) {
            uint64_t fsize = (uint64_t)st.st_size;
            uint64_t inside = fsize > s->file_offset ? fsize - s->file_offset : 0;
            inside = (inside + gran - 1) & ~((uint64_t)gran - 1);
            uintptr_t eof = inside >= s->len ? end : s->start + (uintptr_t)inside;
            if (eof < lo)
                lo = eof;
        }
        if (lo < s->start)
            lo = s->start;
        void *p = mmap((void *)lo, end - lo, PROT_READ | PROT_WRITE,
                       MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) {
            reraise();
            return;
        }
        if (s->zero_from == 0 || lo < s->zero_from)
            s->zero_from = lo;
        s->faults++;
        total_faults++;
        return; /* the access is retried on the zero pages */
    }
    reraise();
}

/* Install the handler unless it is already the current SIGBUS action; the action found is
 * what a foreign SIGBUS goes to. 0 on success. */
int sigbus_guard_install(void)
{
    struct sigaction cur;
    if (sigaction(SIGBUS, NULL, &cur) != 0)
        return -1;
    if (installed && (cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == handler)
        return 0;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = handler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, &previous) != 0)
        return -1;
    installed = 1;
    return 0;
}

/* Remove ours, putting back the action it replaced. */
int sigbus_guard_uninstall(void)
{
    if (!installed)
        return 0;
    installed = 0;
    return sigaction(SIGBUS, &previous, NULL);
}

int sigbus_guard_installed(void)
{
    struct sigaction cur;
    if (sigaction(SIGBUS, NULL, &cur) != 0)
        return 0;
    return installed && (cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == handler;
}

/* A slot index (>= 0), or -1 when the table is full. */
int sigbus_guard_register(uintptr_t start, uintptr_t len, int fd, uint64_t file_offset,
                          uintptr_t gran)
{
    for (int i = 0; i < SLOTS; i++) {
        struct slot *s = &slots[i];
        if (s->active)
            continue;
        s->start = start;
        s->len = len;
        s->fd = fd;
        s->file_offset = file_offset;
        s->gran = gran;
        s->faults = 0;
        s->zero_from = 0;
        __sync_synchronize();
        s->active = 1;
        return i;
    }
    return -1;
}

void sigbus_guard_unregister(int i)
{
    if (i >= 0 && i < SLOTS) {
        slots[i].active = 0;
        __sync_synchronize();
    }
}

uint64_t sigbus_guard_faults(int i)
{
    return (i >= 0 && i < SLOTS) ? slots[i].faults : 0;
}

uintptr_t sigbus_guard_zero_from(int i)
{
    return (i >= 0 && i < SLOTS) ? slots[i].zero_from : 0;
}

uint64_t sigbus_guard_total(void)
{
    return total_faults;
}
