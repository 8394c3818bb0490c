/*
 * The virtqueue ring engine: split virtqueues (virtio 1.x, section 2.7) of a
 * vhost-user device, as the fast path reads and writes them; packed rings
 * (packed_ring.h) share struct vs_vring and the control functions.
 *
 * Everything the guest writes (descriptors, indexes, lengths, addresses) is
 * untrusted; see virtqueue.c for the checks.  The control plane (Python)
 * writes the fields marked "control" only while the ring is disabled and the
 * PMD threads have passed a quiescent point (vs_pmd_quiesce in pmd.h).
 */

/* Limits, ring flags and feature bits: virtio.h. */

/* The guest's rings, exactly as laid out in guest memory. */
struct virtq_desc {
    uint64_t addr;               /* guest-physical address of the buffer */
    uint32_t len;
    uint16_t flags;              /* VIRTQ_DESC_F_* */
    uint16_t next;
};

struct virtq_avail {
    uint16_t flags;              /* VIRTQ_AVAIL_F_NO_INTERRUPT */
    uint16_t idx;
    uint16_t ring[];             /* size entries, then used_event */
};

struct virtq_used_elem {
    uint32_t id;                 /* descriptor head */
    uint32_t len;                /* bytes written into the buffer */
};

struct virtq_used {
    uint16_t flags;              /* VIRTQ_USED_F_NO_NOTIFY */
    uint16_t idx;
    struct virtq_used_elem ring[]; /* size entries, then avail_event */
};

/* One region of guest memory, mapped into this process. */
struct vs_mem_region {
    uint64_t guest_phys_addr;    /* where descriptors point */
    uint64_t user_addr;          /* the front-end's virtual address (ring addresses) */
    uint64_t size;
    uint8_t *host_addr;          /* our mapping of guest_phys_addr */
};

/* Immutable once published: a change builds a new table (vs_vhost_dev_set_mem). */
struct vs_memtable {
    uint32_t nregions;
    struct vs_mem_region regions[VS_MAX_MEM_SLOTS];
};

/* Why a descriptor chain or a ring was refused; names in vs_vq_error_name(). */
enum vs_vq_error {
    VS_VQ_OK = 0,
    VS_VQ_ERR_ADDR = 1,              /* buffer not inside the guest's memory */
    VS_VQ_ERR_LOOP = 2,              /* chain longer than the ring: a loop */
    VS_VQ_ERR_NEXT = 3,              /* next index past the ring or table */
    VS_VQ_ERR_NESTED_INDIRECT = 4,   /* indirect table inside an indirect table */
    VS_VQ_ERR_INDIRECT_LEN = 5,      /* indirect table length not a multiple of 16, or empty */
    VS_VQ_ERR_HEAD = 6,              /* avail ring names a head past the ring */
    VS_VQ_ERR_AVAIL_JUMP = 7,        /* avail index moved by more than the ring size */
    VS_VQ_ERR_NO_READABLE = 8,       /* TX chain with no readable bytes past the header */
    VS_VQ_ERR_NO_WRITABLE = 9,       /* RX chain with no writable buffer */
    VS_VQ_ERR_WRITE_IN_TX = 10,      /* writable descriptor in a TX chain */
    VS_VQ_ERR_TOO_LONG = 11,         /* frame longer than VS_MAX_FRAME */
    VS_VQ_ERR_TOO_MANY_SEGS = 12,    /* more than VS_PKT_MAX_SEGS pieces */
    VS_VQ_ERR_SHORT_HEADER = 13,     /* chain shorter than the virtio-net header */
    VS_VQ_ERR_RING_ADDR = 14,        /* ring not inside the guest's memory */
    VS_VQ_ERR_RING_SIZE = 15,        /* ring size zero, too big or not a power of two */
    VS_VQ_ERR_NET_HDR = 16,          /* TX header asks for an offload the guest did not negotiate */
    VS_VQ_ERR_WRAP = 17,             /* packed: a chain runs into a descriptor not made available */
    VS_VQ_ERR_BAD_ID = 18,           /* packed: buffer id past the ring */
    VS_VQ_ERR_INDIRECT_CHAINED = 19, /* packed: indirect descriptor chained to others */
    VS_VQ_ERR_BASE = 20,             /* packed: vring base past the ring */
    VS_VQ_ERR_IOTLB_MISS = 21,       /* no IOTLB entry yet: not an error, the ring waits (iotlb.h) */
    VS_VQ_ERR_IOTLB_PERM = 22,       /* the IOTLB entry does not allow this access */
    VS_VQ_ERR_MAX = 23
};

struct vs_queue_stats {
    uint64_t packets;            /* frames moved through this ring */
    uint64_t bytes;
    uint64_t dropped;            /* RX ring: no guest buffer (or too small) */
    uint64_t too_big;            /* RX ring: of dropped, frames larger than the guest's buffers can
                                    hold (one buffer without mergeable buffers); never truncated */
    uint64_t errors;             /* malformed chains, enum vs_vq_error */
    uint64_t notifications;      /* eventfd writes to the guest */
    uint64_t bursts;             /* non-empty bursts */
    uint64_t calls_blocked;      /* call writes that blocked and were cut short (vs_call_watch) */
};

