/*
 * Private header of the two ring engines, split (virtqueue.c) and packed
 * (packed_ring.c): what they share.  Guest-address translation and the
 * virtio-net header are inline here, so that each engine's fast path
 * compiles exactly as if they were its own; the rest are out-of-line helpers
 * of virtqueue.c that only a chain off the fast path needs.
 */
#ifndef VSWITCH_RING_INTERNAL_H
#define VSWITCH_RING_INTERNAL_H

#define RX_MAX_BUFS 64           /* mergeable buffers one frame may use */
#define RX_MAX_SEGS 128          /* writable pieces one frame may use */

/*
 * Copies frame bytes into a guest's buffer.  glibc's memcpy moves blocks of
 * a few KiB and more with `rep movsb`, which on some CPUs (this AMD EPYC VM
 * among them) runs 20-80x slower when the destination lies less than 64
 * bytes ahead of the source modulo 4 KiB, and its vector loop is 4x slower
 * there too: each load waits on a recent store to an address that looks the
 * same to the CPU (4K aliasing).  A frame copied behind the 12-byte
 * virtio-net header into a buffer at the source's page offset lands exactly
 * there (README "The switch's own cost").  Such copies run backwards, 64
 * bytes at a time, so that no load follows a store it seems to alias: 2-4x
 * the cost of an unaliased copy instead of 20-50x.  The test is one branch.
 */
/* glibc's smallest rep_movsb_threshold (SSE2; 2112 on this machine): below
 * it glibc's vector loop is faster than ours, aliased or not. */
#define VS_COPY_ALIASED_MIN 2048
static inline void vs_copy(void *dst, const void *src, size_t n)
{
    if (unlikely(n >= VS_COPY_ALIASED_MIN && (((uintptr_t)dst - (uintptr_t)src) & 4095) < 64)) {
        uint8_t *d = dst;
        const uint8_t *s = src;
        while (n >= 64) {
            n -= 64;
            memcpy(d + n, s + n, 64);   /* a constant size: inlined vector moves */
        }
        memcpy(d, s, n);
        return;
    }
    memcpy(dst, src, n);
}

/* Returns the host address of guest-physical gpa and, in *contig, how many
 * bytes from there stay inside the same region; NULL if gpa is unmapped. */
static inline uint8_t *gpa_to_hva(const struct vs_memtable *mem, uint64_t gpa, uint64_t *contig)
{
    for (uint32_t i = 0; i < mem->nregions; i++) {
        const struct vs_mem_region *r = &mem->regions[i];
        uint64_t off = gpa - r->guest_phys_addr;
        if (gpa >= r->guest_phys_addr && off < r->size) {
            *contig = r->size - off;
            return r->host_addr + off;
        }
    }
    return NULL;
}

/* Translates a range that must lie wholly inside one region. */
static inline void *gpa_to_hva_range(const struct vs_memtable *mem, uint64_t gpa, uint64_t len)
{
    uint64_t contig;
    uint8_t *p = gpa_to_hva(mem, gpa, &contig);
    return p && contig >= len ? p : NULL;
}

/*
 * Translates an address a descriptor holds: guest-physical, or with
 * ACCESS_PLATFORM an IOVA looked up in the IOTLB (iotlb.c), which also
 * checks the access (VS_IOTLB_ACCESS_RO to read, _WO to write).  A device
 * without an IOTLB pays this one branch.  NULL: buf_error() says why.
 */
static inline uint8_t *buf_to_hva(const struct vs_vhost_dev *dev, uint64_t addr, uint32_t access, uint64_t *contig)
{
    if (likely(!dev->iotlb)) {
        return gpa_to_hva(dev->mem, addr, contig);
    }
    return vs_iotlb_to_hva(dev, addr, access, contig);
}

/* Translates a buffer that must lie in one region (and one IOTLB entry). */
static inline void *buf_to_hva_range(const struct vs_vhost_dev *dev, uint64_t addr, uint64_t len, uint32_t access)
{
    uint64_t contig;
    uint8_t *p = buf_to_hva(dev, addr, access, &contig);
    return p && contig >= len ? p : NULL;
}

