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
 * A PMD set to poll_only never sleeps: it spends a core to save the wake-up.
 * A PMD set to yield_light gives its CPU away after every pass that moved
 * less than half a burst, for threads that share its CPU (pmd.yield), and
 * sleeps at once when its yields run no other thread, or after a few empty
 * passes, not after the linger, once it finds itself held off its CPU.
 * Without pmd.yield a PMD keeps the linger: on a CPU of its own, or one
 * shared only now and then, an early sleep would make the guests kick.
 * The epoch counter, bumped at the top of every pass, is how the control
 * plane knows the PMD no longer holds pointers it read before a change.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
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
/* A sched_yield() that comes back sooner than this ran no other thread. */
#define YIELD_HANDOVER_NS 3000
/* With pmd.yield, empty passes in a row whose yields ran no other thread
 * before the PMD sleeps.  The scheduler (EEVDF) lets a yield hand the CPU
 * only to a thread it owes time: two PMDs on one CPU otherwise take turns
 * by whole time slices (milliseconds) while the frames each waits for sit
 * with the other.  Sleeping on the queues' fds hands the CPU over at once
 * and the frames' arrival wakes us. */
#define IDLE_YIELDS_BEFORE_SLEEP 8
/* A PMD with pmd.yield that was held off its CPU this long between two
 * passes, or in an empty one, shares the CPU with a thread that wants it
 * (another switch's PMD, say); for SHARED_WINDOW_MS after that it sleeps
 * after IDLE_YIELDS_BEFORE_SLEEP empty passes instead of lingering, since
 * its polling would only take turns with that thread by whole time slices. */
#define PREEMPTED_US 50
#define SHARED_WINDOW_MS 1000

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

