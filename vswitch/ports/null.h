/*
 * The null port: a port type with no device behind it, for tests and
 * benchmarks (like OVS's dummy netdev).  What the switch sends it is
 * counted and dropped (in copy mode, copied first); what it receives is only what a test queued into
 * it with vs_null_port_inject().  It is also the smallest example of a
 * port type: its operations table (port.h) is all the PMD knows of it.
 *
 * No #include: cffi reads this file.
 */

#define VS_NULL_MAX_QUEUES 16
#define VS_NULL_SLOTS 64                  /* injected frames waiting per queue, a power of two */
#define VS_NULL_FRAME_MAX 2048            /* largest frame vs_null_port_inject() takes */

struct vs_null_stats {
    uint64_t rx_packets;                  /* frames handed to the PMD */
    uint64_t rx_bytes;
    uint64_t rx_dropped;                  /* injected while the queue was full */
    uint64_t tx_packets;                  /* frames the switch sent here (and were dropped) */
    uint64_t tx_bytes;
};

/*
 * Generator mode: instead of injected frames, every receive burst is full
 * of frames built in place, from one fixed destination and a source MAC
 * that steps through n_src addresses from src_base.  A benchmark of the PMD
 * alone: no other thread and no guest pays for the frames, so the PMD's
 * busy cycles per frame are the switch's own cost.
 */
struct vs_null_gen {
    uint32_t n_src;                       /* source MACs to cycle through; 0: generator off */
    uint32_t len;                         /* frame length */
    uint64_t src_base;                    /* first source MAC, the 48 bits as a number */
    uint8_t dst[6];                       /* every frame's destination */
};

struct vs_null_queue {
    uint32_t head;                        /* shared: slots filled by vs_null_port_inject() */
    uint32_t tail;                        /* shared: slots the PMD has given back (rx_done) */
    int lock;                             /* spinlock: injecting threads */
    uint32_t lens[VS_NULL_SLOTS];
    uint8_t *frames;                      /* VS_NULL_SLOTS buffers of VS_NULL_FRAME_MAX bytes */
    struct vs_null_stats stats;           /* tx_*: atomic adds, as several PMDs may send here */
    uint32_t gen_next;                    /* generator: index of the next source MAC */
};

/* Copy mode's buffers: one per frame, like a guest's receive buffers of a page. */
#define VS_NULL_SINK_STRIDE 4096

struct vs_null_port {
    uint32_t nqueues;
    uint32_t offload_caps;                /* control: VS_OFFLOAD_* taken on transmit (default all) */
    int eventfd;                          /* written on inject: a sleeping PMD wakes on it */
    struct vs_null_gen gen;               /* control: set by vs_null_port_generate() before publishing */
    struct vs_null_queue queues[VS_NULL_MAX_QUEUES];
    /* Copy mode (vs_null_port_copy_tx): every frame sent here is copied,
     * after a virtio-net header, into the next of sink_slots buffers, by the
     * routine that copies a frame into a guest's buffers (vs_vq_copy_frame):
     * the switch's one copy, without a guest. */
    uint8_t *sink;
    uint32_t sink_slots;                  /* a power of two */
    uint32_t sink_next;                   /* shared: atomic, as several PMDs may send here */
};

/* 0 or -errno (EINVAL: no queues or too many; ENOMEM).  vs_null_port_fini
 * releases everything, also after a failed init. */
int vs_null_port_init(struct vs_null_port *np, uint32_t nqueues);
void vs_null_port_fini(struct vs_null_port *np);
/* Queues one frame for the PMD to receive from queue, from any thread.
 * 0, or -EINVAL (no such queue, shorter than an Ethernet header),
 * -EMSGSIZE (longer than VS_NULL_FRAME_MAX), -ENOSPC (queue full: counted
 * in rx_dropped). */
int vs_null_port_inject(struct vs_null_port *np, uint32_t queue, const uint8_t *frame, uint32_t len);

/* Turns generator mode on (struct vs_null_gen), before the port is
 * published to a PMD.  0, or -EINVAL (n_src 0, len outside 60 ..
 * VS_NULL_FRAME_MAX, or a multicast source). */
int vs_null_port_generate(struct vs_null_port *np, const uint8_t *dst, uint64_t src_base, uint32_t n_src,
                          uint32_t len);

/* Turns copy mode on with slots buffers (a power of two, at most 65536),
 * before the port is published.  0, -EINVAL or -ENOMEM; freed by fini. */
int vs_null_port_copy_tx(struct vs_null_port *np, uint32_t slots);

const struct vs_port_ops *vs_null_port_ops(void);
