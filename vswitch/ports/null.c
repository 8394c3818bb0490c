/*
 * The null port (null.h).  Each queue is a single-consumer ring of frame
 * buffers: injectors fill slots at head under a lock, the one PMD that
 * polls the queue hands them out in place and gives them back in rx_done,
 * after it has forwarded them, so a slot is never rewritten while in use.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "vswitch.h"
#include "vhost/ring_internal.h"

int vs_null_port_init(struct vs_null_port *np, uint32_t nqueues)
{
    memset(np, 0, sizeof *np);
    np->eventfd = -1;
    if (nqueues == 0 || nqueues > VS_NULL_MAX_QUEUES) {
        return -EINVAL;
    }
    np->nqueues = nqueues;
    np->offload_caps = VS_OFFLOAD_ALL;
    for (uint32_t q = 0; q < nqueues; q++) {
        np->queues[q].frames = malloc((size_t)VS_NULL_SLOTS * VS_NULL_FRAME_MAX);
        if (!np->queues[q].frames) {
            return -ENOMEM;
        }
    }
    np->eventfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    return np->eventfd < 0 ? -errno : 0;
}

void vs_null_port_fini(struct vs_null_port *np)
{
    for (uint32_t q = 0; q < VS_NULL_MAX_QUEUES; q++) {
        free(np->queues[q].frames);
        np->queues[q].frames = NULL;
    }
    free(np->sink);
    np->sink = NULL;
    np->sink_slots = 0;
    if (np->eventfd >= 0) {
        close(np->eventfd);
        np->eventfd = -1;
    }
}

int vs_null_port_inject(struct vs_null_port *np, uint32_t queue, const uint8_t *frame, uint32_t len)
{
    if (queue >= np->nqueues || len < 14) {
        return -EINVAL;
    }
    if (len > VS_NULL_FRAME_MAX) {
        return -EMSGSIZE;
    }
    struct vs_null_queue *nq = &np->queues[queue];
    vs_spin_lock(&nq->lock);
    uint32_t head = nq->head;
    if (head - __atomic_load_n(&nq->tail, __ATOMIC_ACQUIRE) >= VS_NULL_SLOTS) {
        vs_spin_unlock(&nq->lock);
        __atomic_add_fetch(&nq->stats.rx_dropped, 1, __ATOMIC_RELAXED);
        return -ENOSPC;
    }
    uint32_t slot = head % VS_NULL_SLOTS;
    memcpy(nq->frames + (size_t)slot * VS_NULL_FRAME_MAX, frame, len);
    nq->lens[slot] = len;
    __atomic_store_n(&nq->head, head + 1, __ATOMIC_RELEASE);
    vs_spin_unlock(&nq->lock);
    uint64_t one = 1;
    ssize_t r = write(np->eventfd, &one, sizeof one);
    (void)r;  /* EAGAIN: the counter is full, so it is readable anyway */
    return 0;
}

int vs_null_port_generate(struct vs_null_port *np, const uint8_t *dst, uint64_t src_base, uint32_t n_src,
                          uint32_t len)
{
    if (n_src == 0 || len < 60 || len > VS_NULL_FRAME_MAX || ((src_base >> 40) & 1) ||
        src_base + n_src - 1 > 0xffffffffffffULL) {
        return -EINVAL;
    }
    np->gen.src_base = src_base;
    np->gen.len = len;
    memcpy(np->gen.dst, dst, 6);
    /* The first VS_BURST slots of each queue are the frames: the header is
     * written once here, only the source MAC per frame. */
    for (uint32_t q = 0; q < np->nqueues; q++) {
        for (uint32_t i = 0; i < VS_BURST && i < VS_NULL_SLOTS; i++) {
            uint8_t *f = np->queues[q].frames + (size_t)i * VS_NULL_FRAME_MAX;
            memset(f, 0, len);
            memcpy(f, dst, 6);
            f[12] = 0x08;   /* IPv4 ethertype; the payload stays zero */
        }
        np->queues[q].gen_next = 0;
    }
    np->gen.n_src = n_src;
    return 0;
}

static uint32_t gen_rx_burst(struct vs_null_port *np, struct vs_null_queue *nq, struct vs_pkt *pkts,
                             uint32_t max)
{
    const struct vs_null_gen *g = &np->gen;
    uint32_t n = max < VS_BURST ? max : VS_BURST;
    uint32_t next = nq->gen_next;
    for (uint32_t i = 0; i < n; i++) {
        uint8_t *f = nq->frames + (size_t)i * VS_NULL_FRAME_MAX;
        uint64_t src = g->src_base + next;
        for (int b = 0; b < 6; b++) {
            f[6 + b] = (uint8_t)(src >> (40 - 8 * b));
        }
        if (++next == g->n_src) {
            next = 0;
        }
        struct vs_pkt *pkt = &pkts[i];
        memset(&pkt->vnet, 0, sizeof pkt->vnet);
        pkt->len = g->len;
        pkt->nsegs = 1;
        pkt->head = 0;
        pkt->segs[0].addr = f;
        pkt->segs[0].len = g->len;
    }
    nq->gen_next = next;
    nq->stats.rx_packets += n;
    nq->stats.rx_bytes += (uint64_t)n * g->len;
    return n;
}