uint64_t vs_tsc_hz(void)
{
    /* Measured once per process: every PMD and port uses the same rate. */
    static uint64_t hz;
    uint64_t v = __atomic_load_n(&hz, __ATOMIC_RELAXED);
    if (!v) {
        v = measure_tsc_hz();
        __atomic_store_n(&hz, v, __ATOMIC_RELAXED);
    }
    return v;
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
    pmd->tsc_hz = vs_tsc_hz();
    pmd->linger_cycles = pmd->tsc_hz / 1000000 * LINGER_US;
    pmd->yield_handover_cycles = pmd->tsc_hz / 1000000 * YIELD_HANDOVER_NS / 1000;
    pmd->preempted_cycles = pmd->tsc_hz / 1000000 * PREEMPTED_US;
    pmd->shared_window_cycles = pmd->tsc_hz / 1000 * SHARED_WINDOW_MS;
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

/*
 * The frames of one burst mostly share their addresses (a queue carries few
 * flows), so the last source learned and the last destination looked up are
 * remembered for the rest of the burst: a repeat costs a compare, not a walk
 * of the MAC table.  A learn may move or evict any entry, so it forgets the
 * remembered destination.  Keys are 48-bit MACs under a 12-bit VLAN id, so ~0
 * matches none.
 */
struct fib_memo {
    uint64_t src;
    uint64_t dst;
    uint16_t src_sub;
    uint16_t dst_sub;
    int dst_port;
    /* Lookups answered by the memo, added to the table's stats once per
     * burst (memo_stats) rather than stored to them per frame. */
    uint32_t lookups;
    uint32_t hits;
};

#define FIB_MEMO_INIT { .src = ~0ULL, .dst = ~0ULL, .dst_port = VS_FIB_NO_PORT }
#define NO_KEY (~0ULL)

static inline void memo_stats(struct vs_fib *fib, const struct fib_memo *m)
{
    fib->stats.lookups += m->lookups;
    fib->stats.hits += m->hits;
}

#define NO_BUCKET UINT32_MAX

/* Learns hdr's source on in_port (and its sub-destination in_sub) and returns
 * the port of its destination (VS_FIB_NO_PORT: flood), its sub in *dest_sub.
 * src_bucket: the source's bucket if prefetch_sources found it, else NO_BUCKET;
 * src_key: the source's key if prefetch_sources made it, else NO_KEY. */
static inline int learn_and_lookup(struct vs_fib *fib, struct fib_memo *m, const uint8_t *hdr,
                                   uint64_t vkey, uint32_t in_port, uint16_t in_sub, uint64_t now,
                                   uint16_t *dest_sub, uint32_t src_bucket, uint64_t src_key)
{
    if (likely(!(hdr[6] & 1))) {
        uint64_t src = src_key != NO_KEY ? src_key : mac_key(hdr + 6) | vkey;
        if (src != m->src || in_sub != m->src_sub) {
            /* Many sources in a burst: a known one, refreshed, keeps the remembered destination. */
            int changed;
            if (src_bucket != NO_BUCKET) {
                uint32_t entry = vs_fib_learn_check(fib, src, src_bucket, in_port, in_sub, now);
                changed = entry != VS_FIB_NOOP &&
                          vs_fib_learn_at(fib, src, src_bucket, entry, in_port, in_sub, now);
            } else {
                changed = vs_fib_learn_sub(fib, src, in_port, in_sub, now);
            }
            if (changed) {
                m->dst = ~0ULL;
            }
            m->src = src;
            m->src_sub = in_sub;
        }
    }
    if (hdr[0] & 1) {
        *dest_sub = 0;
        return VS_FIB_NO_PORT;
    }
    uint64_t dst = mac_key(hdr) | vkey;
    if (dst != m->dst) {
        m->dst = dst;
        m->dst_port = vs_fib_lookup_sub(fib, dst, &m->dst_sub);
    } else {
        m->lookups++;
        m->hits += m->dst_port != VS_FIB_NO_PORT;
    }
    *dest_sub = m->dst_sub;
    return m->dst_port;
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

static void monitor_group(const struct vs_monitor *monitor, bool received, uint32_t queue_hint,
                          struct vs_pkt **pkts, uint32_t n);

static void send_group(struct vs_port *out, uint32_t queue_hint, struct out_group *g);

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
    send_group(out, queue_hint, g);
    /* Captured and mirrored after the port took them: the frames are still
     * the source's until rx_done, and a mirror copy may then retarget sub. */
    const struct vs_monitor *monitor = __atomic_load_n(&out->monitor, __ATOMIC_ACQUIRE);
    if (unlikely(monitor != NULL)) {
        monitor_group(monitor, false, queue_hint, g->pkts, g->n);
    }
}

static void send_group(struct vs_port *out, uint32_t queue_hint, struct out_group *g)
{
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

/* A burst of many sources in a large table would miss the cache twice per
 * frame (bucket, entry) one after the other: start all those loads first,
 * before the lock, so that they overlap.  A source repeated from the frame
 * before costs nothing, so the few-flow case stays as it was; with many,
 * every frame's source is hashed, repeats too (a hash is cheaper than
 * keeping a list of the distinct ones). */
static void prefetch_sources(const struct vs_fib *fib, const uint8_t (*macs)[12], uint32_t n,
                             uint32_t *src_bucket, uint64_t *src_key)
{
    uint32_t runs = 0, first = 0;   /* runs: stretches of frames in a row with one source */
    uint64_t prev = NO_KEY;
    for (uint32_t i = 0; i < n; i++) {
        src_bucket[i] = NO_BUCKET;
        uint64_t src = NO_KEY;
        if (!(macs[i][6] & 1)) {
            src = mac_key(macs[i] + 6);
            if (src != prev) {
                if (runs++ == 0) {
                    first = i;
                }
                prev = src;
            }
        }
        src_key[i] = src;
    }
    if (runs < 2) {
        if (runs) {
            src_bucket[first] = vs_fib_prefetch_bucket(fib, src_key[first]);
        }
        return;   /* one source: the memo and the cache have it */
    }
    /* Many sources: hashed together (a multicast frame's NO_KEY too, unused). */
    vs_fib_buckets_of(fib, src_key, n, src_bucket);
    for (uint32_t i = 0; i < n; i++) {
        vs_fib_prefetch_entry(fib, src_bucket[i]);
    }
}

/*
 * The stage timer (pmd.h struct vs_pmd_profile).  prof is a constant in each
 * of the loop's two copies (vs_pmd_poll_once), so in the one that runs
 * without profiling these calls compile to nothing.  cyc is the pass's own
 * tally, added to the profile only if the pass moved packets.
 */
struct stage_clock {
    uint64_t mark;               /* TSC at the end of the last stage */
    uint64_t cyc[VS_PMD_STAGES];
};

static inline __attribute__((always_inline)) void stage_start(bool prof, struct stage_clock *c)
{
    if (prof) {
        c->mark = vs_rdtsc();
    }
}

static inline __attribute__((always_inline)) void stage_end(bool prof, struct stage_clock *c, uint32_t stage)
{
    if (prof) {
        uint64_t now = vs_rdtsc();
        c->cyc[stage] += now - c->mark;
        c->mark = now;
    }
}

static inline __attribute__((always_inline))
void forward_burst(struct vs_pmd *pmd, const struct vs_port_table *t, struct vs_port *in,
                   uint32_t queue, struct vs_pkt *pkts, uint32_t n, uint64_t now,
                   const bool prof, struct stage_clock *clk)
{
    int dest[VS_BURST];
    uint16_t dest_sub[VS_BURST];
    uint8_t macs[VS_BURST][12];
    struct vs_fib *fib = pmd->fib;
    bool in_subs = in->subs != 0;

    for (uint32_t i = 0; i < n; i++) {
        eth_addrs(&pkts[i], macs[i]);
    }
    uint32_t src_bucket[VS_BURST];
    uint64_t src_key[VS_BURST];
    prefetch_sources(fib, macs, n, src_bucket, src_key);
    struct fib_memo memo = FIB_MEMO_INIT;
    vs_fib_lock(fib);
    for (uint32_t i = 0; i < n; i++) {
        dest[i] = learn_and_lookup(fib, &memo, macs[i], 0, in->port_no, in_subs ? pkts[i].sub : 0, now,
                                   &dest_sub[i], src_bucket[i], src_key[i]);
    }
    memo_stats(fib, &memo);
    vs_fib_unlock(fib);
    stage_end(prof, clk, VS_PMD_STAGE_LEARN);

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
            pkts[i].sub = dest_sub[i];
            ADD_TO_GROUP((uint32_t)d, &pkts[i], 1);
            pmd->stats.unicast++;
            continue;
        }
        /* Unknown, broadcast or multicast: every port but the ingress one
         * (so never back into the tunnel it came from: split horizon). */
        pkts[i].sub = VS_SUB_ALL;
        for (uint32_t j = 0; j < t->n_live; j++) {
            uint32_t p = t->live[j];
            if (p != in->port_no) {
                ADD_TO_GROUP(p, &pkts[i], 0);
            }
        }
        pmd->stats.flooded++;
    }
#undef ADD_TO_GROUP
    stage_end(prof, clk, VS_PMD_STAGE_GROUP);

    for (uint32_t k = 0; k < n_touched; k++) {
        transmit(t->ports[touched[k]], queue, &groups[touched[k]]);
    }
    stage_end(prof, clk, VS_PMD_STAGE_TX);
}

