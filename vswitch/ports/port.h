/*
 * A port as the fast path sees it: a port number, a link flag, and the
 * operations table of its type with that type's own state (priv).  The PMD
 * calls a port only through its table, once per burst, and knows no port
 * type by name; a new port type is a new table in its own files.
 */

#define VS_MAX_PORTS 256
/* The most receive queues one port has (vhost-user queue pairs, TAP queues ...). */
#define VS_MAX_PORT_QUEUES 16

/* VLAN modes of a port, as Open vSwitch's vlan_mode (README "VLANs").  A
 * port without a struct vs_vlan is in VLAN 0 and its frames pass unchanged. */
#define VS_VLAN_ACCESS 1             /* one VLAN, untagged; tagged frames dropped */
#define VS_VLAN_TRUNK 2              /* tagged VLANs; untagged frames are VLAN 0 */
#define VS_VLAN_NATIVE_UNTAGGED 3    /* trunk whose native VLAN (tag) is untagged */
#define VS_VLAN_NATIVE_TAGGED 4      /* trunk whose native VLAN takes untagged frames in, leaves tagged */
#define VS_VLAN_IDS 4096

/* A port's VLAN settings.  Never changed once published: a new one replaces
 * it (one pointer store), and the old one is freed after a quiescent point. */
struct vs_vlan {
    uint32_t mode;               /* VS_VLAN_* */
    uint32_t tag;                /* access: its VLAN; native-*: the native VLAN; trunk: 0 */
    uint64_t carries[64];        /* bit v set: frames of VLAN v may enter and leave here */
};

/*
 * Ingress policing of a port (README "Rate limiting"): two token buckets,
 * one in packets and one in bytes, refilled from the TSC; a received frame
 * passes only if both hold a token for it.  The settings never change once
 * published (a new struct replaces the old, freed after a quiescent point);
 * the bucket does, under its lock, as several PMDs may poll one port.
 */
struct vs_police {
    double packets_per_sec;      /* 0: no packet limit */
    double bytes_per_sec;        /* 0: no byte limit */
    double burst_packets;        /* bucket depths, in packets and bytes */
    double burst_bytes;
    int lock;
    uint64_t last_tsc;           /* 0: the bucket starts full at the first burst */
    double packet_tokens;
    double byte_tokens;
};

struct vs_port;

/* What a queue's idle_arm tells a PMD about to sleep, when not an fd (>= 0)
 * to wait on for POLLIN. */
enum vs_idle_wait {
    VS_IDLE_NOTHING = -1,        /* nothing to wait for: the queue is off or its port faulted */
    VS_IDLE_CANNOT_WAKE = -2     /* work may come without an fd to show it: the sleep stays short */
};

/*
 * One table per port type, a const global in the type's .c file (found by
 * Python through the type's accessor function).  Every function gets the
 * port; port->priv is the type's own state.  Functions marked "may be NULL"
 * are skipped when absent.  The PMD threads call the burst and idle
 * functions; several PMDs may transmit to one port at once, but each
 * receive queue is polled by one PMD only.
 */
struct vs_port_ops {
    const char *name;            /* the port type, for messages */
    /* Receives at most max frames from queue.  They stay valid (in the
     * port's or the guest's memory) until rx_done, or, without rx_done,
     * until the next rx_burst on the queue. */
    uint32_t (*rx_burst)(struct vs_port *port, uint32_t queue, struct vs_pkt *pkts, uint32_t max);
    /* After a burst of n > 0 frames has been forwarded: give the buffers
     * back to their owner.  May be NULL. */
    void (*rx_done)(struct vs_port *port, uint32_t queue, struct vs_pkt *pkts, uint32_t n);
    /* Sends n frames, each copied before it returns.  queue_hint is the
     * ingress queue, to spread flows over the port's queues.  unicast of
     * them were sent here by the MAC table (the rest are flooded copies):
     * frames the port has no queue for count as stats.tx_dropped_down. */
    void (*tx_burst)(struct vs_port *port, uint32_t queue_hint, struct vs_pkt **pkts, uint32_t n,
                     uint32_t unicast);
    /* VS_OFFLOAD_* the port takes on transmit; the PMD does the rest in
     * software.  May be NULL (none). */
    uint32_t (*offload_caps)(const struct vs_port *port);
    /* Before the PMD sleeps: arm the queue's notifications and return the
     * fd that turns readable when work arrives, or an enum vs_idle_wait.
     * May be NULL (VS_IDLE_CANNOT_WAKE). */
    int (*idle_arm)(struct vs_port *port, uint32_t queue);
    /* After every queue is armed and a full barrier: 1 if work arrived
     * before the peer could see the notifications armed.  May be NULL (the
     * fd shows all work). */
    int (*idle_pending)(struct vs_port *port, uint32_t queue);
    /* After the sleep, for each queue whose idle_arm gave an fd: woke says
     * whether that fd turned readable (drain it if it counts).  May be NULL. */
    void (*idle_disarm)(struct vs_port *port, uint32_t queue, int woke);
    /* For the control plane: 1 up, 0 down, -errno gone for good.  May be
     * NULL (the control plane follows the link by other means). */
    int (*link_state)(struct vs_port *port);
};

/* Counters kept per port (per-queue counters live in the port type's state). */
struct vs_port_stats {
    uint64_t tx_dropped_down;    /* unicast frames for this port while its link was down */
    uint64_t tx_dropped_offload; /* frames whose checksum/segmentation could not be done (bad header) */
    uint64_t tx_dropped_mtu;     /* frames longer than max_frame: dropped, never truncated */
    uint64_t vlan_dropped;       /* received frames with a VLAN the port does not carry, or tagged on an access port */
    uint64_t police_dropped;     /* received frames over the port's policing rate */
    uint64_t mirror_output_dropped; /* received on a mirror's output port, which takes no traffic */
    uint64_t rarp_sent;          /* RARP frames the switch sent as if from this port (vs_port_announce) */
};

struct vs_port {
    uint32_t port_no;            /* index in vs_port_table.ports and in FIB entries */
    uint8_t link_up;             /* shared: the PMD delivers only while set */
    const struct vs_port_ops *ops; /* control: set before the port is published, never changed */
    void *priv;                  /* control: the type's state (a vhost device, a kernel port ...) */
    uint32_t max_frame;          /* shared: longest frame (without GSO) the port takes, from its
                                  * MTU; 0: no limit.  Written by the control plane at any time. */
    struct vs_vlan *vlan;        /* shared: NULL, no VLAN settings (VLAN 0, tags carried untouched) */
    struct vs_police *police;    /* shared: NULL, no ingress policing */
    struct vs_monitor *monitor;  /* shared: NULL, neither captured nor mirrored (pmd/capture.h) */
    /* shared: announcements still to send as if received on this port
     * (vs_port_announce, pmd.h): the MAC in the top 48 bits, how many RARP
     * frames in the low 16.  0, the usual case, costs the PMD one load and
     * one branch per poll of a queue of the port, on a cache line it reads
     * anyway (the struct's first 64 bytes). */
    uint64_t announce;
    /* control: how many sub-destinations the port has (a tunnel's remote
     * endpoints), set before the port is published; 0: none.  The MAC table
     * then records which one a MAC was learned from (vs_pkt.sub on receive,
     * 1 to subs) and hands that back on transmit. */
    uint16_t subs;
    struct vs_port_stats stats;
};
