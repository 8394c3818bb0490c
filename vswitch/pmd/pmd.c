/*
 * The packet loop.  One pass over the poll list:
 *
 *   for each receive queue: take a burst (at most VS_BURST frames) that
 *   still sits in the source guest's memory; under the FIB lock, learn each
 *   source MAC and look up each destination; group the frames by output
 *   port (a flooded frame joins every other port's group); hand each group
 *   to its port in one call, which copies each frame once, straight into
 *   the destination guest's buffers, and notifies that guest once; finally
 *   return the burst's buffers to the source guest and notify it once.
 *
 * Idle passes back off into a sleep on wakefd, so that an idle switch does
 * not burn a core; vs_pmd_quiesce() writes wakefd to cut the sleep short.
 * The epoch counter, bumped at the top of every pass, is how the control
 * plane knows the PMD no longer holds pointers it read before a change.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "vswitch.h"

#define IDLE_PASSES_BEFORE_SLEEP 256
#define FIRST_SLEEP_US 8
/* Gaps in a busy guest's traffic are microseconds long: sleeping through
 * them would make it kick (a syscall) and wait for us to wake.  So after
 * traffic the PMD keeps polling for this long before it may sleep. */
#define LINGER_US 1000

/* TSC ticks per second, measured against CLOCK_MONOTONIC over a few ms. */
static uint64_t measure_tsc_hz(void)
{
    struct timespec a, b, pause = { .tv_sec = 0, .tv_nsec = 5000000 };
    clock_gettime(CLOCK_MONOTONIC, &a);
    uint64_t t0 = vs_rdtsc();
    nanosleep(&pause, NULL);
    clock_gettime(CLOCK_MONOTONIC, &b);
    uint64_t t1 = vs_rdtsc();
    uint64_t ns = (uint64_t)(b.tv_sec - a.tv_sec) * 1000000000ULL + (uint64_t)(b.tv_nsec - a.tv_nsec);
    return ns ? (t1 - t0) * 1000000000ULL / ns : 1000000000ULL;
}

static void interrupt_only(int sig)
{
    (void)sig;
}

int vs_pmd_watchdog_signal(void)
{
    return SIGRTMIN + 2;
}

/* The handler only has to exist: with it, the signal interrupts a blocking
 * system call (no SA_RESTART) instead of killing the process. */
static int install_watchdog_handler(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = interrupt_only;
    sigemptyset(&sa.sa_mask);
    return sigaction(vs_pmd_watchdog_signal(), &sa, NULL) ? -errno : 0;
}

int vs_pmd_init(struct vs_pmd *pmd, struct vs_fib *fib)
{
    memset(pmd, 0, sizeof *pmd);
    pmd->fib = fib;
    pmd->max_sleep_us = 1000;
    pmd->max_notify_sleep_ms = 100;
    pmd->tsc_hz = measure_tsc_hz();
    pmd->linger_cycles = pmd->tsc_hz / 1000000 * LINGER_US;
    pmd->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (pmd->wakefd < 0) {
        return -errno;
    }
    return install_watchdog_handler();
}

void vs_pmd_fini(struct vs_pmd *pmd)
{
    if (pmd->wakefd >= 0) {
        close(pmd->wakefd);
        pmd->wakefd = -1;
    }
}

void vs_pmd_publish(struct vs_pmd *pmd, struct vs_port_table *table)
{
    __atomic_store_n(&pmd->table, table, __ATOMIC_SEQ_CST);
}

static void wake(struct vs_pmd *pmd)
{
    uint64_t one = 1;
    ssize_t r = write(pmd->wakefd, &one, sizeof one);
    (void)r;  /* EAGAIN: a wake-up is already pending. */
}

int vs_pmd_call_watchdog(struct vs_pmd *pmd, uint32_t stall_ms)
{
    struct vs_call_watch *w = &pmd->call_watch;
    /* The thread cannot end meanwhile: only vs_pmd_stop() ends it, and the
     * control plane stops the watchdog first. */
    if (!__atomic_load_n(&pmd->running, __ATOMIC_ACQUIRE)) {
        return 0;
    }
    /* seq read on both sides of since_tsc: the stamp belongs to that write. */
    uint64_t seq = __atomic_load_n(&w->seq, __ATOMIC_ACQUIRE);
    uint64_t since = __atomic_load_n(&w->since_tsc, __ATOMIC_ACQUIRE);
    if (!since || __atomic_load_n(&w->seq, __ATOMIC_ACQUIRE) != seq) {
        return 0;
    }
    uint64_t now = vs_rdtsc();
    if (now < since || now - since < pmd->tsc_hz / 1000 * stall_ms) {
        return 0;
    }
    /* Sent again on every call while the same write is pending: a signal that
     * arrived just before the write began did not interrupt it. */
    __atomic_store_n(&w->interrupt_seq, seq, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&w->signals, 1, __ATOMIC_RELAXED);
    pthread_kill((pthread_t)pmd->thread, vs_pmd_watchdog_signal());
    return 1;
}