/*
 * VLANs (ports/port.h, README "VLANs").  Taken only while some port in the
 * table has VLAN settings (t->n_vlan), so a switch without them runs
 * forward_burst above unchanged.
 *
 * At ingress a frame is classified once, on one copy of its first 16
 * bytes: its VLAN, whether it came with an 802.1Q header, and the tag it
 * would leave a trunk with (its own priority bits, its VLAN).  Learning and
 * lookup are keyed by (MAC, VLAN); flooding goes only to ports that carry
 * the VLAN.
 *
 * Tags are pushed and popped without copying the frame: each destination
 * that needs another form of it gets a second struct vs_pkt whose segments
 * are the source's bytes [0, 12), then (for a tagged form) 4 bytes of tag
 * held on this stack, then the source's bytes from 12 (untagged source) or
 * 16 (tagged source) on.  Every port type's transmit already gathers from
 * segments (a vhost copy into the guest, a TAP's writev, an AF_PACKET ring
 * slot), so the one copy stays the only copy, and the source is never
 * written, since one flooded frame may leave tagged on one port and
 * untagged on another.  A frame has at most two such forms, built the first
 * time a destination asks for them.  The tag is always ours, never the
 * guest's bytes: a guest rewriting its tag after we classified the frame
 * cannot move it to another VLAN.  The offsets in the virtio-net header
 * move by the 4 bytes too, so checksum and TSO offloads (done by the
 * destination or by offload.c, which looks past 802.1Q headers) stay right.
 */
#define ETHERTYPE_VLAN_HI 0x81
#define ETHERTYPE_VLAN_LO 0x00
#define VLAN_HLEN 4
#define VLAN_TAG_OFFSET 12

struct vlan_class {
    uint16_t vid;                /* the frame's VLAN; 0: VLAN 0, forwarded as it is */
    uint16_t tci;                /* the tag it leaves tagged with */
    uint8_t tagged;              /* it arrived with an 802.1Q header */
};

struct vlan_forms {
    uint32_t built_tagged;       /* bit i: tagged[i] is built */
    uint32_t built_untagged;
    uint8_t tag[VS_BURST][VLAN_HLEN];
    struct vs_pkt tagged[VS_BURST];
    struct vs_pkt untagged[VS_BURST];
};

static inline bool vlan_carries(const struct vs_vlan *v, uint32_t vid)
{
    if (!v) {
        return vid == 0;
    }
    return (v->carries[vid >> 6] >> (vid & 63)) & 1;
}

/* Whether frames of VLAN vid (not 0) leave a port with these settings tagged. */
static inline bool vlan_leaves_tagged(const struct vs_vlan *v, uint32_t vid)
{
    return v && (v->mode == VS_VLAN_TRUNK || v->mode == VS_VLAN_NATIVE_TAGGED ||
                 (v->mode == VS_VLAN_NATIVE_UNTAGGED && vid != v->tag));
}

/* Classifies a frame received on a port with settings v (NULL: none) from a
 * copy of its first 16 bytes; false if the port drops it. */
static inline bool vlan_classify(const struct vs_vlan *v, const uint8_t *hdr, uint32_t len,
                                 struct vlan_class *c)
{
    bool tagged = len >= VLAN_TAG_OFFSET + VLAN_HLEN + 2 && hdr[12] == ETHERTYPE_VLAN_HI &&
                  hdr[13] == ETHERTYPE_VLAN_LO;
    uint16_t tci = tagged ? (uint16_t)(hdr[14] << 8 | hdr[15]) : 0;
    uint32_t vid = tci & 0xfff;
    c->tagged = tagged;
    if (!v) {
        c->vid = 0;
        return true;
    }
    if (v->mode == VS_VLAN_ACCESS) {
        if (vid) {
            return false;
        }
        vid = v->tag;
    } else if (!vid && v->mode != VS_VLAN_TRUNK) {
        vid = v->tag;            /* untagged or priority-tagged: the native VLAN */
    }
    if (!vlan_carries(v, vid)) {
        return false;
    }
    c->vid = (uint16_t)vid;
    c->tci = (uint16_t)((tci & 0xf000) | vid);
    return true;
}

/* out = in's bytes [0, 12), the 4 bytes at tag (if not NULL), in's bytes
 * from skip on: segments only.  False if that needs too many segments. */
