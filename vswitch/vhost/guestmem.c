/*
 * Surviving guest memory faults: the registry of guest mappings and the
 * SIGBUS handler (see guestmem.h for what it does and why).
 *
 * Everything the handler touches is a static array or an atomic, and the
 * only calls it makes are mmap(), write() and sigaction(), which are system
 * calls: it may run on any thread, at any instruction, even inside malloc.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include "vswitch.h"

enum {
    MAPPING_INTACT = 0,
    MAPPING_REPLACING = 1,       /* a handler is mapping zero memory over it */
    MAPPING_REPLACED = 2,
};

struct guest_mapping {
    uintptr_t start;             /* 0: free slot; written last on register, first on unregister */
    uint64_t len;
    struct vs_vhost_dev *dev;
    uint32_t region;
    uint32_t state;              /* MAPPING_* */
    uint32_t readers;            /* handlers looking at this slot right now */
    uint64_t fault_addr;
};

static struct guest_mapping mappings[VS_GUESTMEM_MAX_MAPPINGS];
static uint32_t slots_used;      /* every registered slot is below this */
static int wake_fd = -1;
static uint64_t fault_count;
static struct sigaction previous_action;
static int installed;

static void wake_control_plane(void)
{
    int fd = __atomic_load_n(&wake_fd, __ATOMIC_ACQUIRE);
    if (fd >= 0) {
        uint64_t one = 1;
        ssize_t r = write(fd, &one, sizeof one);
        (void)r;  /* EAGAIN: the counter is full, a wake-up is pending anyway. */
    }
}

void vs_vhost_dev_raise_fault(struct vs_vhost_dev *dev, uint32_t bits)
{
    __atomic_or_fetch(&dev->fault, bits, __ATOMIC_SEQ_CST);
    wake_control_plane();
}

uint32_t vs_vhost_dev_take_fault(struct vs_vhost_dev *dev)
{
    return __atomic_exchange_n(&dev->fault, 0, __ATOMIC_SEQ_CST);
}

