/*
 * The packet loop.  One pass over the poll list:
 *
 *   for each receive queue: take a burst (at most VS_BURST frames) that
 *   still sits in the source port's memory (a guest's buffers, say); under
 *   the FIB lock, learn each source MAC and look up each destination; group
 *   the frames by output port (a flooded frame joins every other port's
 *   group); hand each group to its port in one call, which copies each
 *   frame once, straight into the destination (a guest's buffers, notified
 *   once); finally give the burst's buffers back to the source port.
 *
 * Ports are reached only through their operations table (port.h), one
 * indirect call per burst: this file knows no port type.  Direct calls for
 * vhost ports measured no faster (tools/bench.py, 64 B, interleaved A/B).
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
#include <time.h>
#include <unistd.h>

#include "vswitch.h"

_Static_assert(VS_MAX_POLL >= VS_MAX_PORTS * VS_MAX_PORT_QUEUES, "a poll slot for every queue of every port");

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

struct out_group {
    uint32_t n;
    uint32_t unicast;            /* frames sent here because the FIB said so */
    struct vs_pkt *pkts[VS_BURST];
};

/*
 * Drops the frames longer than the port's MTU allows, as a Linux bridge
 * does: a frame cut short would reach its destination as a different one.
 * A GSO frame is exempt: the port takes it whole or it is cut into
 * gso_size segments (vs_offload_fit).
 */
static void drop_over_mtu(struct vs_port *out, struct out_group *g)
{
    uint32_t max = __atomic_load_n(&out->max_frame, __ATOMIC_RELAXED);
    if (!max) {
        return;
    }
    uint32_t kept = 0;
    for (uint32_t i = 0; i < g->n; i++) {
        struct vs_pkt *pkt = g->pkts[i];
        if (likely(pkt->len <= max || pkt->vnet.gso_type != VS_NET_HDR_GSO_NONE)) {
            g->pkts[kept++] = pkt;
        }
    }
    if (unlikely(kept != g->n)) {
        __atomic_add_fetch(&out->stats.tx_dropped_mtu, g->n - kept, __ATOMIC_RELAXED);  /* several PMDs */
        g->n = kept;
        if (g->unicast > kept) {
            g->unicast = kept;
        }
    }
}

static void transmit(struct vs_port *out, uint32_t queue_hint, struct out_group *g)
{
    if (unlikely(!__atomic_load_n(&out->link_up, __ATOMIC_ACQUIRE))) {
        out->stats.tx_dropped_down += g->unicast;
        return;
    }
    drop_over_mtu(out, g);
    if (unlikely(!g->n)) {
        return;
    }
    const struct vs_port_ops *ops = out->ops;
    uint32_t caps = ops->offload_caps ? ops->offload_caps(out) : 0;
    if (likely(!vs_offload_needed(g->pkts, g->n, caps))) {
        ops->tx_burst(out, queue_hint, g->pkts, g->n, g->unicast);
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
        ops->tx_burst(out, queue_hint, b->out, b->n, next == g->n ? g->unicast : 0);
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
    const struct vs_port_ops *ops = in->ops;
    struct vs_pkt pkts[VS_BURST];

    uint32_t n = ops->rx_burst(in, pq->queue, pkts, VS_BURST);
    if (n) {
        forward_burst(pmd, t, in, pq->queue, pkts, n, pass_clock(now));
        if (ops->rx_done) {
            ops->rx_done(in, pq->queue, pkts, n);
        }
    }
    return n;
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
 * An idle PMD sleeps until a port has work.  It asks every queue it polls
 * to arm its notifications (a guest's kicks, say) and for the fd that
 * turns readable when work arrives, checks once more that no queue got
 * work meanwhile (a guest may have added a buffer before it saw kicks
 * enabled), then waits on those fds and its own wakefd.  A queue that
 * cannot wake it limits the sleep to max_sleep_us, with an exponential
 * backoff from FIRST_SLEEP_US.
 */
static void idle_sleep(struct vs_pmd *pmd)
{
    const struct vs_port_table *t = __atomic_load_n(&pmd->table, __ATOMIC_SEQ_CST);
    struct pollfd fds[VS_MAX_POLL + 1];
    const struct vs_pollq *armed[VS_MAX_POLL];  /* armed[i] waits on fds[i + 1]; revents start 0 */
    uint32_t narmed = 0;
    bool every_queue_wakes_us = true;
    bool work = false;

    fds[0] = (struct pollfd){ .fd = pmd->wakefd, .events = POLLIN };
    for (uint32_t i = 0; t && i < t->n_poll; i++) {
        const struct vs_pollq *pq = &t->poll[i];
        const struct vs_port_ops *ops = pq->port->ops;
        int fd = ops->idle_arm ? ops->idle_arm(pq->port, pq->queue) : VS_IDLE_CANNOT_WAKE;
        if (fd >= 0) {
            armed[narmed++] = pq;
            fds[narmed] = (struct pollfd){ .fd = fd, .events = POLLIN };
        } else if (fd == VS_IDLE_CANNOT_WAKE) {
            every_queue_wakes_us = false;
        }
    }
    /* Our notification flags must be visible before the ports look for work. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    for (uint32_t i = 0; i < narmed && !work; i++) {
        const struct vs_port_ops *ops = armed[i]->port->ops;
        work = ops->idle_pending && ops->idle_pending(armed[i]->port, armed[i]->queue);
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
        if (ppoll(fds, 1 + narmed, &ts, NULL) > 0 && (fds[0].revents & POLLIN)) {
            /* Drained so that the next sleep does not return at once; the
             * ports drain their own fds (idle_disarm). */
            uint64_t count;
            ssize_t r = read(pmd->wakefd, &count, sizeof count);
            (void)r;
        }
        pmd->stats.sleeps++;
    }
    for (uint32_t i = 0; i < narmed; i++) {
        const struct vs_pollq *pq = armed[i];
        int woke = (fds[i + 1].revents & POLLIN) != 0;
        pmd->stats.kick_wakeups += woke;
        if (pq->port->ops->idle_disarm) {
            pq->port->ops->idle_disarm(pq->port, pq->queue, woke);
        }
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
