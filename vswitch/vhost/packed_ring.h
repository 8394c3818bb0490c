/*
 * The packed virtqueue engine (virtio 1.1, section 2.8): one descriptor
 * ring the driver and the device both write, AVAIL/USED flags against wrap
 * counters instead of avail and used indexes, and two event suppression
 * structures.  The state of a packed ring is a part of struct vs_vring
 * (virtqueue.h), which picks the engine per ring when it starts.
 *
 * cdef-clean: no #include, integer #defines only.
 */

/* A descriptor of the ring, as laid out in guest memory. */
struct vring_packed_desc {
    uint64_t addr;               /* guest-physical address of the buffer */
    uint32_t len;
    uint16_t id;                 /* buffer id (in the chain's last descriptor) */
    uint16_t flags;              /* VIRTQ_DESC_F_*, with AVAIL and USED */
};

/* The driver's and the device's event suppression structures. */
struct vring_packed_desc_event {
    uint16_t off_wrap;           /* descriptor offset, bit 15 its wrap counter (VIRTQ_EVENT_F_DESC) */
    uint16_t flags;              /* VIRTQ_EVENT_F_* */
};

/* A chain taken from a guest's TX ring and not yet returned; with
 * VIRTIO_F_IN_ORDER also a run of chains that go back as one used entry. */
struct vs_packed_chain {
    uint16_t id;                 /* buffer id to return (a run's last) */
    uint16_t count;              /* descriptors it took in the ring */
};

/* Chains one dequeue may hold before they go back (a burst and its refused chains). */
#define VS_PACKED_MAX_PENDING 64

struct vs_packed_ring {
    /* control: set by vs_vring_setup() while disabled. */
    struct vring_packed_desc *desc;
    struct vring_packed_desc_event *driver_event;   /* the guest's wishes: when to notify it */
    struct vring_packed_desc_event *device_event;   /* ours: when the guest should kick */
    /* the ring's owner (the PMD, or the lock holder for a receive ring). */
    uint16_t avail_idx;          /* next descriptor to consume */
    uint8_t avail_wrap;          /* the driver's wrap counter at avail_idx */
    uint8_t used_wrap;           /* our wrap counter at used_idx */
    uint16_t used_idx;           /* next descriptor to write a used entry to */
    uint16_t batch_slot;         /* first used entry of the batch: its flags are written last */
    uint16_t batch_flags;
    uint16_t batch_count;        /* used entries written, their batch not yet published */
    uint16_t signalled_used;     /* used_idx at our last notification decision */
    uint8_t signalled_used_wrap;
    uint16_t npending;           /* chains in pending */
    struct vs_packed_chain pending[VS_PACKED_MAX_PENDING];
};

struct vs_vhost_dev;
struct vs_vring;
struct vs_pkt;

/* Control plane (through vs_vring_setup and friends in virtqueue.c). */
int vs_packed_setup(struct vs_vhost_dev *dev, struct vs_vring *vr, uint32_t size,
                    uint64_t desc_uva, uint64_t driver_event_uva, uint64_t device_event_uva,
                    uint32_t base);
void vs_packed_enable_notify(const struct vs_vhost_dev *dev, struct vs_vring *vr, int enable);
int vs_packed_has_avail(const struct vs_vring *vr);

/* Fast path: the packed counterparts of vs_vring_dequeue_burst & co. */
uint32_t vs_packed_dequeue_burst(struct vs_vhost_dev *dev, struct vs_vring *vr,
                                 struct vs_pkt *pkts, uint32_t max);
void vs_packed_dequeue_done(struct vs_vhost_dev *dev, struct vs_vring *vr,
                            const struct vs_pkt *pkts, uint32_t n);
uint32_t vs_packed_enqueue_burst(struct vs_vhost_dev *dev, struct vs_vring *vr,
                                 struct vs_pkt **pkts, uint32_t n);
