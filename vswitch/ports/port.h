/*
 * A port as the fast path sees it.  Every port type has one of these; the
 * type decides which receive and transmit functions the PMD calls.
 */

#define VS_MAX_PORTS 256

enum vs_port_type {
    VS_PORT_VHOST_USER = 1,
    VS_PORT_TAP = 2,
    VS_PORT_AF_PACKET = 3,
    VS_PORT_AF_XDP = 4
};

/* Counters kept per port (per-queue counters live in the rings). */
struct vs_port_stats {
    uint64_t tx_dropped_down;    /* unicast frames for this port while its link was down */
    uint64_t tx_dropped_offload; /* frames whose checksum/segmentation could not be done (bad header) */
};

struct vs_port {
    uint32_t port_no;            /* index in vs_port_table.ports and in FIB entries */
    uint32_t type;               /* enum vs_port_type */
    uint8_t link_up;             /* shared: the PMD delivers only while set */
    struct vs_vhost_dev *vhost;  /* VS_PORT_VHOST_USER */
    struct vs_kport *kport;      /* VS_PORT_TAP, VS_PORT_AF_PACKET */
    struct vs_port_stats stats;
};