void vs_call_watchdog_run(struct vs_call_watchdog *wd)
{
    struct timespec pause = { .tv_sec = wd->interval_ms / 1000,
                              .tv_nsec = (wd->interval_ms % 1000) * 1000000L };
    while (!__atomic_load_n(&wd->stop, __ATOMIC_ACQUIRE)) {
        nanosleep(&pause, NULL);
        for (uint32_t i = 0; i < wd->n_pmds; i++) {
            vs_pmd_call_watchdog(wd->pmds[i], wd->stall_ms);
        }
    }
}

int vs_pmd_quiesce(struct vs_pmd *pmd, uint32_t timeout_ms)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint64_t start = __atomic_load_n(&pmd->epoch, __ATOMIC_SEQ_CST);
    struct timespec pause = { .tv_sec = 0, .tv_nsec = 20000 };
    uint64_t waited_us = 0;
    /* A pass that began before our change has ended once the epoch moves. */
    while (__atomic_load_n(&pmd->running, __ATOMIC_SEQ_CST) &&
           __atomic_load_n(&pmd->epoch, __ATOMIC_SEQ_CST) == start) {
        wake(pmd);
        /* A pass stuck in a guest's blocked call write would never end. */
        vs_pmd_call_watchdog(pmd, VS_PMD_CALL_STALL_MS);
        nanosleep(&pause, NULL);
        waited_us += 20;
        if (waited_us > (uint64_t)timeout_ms * 1000) {
            return -ETIMEDOUT;
        }
    }
    return 0;
}

void vs_pmd_stop(struct vs_pmd *pmd)
{
    __atomic_store_n(&pmd->stop, 1, __ATOMIC_SEQ_CST);
    wake(pmd);
}

/*
 * Copies the destination and source MACs, which may span segments, out of
 * the frame once: a guest may rewrite its buffer while we learn and look
 * up, and every decision must be made on the same bytes.
 */
static inline void eth_addrs(const struct vs_pkt *pkt, uint8_t *macs)
{
    if (likely(pkt->segs[0].len >= 12)) {
        vs_copy_once(macs, pkt->segs[0].addr, 12);
        return;
    }
    uint32_t copied = 0;
    for (uint32_t s = 0; s < pkt->nsegs && copied < 12; s++) {
        uint32_t n = pkt->segs[s].len < 12 - copied ? pkt->segs[s].len : 12 - copied;
        memcpy(macs + copied, pkt->segs[s].addr, n);
        copied += n;
    }
    vs_keep_copy(macs, 12);
}

/* vs_fib_key(mac, 0), inlined: two loads and two byte swaps. */
static inline uint64_t mac_key(const uint8_t *mac)
{
    uint32_t hi;
    uint16_t lo;
    memcpy(&hi, mac, sizeof hi);
    memcpy(&lo, mac + 4, sizeof lo);
    return ((uint64_t)__builtin_bswap32(hi) << 16) | __builtin_bswap16(lo);
}

/* The receive queue of a port that a frame from ingress queue `hint` uses. */
static struct vs_vring *pick_rx_vring(struct vs_vhost_dev *dev, uint32_t hint)
{
    uint32_t pairs = dev->nr_queue_pairs ? dev->nr_queue_pairs : 1;
    struct vs_vring *vr = &dev->vrings[2 * (hint % pairs)];
    if (likely(vs_vring_is_enabled(vr))) {
        return vr;
    }
    /* A guest may enable fewer queues than the port offers. */
    for (uint32_t q = 0; q < pairs; q++) {
        vr = &dev->vrings[2 * q];
        if (vs_vring_is_enabled(vr)) {
            return vr;
        }
    }
    return NULL;
}

struct out_group {
    uint32_t n;
    uint32_t unicast;            /* frames sent here because the FIB said so */
    struct vs_pkt *pkts[VS_BURST];
};

