/*
 * AF_XDP ports: an existing interface attached with one XDP socket per
 * queue (af_xdp.c).  Each queue has its own UMEM, split in two: frames the
 * kernel receives into (the fill ring keeps all of them posted) and frames
 * the switch copies outgoing frames into.  libxdp's types stay opaque here
 * (struct vs_xsk_rings lives in af_xdp.c): libxdp is loaded at run time,
 * and cffi reads this file.
 *
 * No #include: cffi reads this file.
 */

#define VS_XSK_MAX_QUEUES 16
#define VS_XSK_FRAME_SIZE 4096            /* one UMEM frame: the largest frame sent or received */
#define VS_XSK_RX_FRAMES 2048             /* posted to the fill ring; also the fill and RX ring size */
#define VS_XSK_TX_FRAMES 2048             /* for transmit; also the TX and completion ring size */

enum vs_xsk_mode {
    VS_XSK_MODE_AUTO = 0,                 /* native, else generic */
    VS_XSK_MODE_NATIVE = 1,               /* the driver runs the program (XDP_FLAGS_DRV_MODE) */
    VS_XSK_MODE_GENERIC = 2               /* the stack runs it on an skb (XDP_FLAGS_SKB_MODE) */
};

enum vs_xsk_zero_copy {
    VS_XSK_ZC_AUTO = 0,                   /* zero-copy where the driver offers it, else copy */
    VS_XSK_ZC_ON = 1,
    VS_XSK_ZC_OFF = 2
};

/* What failed in vs_xsk_open, beyond the errno it returns. */
enum vs_xsk_failure {
    VS_XSK_FAIL_NONE = 0,
    VS_XSK_FAIL_LIBXDP = 1,               /* libxdp could not be loaded (vs_xsk_libxdp_error says why) */
    VS_XSK_FAIL_NO_INTERFACE = 2,
    VS_XSK_FAIL_CHANNELS = 3,             /* fewer channels than queues (channels says how many) */
    VS_XSK_FAIL_NATIVE = 4,               /* mode native, and the driver has no native XDP */
    VS_XSK_FAIL_ZERO_COPY = 5,            /* zero_copy on, and the driver cannot */
    VS_XSK_FAIL_PROGRAM_BUSY = 6,         /* another XDP program without libxdp's dispatcher */
    VS_XSK_FAIL_SOCKET = 7,               /* anything else while creating the UMEM or a socket */
    VS_XSK_FAIL_FILTER = 8                /* the UDP filter program or its map (libbpf) failed to load */
};

/* Counters per queue, from the switch's point of view (rx: from the kernel). */
struct vs_xsk_stats {
    uint64_t rx_packets;
    uint64_t rx_bytes;
    uint64_t rx_dropped;                  /* shorter than an Ethernet header */
    uint64_t tx_packets;
    uint64_t tx_bytes;
    uint64_t tx_ring_full;                /* dropped: no free TX descriptor or UMEM frame */
    uint64_t tx_errors;                   /* bigger than a UMEM frame, or the send failed */
    uint64_t tx_kicks;                    /* sendto() calls, made only when the TX ring asked */
    uint64_t fill_wakeups;                /* recvfrom() calls, made only when the fill ring asked */
};

/* The kernel's own counters of a socket (struct xdp_statistics). */
struct vs_xsk_kernel_stats {
    uint64_t rx_dropped;                  /* dropped by the kernel for other reasons */
    uint64_t rx_invalid_descs;
    uint64_t tx_invalid_descs;
    uint64_t rx_ring_full;                /* dropped: the RX ring was full (the PMD was behind) */
    uint64_t rx_fill_ring_empty_descs;    /* dropped: no frame in the fill ring */
    uint64_t tx_ring_empty_descs;
};

struct vs_xsk_rings;                      /* libxdp's rings and sockets of one queue (af_xdp.c) */

struct vs_xsk_queue {
    struct vs_xsk_rings *rings;           /* NULL until opened */
    uint8_t *area;                        /* the UMEM */
    uint64_t area_len;
    int fd;                               /* the XDP socket: the PMD may sleep on it */
    int tx_lock;                          /* spinlock: transmits from several PMD threads */
    uint32_t tx_free_n;                   /* TX frames not in flight, in tx_free */
    uint32_t tx_idx;                      /* the first descriptor vs_xsk_tx_begin reserved (under tx_lock) */
    uint64_t tx_free[VS_XSK_TX_FRAMES];   /* their UMEM addresses */
    struct vs_xsk_stats stats;
};

