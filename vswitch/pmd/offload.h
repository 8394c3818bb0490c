/*
 * Checksum and segmentation offloads in software (offload.c), for frames
 * whose virtio-net header asks for work the destination port cannot do:
 * a partial checksum (NEEDS_CSUM) for a port without checksum offload, a
 * TCP GSO frame for a port without TSO.  The fixed frames are new struct
 * vs_pkt whose headers live in a per-thread batch and whose payload still
 * points into the source's memory: the source is never written, since the
 * same frame may be flooded to ports that take it as it is.
 *
 * cdef-clean: no #include, integer #defines only.
 */

/* What a destination port accepts in a frame's virtio-net header. */
#define VS_OFFLOAD_CSUM 1            /* NEEDS_CSUM frames (virtio GUEST_CSUM, TUN_F_CSUM) */
#define VS_OFFLOAD_TSO4 2            /* TCP/IPv4 GSO frames */
#define VS_OFFLOAD_TSO6 4            /* TCP/IPv6 GSO frames */
#define VS_OFFLOAD_ECN 8             /* GSO frames with the ECN bit */
#define VS_OFFLOAD_ALL 15

#define VS_OFFLOAD_MAX_SEGS 128      /* segments one GSO frame may become; more is refused */
#define VS_OFFLOAD_MIN_MSS 48        /* smallest gso_size taken: Linux's own floor (TCP_MIN_SND_MSS) */
#define VS_OFFLOAD_HDR_MAX 256       /* headers copied per output frame (Ethernet .. L4) */
#define VS_OFFLOAD_MAX_OUT 160       /* VS_BURST + VS_OFFLOAD_MAX_SEGS */

struct vs_offload_batch {
    uint32_t n;                                  /* frames in out[] */
    uint32_t used;                               /* pkts[] / hdrs[] slots taken */
    uint64_t errors;                             /* frames dropped: bad header, unsupported GSO */
    struct vs_pkt *out[VS_OFFLOAD_MAX_OUT];      /* what to transmit, in order */
    struct vs_pkt pkts[VS_OFFLOAD_MAX_OUT];      /* fixed frames */
    uint8_t hdrs[VS_OFFLOAD_MAX_OUT][VS_OFFLOAD_HDR_MAX];
};

/* Destination capabilities of a vhost-user device, from its negotiated features. */
uint32_t vs_offload_caps_from_features(uint64_t features);
/* Non-zero if some frame in pkts needs work before a port with `caps` may take it,
 * or has a header no port may be handed (vs_offload_fit then drops it). */
int vs_offload_needed(struct vs_pkt **pkts, uint32_t n, uint32_t caps);
/* 1 if the frame's virtio-net header may be handed as it is to a port that
 * takes offloads (a TAP, an AF_PACKET socket, a guest): known flags, hdr_len
 * within the frame, a TCP/UDP checksum field inside it, a GSO type that matches
 * the frame's TCP/IPv4 or TCP/IPv6 headers with a sane gso_size and lengths
 * that fit their 16-bit IP fields.  0 otherwise. */
int vs_offload_hdr_valid(const struct vs_pkt *pkt);
/* Fills b (reset first) with pkts[start..], fixed for `caps`, until b could
 * overflow; returns the index of the first frame not taken. */
uint32_t vs_offload_fit(struct vs_offload_batch *b, struct vs_pkt **pkts, uint32_t n, uint32_t start,
                        uint32_t caps);
/* This thread's batch, allocated on first use; NULL if out of memory. */
struct vs_offload_batch *vs_offload_thread_batch(void);