/* Hands frames to the port type's transmit function. */
static void deliver(struct vs_port *out, uint32_t queue_hint, struct vs_pkt **pkts, uint32_t n,
                    uint32_t unicast)
{
    switch (out->type) {
    case VS_PORT_VHOST_USER: {
        struct vs_vring *vr = pick_rx_vring(out->vhost, queue_hint);
        if (likely(vr)) {
            vs_vring_enqueue_burst(out->vhost, vr, pkts, n);
        } else {
            out->stats.tx_dropped_down += unicast;
        }
        break;
    }
    case VS_PORT_TAP:
    case VS_PORT_AF_PACKET:
        vs_kport_tx_burst(out->kport, queue_hint, pkts, n);
        break;
    default:
        break;
    }
}

/* Which virtio-net header offloads the port takes (VS_OFFLOAD_*). */
static inline uint32_t offload_caps(const struct vs_port *out)
{
    switch (out->type) {
    case VS_PORT_VHOST_USER:
        return vs_offload_caps_from_features(out->vhost->features);
    case VS_PORT_TAP:
    case VS_PORT_AF_PACKET:
        return out->kport->offload_caps;
    default:
        return 0;
    }
}

static void transmit(struct vs_port *out, uint32_t queue_hint, struct out_group *g)
{
    if (unlikely(!__atomic_load_n(&out->link_up, __ATOMIC_ACQUIRE))) {
        out->stats.tx_dropped_down += g->unicast;
        return;
    }
    uint32_t caps = offload_caps(out);
    if (likely(!vs_offload_needed(g->pkts, g->n, caps))) {
        deliver(out, queue_hint, g->pkts, g->n, g->unicast);
        return;
    }
    /* A partial checksum or a GSO frame the port cannot take: fix copies in software. */
    struct vs_offload_batch *b = vs_offload_thread_batch();
    if (unlikely(!b)) {
        out->stats.tx_dropped_offload += g->n;
        return;
    }
    for (uint32_t next = 0; next < g->n;) {
        next = vs_offload_fit(b, g->pkts, g->n, next, caps);
        deliver(out, queue_hint, b->out, b->n, next == g->n ? g->unicast : 0);
    }
    out->stats.tx_dropped_offload += b->errors;
    b->errors = 0;
}

static void forward_burst(struct vs_pmd *pmd, const struct vs_port_table *t, struct vs_port *in,
                          uint32_t queue, struct vs_pkt *pkts, uint32_t n, uint64_t now)
{
    int dest[VS_BURST];
    uint8_t macs[12];
    struct vs_fib *fib = pmd->fib;

    vs_fib_lock(fib);
    for (uint32_t i = 0; i < n; i++) {
        eth_addrs(&pkts[i], macs);
        if (likely(!(macs[6] & 1))) {
            vs_fib_learn(fib, mac_key(macs + 6), in->port_no, now);
        }
        dest[i] = (macs[0] & 1) ? VS_FIB_NO_PORT : vs_fib_lookup(fib, mac_key(macs));
    }
    vs_fib_unlock(fib);

    struct out_group groups[VS_MAX_PORTS];
    uint16_t touched[VS_MAX_PORTS];
    uint8_t seen[VS_MAX_PORTS];
    uint32_t n_touched = 0;
    memset(seen, 0, sizeof seen);

#define ADD_TO_GROUP(port_no, pkt, is_unicast) do {                       \
        uint32_t p_ = (port_no);                                          \
        if (!seen[p_]) {                                                  \
            seen[p_] = 1;                                                 \
            groups[p_].n = 0;                                             \
            groups[p_].unicast = 0;                                       \
            touched[n_touched++] = (uint16_t)p_;                          \
        }                                                                 \
        groups[p_].pkts[groups[p_].n++] = (pkt);                          \
        groups[p_].unicast += (is_unicast);                               \
    } while (0)

    for (uint32_t i = 0; i < n; i++) {
        int d = dest[i];
        if (d >= 0 && t->ports[d]) {
            if (unlikely((uint32_t)d == in->port_no)) {
                /* The destination lives behind the port it came from. */
                pmd->stats.dropped_same_port++;
                continue;
            }
            ADD_TO_GROUP((uint32_t)d, &pkts[i], 1);
            pmd->stats.unicast++;
            continue;
        }
        /* Unknown, broadcast or multicast: every port but the ingress one. */
        for (uint32_t j = 0; j < t->n_live; j++) {
            uint32_t p = t->live[j];
            if (p != in->port_no) {
                ADD_TO_GROUP(p, &pkts[i], 0);
            }
        }
        pmd->stats.flooded++;
    }