/* Why the last buf_to_hva on this thread failed: VS_VQ_ERR_IOTLB_MISS (the ring waits for the
 * front-end's answer and tries again), VS_VQ_ERR_IOTLB_PERM, or VS_VQ_ERR_ADDR. */
static inline int buf_error(const struct vs_vhost_dev *dev)
{
    return likely(!dev->iotlb) ? VS_VQ_ERR_ADDR : vs_iotlb_failure();
}

/* The part of the virtio-net header a TX frame's offloads come from (flags .. csum_offset). */
#define NET_HDR_OFFLOAD_LEN 10

/*
 * Takes what the guest may ask of us from its TX header: a partial checksum
 * only with CSUM negotiated, a GSO type only with the matching HOST_TSO
 * feature (and ECN only with HOST_ECN), and only with a partial checksum, as
 * virtio requires of TSO.  A header asking for more is refused
 * (VS_VQ_ERR_NET_HDR): the frame is dropped and counted rather than passed
 * on with its request silently cleared.  Without CSUM the header carries no
 * offload at all and is ignored.  guest_hdr may be guest memory: it is
 * copied once and every decision is made on the copy, so a guest rewriting
 * it meanwhile cannot pass a field that differs from the one checked.
 */
static inline int capture_net_hdr(const struct vs_vhost_dev *dev, struct vs_pkt *pkt, const uint8_t *guest_hdr)
{
    memset(&pkt->vnet, 0, sizeof pkt->vnet);
    uint64_t f = dev->features;
    if (likely(!(f & (1ULL << VIRTIO_NET_F_CSUM)))) {
        return VS_VQ_OK;
    }
    uint8_t h[NET_HDR_OFFLOAD_LEN];
    vs_copy_once(h, guest_hdr, NET_HDR_OFFLOAD_LEN);
    if ((h[0] | h[1]) == 0) {
        return VS_VQ_OK;
    }
    bool partial = h[0] & VS_NET_HDR_F_NEEDS_CSUM;
    if (partial) {
        pkt->vnet.flags = VS_NET_HDR_F_NEEDS_CSUM;
        memcpy(&pkt->vnet.csum_start, h + 6, 2);
        memcpy(&pkt->vnet.csum_offset, h + 8, 2);
    }
    uint8_t gso = h[1];
    if (gso == VS_NET_HDR_GSO_NONE) {
        return VS_VQ_OK;
    }
    uint8_t kind = gso & (uint8_t)~VS_NET_HDR_GSO_ECN;
    bool allowed = (kind == VS_NET_HDR_GSO_TCPV4 && (f & (1ULL << VIRTIO_NET_F_HOST_TSO4))) ||
                   (kind == VS_NET_HDR_GSO_TCPV6 && (f & (1ULL << VIRTIO_NET_F_HOST_TSO6)));
    if (!allowed || !partial || ((gso & VS_NET_HDR_GSO_ECN) && !(f & (1ULL << VIRTIO_NET_F_HOST_ECN)))) {
        return VS_VQ_ERR_NET_HDR;
    }
    pkt->vnet.gso_type = gso;
    memcpy(&pkt->vnet.hdr_len, h + 2, 2);
    memcpy(&pkt->vnet.gso_size, h + 4, 2);
    return VS_VQ_OK;
}

/*
 * Writes the virtio-net header a receiving guest gets in front of the frame
 * into h (dev->hdr_len bytes: 10, or 12 with num_buffers).  Pure: the
 * multi-buffer paths build it on the stack and copy it with the frame.
 */