static bool vlan_rewrite(struct vs_pkt *out, const struct vs_pkt *in, uint32_t skip, const uint8_t *tag)
{
    uint32_t n = 0, off = 0;
    bool tag_placed = tag == NULL;
#define EMIT(p_, len_) do {                                               \
        if ((len_) > 0) {                                                 \
            if (n == VS_PKT_MAX_SEGS) {                                   \
                return false;                                             \
            }                                                             \
            out->segs[n].addr = (uint8_t *)(p_);                          \
            out->segs[n++].len = (len_);                                  \
        }                                                                 \
    } while (0)
    for (uint32_t s = 0; s < in->nsegs; s++) {
        uint8_t *p = in->segs[s].addr;
        uint32_t start = off, end = off + in->segs[s].len;
        off = end;
        if (start < VLAN_TAG_OFFSET) {
            EMIT(p, (end < VLAN_TAG_OFFSET ? end : VLAN_TAG_OFFSET) - start);
        }
        if (!tag_placed && end >= VLAN_TAG_OFFSET) {
            EMIT(tag, VLAN_HLEN);
            tag_placed = true;
        }
        if (end > skip) {
            uint32_t from = start > skip ? start : skip;
            EMIT(p + (from - start), end - from);
        }
    }
#undef EMIT
    if (!tag_placed) {
        return false;
    }
    int delta = (tag ? VLAN_HLEN : 0) - (int)(skip - VLAN_TAG_OFFSET);
    out->nsegs = (uint16_t)n;
    out->len = in->len + delta;
    out->head = in->head;
    out->sub = in->sub;
    out->vnet = in->vnet;
    if (out->vnet.flags & VS_NET_HDR_F_NEEDS_CSUM) {
        out->vnet.csum_start = (uint16_t)(out->vnet.csum_start + delta);
    }
    if (out->vnet.hdr_len) {
        out->vnet.hdr_len = (uint16_t)(out->vnet.hdr_len + delta);
    }
    return true;
}

/* Frame i as it leaves a port with settings v; NULL if it cannot be built. */
static inline struct vs_pkt *vlan_form(struct vlan_forms *f, struct vs_pkt *pkts, const struct vlan_class *c,
                                       uint32_t i, const struct vs_vlan *v)
{
    if (!c->vid) {
        return &pkts[i];
    }
    if (vlan_leaves_tagged(v, c->vid)) {
        if (!(f->built_tagged & (1u << i))) {
            f->tag[i][0] = ETHERTYPE_VLAN_HI;
            f->tag[i][1] = ETHERTYPE_VLAN_LO;
            f->tag[i][2] = (uint8_t)(c->tci >> 8);
            f->tag[i][3] = (uint8_t)c->tci;
            if (!vlan_rewrite(&f->tagged[i], &pkts[i], VLAN_TAG_OFFSET + (c->tagged ? VLAN_HLEN : 0), f->tag[i])) {
                return NULL;
            }
            f->built_tagged |= 1u << i;
        }
        return &f->tagged[i];
    }
    if (!c->tagged) {
        return &pkts[i];
    }
    if (!(f->built_untagged & (1u << i))) {
        if (!vlan_rewrite(&f->untagged[i], &pkts[i], VLAN_TAG_OFFSET + VLAN_HLEN, NULL)) {
            return NULL;
        }
        f->built_untagged |= 1u << i;
    }
    return &f->untagged[i];
}

/* Copies a frame's first 16 bytes (MACs, EtherType, TCI) out once; zeros past its end. */
static inline void eth_header(const struct vs_pkt *pkt, uint8_t *hdr)
{
    if (likely(pkt->segs[0].len >= 16)) {
        vs_copy_once(hdr, pkt->segs[0].addr, 16);
        return;
    }
    uint32_t copied = 0;
    memset(hdr, 0, 16);
    for (uint32_t s = 0; s < pkt->nsegs && copied < 16; s++) {
        uint32_t k = pkt->segs[s].len < 16 - copied ? pkt->segs[s].len : 16 - copied;
        memcpy(hdr + copied, pkt->segs[s].addr, k);
        copied += k;
    }
    vs_keep_copy(hdr, 16);
}

