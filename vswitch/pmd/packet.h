/*
 * A packet as the fast path sees it: a list of segments that point straight
 * into the memory of the port it came from (a guest's TX buffers), so that
 * delivery is the only copy.  Declared once here for the compiler and cffi.
 * No #include: vswitch/_build.py concatenates the headers for ffi.cdef().
 */

#define VS_BURST 32              /* packets per rx/tx burst */
#define VS_PKT_MAX_SEGS 64       /* gather segments per packet */
#define VS_MAX_FRAME 65550       /* largest frame accepted, without the virtio-net header */
#define VS_SUB_ALL 0             /* a frame for every sub-destination of its port (flooded, or static) */

struct vs_seg {
    uint8_t *addr;               /* host address of the bytes */
    uint32_t len;                /* number of bytes */
};

/* The virtio-net header (virtio 1.x, 5.1.6) that travels with a frame:
 * checksum and segmentation offloads the sender left to the receiver. */
#define VS_NET_HDR_F_NEEDS_CSUM 1    /* checksum from csum_start, stored at csum_start + csum_offset */
#define VS_NET_HDR_F_DATA_VALID 2    /* checksum already verified */
#define VS_NET_HDR_GSO_NONE 0
#define VS_NET_HDR_GSO_TCPV4 1
#define VS_NET_HDR_GSO_UDP 3
#define VS_NET_HDR_GSO_TCPV6 4
#define VS_NET_HDR_GSO_ECN 128       /* with TCPV4/6: the sender set ECN CWR */

struct vs_net_hdr {
    uint8_t flags;               /* VS_NET_HDR_F_* */
    uint8_t gso_type;            /* VS_NET_HDR_GSO_* */
    uint16_t hdr_len;            /* bytes of headers (Ethernet .. TCP) of a GSO frame */
    uint16_t gso_size;           /* payload bytes per segment */
    uint16_t csum_start;
    uint16_t csum_offset;
};

struct vs_pkt {
    uint32_t len;                /* frame length, virtio-net header excluded */
    uint16_t nsegs;              /* segments in use */
    uint16_t head;               /* descriptor head to return to the source ring */
    /* A sub-destination of a port with several (a tunnel's remotes, port.h
     * subs): on receive, the one the frame came from (read only from such
     * ports); on transmit, the one it goes to, VS_SUB_ALL for every one. */
    uint16_t sub;
    struct vs_net_hdr vnet;      /* offloads; all zero when none were negotiated */
    struct vs_seg segs[VS_PKT_MAX_SEGS];
};