static inline void build_net_hdr(uint8_t *h, const struct vs_vhost_dev *dev, const struct vs_pkt *pkt,
                                 uint32_t num_buffers)
{
    memset(h, 0, 10);
    /* Only what this guest negotiated; vs_offload_fit() did the rest in software. */
    if (unlikely(pkt->vnet.flags | pkt->vnet.gso_type) && (dev->features & (1ULL << VIRTIO_NET_F_GUEST_CSUM))) {
        const struct vs_net_hdr *v = &pkt->vnet;
        h[0] = v->flags & (VS_NET_HDR_F_NEEDS_CSUM | VS_NET_HDR_F_DATA_VALID);
        if (v->flags & VS_NET_HDR_F_NEEDS_CSUM) {
            memcpy(h + 6, &v->csum_start, 2);
            memcpy(h + 8, &v->csum_offset, 2);
        }
        if (v->gso_type) {
            h[1] = v->gso_type;
            memcpy(h + 2, &v->hdr_len, 2);
            memcpy(h + 4, &v->gso_size, 2);
        }
    }
    if (dev->hdr_len == 12) {
        h[10] = (uint8_t)num_buffers;  /* num_buffers, little endian */
        h[11] = (uint8_t)(num_buffers >> 8);
    }
}

/*
 * The header of a frame that fits one buffer, written in guest memory only
 * where the buffer does not hold it already.  In a steady stream it does
 * (the driver reuses its buffers and zeroes the same fields when it sends
 * one on), and the driver reads this cache line back: storing the same
 * bytes again would take the line from the driver's core on every frame
 * and make the driver wait for it (README "Throughput per virtio path").
 * Reading the guest's bytes first is safe: they only decide whether to write.
 */
static inline void fill_net_hdr(uint8_t *hdr, const struct vs_vhost_dev *dev, const struct vs_pkt *pkt,
                                uint32_t num_buffers)
{
    uint8_t h[12];
    build_net_hdr(h, dev, pkt, num_buffers);
    /* Compared as two words, not with memcmp(): a call and its size dispatch
     * cost more than the rest of the header's work. */
    uint64_t g8, h8;
    memcpy(&g8, hdr, 8);
    memcpy(&h8, h, 8);
    if (dev->hdr_len == 12) {
        uint32_t g4, h4;
        memcpy(&g4, hdr + 8, 4);
        memcpy(&h4, h + 8, 4);
        if ((g8 ^ h8) | (g4 ^ h4)) {
            memcpy(hdr, h, 12);
        }
    } else {
        uint16_t g2, h2;
        memcpy(&g2, hdr + 8, 2);
        memcpy(&h2, h + 8, 2);
        if ((g8 ^ h8) | (uint16_t)(g2 ^ h2)) {
            memcpy(hdr, h, 10);
        }
    }
}

/*
 * A frame into one guest buffer already found whole and writable: its
 * header (fill_net_hdr, one buffer) and then its segments, and the bytes
 * marked dirty while a migration logs them.  `need` is the header and the
 * frame, the buffer's size at least.  Every one-buffer receive path of
 * both engines goes through here, so they copy the same way.
 */
static inline void put_frame_in_buffer(const struct vs_vhost_dev *dev, uint8_t *buf,
                                       const struct vs_pkt *pkt, uint32_t need)
{
    fill_net_hdr(buf, dev, pkt, 1);
    uint8_t *p = buf + dev->hdr_len;
    for (uint32_t s = 0; s < pkt->nsegs; s++) {
        vs_copy(p, pkt->segs[s].addr, pkt->segs[s].len);
        p += pkt->segs[s].len;
    }
    if (unlikely(dev->log)) {
        vs_dirty_log_hva(dev, p - need, need);  /* p, not buf: buf need not stay in a register */
    }
}

enum rx_result { RX_DELIVERED, RX_RING_EMPTY, RX_TOO_SMALL, RX_BAD_CHAIN, RX_BROKEN, RX_NOT_SIMPLE };

/* Helpers of virtqueue.c (see there). */
int vs_vq_add_segments(const struct vs_vhost_dev *dev, uint32_t access, uint64_t gpa, uint32_t len,
                       struct vs_seg *segs, uint32_t max_segs, uint32_t *nsegs,
                       uint64_t *total, uint64_t max_total);
int vs_vq_strip_header(struct vs_pkt *pkt, uint32_t n, uint8_t *hdr);
void vs_vq_copy_frame(const struct vs_seg *dst, const uint8_t *hdr, uint32_t hdr_len,
                      const struct vs_pkt *pkt);
void vs_vq_record_error(struct vs_vring *vr, uint32_t err, uint32_t index);
void vs_vq_notify_guest(struct vs_vhost_dev *dev, struct vs_vring *vr);

#endif