static __attribute__((noinline)) void forward_burst_vlan(struct vs_pmd *pmd, const struct vs_port_table *t,
                                                         struct vs_port *in, uint32_t queue, struct vs_pkt *pkts,
                                                         uint32_t n, uint64_t now)
{
    const struct vs_vlan *in_vlan = __atomic_load_n(&in->vlan, __ATOMIC_ACQUIRE);
    struct vlan_class cls[VS_BURST];
    int dest[VS_BURST];
    uint16_t dest_sub[VS_BURST];
    bool in_subs = in->subs != 0;
    uint32_t keep = 0;           /* bit i: frame i passed classification */
    uint64_t dropped = 0;
    uint8_t hdr[16];
    struct vs_fib *fib = pmd->fib;
    struct fib_memo memo = FIB_MEMO_INIT;

    vs_fib_lock(fib);
    for (uint32_t i = 0; i < n; i++) {
        eth_header(&pkts[i], hdr);
        /* A tag needs up to two more segments (vlan_rewrite): a frame without room is dropped here. */
        if (unlikely(!vlan_classify(in_vlan, hdr, pkts[i].len, &cls[i]) ||
                     (cls[i].vid && pkts[i].nsegs > VS_PKT_MAX_SEGS - 2))) {
            dropped++;
            continue;
        }
        keep |= 1u << i;
        dest[i] = learn_and_lookup(fib, &memo, hdr, (uint64_t)cls[i].vid << 48, in->port_no,
                                   in_subs ? pkts[i].sub : 0, now, &dest_sub[i], NO_BUCKET, NO_KEY);
    }
    memo_stats(fib, &memo);
    vs_fib_unlock(fib);
    if (unlikely(dropped)) {
        __atomic_add_fetch(&in->stats.vlan_dropped, dropped, __ATOMIC_RELAXED);
    }

    struct vlan_forms forms;
    struct out_group groups[VS_MAX_PORTS];
    uint16_t touched[VS_MAX_PORTS];
    uint8_t seen[VS_MAX_PORTS];
    uint32_t n_touched = 0;
    memset(seen, 0, sizeof seen);
    forms.built_tagged = forms.built_untagged = 0;

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
        if (!(keep & (1u << i))) {
            continue;
        }
        uint32_t vid = cls[i].vid;
        int d = dest[i];
        if (d >= 0 && t->ports[d]) {
            if (unlikely((uint32_t)d == in->port_no)) {
                pmd->stats.dropped_same_port++;
                continue;
            }
            const struct vs_vlan *v = __atomic_load_n(&t->ports[d]->vlan, __ATOMIC_ACQUIRE);
            /* An entry the port no longer carries (its settings just changed): flood instead. */
            if (likely(vlan_carries(v, vid))) {
                pkts[i].sub = dest_sub[i];
                struct vs_pkt *form = vlan_form(&forms, pkts, &cls[i], i, v);
                if (likely(form != NULL)) {
                    ADD_TO_GROUP((uint32_t)d, form, 1);
                    pmd->stats.unicast++;
                }
                continue;
            }
        }
        /* Unknown, broadcast or multicast: every other port in the frame's VLAN. */
        pkts[i].sub = VS_SUB_ALL;
        for (uint32_t j = 0; j < t->n_live; j++) {
            uint32_t p = t->live[j];
            if (p == in->port_no) {
                continue;
            }
            const struct vs_vlan *v = __atomic_load_n(&t->ports[p]->vlan, __ATOMIC_ACQUIRE);
            if (vlan_carries(v, vid)) {
                struct vs_pkt *form = vlan_form(&forms, pkts, &cls[i], i, v);
                if (likely(form != NULL)) {
                    ADD_TO_GROUP(p, form, 0);
                }
            }
        }
        pmd->stats.flooded++;
    }
#undef ADD_TO_GROUP

    for (uint32_t k = 0; k < n_touched; k++) {
        transmit(t->ports[touched[k]], queue, &groups[touched[k]]);
    }
}

/*
 * Capture and mirroring (pmd/capture.h), taken only for a port with a monitor.
 * Frames are captured as they are on that port's wire: received ones before
 * policing and VLAN checks, sent ones after their VLAN tag was pushed or
 * popped and the MTU check, before software offloads.  A mirror copy goes
 * through transmit() like any frame, so the output port's own link, MTU and
 * offload rules apply; an output port is never selected by a mirror
 * (capture.py check_mirrors), so this recurses once at most.  Sent frames
 * are captured whether or not the port had room for them.
 */
static __attribute__((noinline)) void monitor_group(const struct vs_monitor *monitor, bool received,
                                                    uint32_t queue_hint, struct vs_pkt **pkts, uint32_t n)
{
    uint32_t n_captures = received ? monitor->n_rx_captures : monitor->n_tx_captures;
    if (n_captures) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        uint64_t time_ns = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
        for (uint32_t c = 0; c < n_captures; c++) {
            vs_capture_frames(received ? monitor->rx_captures[c] : monitor->tx_captures[c], pkts, n, time_ns);
        }
    }
    uint32_t n_mirrors = received ? monitor->n_rx_mirrors : monitor->n_tx_mirrors;
    for (uint32_t m = 0; m < n_mirrors; m++) {
        struct out_group copy = { .n = n, .unicast = 0 };
        for (uint32_t i = 0; i < n; i++) {
            pkts[i]->sub = VS_SUB_ALL;   /* every remote of a tunnel output */
            copy.pkts[i] = pkts[i];
        }
        transmit(received ? monitor->rx_mirrors[m] : monitor->tx_mirrors[m], queue_hint, &copy);
    }
}

/* A received burst on a port with a monitor; returns true if it must not be
 * forwarded (the port is a mirror's output). */
static __attribute__((noinline)) bool monitor_received(struct vs_port *in, const struct vs_monitor *monitor,
                                                       uint32_t queue, struct vs_pkt *pkts, uint32_t n)
{
    struct vs_pkt *ptrs[VS_BURST];
    uint16_t subs[VS_BURST];
    for (uint32_t i = 0; i < n; i++) {
        ptrs[i] = &pkts[i];
        subs[i] = pkts[i].sub;
    }
    monitor_group(monitor, true, queue, ptrs, n);
    if (monitor->mirror_output) {
        __atomic_add_fetch(&in->stats.mirror_output_dropped, n, __ATOMIC_RELAXED);
        return true;
    }
    for (uint32_t i = 0; i < n; i++) {
        pkts[i].sub = subs[i];   /* the remote a tunnel frame came from, for learning */
    }
    return false;
}

