/*
 * A packet as the fast path sees it: a list of segments that point straight
 * into the memory of the port it came from (a guest's TX buffers), so that
 * delivery is the only copy.  Declared once here for the compiler and cffi.
 * No #include: vswitch/_build.py concatenates the headers for ffi.cdef().
 */

#define VS_BURST 32              /* packets per rx/tx burst */
#define VS_PKT_MAX_SEGS 64       /* gather segments per packet */
#define VS_MAX_FRAME 65550       /* largest frame accepted, without the virtio-net header */

struct vs_seg {
    uint8_t *addr;               /* host address of the bytes */
    uint32_t len;                /* number of bytes */
};

struct vs_pkt {
    uint32_t len;                /* frame length, virtio-net header excluded */
    uint16_t nsegs;              /* segments in use */
    uint16_t head;               /* descriptor head to return to the source ring */
    struct vs_seg segs[VS_PKT_MAX_SEGS];
};