struct vs_xsk_port {
    uint32_t nqueues;
    int ifindex;
    int link_fd;                          /* rtnetlink socket: link notifications, or -1 */
    int ioctl_fd;                         /* for interface ioctls in the sockets' namespace */
    uint32_t mode;                        /* what was got: VS_XSK_MODE_NATIVE or _GENERIC */
    uint8_t zero_copy;                    /* 1: the driver gives zero-copy */
    uint8_t dispatcher;                   /* 1: the program runs under libxdp's dispatcher */
    uint32_t prog_id;                     /* the XSK program on the interface, 0 if unknown */
    uint32_t failure;                     /* enum vs_xsk_failure of the last vs_xsk_open */
    uint32_t channels;                    /* the interface's channels, 0 if it does not say */
    uint32_t fault;                       /* shared: 1 once the interface is gone for good */
    int fault_errno;
    int netns_fd;                         /* the sockets' namespace: libxdp detaches in it on close */
    char busy_prog[32];                   /* VS_XSK_FAIL_PROGRAM_BUSY: the program in the way */
    /* Set before vs_xsk_open to take only IPv4/UDP frames to udp_addr:udp_port
     * (a VXLAN underlay, vxlan.h): af_xdp.c loads its own small XDP program
     * that redirects those to the sockets and passes everything else (ARP,
     * ICMP, other traffic) to the kernel.  udp_port 0: libxdp's default
     * program, which takes every frame. */
    uint32_t udp_addr;                    /* network byte order */
    uint32_t udp_port;                    /* host byte order */
    int filter_prog_fd;                   /* the filter program and its XSKMAP, -1 if none */
    int filter_map_fd;
    uint32_t filter_flags;                /* the XDP_FLAGS_* it was attached with */
    struct vs_xsk_queue queues[VS_XSK_MAX_QUEUES];
};

/* Control plane.  vs_xsk_open attaches nqueues queues (from queue 0) of
 * ifname and returns 0 or -errno, with failure saying what went wrong; it
 * runs, if netns_fd >= 0, inside that network namespace.  Before
 * attaching, it detaches the XSK program stale_prog_id (0: none) if that
 * program is still on the interface: one a killed switch left behind.
 * vs_xsk_close releases everything, also after a failed open; closing the
 * last socket on the interface detaches the program (libxdp does, in the
 * calling thread's namespace: vs_xsk_close enters the sockets' own, so the
 * caller must be a thread that may change namespace). */
void vs_xsk_init(struct vs_xsk_port *xp);
int vs_xsk_open(struct vs_xsk_port *xp, const char *ifname, uint32_t nqueues, int netns_fd, uint32_t mode,
                uint32_t zero_copy, uint32_t stale_prog_id);
void vs_xsk_close(struct vs_xsk_port *xp);
int vs_xsk_link_state(struct vs_xsk_port *xp);     /* 1 up and running, 0 down, -errno gone */
int vs_xsk_kernel_stats(struct vs_xsk_port *xp, uint32_t queue, struct vs_xsk_kernel_stats *out);
/* 0 if libxdp is (or can be) loaded, else -errno with vs_xsk_libxdp_error() saying why. */
int vs_xsk_load_libxdp(void);
const char *vs_xsk_libxdp_error(void);

/* The packet path, shared with vxlan.c's AF_XDP underlay.  vs_xsk_rx
 * hands up to max received frames to pkts in place (raw, with their
 * Ethernet header); they stay the caller's until vs_xsk_rx_done (or the
 * next vs_xsk_rx, which gives back what it was not told about).  Transmit:
 * vs_xsk_tx_begin takes the queue's lock and reserves up to n descriptors
 * (the number got, maybe 0), vs_xsk_tx_frame gives the i-th one a free UMEM
 * frame of len bytes (at most VS_XSK_FRAME_SIZE) to write into, and
 * vs_xsk_tx_end sends the first `used` of them (the rest are given back),
 * kicks the kernel if it asks and drops the lock. */
uint32_t vs_xsk_rx(struct vs_xsk_port *xp, uint32_t queue, struct vs_pkt *pkts, uint32_t max);
void vs_xsk_rx_done(struct vs_xsk_port *xp, uint32_t queue);
uint32_t vs_xsk_tx_begin(struct vs_xsk_port *xp, uint32_t queue, uint32_t n);
uint8_t *vs_xsk_tx_frame(struct vs_xsk_port *xp, uint32_t queue, uint32_t i, uint32_t len);
void vs_xsk_tx_end(struct vs_xsk_port *xp, uint32_t queue, uint32_t reserved, uint32_t used, uint64_t bytes);
int vs_xsk_idle_arm(struct vs_xsk_port *xp, uint32_t queue);
int vs_xsk_idle_pending(struct vs_xsk_port *xp, uint32_t queue);
/* The interface's MAC address into mac[6]: 0 or -errno. */
int vs_xsk_interface_mac(struct vs_xsk_port *xp, uint8_t *mac);

const struct vs_port_ops *vs_af_xdp_port_ops(void);