static inline uint64_t pass_clock(uint64_t *now)
{
    if (!*now) {
        *now = vs_now_sec();
    }
    return *now;
}

/*
 * How many of the burst's first frames the port's policer lets through; the
 * rest are dropped (a burst over the rate loses its tail, as a queue would).
 * Tokens accrue for the time since the last burst, up to the bucket's depth.
 */
static __attribute__((noinline)) uint32_t police_burst(const struct vs_pmd *pmd, struct vs_port *in,
                                                       struct vs_police *pol, const struct vs_pkt *pkts,
                                                       uint32_t n)
{
    uint64_t tsc = vs_rdtsc();
    uint32_t pass = 0;
    vs_spin_lock(&pol->lock);
    if (pol->last_tsc == 0 || tsc - pol->last_tsc > pmd->tsc_hz) {
        pol->packet_tokens = pol->burst_packets;
        pol->byte_tokens = pol->burst_bytes;
    } else {
        double secs = (double)(tsc - pol->last_tsc) / (double)pmd->tsc_hz;
        pol->packet_tokens += secs * pol->packets_per_sec;
        if (pol->packet_tokens > pol->burst_packets) {
            pol->packet_tokens = pol->burst_packets;
        }
        pol->byte_tokens += secs * pol->bytes_per_sec;
        if (pol->byte_tokens > pol->burst_bytes) {
            pol->byte_tokens = pol->burst_bytes;
        }
    }
    pol->last_tsc = tsc;
    for (; pass < n; pass++) {
        double packet_cost = pol->packets_per_sec > 0 ? 1.0 : 0.0;
        double byte_cost = pol->bytes_per_sec > 0 ? (double)pkts[pass].len : 0.0;
        if (pol->packet_tokens < packet_cost || pol->byte_tokens < byte_cost) {
            break;
        }
        pol->packet_tokens -= packet_cost;
        pol->byte_tokens -= byte_cost;
    }
    vs_spin_unlock(&pol->lock);
    if (pass < n) {
        __atomic_add_fetch(&in->stats.police_dropped, n - pass, __ATOMIC_RELAXED);
    }
    return pass;
}

/* Captures, polices (if police) and forwards n frames received on in, or
 * sent as if they had been; returns how many were forwarded. */
static inline __attribute__((always_inline))
uint32_t switch_received(struct vs_pmd *pmd, const struct vs_port_table *t, struct vs_port *in, uint32_t queue,
                         struct vs_pkt *pkts, uint32_t n, uint64_t *now, bool police,
                         const bool prof, struct stage_clock *clk)
{
    uint32_t pass = n;
    const struct vs_monitor *monitor = __atomic_load_n(&in->monitor, __ATOMIC_ACQUIRE);
    if (unlikely(monitor != NULL) && monitor_received(in, monitor, queue, pkts, n)) {
        pass = 0;
    }
    if (police) {
        struct vs_police *pol = __atomic_load_n(&in->police, __ATOMIC_ACQUIRE);
        if (unlikely(pol) && pass) {
            pass = police_burst(pmd, in, pol, pkts, n);
        }
    }
    stage_end(prof, clk, VS_PMD_STAGE_HOOKS);
    if (unlikely(t->n_vlan)) {
        if (pass) {
            forward_burst_vlan(pmd, t, in, queue, pkts, pass, pass_clock(now));
        }
        stage_end(prof, clk, VS_PMD_STAGE_VLAN);
    } else if (likely(pass)) {
        forward_burst(pmd, t, in, queue, pkts, pass, pass_clock(now), prof, clk);
    }
    return pass;
}

/*
 * Announcements (vs_port_announce).  Like DPDK's vhost library, which puts
 * a RARP at the head of the guest's next dequeue burst, the frame enters
 * the fast path as if the guest had sent it: it is learned on its port in
 * the port's VLAN, flooded to every other port of that VLAN (tagged where
 * they take it tagged, never back into the port, captured and mirrored as
 * received there), and not policed, as it is the switch's frame, not the
 * guest's.  One frame per poll of a queue at most: more pending ones go
 * out over the next polls.  Several PMDs may poll queues of one port: the compare-and-swap
 * gives each frame to one of them.
 */
_Static_assert(offsetof(struct vs_port, announce) + sizeof(uint64_t) <= 64,
               "vs_port.announce on the struct's first cache line");

#define ETHERTYPE_RARP 0x8035
#define ARP_HRD_ETHER 1
#define ETHERTYPE_IPV4 0x0800
#define ARP_OP_REVREQUEST 3

int vs_port_announce(struct vs_port *port, const uint8_t *mac)
{
    uint64_t key = mac_key(mac);
    if ((mac[0] & 1) || !key) {
        return -EINVAL;
    }
    uint64_t old = __atomic_load_n(&port->announce, __ATOMIC_ACQUIRE), next;
    do {
        uint64_t frames = old >> 16 == key ? (old & 0xffff) : 0;
        next = key << 16 | (frames < 0xffff ? frames + 1 : frames);
    } while (!__atomic_compare_exchange_n(&port->announce, &old, next, false, __ATOMIC_ACQ_REL,
                                          __ATOMIC_ACQUIRE));
    return (int)(next & 0xffff);
}

