/*
 * The core-to-core probe (core_probe.h).  A round trip is: core A writes an
 * odd number to the shared line, core B sees it and writes the next even
 * one, core A sees that.  Each batch is timed as a whole, so the clock reads
 * are not part of the figure.  Below it, the wake-up probe, which shares its
 * way of pinning threads and reading the clock.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "vswitch.h"

struct probe_run {
    struct vs_core_probe *p;
    _Alignas(64) _Atomic uint64_t line;
    _Alignas(64) _Atomic int failed;     /* set by either side on a timeout; ends both */
    int rc_b;
};

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static int enter_core(int cpu, int realtime)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    int rc = pthread_setaffinity_np(pthread_self(), sizeof set, &set);
    if (rc != 0) {
        return -rc;
    }
    if (realtime) {
        struct sched_param sp = { .sched_priority = 1 };
        rc = pthread_setschedparam(pthread_self(), SCHED_FIFO, &sp);
        if (rc != 0) {
            return -rc;
        }
    }
    return 0;
}

/* Spins until the line holds `want`; the clock is read every 4096 spins
 * only, so that the wait itself stays a tight loop. */
static int wait_for(struct probe_run *r, uint64_t want, uint64_t deadline)
{
    for (uint32_t spins = 0; atomic_load_explicit(&r->line, memory_order_acquire) != want; spins++) {
        if ((spins & 4095) == 4095 && (atomic_load_explicit(&r->failed, memory_order_relaxed) || now_ns() > deadline)) {
            atomic_store_explicit(&r->failed, 1, memory_order_relaxed);
            return -ETIMEDOUT;
        }
    }
    return 0;
}

static void *answer(void *arg)
{
    struct probe_run *r = arg;
    struct vs_core_probe *p = r->p;
    r->rc_b = enter_core(p->cpu_b, p->realtime);
    if (r->rc_b != 0) {
        atomic_store_explicit(&r->failed, 1, memory_order_relaxed);
        return NULL;
    }
    uint64_t total = (uint64_t)p->round_trips * p->batches;
    uint64_t deadline = now_ns() + (uint64_t)p->timeout_ms * 1000000u;
    for (uint64_t i = 0; i < total; i++) {
        if (wait_for(r, 2 * i + 1, deadline) != 0) {
            r->rc_b = -ETIMEDOUT;
            return NULL;
        }
        atomic_store_explicit(&r->line, 2 * i + 2, memory_order_release);
    }
    return NULL;
}

struct start_args {
    struct probe_run *r;
    int rc;
};

static void *start(void *arg)
{
    struct start_args *s = arg;
    struct probe_run *r = s->r;
    struct vs_core_probe *p = r->p;
    s->rc = enter_core(p->cpu_a, p->realtime);
    if (s->rc != 0) {
        atomic_store_explicit(&r->failed, 1, memory_order_relaxed);
        return NULL;
    }
    uint64_t deadline = now_ns() + (uint64_t)p->timeout_ms * 1000000u;
    uint64_t i = 0;
    for (uint32_t b = 0; b < p->batches; b++) {
        uint64_t t0 = now_ns();
        for (uint32_t k = 0; k < p->round_trips; k++, i++) {
            atomic_store_explicit(&r->line, 2 * i + 1, memory_order_release);
            if (wait_for(r, 2 * i + 2, deadline) != 0) {
                s->rc = -ETIMEDOUT;
                return NULL;
            }
        }
        p->ns[b] = (double)(now_ns() - t0) / p->round_trips;
    }
    return NULL;
}

/* Of two threads' results, the one that says why: a side that failed on
 * its own (a core this process may not use: EINVAL; realtime refused:
 * EPERM) rather than one that only saw the other stop (ETIMEDOUT). */
static int first_cause(int a, int b)
{
    if (a != 0 && a != -ETIMEDOUT) {
        return a;
    }
    if (b != 0 && b != -ETIMEDOUT) {
        return b;
    }
    return a != 0 ? a : b;
}

/* Both probes need two different cores that a cpu_set_t can name. */
static bool two_cores(int32_t a, int32_t b)
{
    return a >= 0 && b >= 0 && a != b && a < CPU_SETSIZE && b < CPU_SETSIZE;
}

int vs_core_probe_run(struct vs_core_probe *p)
{
    if (p->round_trips == 0 || p->round_trips > 1000000 || p->batches == 0 ||
        p->batches > VS_CORE_PROBE_MAX_BATCHES || !two_cores(p->cpu_a, p->cpu_b) || p->timeout_ms == 0) {
        return -EINVAL;
    }
    struct probe_run *r = aligned_alloc(64, sizeof *r);
    if (r == NULL) {
        return -ENOMEM;
    }
    memset(r, 0, sizeof *r);
    r->p = p;
    struct start_args s = { .r = r };
    /* Both sides on threads of their own: the caller's thread keeps its
     * cores and scheduling policy. */
    pthread_t ta, tb;
    int rc = pthread_create(&tb, NULL, answer, r);
    if (rc != 0) {
        free(r);
        return -rc;
    }
    rc = pthread_create(&ta, NULL, start, &s);
    if (rc != 0) {
        atomic_store_explicit(&r->failed, 1, memory_order_relaxed);
        pthread_join(tb, NULL);
        free(r);
        return -rc;
    }
    pthread_join(ta, NULL);
    pthread_join(tb, NULL);
    rc = first_cause(s.rc, r->rc_b);
    free(r);
    return rc;
}

