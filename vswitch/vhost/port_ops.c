/*
 * The vhost-user port type as the PMD sees it: the ring engine
 * (virtqueue.c) behind the operations table of port.h.  Switch terms: the
 * port receives from the guest's TX rings (odd) and transmits into its RX
 * rings (even).  Each ring runs split or packed (vr->packed, fixed while it
 * runs): the choice is made here once per burst, never per descriptor.
 */
#define _GNU_SOURCE
#include <sys/uio.h>

#include "vswitch.h"

_Static_assert(VS_MAX_QUEUE_PAIRS <= VS_MAX_PORT_QUEUES, "the PMD has a poll slot for every queue (pmd.h)");

static inline struct vs_vhost_dev *dev_of(const struct vs_port *port)
{
    return port->priv;
}

static uint32_t vhost_rx_burst(struct vs_port *port, uint32_t queue, struct vs_pkt *pkts, uint32_t max)
{
    struct vs_vhost_dev *dev = dev_of(port);
    struct vs_vring *vr = &dev->vrings[2 * queue + 1];
    if (!vs_vring_is_enabled(vr) || unlikely(__atomic_load_n(&dev->fault, __ATOMIC_RELAXED))) {
        return 0;  /* a faulted device is being disconnected: leave its rings alone */
    }
    uint32_t n = likely(!vr->packed) ? vs_vring_dequeue_burst(dev, vr, pkts, max)
                                     : vs_packed_dequeue_burst(dev, vr, pkts, max);
    if (unlikely(dev->iotlb)) {
        vs_iotlb_probe_rx(dev, &dev->vrings[2 * queue], VS_IOTLB_PROBE_DEPTH);
    }
    if (unlikely(n && __atomic_load_n(&dev->fault, __ATOMIC_ACQUIRE))) {
        /* Its guest memory faulted during the burst and now reads as zeros:
         * the frames may be garbage, so they go nowhere. */
        vr->stats.dropped += n;
        return 0;
    }
    if (!n) {
        /* Publishes chains dropped as malformed, if any (rx_done does after a burst). */
        if (likely(!vr->packed)) {
            vs_vring_dequeue_done(dev, vr, pkts, 0);
        } else {
            vs_packed_dequeue_done(dev, vr, pkts, 0);
        }
    }
    return n;
}

static void vhost_rx_done(struct vs_port *port, uint32_t queue, struct vs_pkt *pkts, uint32_t n)
{
    struct vs_vhost_dev *dev = dev_of(port);
    struct vs_vring *vr = &dev->vrings[2 * queue + 1];
    if (likely(!vr->packed)) {
        vs_vring_dequeue_done(dev, vr, pkts, n);
    } else {
        vs_packed_dequeue_done(dev, vr, pkts, n);
    }
}

/* The receive ring of the guest that a frame from ingress queue `hint` uses. */
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

static void vhost_tx_burst(struct vs_port *port, uint32_t queue_hint, struct vs_pkt **pkts, uint32_t n,
                           uint32_t unicast)
{
    struct vs_vhost_dev *dev = dev_of(port);
    struct vs_vring *vr = pick_rx_vring(dev, queue_hint);
    if (likely(vr && !vr->packed)) {
        vs_vring_enqueue_burst(dev, vr, pkts, n);
    } else if (vr) {
        vs_packed_enqueue_burst(dev, vr, pkts, n);
    } else {
        port->stats.tx_dropped_down += unicast;
    }
}

static uint32_t vhost_offload_caps(const struct vs_port *port)
{
    return vs_offload_caps_from_features(dev_of(port)->features);
}

/* Turns on the guest's kicks for the ring and sleeps on its kick eventfd. */
static int vhost_idle_arm(struct vs_port *port, uint32_t queue)
{
    struct vs_vhost_dev *dev = dev_of(port);
    struct vs_vring *vr = &dev->vrings[2 * queue + 1];
    if (!vs_vring_is_enabled(vr)) {
        return VS_IDLE_NOTHING;
    }
    if (vr->kickfd < 0) {
        return VS_IDLE_CANNOT_WAKE;
    }
    vs_vring_enable_notify(dev, vr, 1);
    return vr->kickfd;
}

/* The guest may have added a buffer before it saw kicks enabled. */
static int vhost_idle_pending(struct vs_port *port, uint32_t queue)
{
    return vs_vring_has_avail(&dev_of(port)->vrings[2 * queue + 1]);
}

static void vhost_idle_disarm(struct vs_port *port, uint32_t queue, int woke)
{
    struct vs_vhost_dev *dev = dev_of(port);
    struct vs_vring *vr = &dev->vrings[2 * queue + 1];
    if (woke) {
        /* Drained so that the next sleep does not return at once.  The kick
         * eventfd is the front-end's too: it may have made it blocking and
         * emptied it since the poll (or two rings may share it), so the
         * read must never wait. */
        uint64_t count;
        struct iovec iov = { .iov_base = &count, .iov_len = sizeof count };
        ssize_t r = preadv2(vr->kickfd, &iov, 1, -1, RWF_NOWAIT);
        (void)r;
    }
    /* Busy again: the guest need not kick while we poll. */
    vs_vring_enable_notify(dev, vr, 0);
}

static const struct vs_port_ops vhost_port_ops = {
    .name = "vhost-user",
    .rx_burst = vhost_rx_burst,
    .rx_done = vhost_rx_done,
    .tx_burst = vhost_tx_burst,
    .offload_caps = vhost_offload_caps,
    .idle_arm = vhost_idle_arm,
    .idle_pending = vhost_idle_pending,
    .idle_disarm = vhost_idle_disarm,
    .link_state = NULL,          /* the back-end follows the front-end's connection and rings */
};

const struct vs_port_ops *vs_vhost_port_ops(void)
{
    return &vhost_port_ops;
}