struct vs_vring {
    /* control: set by vs_vring_setup() while disabled. */
    struct virtq_desc *desc;
    struct virtq_avail *avail;
    struct virtq_used *used;
    uint32_t size;               /* descriptors, a power of two */
    int callfd;                  /* eventfd to interrupt the guest; -1: the guest polls */
    int kickfd;                  /* eventfd the guest kicks; -1 if none */
    uint16_t last_avail_idx;     /* next avail entry to consume */
    uint16_t last_used_idx;      /* used->idx as we last published it */
    uint16_t pending_used;       /* used entries written but not yet published */
    uint16_t signalled_used;     /* used idx at our last notification (event idx) */
    uint8_t signalled_used_valid;
    uint32_t resumed_from_used;  /* control: starts whose base the used index in guest memory overrode */
    /* shared: atomics. */
    uint8_t enabled;             /* the PMD touches the ring only while set */
    uint8_t broken;              /* the guest broke the ring; stays stopped until restarted */
    uint8_t call_broken;         /* a write to callfd blocked: the guest is not notified again
                                    until the control plane installs a new call fd */
    int lock;                    /* spinlock: enqueues from several PMD threads */
    uint32_t last_error;         /* enum vs_vq_error of the latest error, read by the control plane */
    uint32_t last_error_index;   /* descriptor or avail index involved */
    uint64_t error_count[VS_VQ_ERR_MAX]; /* per reason */
    struct vs_queue_stats stats;
    /* control: the layout, chosen by vs_vring_setup() from the negotiated features. */
    uint8_t packed;              /* 1: packed ring (pk below); 0: split (desc, avail, used above) */
    struct vs_packed_ring pk;
    /* control: SET_VRING_ADDR's log_guest_addr, the used ring's guest-physical address (dirty_log.h). */
    uint64_t log_used_gpa;
    uint8_t log_used;            /* VHOST_VRING_F_LOG was set: log used ring writes at log_used_gpa */
};

/* Bits of vs_vhost_dev.fault: why the control plane must disconnect the front-end. */
#define VS_DEV_FAULT_MEMORY 1        /* guest memory faulted (truncated or unmapped by the front-end) */
#define VS_DEV_FAULT_CALL_BLOCKED 2  /* writing a call fd would block */

struct vs_vhost_dev {
    struct vs_memtable *mem;     /* control: swapped whole by vs_vhost_dev_set_mem() while rings run;
                                  * the old table and any region it alone maps are freed only
                                  * once the PMDs have passed a quiescent point */
    struct vs_iotlb *iotlb;      /* control: set with ACCESS_PLATFORM (addresses are IOVAs), else NULL */
    uint32_t fault;              /* shared: VS_DEV_FAULT_* bits, set atomically by any thread; while
                                  * non-zero the PMD forwards nothing from the device, and the control
                                  * plane disconnects the front-end */
    uint64_t features;           /* control: negotiated virtio features */
    uint32_t hdr_len;            /* control: virtio-net header, 12 or 10 bytes */
    uint32_t nr_queue_pairs;     /* control: queue pairs the port offers */
    struct vs_vring vrings[VS_MAX_VRINGS];
    struct vs_dirty_log *log;    /* control: set while VHOST_F_LOG_ALL is negotiated and a log is mapped;
                                  * the ring engines mark every page they write (dirty_log.h) */
};

/* Control plane. */
const char *vs_vq_error_name(uint32_t err);
uint8_t *vs_mem_translate_uva(const struct vs_memtable *mem, uint64_t uva, uint64_t len);
void vs_vhost_dev_set_mem(struct vs_vhost_dev *dev, struct vs_memtable *mem);
void vs_vhost_dev_init(struct vs_vhost_dev *dev, uint32_t nr_queue_pairs);
void vs_vhost_dev_set_features(struct vs_vhost_dev *dev, uint64_t features);
int vs_vring_setup(struct vs_vhost_dev *dev, uint32_t index, uint32_t size,
                   uint64_t desc_uva, uint64_t avail_uva, uint64_t used_uva,
                   uint32_t base);
void vs_vring_set_enabled(struct vs_vring *vr, int enabled);
int vs_vring_is_enabled(const struct vs_vring *vr);
/* Where the ring stands, as GET_VRING_BASE reports it: the next avail
 * index; for a packed ring with its wrap counter in bit 15, and the used
 * side the same way in bits 16-31 (QEMU's form; DPDK reads the low half). */
uint32_t vs_vring_base(const struct vs_vring *vr);

/* Guest notifications, for a PMD that goes to sleep on the kick eventfds. */
void vs_vring_enable_notify(const struct vs_vhost_dev *dev, struct vs_vring *vr, int enable);
int vs_vring_has_avail(const struct vs_vring *vr);

/*
 * A guest's call eventfd is shared with its front-end, which can make it
 * blocking and fill its counter, so that our next write() blocks.  A thread
 * that registered a watch (vs_vring_watch_calls) stamps each call write in
 * it; a watchdog that sees a write pending too long sets interrupt_seq and
 * sends the thread a signal whose handler does nothing, so the write fails
 * with EINTR.  The ring's call fd is then broken and its device faulted.
 */
struct vs_call_watch {
    uint64_t since_tsc;          /* shared: when the pending write began; 0: none pending */
    uint64_t seq;                /* shared: numbers the writes; the pending one's while since_tsc != 0 */
    uint64_t interrupt_seq;      /* shared: the write the watchdog wants cut short */
    uint64_t blocked;            /* writes cut short */
    uint64_t signals;            /* signals the watchdog sent (it may repeat one) */
};

/* Fast path. */
void vs_vring_watch_calls(struct vs_call_watch *watch);
uint32_t vs_vring_dequeue_burst(struct vs_vhost_dev *dev, struct vs_vring *vr,
                                struct vs_pkt *pkts, uint32_t max);
void vs_vring_dequeue_done(struct vs_vhost_dev *dev, struct vs_vring *vr,
                           const struct vs_pkt *pkts, uint32_t n);
uint32_t vs_vring_enqueue_burst(struct vs_vhost_dev *dev, struct vs_vring *vr,
                                struct vs_pkt **pkts, uint32_t n);