#undef ADD_TO_GROUP

    for (uint32_t k = 0; k < n_touched; k++) {
        transmit(t->ports[touched[k]], queue, &groups[touched[k]]);
    }
}

static inline uint64_t pass_clock(uint64_t *now)
{
    if (!*now) {
        *now = vs_now_sec();
    }
    return *now;
}

static uint32_t poll_queue(struct vs_pmd *pmd, const struct vs_port_table *t,
                           const struct vs_pollq *pq, uint64_t *now)
{
    struct vs_port *in = pq->port;
    struct vs_pkt pkts[VS_BURST];

    switch (in->type) {
    case VS_PORT_VHOST_USER: {
        struct vs_vhost_dev *dev = in->vhost;
        struct vs_vring *vr = &dev->vrings[2 * pq->queue + 1];
        if (!vs_vring_is_enabled(vr) || unlikely(__atomic_load_n(&dev->fault, __ATOMIC_RELAXED))) {
            return 0;  /* a faulted device is being disconnected: leave its rings alone */
        }
        uint32_t n = vs_vring_dequeue_burst(dev, vr, pkts, VS_BURST);
        if (unlikely(n && __atomic_load_n(&dev->fault, __ATOMIC_ACQUIRE))) {
            /* Its guest memory faulted during the burst and now reads as zeros:
             * the frames may be garbage, so they go nowhere. */
            vr->stats.dropped += n;
            return 0;
        }
        if (n) {
            forward_burst(pmd, t, in, pq->queue, pkts, n, pass_clock(now));
        }
        /* Also publishes chains dropped as malformed, if any. */
        vs_vring_dequeue_done(dev, vr, pkts, n);
        return n;
    }
    case VS_PORT_TAP:
    case VS_PORT_AF_PACKET: {
        /* The frames stay in the port's buffers until its next receive. */
        uint32_t n = vs_kport_rx_burst(in->kport, pq->queue, pkts, VS_BURST);
        if (n) {
            forward_burst(pmd, t, in, pq->queue, pkts, n, pass_clock(now));
        }
        return n;
    }
    default:
        return 0;
    }
}

uint32_t vs_pmd_poll_once(struct vs_pmd *pmd)
{
    const struct vs_port_table *t = __atomic_load_n(&pmd->table, __ATOMIC_SEQ_CST);
    if (!t) {
        return 0;
    }
    uint64_t now = 0;  /* read once per pass, and only by a pass that moves packets */
    uint32_t total = 0;
    for (uint32_t i = 0; i < t->n_poll; i++) {
        uint32_t n = poll_queue(pmd, t, &t->poll[i], &now);
        total += n;
        pmd->stats.bursts += n != 0;
    }
    pmd->stats.packets += total;
    return total;
}

/*
 * An idle PMD sleeps until a guest kicks.  It turns guest notifications on
 * for every ring it polls, checks once more that no ring got work meanwhile
 * (the guest may have added a buffer before it saw notifications enabled),
 * then waits on the rings' kick eventfds and its own wakefd.  A queue that
 * cannot wake it (no kick fd, a port type without one) limits the sleep to
 * max_sleep_us, with an exponential backoff from FIRST_SLEEP_US.
 */
