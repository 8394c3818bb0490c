/*
 * VXLAN tunnel ports (RFC 7348): the switch's frames travel to remote
 * tunnel endpoints (VTEPs) inside UDP datagrams, behind an 8-byte VXLAN
 * header that carries a 24-bit segment id (VNI).
 *
 * The outer frames leave and enter through the kernel's IPv4 stack, not an
 * uplink of our own: a UDP socket bound to local_ip:dst_port receives
 * (recvmmsg), a raw IPPROTO_UDP socket bound to local_ip sends (sendmmsg)
 * with a UDP header we write, so that each flow gets its own source port
 * (a bound UDP socket could only send from dst_port).  The kernel does
 * routing, ARP and the outer Ethernet and IP headers, so the tunnel works
 * over any interface, bond or VLAN the host already has; the cost is a
 * system call per batch and the kernel's copy, which an AF_PACKET uplink
 * would share.
 *
 * With `underlay: {type: af-xdp, interface: IF}` the datagrams go through
 * an XDP socket on IF instead (xsk below, af_xdp.h's machinery with its
 * UDP filter program: only IPv4/UDP to local_ip:dst_port reaches the
 * socket, the kernel keeps the rest and so keeps ARP and ICMP working).
 * The switch then writes the outer Ethernet and IPv4 headers itself, from
 * a template per remote that the control plane builds once it knows the
 * next hop's MAC address (vs_vxlan_set_next_hop); a remote without one is
 * not sent to (tx_no_neighbour).
 *
 * Each remote VTEP is one sub-destination of the port (port.h subs): a
 * received frame carries the index of the remote it came from plus one
 * (vs_pkt.sub), the MAC table records it, and a unicast frame goes back to
 * that remote only; frames for VS_SUB_ALL go to every remote (head-end
 * replication).
 *
 * No #include: cffi reads this file.
 */

#define VS_VXLAN_MAX_REMOTES 64
#define VS_VXLAN_MAX_VNI_MAP 64          /* VLAN -> VNI pairs of one port */
#define VS_VXLAN_HLEN 8                  /* the VXLAN header */
#define VS_VXLAN_UDP_HLEN 8
#define VS_VXLAN_OVERHEAD 36             /* outer IPv4 (20) + UDP (8) + VXLAN (8) headers around the inner frame */
#define VS_VXLAN_ETH_IP_HLEN 34          /* AF_XDP underlay: the outer Ethernet (14) and IPv4 (20) headers */
#define VS_VXLAN_OUTER_HLEN 50           /* ... and UDP + VXLAN: all that precedes the inner frame */
#define VS_VXLAN_NO_TEMPLATE 2           /* outer_cur: the remote's next hop is not resolved */
#define VS_VXLAN_RX_BUF 65536            /* one receive buffer: any UDP payload over IPv4 fits */
#define VS_VXLAN_FLAG_I 8                /* the VNI is valid; frames without it are dropped */
#define VS_VXLAN_MAX_VNI 16777215
#define VS_VXLAN_SRC_PORT_MIN 49152      /* RFC 7348 5: source ports from the dynamic range */
#define VS_VXLAN_SRC_PORT_MASK 16383
/* An empty receive backs off: the socket is left alone for 1/8 us, then
 * twice as long after each further empty one, up to this cap, which is the
 * most a datagram can wait for a busy-polling PMD to look. */
#define VS_VXLAN_RX_BACKOFF_MAX_NS 8000

/* Why vs_vxlan_decap refused a datagram. */
#define VS_VXLAN_UNKNOWN_REMOTE -1       /* its source address is none of the remotes */
#define VS_VXLAN_MALFORMED -2            /* too short for VXLAN + Ethernet headers, or the I flag clear */
#define VS_VXLAN_WRONG_VNI -3            /* a VNI this port does not carry */
#define VS_VXLAN_FRAGMENT -4             /* AF_XDP underlay: an outer IPv4 fragment (none is reassembled) */

struct vs_vxlan_stats {
    uint64_t rx_packets;                 /* inner frames handed to the PMD */
    uint64_t rx_bytes;
    uint64_t rx_unknown_remote;          /* datagrams dropped: not from a remote VTEP of this port */
    uint64_t rx_wrong_vni;               /* datagrams dropped: a VNI this port does not carry */
    uint64_t rx_malformed;               /* datagrams dropped: short, truncated, or the I flag clear */
    uint64_t rx_errors;                  /* recvmmsg failures other than "nothing to read" */
    uint64_t rx_polls;                   /* recvmmsg calls */
    uint64_t rx_empty_polls;             /* of those, the ones that found the socket empty */
    uint64_t rx_polls_skipped;           /* receive bursts that left the socket alone (backing off) */
    uint64_t tx_packets;                 /* datagrams sent (one per remote a frame went to): atomic */
    uint64_t tx_bytes;                   /* their inner frames' bytes: atomic */
    uint64_t tx_errors;                  /* datagrams the kernel refused (no route, full buffer): atomic */
    /* AF_XDP underlay only. */
    uint64_t rx_fragments;               /* outer IPv4 fragments dropped */
    uint64_t tx_no_neighbour;            /* datagrams not sent: the remote's next-hop MAC is unknown: atomic */
    uint64_t tx_ring_full;               /* datagrams dropped: no free UMEM frame or TX descriptor: atomic */
};