static uint32_t null_rx_burst(struct vs_port *port, uint32_t queue, struct vs_pkt *pkts, uint32_t max)
{
    struct vs_null_port *np = port->priv;
    if (unlikely(queue >= np->nqueues)) {
        return 0;
    }
    if (np->gen.n_src) {
        return gen_rx_burst(np, &np->queues[queue], pkts, max);
    }
    struct vs_null_queue *nq = &np->queues[queue];
    uint32_t tail = nq->tail;
    uint32_t n = __atomic_load_n(&nq->head, __ATOMIC_ACQUIRE) - tail;
    n = n < max ? n : max;
    uint64_t bytes = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t slot = (tail + i) % VS_NULL_SLOTS;
        struct vs_pkt *pkt = &pkts[i];
        memset(&pkt->vnet, 0, sizeof pkt->vnet);
        pkt->len = nq->lens[slot];
        pkt->nsegs = 1;
        pkt->head = 0;
        pkt->segs[0].addr = nq->frames + (size_t)slot * VS_NULL_FRAME_MAX;
        pkt->segs[0].len = pkt->len;
        bytes += pkt->len;
    }
    nq->stats.rx_packets += n;
    nq->stats.rx_bytes += bytes;
    return n;
}

/* The PMD is done with the burst: its slots may be filled again. */
static void null_rx_done(struct vs_port *port, uint32_t queue, struct vs_pkt *pkts, uint32_t n)
{
    struct vs_null_port *np = port->priv;
    if (np->gen.n_src) {
        return;   /* the generator's frames stay in place */
    }
    struct vs_null_queue *nq = &np->queues[queue];
    __atomic_store_n(&nq->tail, nq->tail + n, __ATOMIC_RELEASE);
}

int vs_null_port_copy_tx(struct vs_null_port *np, uint32_t slots)
{
    if (slots == 0 || slots > 65536 || (slots & (slots - 1))) {
        return -EINVAL;
    }
    free(np->sink);
    np->sink = aligned_alloc(VS_NULL_SINK_STRIDE, (size_t)slots * VS_NULL_SINK_STRIDE);
    if (!np->sink) {
        np->sink_slots = 0;
        return -ENOMEM;
    }
    memset(np->sink, 0, (size_t)slots * VS_NULL_SINK_STRIDE);   /* every page mapped before the PMD runs */
    np->sink_slots = slots;
    return 0;
}

/* A frame longer than a buffer (a GSO frame, say) is not copied: copy mode
 * measures the one copy of frames that fit, not segmentation. */
static void copy_to_sink(struct vs_null_port *np, struct vs_pkt **pkts, uint32_t n)
{
    static const uint8_t hdr[12];   /* a virtio-net header: no offloads, one buffer */
    uint32_t first = __atomic_fetch_add(&np->sink_next, n, __ATOMIC_RELAXED);
    for (uint32_t i = 0; i < n; i++) {
        if (pkts[i]->len + sizeof hdr > VS_NULL_SINK_STRIDE) {
            continue;
        }
        struct vs_seg dst = {
            .addr = np->sink + (size_t)((first + i) & (np->sink_slots - 1)) * VS_NULL_SINK_STRIDE,
            .len = (uint32_t)(pkts[i]->len + sizeof hdr),
        };
        vs_vq_copy_frame(&dst, hdr, sizeof hdr, pkts[i]);
    }
}

static void null_tx_burst(struct vs_port *port, uint32_t queue_hint, struct vs_pkt **pkts, uint32_t n,
                          uint32_t unicast)
{
    struct vs_null_port *np = port->priv;
    struct vs_null_queue *nq = &np->queues[queue_hint % np->nqueues];
    uint64_t bytes = 0;
    for (uint32_t i = 0; i < n; i++) {
        bytes += pkts[i]->len;
    }
    if (np->sink) {
        copy_to_sink(np, pkts, n);
    }
    __atomic_add_fetch(&nq->stats.tx_packets, n, __ATOMIC_RELAXED);
    __atomic_add_fetch(&nq->stats.tx_bytes, bytes, __ATOMIC_RELAXED);
}

static uint32_t null_offload_caps(const struct vs_port *port)
{
    const struct vs_null_port *np = port->priv;
    return np->offload_caps;
}

static int null_idle_arm(struct vs_port *port, uint32_t queue)
{
    struct vs_null_port *np = port->priv;
    return queue < np->nqueues ? np->eventfd : VS_IDLE_NOTHING;
}

/* A frame injected before this sleep whose eventfd write an earlier wake-up drained. */
static int null_idle_pending(struct vs_port *port, uint32_t queue)
{
    struct vs_null_queue *nq = &((struct vs_null_port *)port->priv)->queues[queue];
    return __atomic_load_n(&nq->head, __ATOMIC_ACQUIRE) != nq->tail;
}

static void null_idle_disarm(struct vs_port *port, uint32_t queue, int woke)
{
    struct vs_null_port *np = port->priv;
    if (woke) {
        uint64_t count;
        ssize_t r = read(np->eventfd, &count, sizeof count);
        (void)r;  /* EAGAIN: another queue of the port drained it */
    }
}

static int null_link_state(struct vs_port *port)
{
    return 1;
}

static const struct vs_port_ops null_port_ops = {
    .name = "null",
    .rx_burst = null_rx_burst,
    .rx_done = null_rx_done,
    .tx_burst = null_tx_burst,
    .offload_caps = null_offload_caps,
    .idle_arm = null_idle_arm,
    .idle_pending = null_idle_pending,
    .idle_disarm = null_idle_disarm,
    .link_state = null_link_state,
};

const struct vs_port_ops *vs_null_port_ops(void)
{
    return &null_port_ops;
}