/* Maps zero memory over the faulting mapping; true if the access may be retried. */
static bool replace_mapping(struct guest_mapping *m, uintptr_t addr)
{
    uint32_t expected = MAPPING_INTACT;
    if (__atomic_compare_exchange_n(&m->state, &expected, MAPPING_REPLACING, false,
                                    __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
        void *p = mmap((void *)m->start, m->len, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) {
            __atomic_store_n(&m->state, MAPPING_INTACT, __ATOMIC_SEQ_CST);
            return false;
        }
        __atomic_store_n(&m->fault_addr, (uint64_t)addr, __ATOMIC_RELAXED);
        __atomic_add_fetch(&fault_count, 1, __ATOMIC_RELAXED);
        __atomic_store_n(&m->state, MAPPING_REPLACED, __ATOMIC_SEQ_CST);
        vs_vhost_dev_raise_fault(m->dev, VS_DEV_FAULT_MEMORY);
        return true;
    }
    /* Another thread faulted in the same mapping (before its replacement was in
     * place): wait for the replacement, then retry the access. */
    while (__atomic_load_n(&m->state, __ATOMIC_SEQ_CST) == MAPPING_REPLACING) {
        __builtin_ia32_pause();
    }
    return __atomic_load_n(&m->state, __ATOMIC_SEQ_CST) == MAPPING_REPLACED;
}

/* Hands a fault that is not ours to whoever handled SIGBUS before us. */
static void chain(int sig, siginfo_t *info, void *context)
{
    if (previous_action.sa_flags & SA_SIGINFO) {
        if (previous_action.sa_sigaction) {
            previous_action.sa_sigaction(sig, info, context);
            return;
        }
    } else if (previous_action.sa_handler == SIG_IGN) {
        if (info->si_code <= 0) {
            return;  /* sent by kill(), and ignored before we came */
        }
    } else if (previous_action.sa_handler != SIG_DFL) {
        previous_action.sa_handler(sig);
        return;
    }
    /* The default action: a fault re-executes the access and kills the process; a
     * signal sent by kill() is raised again, delivered once we return. */
    struct sigaction dfl = { .sa_handler = SIG_DFL };
    sigemptyset(&dfl.sa_mask);
    sigaction(SIGBUS, &dfl, NULL);
    if (info->si_code <= 0) {
        raise(SIGBUS);
    }
}

static void on_sigbus(int sig, siginfo_t *info, void *context)
{
    int saved_errno = errno;
    /* BUS_ADRERR: an access to a page the file no longer has (truncated, a hole
     * that cannot be filled, an I/O error).  Not kill(), not a hardware error. */
    if (info->si_code == BUS_ADRERR) {
        uintptr_t addr = (uintptr_t)info->si_addr;
        uint32_t n = __atomic_load_n(&slots_used, __ATOMIC_ACQUIRE);
        for (uint32_t i = 0; i < n; i++) {
            struct guest_mapping *m = &mappings[i];
            __atomic_add_fetch(&m->readers, 1, __ATOMIC_SEQ_CST);
            uintptr_t start = __atomic_load_n(&m->start, __ATOMIC_SEQ_CST);
            bool recovered = start && addr - start < m->len && replace_mapping(m, addr);
            __atomic_sub_fetch(&m->readers, 1, __ATOMIC_SEQ_CST);
            if (recovered) {
                errno = saved_errno;
                return;
            }
            if (start && addr - start < m->len) {
                break;
            }
        }
    }
    errno = saved_errno;
    chain(sig, info, context);
}

int vs_guestmem_init(void)
{
    if (installed) {
        return 0;
    }
    int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (fd < 0) {
        return -errno;
    }
    struct sigaction action = { .sa_sigaction = on_sigbus, .sa_flags = SA_SIGINFO | SA_RESTART };
    sigemptyset(&action.sa_mask);
    if (sigaction(SIGBUS, &action, &previous_action) != 0) {
        int err = errno;
        close(fd);
        return -err;
    }
    __atomic_store_n(&wake_fd, fd, __ATOMIC_RELEASE);
    installed = 1;
    return 0;
}

int vs_guestmem_eventfd(void)
{
    return __atomic_load_n(&wake_fd, __ATOMIC_ACQUIRE);
}

int vs_guestmem_register(void *addr, uint64_t len, struct vs_vhost_dev *dev, uint32_t region)
{
    int rc = vs_guestmem_init();
    if (rc != 0) {
        return rc;
    }
    if (!addr || !len || !dev) {
        return -EINVAL;
    }
    for (uint32_t i = 0; i < VS_GUESTMEM_MAX_MAPPINGS; i++) {
        struct guest_mapping *m = &mappings[i];
        if (__atomic_load_n(&m->start, __ATOMIC_SEQ_CST) ||
            __atomic_load_n(&m->readers, __ATOMIC_SEQ_CST)) {
            continue;
        }
        m->len = len;
        m->dev = dev;
        m->region = region;
        m->fault_addr = 0;
        m->state = MAPPING_INTACT;
        if (i >= __atomic_load_n(&slots_used, __ATOMIC_RELAXED)) {
            __atomic_store_n(&slots_used, i + 1, __ATOMIC_RELEASE);
        }
        /* Published last: a handler that sees start sees the rest. */
        __atomic_store_n(&m->start, (uintptr_t)addr, __ATOMIC_SEQ_CST);
        return (int)i;
    }
    return -ENOSPC;
}

void vs_guestmem_unregister(int slot)
{
    if (slot < 0 || slot >= VS_GUESTMEM_MAX_MAPPINGS) {
        return;
    }
    struct guest_mapping *m = &mappings[slot];
    __atomic_store_n(&m->start, 0, __ATOMIC_SEQ_CST);
    /* A handler that saw the mapping may be replacing it: the caller unmaps only after. */
    while (__atomic_load_n(&m->readers, __ATOMIC_SEQ_CST)) {
        __builtin_ia32_pause();
    }
}

uint64_t vs_guestmem_fault_addr(int slot)
{
    if (slot < 0 || slot >= VS_GUESTMEM_MAX_MAPPINGS) {
        return 0;
    }
    return __atomic_load_n(&mappings[slot].fault_addr, __ATOMIC_RELAXED);
}

uint64_t vs_guestmem_fault_count(void)
{
    return __atomic_load_n(&fault_count, __ATOMIC_RELAXED);
}