struct vs_vxlan_remote {
    uint32_t addr;                       /* IPv4 address, network byte order */
    uint64_t rx_packets;                 /* frames received from it */
    uint64_t tx_packets;                 /* datagrams sent to it: atomic */
    /* AF_XDP underlay: the outer Ethernet + IPv4 headers towards it, with
     * total length and id 0 and the checksum over that; two copies, so the
     * control plane rewrites the one not in use and then flips outer_cur. */
    uint8_t outer[2][VS_VXLAN_ETH_IP_HLEN];
    uint32_t outer_cur;                  /* 0 or 1, or VS_VXLAN_NO_TEMPLATE */
    uint8_t next_hop_mac[6];             /* what the current template sends to */
};

struct vs_vxlan_port {
    int rx_fd;                           /* UDP socket bound to local_addr:dst_port */
    int tx_fd;                           /* raw IPPROTO_UDP socket bound to local_addr */
    uint32_t local_addr;                 /* network byte order */
    uint32_t dst_port;                   /* host byte order */
    uint32_t vni;                        /* frames without a mapped VLAN */
    uint32_t n_remotes;
    struct vs_vxlan_remote remotes[VS_VXLAN_MAX_REMOTES];
    /* Per-VLAN VNIs: a frame that leaves this port tagged with map_vlan[i]
     * travels untagged in VNI map_vni[i], and comes back tagged. */
    uint32_t n_map;
    uint16_t map_vlan[VS_VXLAN_MAX_VNI_MAP];
    uint32_t map_vni[VS_VXLAN_MAX_VNI_MAP];
    uint32_t route_mtu;                  /* the smallest MTU of the routes to the remotes, found by open */
    uint8_t *rx_bufs;                    /* VS_BURST buffers of VS_VXLAN_RX_BUF bytes */
    /* Receive backoff, kept by the one PMD that polls the port. */
    uint64_t rx_next_poll_tsc;           /* no recvmmsg before this TSC */
    uint64_t rx_backoff_cycles;          /* the current backoff; 0 after a datagram */
    uint64_t rx_backoff_min_cycles;      /* the first backoff, set by init */
    uint64_t rx_backoff_max_cycles;      /* its cap (VS_VXLAN_RX_BACKOFF_MAX_NS), set by init; 0: no backoff */
    struct vs_xsk_port *xsk;             /* the AF_XDP underlay, opened by the control plane; NULL: sockets */
    uint8_t src_mac[6];                  /* AF_XDP underlay: the interface's MAC */
    uint16_t ip_id;                      /* AF_XDP underlay: the next outer IPv4 id: atomic */
    char error[128];                     /* what failed in vs_vxlan_port_open */
    struct vs_vxlan_stats stats;
};

/* Allocates the receive buffers (none with xsk set: the UMEM is the buffer); fds stay -1.  0 or -ENOMEM.
 * vs_vxlan_port_fini releases everything, also after a failure. */
int vs_vxlan_port_init(struct vs_vxlan_port *vp);
/* Opens both sockets, in network namespace netns_fd if >= 0.  0 or -errno
 * (vp->error says which step failed). */
int vs_vxlan_port_open(struct vs_vxlan_port *vp, int netns_fd);
void vs_vxlan_port_fini(struct vs_vxlan_port *vp);

/* Checks a received datagram (UDP payload) from from_addr (network order).
 * Returns the offset of the inner frame in data (its length is len minus
 * that), and sets *sub to the remote's index + 1; or a VS_VXLAN_* reason.
 * A frame of a mapped VNI gets its VLAN tag pushed in place, in front of
 * the inner frame (data must be writable). */
int vs_vxlan_decap(const struct vs_vxlan_port *vp, uint32_t from_addr, uint8_t *data, uint32_t len,
                   uint16_t *sub);
/* Writes the UDP and VXLAN headers (16 bytes) for pkt to out; *strip_tag is
 * set when the frame's VLAN tag maps to a VNI and must be left out. */
void vs_vxlan_encap_header(const struct vs_vxlan_port *vp, const struct vs_pkt *pkt, uint8_t *out,
                           int *strip_tag);
/* The outer UDP source port for a frame: a hash of its addresses and ports,
 * in the dynamic range, so the underlay spreads flows and keeps each in order. */
uint16_t vs_vxlan_source_port(const struct vs_pkt *pkt);

/* AF_XDP underlay.  Builds remote's outer Ethernet + IPv4 template from
 * vp->src_mac and next_hop (6 bytes), or marks the remote unresolved if
 * next_hop is NULL.  Control plane only. */
void vs_vxlan_set_next_hop(struct vs_vxlan_port *vp, uint32_t remote, const uint8_t *next_hop);
/* Writes the 50 bytes that precede pkt's inner frame in a datagram to
 * remote: 0, or -1 if the remote is unresolved (nothing written). */
int vs_vxlan_outer_header(const struct vs_vxlan_port *vp, uint32_t remote, const struct vs_pkt *pkt,
                          uint16_t ip_id, uint8_t *out, int *strip_tag);
/* Checks a received Ethernet frame: IPv4 without options or fragments, to
 * local_addr, UDP to dst_port, lengths that agree, then vs_vxlan_decap.
 * Returns the inner frame's offset in frame (and its length in *inner_len)
 * or a VS_VXLAN_* reason. */
int vs_vxlan_parse_outer(const struct vs_vxlan_port *vp, uint8_t *frame, uint32_t len, uint16_t *sub,
                         uint32_t *inner_len);

const struct vs_port_ops *vs_vxlan_port_ops(void);