/* The frame QEMU's announce_self_create() and DPDK's rte_net_make_rarp_packet()
 * send: a reverse request whose sender and target hardware addresses are the
 * guest's, with no protocol addresses, zero-padded to VS_RARP_FRAME_LEN. */
static void rarp_frame(uint8_t *f, uint64_t key)
{
    uint8_t mac[6];
    for (int i = 0; i < 6; i++) {
        mac[i] = (uint8_t)(key >> (40 - 8 * i));
    }
    memset(f, 0, VS_RARP_FRAME_LEN);
    memset(f, 0xff, 6);
    memcpy(f + 6, mac, 6);
    f[12] = ETHERTYPE_RARP >> 8;
    f[13] = ETHERTYPE_RARP & 0xff;
    f[15] = ARP_HRD_ETHER;
    f[16] = ETHERTYPE_IPV4 >> 8;
    f[18] = 6;                   /* hardware address length */
    f[19] = 4;                   /* protocol address length */
    f[21] = ARP_OP_REVREQUEST;
    memcpy(f + 22, mac, 6);      /* sender hardware address; sender IP 0 */
    memcpy(f + 32, mac, 6);      /* target hardware address; target IP 0 */
}

static __attribute__((noinline)) void announce(struct vs_pmd *pmd, const struct vs_port_table *t,
                                               struct vs_port *in, uint32_t queue, uint64_t *now)
{
    uint64_t a = __atomic_load_n(&in->announce, __ATOMIC_ACQUIRE), next;
    do {
        if (!a) {
            return;              /* the PMD of another of its queues took it */
        }
        next = (a & 0xffff) > 1 ? a - 1 : 0;
    } while (!__atomic_compare_exchange_n(&in->announce, &a, next, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE));

    uint8_t frame[VS_RARP_FRAME_LEN];
    rarp_frame(frame, a >> 16);
    struct vs_pkt pkt;
    pkt.len = VS_RARP_FRAME_LEN;
    pkt.nsegs = 1;
    pkt.head = 0;
    pkt.sub = 0;
    memset(&pkt.vnet, 0, sizeof pkt.vnet);
    pkt.segs[0].addr = frame;
    pkt.segs[0].len = VS_RARP_FRAME_LEN;
    /* Not on a mirror's output port, which takes nothing in (counted there). */
    if (switch_received(pmd, t, in, queue, &pkt, 1, now, false, false, NULL)) {
        __atomic_add_fetch(&in->stats.rarp_sent, 1, __ATOMIC_RELAXED);
    }
}

static inline __attribute__((always_inline))
uint32_t poll_queue(struct vs_pmd *pmd, const struct vs_port_table *t, const struct vs_pollq *pq, uint64_t *now,
                    const bool prof, struct stage_clock *clk)
{
    struct vs_port *in = pq->port;
    const struct vs_port_ops *ops = in->ops;
    struct vs_pkt pkts[VS_BURST];

    /* Ahead of the burst, as DPDK does: the MAC table moves before the guest's own frames are switched. */
    if (unlikely(__atomic_load_n(&in->announce, __ATOMIC_RELAXED))) {
        announce(pmd, t, in, pq->queue, now);
    }
    stage_start(prof, clk);
    uint32_t n = ops->rx_burst(in, pq->queue, pkts, VS_BURST);
    stage_end(prof, clk, VS_PMD_STAGE_RX);
    if (n) {
        switch_received(pmd, t, in, pq->queue, pkts, n, now, true, prof, clk);
        if (ops->rx_done) {
            ops->rx_done(in, pq->queue, pkts, n);
        }
        stage_end(prof, clk, VS_PMD_STAGE_RX_DONE);
    }
    return n;
}

static inline __attribute__((always_inline)) uint32_t poll_pass(struct vs_pmd *pmd, const bool prof)
{
    const struct vs_port_table *t = __atomic_load_n(&pmd->table, __ATOMIC_SEQ_CST);
    if (!t) {
        return 0;
    }
    struct stage_clock clk;
    uint64_t t0 = 0;
    if (prof) {
        memset(&clk, 0, sizeof clk);
        t0 = vs_rdtsc();
    }
    /* The clock is read once per pass, and only by a pass that moves packets. */
    uint64_t now = pmd->clock_sec;
    uint32_t total = 0, bursts = 0;
    for (uint32_t i = 0; i < t->n_poll; i++) {
        uint32_t n = poll_queue(pmd, t, &t->poll[i], &now, prof, &clk);
        total += n;
        pmd->stats.bursts += n != 0;
        if (prof) {
            bursts += n != 0;
        }
    }
    pmd->stats.packets += total;
    if (prof && total) {
        struct vs_pmd_profile *p = &pmd->profile;
        for (uint32_t s = 0; s < VS_PMD_STAGES; s++) {
            p->cycles[s] += clk.cyc[s];
        }
        p->busy_cycles += vs_rdtsc() - t0;
        p->packets += total;
        p->bursts += bursts;
    }
    return total;
}