/* The wake-up probe (core_probe.h struct vs_wake_probe). */
struct wake_run {
    struct vs_wake_probe *p;
    int efd;
    _Alignas(64) _Atomic uint64_t sent_ns;   /* the waker's clock just before its write */
    _Alignas(64) _Atomic uint32_t answered;  /* wake-ups the sleeper has timed */
    _Atomic int failed;                      /* set by either side; ends both */
    int rc_sleeper;
    int rc_waker;
};

/* Ends the run: the sleeper, maybe in ppoll(), is woken and sees it. */
static void stop_both(struct wake_run *r)
{
    atomic_store_explicit(&r->failed, 1, memory_order_relaxed);
    uint64_t one = 1;
    ssize_t w = write(r->efd, &one, sizeof one);
    (void)w;
}

static void *sleep_and_time(void *arg)
{
    struct wake_run *r = arg;
    struct vs_wake_probe *p = r->p;
    int rc = enter_core(p->cpu_sleeper, 0);
    for (uint32_t i = 0; rc == 0 && i < p->wakes; i++) {
        struct pollfd fd = { .fd = r->efd, .events = POLLIN };
        struct timespec limit = { .tv_sec = p->timeout_ms / 1000, .tv_nsec = (p->timeout_ms % 1000) * 1000000L };
        int n = ppoll(&fd, 1, &limit, NULL);
        uint64_t woke = now_ns();
        uint64_t count;
        if (n < 0) {
            rc = -errno;
        } else if (n == 0 || atomic_load_explicit(&r->failed, memory_order_relaxed)) {
            rc = -ETIMEDOUT;
        } else if (read(r->efd, &count, sizeof count) != (ssize_t)sizeof count) {
            rc = -errno;
        } else {
            p->ns[i] = (uint32_t)(woke - atomic_load_explicit(&r->sent_ns, memory_order_acquire));
            atomic_store_explicit(&r->answered, i + 1, memory_order_release);
        }
    }
    if (rc != 0) {
        atomic_store_explicit(&r->failed, 1, memory_order_relaxed);
    }
    r->rc_sleeper = rc;
    return NULL;
}

/* Waits until `due`: asleep while more than 200 us are left, so that this
 * thread is awake and spinning when it writes. */
static void wait_until_ns(uint64_t due)
{
    uint64_t left = due - now_ns();
    if ((int64_t)left > 300000) {
        uint64_t nap = left - 200000;
        struct timespec ts = { .tv_sec = nap / 1000000000u, .tv_nsec = nap % 1000000000u };
        nanosleep(&ts, NULL);
    }
    while (now_ns() < due) {
    }
}

static void *wake_and_wait(void *arg)
{
    struct wake_run *r = arg;
    struct vs_wake_probe *p = r->p;
    uint64_t one = 1;
    int rc = enter_core(p->cpu_waker, 0);
    for (uint32_t i = 0; rc == 0 && i < p->wakes; i++) {
        wait_until_ns(now_ns() + (uint64_t)p->gap_us * 1000u);
        atomic_store_explicit(&r->sent_ns, now_ns(), memory_order_release);
        if (write(r->efd, &one, sizeof one) != (ssize_t)sizeof one) {
            rc = -errno;
            break;
        }
        uint64_t deadline = now_ns() + (uint64_t)p->timeout_ms * 1000000u;
        while (atomic_load_explicit(&r->answered, memory_order_acquire) != i + 1) {
            if (atomic_load_explicit(&r->failed, memory_order_relaxed) || now_ns() > deadline) {
                rc = -ETIMEDOUT;
                break;
            }
        }
    }
    if (rc != 0) {
        stop_both(r);
    }
    r->rc_waker = rc;
    return NULL;
}

int vs_wake_probe_run(struct vs_wake_probe *p)
{
    if (p->wakes == 0 || p->wakes > VS_WAKE_PROBE_MAX || p->gap_us == 0 || p->gap_us > 10000000 ||
        !two_cores(p->cpu_waker, p->cpu_sleeper) || p->timeout_ms == 0) {
        return -EINVAL;
    }
    struct wake_run *r = aligned_alloc(64, sizeof *r);
    if (r == NULL) {
        return -ENOMEM;
    }
    memset(r, 0, sizeof *r);
    r->p = p;
    r->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (r->efd < 0) {
        int rc = -errno;
        free(r);
        return rc;
    }
    pthread_t ts, tw;
    int rc = pthread_create(&ts, NULL, sleep_and_time, r);
    if (rc == 0) {
        rc = pthread_create(&tw, NULL, wake_and_wait, r);
        if (rc != 0) {
            stop_both(r);
        } else {
            pthread_join(tw, NULL);
        }
        pthread_join(ts, NULL);
        rc = rc != 0 ? -rc : first_cause(r->rc_waker, r->rc_sleeper);
    } else {
        rc = -rc;
    }
    close(r->efd);
    free(r);
    return rc;
}