static void idle_sleep(struct vs_pmd *pmd)
{
    const struct vs_port_table *t = __atomic_load_n(&pmd->table, __ATOMIC_SEQ_CST);
    struct pollfd fds[VS_MAX_POLL + 1];
    struct vs_vring *notifying[VS_MAX_POLL];
    struct vs_vhost_dev *devs[VS_MAX_POLL];
    int kernel_fds[VS_MAX_POLL];
    uint32_t nfds = 0, nnotify = 0, nkernel = 0;
    bool every_queue_wakes_us = true;
    bool work = false;

    fds[nfds++] = (struct pollfd){ .fd = pmd->wakefd, .events = POLLIN };
    for (uint32_t i = 0; t && i < t->n_poll; i++) {
        const struct vs_pollq *pq = &t->poll[i];
        if (pq->port->type == VS_PORT_TAP || pq->port->type == VS_PORT_AF_PACKET) {
            /* A kernel port's fd turns readable when a frame arrives. */
            if (__atomic_load_n(&pq->port->kport->fault, __ATOMIC_RELAXED)) {
                continue;  /* a dead fd would report an error at once, forever */
            }
            int fd = pq->queue < pq->port->kport->nqueues ? pq->port->kport->fds[pq->queue] : -1;
            if (fd >= 0) {
                kernel_fds[nkernel++] = fd;
            } else {
                every_queue_wakes_us = false;
            }
            continue;
        }
        if (pq->port->type != VS_PORT_VHOST_USER) {
            every_queue_wakes_us = false;
            continue;
        }
        struct vs_vhost_dev *dev = pq->port->vhost;
        struct vs_vring *vr = &dev->vrings[2 * pq->queue + 1];
        if (!vs_vring_is_enabled(vr)) {
            continue;
        }
        if (vr->kickfd < 0) {
            every_queue_wakes_us = false;
            continue;
        }
        vs_vring_enable_notify(dev, vr, 1);
        notifying[nnotify] = vr;
        devs[nnotify++] = dev;
        fds[nfds++] = (struct pollfd){ .fd = vr->kickfd, .events = POLLIN };
    }
    for (uint32_t i = 0; i < nkernel; i++) {
        fds[nfds++] = (struct pollfd){ .fd = kernel_fds[i], .events = POLLIN };
    }
    /* Our notification flags must be visible before we look at the avail indexes. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    for (uint32_t i = 0; i < nnotify && !work; i++) {
        work = vs_vring_has_avail(notifying[i]);
    }

    if (!work) {
        struct timespec ts;
        if (every_queue_wakes_us) {
            ts = (struct timespec){ .tv_sec = pmd->max_notify_sleep_ms / 1000,
                                    .tv_nsec = (pmd->max_notify_sleep_ms % 1000) * 1000000L };
        } else {
            pmd->sleep_us = pmd->sleep_us ? pmd->sleep_us * 2 : FIRST_SLEEP_US;
            if (pmd->sleep_us > pmd->max_sleep_us) {
                pmd->sleep_us = pmd->max_sleep_us;
            }
            ts = (struct timespec){ .tv_sec = pmd->sleep_us / 1000000, .tv_nsec = (pmd->sleep_us % 1000000) * 1000L };
        }
        if (ppoll(fds, nfds, &ts, NULL) > 0) {
            /* Drain the eventfds that woke us, so the next sleep does not return at
             * once; a kernel port's fd is drained by receiving from it.  A kick
             * eventfd is the front-end's too: it may have made it blocking and
             * emptied it since the poll (or two rings may share it), so the read
             * must never wait. */
            for (uint32_t i = 0; i < 1 + nnotify; i++) {
                if (fds[i].revents & POLLIN) {
                    uint64_t count;
                    struct iovec iov = { .iov_base = &count, .iov_len = sizeof count };
                    ssize_t r = preadv2(fds[i].fd, &iov, 1, -1, RWF_NOWAIT);
                    (void)r;
                    pmd->stats.kick_wakeups += i > 0;
                }
            }
        }
        pmd->stats.sleeps++;
    }
    /* Busy again: the guests need not kick while we poll. */
    for (uint32_t i = 0; i < nnotify; i++) {
        vs_vring_enable_notify(devs[i], notifying[i], 0);
    }
}

void vs_pmd_run(struct vs_pmd *pmd)
{
    pmd->thread = (unsigned long)pthread_self();
    vs_vring_watch_calls(&pmd->call_watch);
    __atomic_store_n(&pmd->running, 1, __ATOMIC_SEQ_CST);
    while (!__atomic_load_n(&pmd->stop, __ATOMIC_ACQUIRE)) {
        __atomic_add_fetch(&pmd->epoch, 1, __ATOMIC_SEQ_CST);
        uint64_t t0 = vs_rdtsc();
        uint32_t n = vs_pmd_poll_once(pmd);
        uint64_t cycles = vs_rdtsc() - t0;
        pmd->stats.loops++;
        if (n) {
            pmd->stats.busy_cycles += cycles;
            pmd->idle_passes = 0;
            pmd->sleep_us = 0;
            pmd->last_work_tsc = t0 + cycles;
        } else {
            pmd->stats.idle_cycles += cycles;
            if (++pmd->idle_passes > IDLE_PASSES_BEFORE_SLEEP &&
                t0 + cycles - pmd->last_work_tsc > pmd->linger_cycles) {
                idle_sleep(pmd);
                pmd->idle_passes = 0;
            }
        }
    }
    __atomic_add_fetch(&pmd->epoch, 1, __ATOMIC_SEQ_CST);
    __atomic_store_n(&pmd->running, 0, __ATOMIC_SEQ_CST);
    vs_vring_watch_calls(NULL);
}