/* The loop with the stage timer: a copy of its own, so that the usual one carries none of it. */
static __attribute__((noinline)) uint32_t poll_pass_profiled(struct vs_pmd *pmd)
{
    return poll_pass(pmd, true);
}

uint32_t vs_pmd_poll_once(struct vs_pmd *pmd)
{
    if (unlikely(__atomic_load_n(&pmd->profiling, __ATOMIC_RELAXED))) {
        return poll_pass_profiled(pmd);
    }
    return poll_pass(pmd, false);
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

/* Keeps stats.max_gap_cycles, the longest time between the starts of two
 * passes: a compare per pass, on the TSC read the pass takes anyway. */
static inline void pass_gap(struct vs_pmd *pmd, uint64_t *last_pass_tsc, uint64_t now)
{
    if (unlikely(__atomic_load_n(&pmd->gap_reset, __ATOMIC_RELAXED))) {
        __atomic_store_n(&pmd->gap_reset, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&pmd->stats.max_gap_cycles, 0, __ATOMIC_RELAXED);
        *last_pass_tsc = 0;
    }
    if (*last_pass_tsc && now - *last_pass_tsc > pmd->stats.max_gap_cycles) {
        __atomic_store_n(&pmd->stats.max_gap_cycles, now - *last_pass_tsc, __ATOMIC_RELAXED);
    }
    *last_pass_tsc = now;
}

void vs_pmd_run(struct vs_pmd *pmd)
{
    pmd->thread = (unsigned long)pthread_self();
    vs_vring_watch_calls(&pmd->call_watch);
    __atomic_store_n(&pmd->running, 1, __ATOMIC_SEQ_CST);
    uint64_t last_pass_tsc = 0;   /* 0: no pass since start, a sleep or a gap_reset */
    uint64_t last_end_tsc = 0;    /* end of the last pass's bookkeeping; 0 after a sleep */
    while (!__atomic_load_n(&pmd->stop, __ATOMIC_ACQUIRE)) {
        __atomic_add_fetch(&pmd->epoch, 1, __ATOMIC_SEQ_CST);
        uint64_t t0 = vs_rdtsc();
        pass_gap(pmd, &last_pass_tsc, t0);
        uint32_t n = vs_pmd_poll_once(pmd);
        uint64_t cycles = vs_rdtsc() - t0;
        pmd->stats.loops++;
        if ((last_end_tsc && t0 - last_end_tsc > pmd->preempted_cycles) ||
            (n == 0 && cycles > pmd->preempted_cycles)) {
            pmd->shared_until_tsc = t0 + cycles + pmd->shared_window_cycles;
        }
        /* A thread that shares our CPU (another switch's PMD, say, holding
         * the frames we wait for) runs now, not at the end of our time
         * slice; alone on the CPU, the call returns at once. */
        if (n < VS_BURST / 2 && __atomic_load_n(&pmd->yield_light, __ATOMIC_RELAXED)) {
            uint64_t y0 = vs_rdtsc();
            sched_yield();
            uint64_t yielded = vs_rdtsc() - y0;
            pmd->stats.yields++;
            pmd->idle_yields = n == 0 && yielded < pmd->yield_handover_cycles ? pmd->idle_yields + 1 : 0;
            if (yielded > pmd->preempted_cycles) {
                /* The yield ran a thread that wanted this CPU: it is shared. */
                pmd->shared_until_tsc = y0 + yielded + pmd->shared_window_cycles;
            }
        }
        if (n) {
            pmd->stats.busy_cycles += cycles;
            pmd->idle_passes = 0;
            pmd->idle_yields = 0;
            pmd->sleep_us = 0;
            pmd->last_work_tsc = t0 + cycles;
        } else {
            pmd->stats.idle_cycles += cycles;
            bool yielded_in_vain = pmd->idle_yields >= IDLE_YIELDS_BEFORE_SLEEP;
            ++pmd->idle_passes;
            bool shared = !yielded_in_vain && pmd->idle_passes >= IDLE_YIELDS_BEFORE_SLEEP &&
                          t0 < pmd->shared_until_tsc && __atomic_load_n(&pmd->yield_light, __ATOMIC_RELAXED);
            if ((yielded_in_vain || shared ||
                 (pmd->idle_passes > IDLE_PASSES_BEFORE_SLEEP &&
                  t0 + cycles - pmd->last_work_tsc > pmd->linger_cycles)) &&
                !__atomic_load_n(&pmd->poll_only, __ATOMIC_RELAXED)) {
                pmd->stats.yield_sleeps += yielded_in_vain;
                pmd->stats.shared_sleeps += shared;
                idle_sleep(pmd);
                pmd->idle_passes = 0;
                pmd->idle_yields = 0;
                last_pass_tsc = 0;   /* a sleep is not a stall */
                last_end_tsc = 0;    /* nor a preemption */
                continue;
            }
        }
        last_end_tsc = vs_rdtsc();
    }
    __atomic_add_fetch(&pmd->epoch, 1, __ATOMIC_SEQ_CST);
    __atomic_store_n(&pmd->running, 0, __ATOMIC_SEQ_CST);
    vs_vring_watch_calls(NULL);
}
