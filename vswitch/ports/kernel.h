/*
 * Kernel-side ports: a TAP interface the switch creates, or an existing
 * interface it attaches to with an AF_PACKET socket.  Both are file
 * descriptors the PMD reads and writes in bursts (kernel.c), through one
 * operations table (port.h) per type, with the struct vs_kport as priv.
 *
 * Received frames land in buffers owned by the port (one pool per queue,
 * VS_BURST buffers, or the AF_PACKET ring itself) and are handed to the PMD
 * as struct vs_pkt with one segment pointing there.  They stay valid until
 * the next receive on that queue: the PMD forwards a burst completely
 * before it polls the queue again.
 *
 * No #include and no macros beyond integer #defines: cffi reads this file.
 */

#define VS_KPORT_MAX_QUEUES 16
#define VS_KPORT_NET_HDR_LEN 10           /* struct virtio_net_hdr, without num_buffers */
#define VS_KPORT_BUF_SIZE 65600           /* a 64 KiB GSO frame plus the virtio-net header */
#define VS_KPORT_IFNAMSIZ 16

enum vs_kport_kind {
    VS_KPORT_TAP = 1,
    VS_KPORT_AF_PACKET = 2
};

/* Why a kernel port stopped for good: set by the PMD or the link check, read
 * by the control plane.  Only a deleted interface (or, for AF_PACKET, one
 * that left the socket's namespace) is gone; one that is down is not. */
enum vs_kport_fault {
    VS_KPORT_OK = 0,
    VS_KPORT_GONE = 1                     /* EBADF/EBADFD/ENXIO/ENODEV on the fd */
};

/* Counters per queue, from the switch's point of view (rx: from the kernel). */
struct vs_kport_stats {
    uint64_t rx_packets;
    uint64_t rx_bytes;
    uint64_t rx_dropped;                  /* truncated or oversized frames */
    uint64_t rx_errors;                   /* read errors, bad virtio-net headers */
    uint64_t tx_packets;
    uint64_t tx_bytes;
    uint64_t tx_dropped;                  /* kernel queue full (EAGAIN), TX ring full, interface down */
    uint64_t tx_errors;                   /* write errors, frames too big for the TX ring */
};

/* AF_PACKET mmap rings (TPACKET_V2) of one socket. */
struct vs_kport_ring {
    uint8_t *map;                         /* RX ring, then TX ring, one mapping */
    uint64_t map_len;
    uint8_t *rx;
    uint32_t rx_slots;                    /* frames */
    uint32_t rx_slot_size;
    uint32_t rx_next;                     /* next slot to look at */
    uint32_t rx_hold_first;               /* slots handed to the PMD, returned on the next poll */
    uint32_t rx_hold_n;
    uint8_t *tx;
    uint32_t tx_frames;
    uint32_t tx_frame_size;
    uint32_t tx_next;
};

struct vs_kport {
    uint32_t kind;                        /* enum vs_kport_kind */
    uint32_t nqueues;
    int fds[VS_KPORT_MAX_QUEUES];         /* one per queue; the PMD may sleep on them */
    int ifindex;                          /* AF_PACKET: the attached interface */
    char ifname[VS_KPORT_IFNAMSIZ];
    int link_fd;                          /* rtnetlink socket: link notifications, or -1 */
    uint32_t mtu_request;                 /* control, before open: the MTU to give the interface; 0: keep it */
    uint8_t vnet_hdr;                     /* frames carry a virtio-net header (offloads) */
    uint32_t offload_caps;                /* VS_OFFLOAD_* the port takes on transmit */
    uint32_t fault;                       /* shared: enum vs_kport_fault, set by the PMD */
    int fault_errno;                      /* shared: the errno that caused it */
    uint8_t *pool[VS_KPORT_MAX_QUEUES];   /* TAP: VS_BURST receive buffers per queue */
    int tx_lock[VS_KPORT_MAX_QUEUES];     /* spinlock: transmits from several PMD threads */
    struct vs_kport_ring rings[VS_KPORT_MAX_QUEUES];
    struct vs_kport_stats stats[VS_KPORT_MAX_QUEUES];
};

/* Control plane.  The open functions return 0 or -errno and run, if
 * netns_fd >= 0, inside that network namespace (the calling thread enters
 * it and comes back).  vs_kport_close releases everything. */
void vs_kport_init(struct vs_kport *kp);
int vs_kport_open_tap(struct vs_kport *kp, const char *ifname, uint32_t nqueues, int netns_fd,
                      int offloads);
int vs_kport_open_af_packet(struct vs_kport *kp, const char *ifname, int netns_fd, int vnet_hdr);
void vs_kport_close(struct vs_kport *kp);
int vs_kport_link_state(struct vs_kport *kp);   /* 1 up and running, 0 down, -errno gone */
int vs_kport_link_events(struct vs_kport *kp);  /* reads link_fd dry: notifications read, or -errno */
int vs_kport_mtu(struct vs_kport *kp);          /* the interface's MTU now, or -errno */

/* Link following for any port on a kernel interface (kernel.c says how):
 * an rtnetlink socket for link changes in the calling thread's namespace
 * (or -1, which costs promptness only), and reading it dry. */
int vs_link_watch_open(void);
int vs_link_watch_drain(int link_fd);
/* The calling thread enters netns_fd (if >= 0; else nothing happens), and
 * comes back to saved, where it was: for opening things in a namespace. */
int vs_enter_netns(int netns_fd, int *saved);
void vs_leave_netns(int saved);

/* The transmit path by itself (tests), as the PMD calls it through the ops. */
void vs_kport_tx_burst(struct vs_kport *kp, uint32_t queue, struct vs_pkt **pkts, uint32_t n);

/* The operations tables (port.h) of the two types. */
const struct vs_port_ops *vs_tap_port_ops(void);
const struct vs_port_ops *vs_af_packet_port_ops(void);
