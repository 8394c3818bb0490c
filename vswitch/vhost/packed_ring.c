/*
 * The packed virtqueue engine (virtio 1.1, section 2.8): the same work as
 * virtqueue.c, on a ring where the driver makes a descriptor available by
 * setting its AVAIL flag to the driver's wrap counter and USED to the
 * opposite, and the device returns a buffer by writing a descriptor (id,
 * length) in the next used slot with both flags equal to its own wrap
 * counter, then skipping as many slots as the chain took.
 *
 * Security model, as for split rings: every descriptor is copied once
 * before it is checked; addresses go through the device's memory table; a
 * chain ends after at most ring-size descriptors, or where it runs into a
 * descriptor the driver has not made available (a wrong wrap counter);
 * an indirect table stands alone, is at most ring-size entries and does
 * not nest; a buffer id past the ring is refused.  A refused chain is
 * returned with length 0 and counted, and the ring goes on with the next
 * one.  A packed ring has no index the guest could make jump, so nothing
 * here stops a ring.
 *
 * Used entries go back in the order the buffers came, and a burst's used
 * entries appear to the driver at once: the first entry's flags are
 * written last.  With VIRTIO_F_IN_ORDER the chains a TX burst took go back
 * as one used entry naming the last buffer (2.8.9), so the driver frees
 * them in ring order; receive buffers keep one entry each, for their
 * lengths.  Notifications follow the driver's event structure (enable,
 * disable, or with EVENT_IDX a descriptor offset and wrap), once per burst.
 *
 * Both directions take descriptors four at a time where they can, as
 * DPDK's vhost does: four one-descriptor chains filling one 64-byte line of
 * the ring (batch_*).  The line's flags are checked with one test, its ring
 * positions need no wrap checks, and on receive its four used entries are
 * written back to back after the four copies.  That made a packed pass
 * fewer instructions than a split one (README "Throughput per virtio
 * path").  Anything a line cannot take whole (a chain, an indirect table,
 * a short buffer, a bad id, a line not all available) falls to the
 * one-chain paths, which check and count it as before.
 */
#include "vswitch.h"
#include "vhost/ring_internal.h"

/* The AVAIL and USED bits of a descriptor available in lap `wrap`. */
static inline uint16_t avail_bits(bool wrap)
{
    return wrap ? VIRTQ_DESC_F_AVAIL : VIRTQ_DESC_F_USED;
}

/* The AVAIL and USED bits of a descriptor the device has used in lap `wrap`: both equal to it. */
static inline uint16_t used_bits(bool wrap)
{
    return (uint16_t)(-(uint16_t)wrap & (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED));
}

/* Available in lap `wrap`: AVAIL equal to the wrap counter, USED not (one compare). */
static inline bool desc_is_avail(uint16_t flags, bool wrap)
{
    return (flags & (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED)) == avail_bits(wrap);
}

/*
 * Moves a ring position on by n slots, flipping the wrap counter each lap.
 * The size is a power of two but not a constant, so t / size would be an
 * integer division (tens of cycles, up to three per frame); a shift by its
 * log does the same, and only once a lap.
 */
static inline void advance(uint16_t *idx, uint8_t *wrap, uint32_t n, uint32_t size)
{
    uint32_t t = *idx + n;
    if (likely(t < size)) {
        *idx = (uint16_t)t;
        return;
    }
    *wrap ^= (uint8_t)((t >> __builtin_ctz(size)) & 1);
    *idx = (uint16_t)(t & (size - 1));
}

/* Copies a descriptor out of guest memory exactly once. */
static inline struct vring_packed_desc read_pdesc(const struct vring_packed_desc *table, uint32_t idx)
{
    const volatile struct vring_packed_desc *vd = &table[idx];
    struct vring_packed_desc d = { .addr = vd->addr, .len = vd->len, .id = vd->id, .flags = vd->flags };
    return d;
}

/* The rest of a descriptor whose flags the caller loaded (with acquire, to
 * see it available): each field is still read exactly once. */
static inline struct vring_packed_desc read_pdesc_after(const struct vring_packed_desc *table, uint32_t idx,
                                                        uint16_t flags)
{
    const volatile struct vring_packed_desc *vd = &table[idx];
    struct vring_packed_desc d = { .addr = vd->addr, .len = vd->len, .id = vd->id, .flags = flags };
    return d;
}

/* Descriptors in one 64-byte line of the ring; the ring is 16-byte aligned. */
#define BATCH 4u
_Static_assert(BATCH * sizeof(struct vring_packed_desc) == 64, "a batch is one cache line");

/* Whether a batch may start at idx: the line's first slot, and the ring does not wrap inside it. */
static inline bool batch_fits(uint16_t idx, uint32_t size)
{
    return !(idx & (BATCH - 1)) && (uint32_t)idx + BATCH <= size;
}

/*
 * Whether the four descriptors from idx are all available and all of one
 * kind: one buffer each (no NEXT, no INDIRECT), writable or not as `want`
 * says.  One test for the line; the rest of each descriptor is read after
 * it (acquire), and its flags are these.
 */
static inline bool batch_avail(const struct vring_packed_desc *ring, uint16_t idx, uint16_t want)
{
    const uint16_t mask = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED | VIRTQ_DESC_F_NEXT |
                          VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE;
    const struct vring_packed_desc *line = &ring[idx];
    uint16_t diff = (__atomic_load_n(&line[0].flags, __ATOMIC_RELAXED) ^ want) |
                    (__atomic_load_n(&line[1].flags, __ATOMIC_RELAXED) ^ want) |
                    (__atomic_load_n(&line[2].flags, __ATOMIC_RELAXED) ^ want) |
                    (__atomic_load_n(&line[3].flags, __ATOMIC_RELAXED) ^ want);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return !(diff & mask);
}

int vs_packed_setup(struct vs_vhost_dev *dev, struct vs_vring *vr, uint32_t size,
                    uint64_t desc_uva, uint64_t driver_event_uva, uint64_t device_event_uva,
                    uint32_t base)
{
    struct vs_packed_ring *pr = &vr->pk;
    void *desc = vs_mem_translate_uva(dev->mem, desc_uva, (uint64_t)size * sizeof(struct vring_packed_desc));
    void *drv = vs_mem_translate_uva(dev->mem, driver_event_uva, sizeof(struct vring_packed_desc_event));
    void *dev_ev = vs_mem_translate_uva(dev->mem, device_event_uva, sizeof(struct vring_packed_desc_event));
    if (!desc || !drv || !dev_ev || ((uintptr_t)desc & 15) || ((uintptr_t)drv & 3) || ((uintptr_t)dev_ev & 3)) {
        return VS_VQ_ERR_RING_ADDR;
    }
    /*
     * The base's low half is the next descriptor to consume (bits 0-14) and
     * the driver's wrap counter there (bit 15), as DPDK and virtio-user send
     * it; QEMU adds the used side the same way in the high half.  Without a
     * high half the used side stands where the avail side does: every buffer
     * taken was returned before the ring stopped.  A front-end that
     * reconnects without inflight tracking either resets its packed rings
     * (virtio-user sends the start, 0 with wrap 1) or, like QEMU, sends where
     * the used side was: if that is behind the avail side (a back-end that
     * died with buffers in flight), resume from it, as split rings do from
     * the used index: those buffers are read again (TX, resent) or written
     * again (RX).  The guest chooses the base either way.
     */
    uint16_t avail = base & 0xffff;
    uint16_t used = base >> 16 ? base >> 16 : avail;
    uint16_t mask = (uint16_t)~(1u << VIRTQ_EVENT_WRAP_SHIFT);
    if ((avail & mask) >= size || (used & mask) >= size) {
        return VS_VQ_ERR_BASE;
    }
    if (used != avail) {
        vr->resumed_from_used++;
    }
    pr->desc = desc;
    pr->driver_event = drv;
    pr->device_event = dev_ev;
    vr->size = size;
    pr->avail_idx = pr->used_idx = used & mask;
    pr->avail_wrap = pr->used_wrap = (used >> VIRTQ_EVENT_WRAP_SHIFT) & 1;
    pr->batch_count = 0;
    pr->npending = 0;
    vr->signalled_used_valid = 0;
    __atomic_store_n(&vr->broken, 0, __ATOMIC_RELAXED);
    /* The PMD polls, so the guest need not kick us. */
    __atomic_store_n(&pr->device_event->flags, VIRTQ_EVENT_F_DISABLE, __ATOMIC_RELAXED);
    if (unlikely(dev->log)) {
        vs_dirty_log_hva(dev, pr->device_event, sizeof *pr->device_event);
    }
    return VS_VQ_OK;
}

void vs_packed_enable_notify(const struct vs_vhost_dev *dev, struct vs_vring *vr, int enable)
{
    struct vs_packed_ring *pr = &vr->pk;
    uint16_t flags = VIRTQ_EVENT_F_DISABLE;
    if (enable && (dev->features & (1ULL << VIRTIO_RING_F_EVENT_IDX))) {
        /* A kick once the guest makes the descriptor past what we consumed available. */
        uint16_t off_wrap = pr->avail_idx | (uint16_t)(pr->avail_wrap << VIRTQ_EVENT_WRAP_SHIFT);
        __atomic_store_n(&pr->device_event->off_wrap, off_wrap, __ATOMIC_RELAXED);
        flags = VIRTQ_EVENT_F_DESC;
    } else if (enable) {
        flags = VIRTQ_EVENT_F_ENABLE;
    }
    __atomic_store_n(&pr->device_event->flags, flags, __ATOMIC_RELEASE);
    if (unlikely(dev->log)) {
        vs_dirty_log_hva(dev, pr->device_event, sizeof *pr->device_event);
    }
}

int vs_packed_has_avail(const struct vs_vring *vr)
{
    const struct vs_packed_ring *pr = &vr->pk;
    uint16_t flags = __atomic_load_n(&pr->desc[pr->avail_idx].flags, __ATOMIC_ACQUIRE);
    return desc_is_avail(flags, pr->avail_wrap);
}

/* Appends one buffer descriptor (not an indirect one) to segs. */
static inline int take_buffer(const struct vs_vhost_dev *dev, const struct vring_packed_desc *d, bool writable,
                              struct vs_seg *segs, uint32_t max_segs, uint32_t *nsegs,
                              uint64_t *total, uint64_t max_total)
{
    if (unlikely(!!(d->flags & VIRTQ_DESC_F_WRITE) != writable)) {
        return writable ? VS_VQ_ERR_NO_WRITABLE : VS_VQ_ERR_WRITE_IN_TX;
    }
    if (!d->len) {
        return VS_VQ_OK;
    }
    return vs_vq_add_segments(dev, writable ? VS_IOTLB_ACCESS_WO : VS_IOTLB_ACCESS_RO, d->addr, d->len, segs, max_segs, nsegs, total, max_total);
}

/* The buffers of an indirect table: its entries in order, F_NEXT ignored (2.8.19). */
static int walk_indirect(const struct vs_vhost_dev *dev, const struct vs_vring *vr,
                         const struct vring_packed_desc *d, bool writable,
                         struct vs_seg *segs, uint32_t max_segs, uint32_t *nsegs,
                         uint64_t *total, uint64_t max_total)
{
    if (unlikely(d->len == 0 || d->len % sizeof(struct vring_packed_desc) ||
                 d->len / sizeof(struct vring_packed_desc) > vr->size)) {
        return VS_VQ_ERR_INDIRECT_LEN;
    }
    const struct vring_packed_desc *table = buf_to_hva_range(dev, d->addr, d->len, VS_IOTLB_ACCESS_RO);
    if (unlikely(!table)) {
        return buf_error(dev);
    }
    if (unlikely((uintptr_t)table & 7)) {
        return VS_VQ_ERR_ADDR;
    }
    uint32_t n = d->len / sizeof(struct vring_packed_desc);
    for (uint32_t i = 0; i < n; i++) {
        struct vring_packed_desc e = read_pdesc(table, i);
        if (unlikely(e.flags & VIRTQ_DESC_F_INDIRECT)) {
            return VS_VQ_ERR_NESTED_INDIRECT;
        }
        int err = take_buffer(dev, &e, writable, segs, max_segs, nsegs, total, max_total);
        if (unlikely(err)) {
            return err;
        }
    }
    return VS_VQ_OK;
}

/*
 * Walks the chain at ring position (idx, wrap), whose first descriptor the
 * caller saw available, and appends its buffers to segs.  Always finds the
 * chain's end, even past an error, so that the ring moves on by *count
 * descriptors: the last one with F_NEXT clear, the ring size (a chain that
 * never ends), or the slot before a descriptor not made available.  *id is
 * the buffer id, from the chain's last descriptor.
 */
static int walk_chain(const struct vs_vhost_dev *dev, const struct vs_vring *vr, uint16_t idx, uint8_t wrap,
                      bool writable, struct vs_seg *segs, uint32_t max_segs, uint32_t *nsegs,
                      uint64_t *total, uint64_t max_total, uint16_t *id, uint16_t *count)
{
    const struct vring_packed_desc *ring = vr->pk.desc;
    uint32_t size = vr->size;
    uint32_t n = 0;
    int err = VS_VQ_OK;
    for (;;) {
        if (unlikely(n == size)) {
            err = err ? err : VS_VQ_ERR_LOOP;
            break;
        }
        struct vring_packed_desc d = read_pdesc(ring, idx);
        if (n && unlikely(!desc_is_avail(d.flags, wrap))) {
            err = err ? err : VS_VQ_ERR_WRAP;
            break;
        }
        n++;
        advance(&idx, &wrap, 1, size);
        *id = d.id;
        if (!err) {
            if (d.flags & VIRTQ_DESC_F_INDIRECT) {
                err = (n > 1 || (d.flags & VIRTQ_DESC_F_NEXT)) ? VS_VQ_ERR_INDIRECT_CHAINED
                    : walk_indirect(dev, vr, &d, writable, segs, max_segs, nsegs, total, max_total);
            } else {
                err = take_buffer(dev, &d, writable, segs, max_segs, nsegs, total, max_total);
            }
        }
        if (!(d.flags & VIRTQ_DESC_F_NEXT)) {
            break;
        }
    }
    *count = (uint16_t)n;
    if (!err && unlikely(*id >= size)) {
        err = VS_VQ_ERR_BAD_ID;
    }
    return err;
}

/* The len, id and flags of a descriptor as one word, whatever the
 * compiler's aliasing rules (the fuzz build does not pass -fno-strict-aliasing). */
typedef uint64_t __attribute__((may_alias)) used_word;
_Static_assert(offsetof(struct vring_packed_desc, len) == 8 && offsetof(struct vring_packed_desc, id) == 12 &&
               offsetof(struct vring_packed_desc, flags) == 14, "len, id, flags: one 8-byte word");
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "virtio rings are little-endian; so must the host be");

/*
 * Writes a used entry in the next used slot and moves on by the chain's
 * count.  The flags of a burst's first entry wait for publish_used, so the
 * driver sees the burst at once; later entries get theirs now, after their
 * id and length.
 */
static inline void put_used(struct vs_vring *vr, uint16_t id, uint32_t len, uint32_t count)
{
    struct vs_packed_ring *pr = &vr->pk;
    struct vring_packed_desc *d = &pr->desc[pr->used_idx];
    uint16_t flags = used_bits(pr->used_wrap);
    if (pr->batch_count == 0) {
        __atomic_store_n(&d->id, id, __ATOMIC_RELAXED);
        __atomic_store_n(&d->len, len, __ATOMIC_RELAXED);
        pr->batch_slot = pr->used_idx;
        pr->batch_flags = flags;
    } else {
        /* len, id and flags in one aligned 8-byte store (the ring is 16-byte
         * aligned; the ring is little-endian, as is this host): the driver
         * cannot see the flags before the id and length, as virtio requires. */
        uint64_t word = len | (uint64_t)id << 32 | (uint64_t)flags << 48;
        __atomic_store_n((used_word *)&d->len, word, __ATOMIC_RELEASE);
    }
    pr->batch_count++;
    advance(&pr->used_idx, &pr->used_wrap, count, vr->size);
}

/* Four one-descriptor used entries, as put_used writes them, back to back
 * in one line of the ring: the used side stands at a line's start (batch_fits). */
static inline void put_used_batch(struct vs_vring *vr, const uint16_t *ids, const uint32_t *lens)
{
    struct vs_packed_ring *pr = &vr->pk;
    uint16_t slot = pr->used_idx;
    struct vring_packed_desc *d = &pr->desc[slot];
    uint16_t flags = used_bits(pr->used_wrap);
    uint64_t word[BATCH];
    for (uint32_t i = 0; i < BATCH; i++) {
        word[i] = lens[i] | (uint64_t)ids[i] << 32 | (uint64_t)flags << 48;
    }
    if (pr->batch_count == 0) {
        /* The burst's first entry: id and length only, its flags wait for publish_used_quietly. */
        __atomic_store_n(&d[0].id, ids[0], __ATOMIC_RELAXED);
        __atomic_store_n(&d[0].len, lens[0], __ATOMIC_RELAXED);
        pr->batch_slot = slot;
        pr->batch_flags = flags;
    } else {
        __atomic_store_n((used_word *)&d[0].len, word[0], __ATOMIC_RELEASE);
    }
    __atomic_store_n((used_word *)&d[1].len, word[1], __ATOMIC_RELEASE);
    __atomic_store_n((used_word *)&d[2].len, word[2], __ATOMIC_RELEASE);
    __atomic_store_n((used_word *)&d[3].len, word[3], __ATOMIC_RELEASE);
    pr->batch_count += BATCH;
    advance(&pr->used_idx, &pr->used_wrap, BATCH, vr->size);
}

/* virtio 2.7.7.2 (and 2.8.21.3): notify if the event offset lies in (old, new]. */
static inline bool need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old_idx)
{
    return (uint16_t)(new_idx - event_idx - 1) < (uint16_t)(new_idx - old_idx);
}

/* Whether the guest wants an interrupt for what was just published; called
 * by the ring's owner as it updates signalled_used. */
static bool want_notify(const struct vs_vhost_dev *dev, struct vs_vring *vr)
{
    struct vs_packed_ring *pr = &vr->pk;
    /* Our flags store must be visible before we read the guest's wishes. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint16_t flags = __atomic_load_n(&pr->driver_event->flags, __ATOMIC_RELAXED);
    bool notify;
    if (flags == VIRTQ_EVENT_F_DESC && (dev->features & (1ULL << VIRTIO_RING_F_EVENT_IDX))) {
        uint16_t off_wrap = __atomic_load_n(&pr->driver_event->off_wrap, __ATOMIC_RELAXED);
        uint16_t event = off_wrap & ~(1u << VIRTQ_EVENT_WRAP_SHIFT);
        uint16_t new_idx = pr->used_idx;
        uint16_t old_idx = pr->signalled_used;
        /* Positions on one line: the last lap's offsets are size lower. */
        if (new_idx <= old_idx) {
            old_idx -= vr->size;
        }
        if ((off_wrap >> VIRTQ_EVENT_WRAP_SHIFT) != pr->used_wrap) {
            event -= vr->size;
        }
        notify = !vr->signalled_used_valid || need_event(event, new_idx, old_idx);
    } else {
        /* DESC without EVENT_IDX is not allowed the driver: treat it as enabled. */
        notify = flags != VIRTQ_EVENT_F_DISABLE;
    }
    pr->signalled_used = pr->used_idx;
    pr->signalled_used_wrap = pr->used_wrap;
    vr->signalled_used_valid = 1;
    return notify && vr->callfd >= 0 && !__atomic_load_n(&vr->call_broken, __ATOMIC_RELAXED);
}

/* Makes the burst's used entries visible (its first entry's flags last);
 * returns whether the guest must be notified (after any lock is dropped). */
static bool publish_used_quietly(const struct vs_vhost_dev *dev, struct vs_vring *vr)
{
    struct vs_packed_ring *pr = &vr->pk;
    if (!pr->batch_count) {
        return false;
    }
    __atomic_store_n(&pr->desc[pr->batch_slot].flags, pr->batch_flags, __ATOMIC_RELEASE);
    if (unlikely(dev->log)) {
        vs_dirty_log_packed_descs(dev, vr, pr->batch_slot, pr->used_idx);
    }
    pr->batch_count = 0;
    return want_notify(dev, vr);
}

/* The frame of a one-buffer chain (flags checked by the caller): its
 * length, id and address checked, its header captured. */
static inline bool take_one_buffer(const struct vs_vhost_dev *dev, const struct vring_packed_desc *d,
                                   uint32_t hdr_len, uint32_t size, struct vs_pkt *pkt)
{
    if (d->len < hdr_len + 14 || d->len > VS_MAX_FRAME + hdr_len || d->id >= size) {
        return false;
    }
    uint8_t *p = buf_to_hva_range(dev, d->addr, d->len, VS_IOTLB_ACCESS_RO);
    if (unlikely(!p)) {
        return false;
    }
    pkt->segs[0].addr = p + hdr_len;
    pkt->segs[0].len = d->len - hdr_len;
    pkt->nsegs = 1;
    pkt->len = d->len - hdr_len;
    pkt->head = d->id;
    if (unlikely(capture_net_hdr(dev, pkt, p))) {
        return false;  /* the full path refuses it and counts why */
    }
    __builtin_prefetch(p + hdr_len);
    return true;
}

/*
 * The common case, checked first: one readable descriptor (header and
 * frame together) inside one region.  Anything else, including every
 * malformed chain, takes walk_chain().
 */
static inline bool dequeue_simple(const struct vs_vhost_dev *dev, const struct vring_packed_desc *d,
                                  uint32_t size, struct vs_pkt *pkt)
{
    if (d->flags & (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE)) {
        return false;
    }
    return take_one_buffer(dev, d, dev->hdr_len, size, pkt);
}

/*
 * Four one-descriptor chains from idx (batch_fits), each taken as
 * dequeue_simple takes one, their ids in ids.  Returns their frames' bytes,
 * or 0 if any of them is not such a chain: then nothing is taken (pkts may
 * be overwritten).
 */
static inline uint32_t dequeue_batch(const struct vs_vhost_dev *dev, const struct vring_packed_desc *ring,
                                     uint16_t idx, bool wrap, uint32_t size, struct vs_pkt *pkts, uint16_t *ids)
{
    uint16_t flags = avail_bits(wrap);
    if (!batch_avail(ring, idx, flags)) {
        return 0;
    }
    uint32_t hdr_len = dev->hdr_len;
    uint32_t bytes = 0;
#pragma GCC unroll 4
    for (uint32_t i = 0; i < BATCH; i++) {
        struct vring_packed_desc d = read_pdesc_after(ring, idx + i, flags);
        if (unlikely(!take_one_buffer(dev, &d, hdr_len, size, &pkts[i]))) {
            return 0;
        }
        ids[i] = d.id;
        bytes += d.len;
    }
    return bytes - BATCH * hdr_len;
}

uint32_t vs_packed_dequeue_burst(struct vs_vhost_dev *dev, struct vs_vring *vr,
                                 struct vs_pkt *pkts, uint32_t max)
{
    struct vs_packed_ring *pr = &vr->pk;
    uint32_t npending = pr->npending;
    uint32_t room = VS_PACKED_MAX_PENDING - npending;
    uint32_t n = max < room ? max : room;
    uint32_t got = 0;
    uint64_t bytes = 0;
    /* The ring position in registers: stores into pkts could alias pr for the compiler. */
    const struct vring_packed_desc *ring = pr->desc;
    uint32_t size = vr->size;
    uint16_t idx = pr->avail_idx;
    uint8_t wrap = pr->avail_wrap;
    bool in_order = dev->features & (1ULL << VIRTIO_F_IN_ORDER);
    for (uint32_t i = 0; i < n; i++) {
        uint16_t ids[BATCH];
        uint32_t batch_bytes;
        if (i + BATCH <= n && batch_fits(idx, size) &&
            (batch_bytes = dequeue_batch(dev, ring, idx, wrap, size, &pkts[got], ids))) {
            if (in_order) {
                /* Returned as one used entry anyway (vs_packed_dequeue_done): its last id and count. */
                pr->pending[npending++] = (struct vs_packed_chain){ .id = ids[BATCH - 1], .count = BATCH };
            } else {
                for (uint32_t k = 0; k < BATCH; k++) {
                    pr->pending[npending++] = (struct vs_packed_chain){ .id = ids[k], .count = 1 };
                }
            }
            bytes += batch_bytes;
            got += BATCH;
            i += BATCH - 1;
            advance(&idx, &wrap, BATCH, size);
            continue;
        }
        uint16_t flags = __atomic_load_n(&ring[idx].flags, __ATOMIC_ACQUIRE);
        if (!desc_is_avail(flags, wrap)) {
            break;
        }
        struct vs_pkt *pkt = &pkts[got];
        struct vring_packed_desc d = read_pdesc_after(ring, idx, flags);
        struct vs_packed_chain *chain = &pr->pending[npending++];
        if (likely(dequeue_simple(dev, &d, size, pkt))) {
            chain->id = d.id;
            chain->count = 1;
            advance(&idx, &wrap, 1, size);
            bytes += pkt->len;
            got++;
            continue;
        }
        uint32_t nsegs = 0;
        uint64_t total = 0;
        uint16_t id = 0, count = 0;
        int err = walk_chain(dev, vr, idx, wrap, false, pkt->segs, VS_PKT_MAX_SEGS,
                             &nsegs, &total, VS_MAX_FRAME + dev->hdr_len, &id, &count);
        if (unlikely(err == VS_VQ_ERR_IOTLB_MISS)) {
            npending--;  /* not taken: the ring waits here for the front-end's answer */
            break;
        }
        chain->id = id;
        chain->count = count;
        advance(&idx, &wrap, count, size);
        pkt->nsegs = nsegs;
        pkt->len = (uint32_t)total;
        pkt->head = id;
        uint8_t hdr[12];
        if (likely(!err)) {
            err = vs_vq_strip_header(pkt, dev->hdr_len, hdr);
        }
        if (likely(!err)) {
            err = capture_net_hdr(dev, pkt, hdr);
        }
        if (likely(!err) && unlikely(pkt->len < 14)) {
            err = VS_VQ_ERR_NO_READABLE;
        }
        if (unlikely(err)) {
            /* Returned with length 0 among the others, in ring order. */
            vs_vq_record_error(vr, err, id);
            continue;
        }
        bytes += pkt->len;
        got++;
    }
    pr->avail_idx = idx;
    pr->avail_wrap = wrap;
    pr->npending = (uint16_t)npending;
    vr->stats.packets += got;
    vr->stats.bytes += bytes;
    vr->stats.bursts += got != 0;
    return got;
}

/* Returns every chain the last dequeue took, forwarded or refused, in ring
 * order (pkts are those chains' good ones, already recorded in pending). */
void vs_packed_dequeue_done(struct vs_vhost_dev *dev, struct vs_vring *vr,
                            const struct vs_pkt *pkts, uint32_t n)
{
    struct vs_packed_ring *pr = &vr->pk;
    uint32_t chains = pr->npending;
    if (!chains) {
        return;
    }
    if (dev->features & (1ULL << VIRTIO_F_IN_ORDER)) {
        /* One entry for the batch, naming its last buffer (2.8.9). */
        uint32_t count = 0;
        for (uint32_t i = 0; i < chains; i++) {
            count += pr->pending[i].count;
        }
        put_used(vr, pr->pending[chains - 1].id, 0, count);
    } else {
        for (uint32_t i = 0; i < chains; i++) {
            put_used(vr, pr->pending[i].id, 0, pr->pending[i].count);
        }
    }
    pr->npending = 0;
    if (publish_used_quietly(dev, vr)) {
        vs_vq_notify_guest(dev, vr);
    }
}

/* The common case, checked first: the next buffer is one writable
 * descriptor inside one region, large enough for the whole frame. */
static inline enum rx_result enqueue_simple(struct vs_vhost_dev *dev, struct vs_vring *vr,
                                            const struct vs_pkt *pkt)
{
    struct vs_packed_ring *pr = &vr->pk;
    uint16_t flags = __atomic_load_n(&pr->desc[pr->avail_idx].flags, __ATOMIC_ACQUIRE);
    if (!desc_is_avail(flags, pr->avail_wrap)) {
        return RX_RING_EMPTY;
    }
    struct vring_packed_desc d = read_pdesc_after(pr->desc, pr->avail_idx, flags);
    uint32_t need = dev->hdr_len + pkt->len;
    if ((d.flags & (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE)) != VIRTQ_DESC_F_WRITE ||
        d.len < need || d.id >= vr->size) {
        return RX_NOT_SIMPLE;
    }
    uint8_t *p = buf_to_hva_range(dev, d.addr, need, VS_IOTLB_ACCESS_WO);
    if (unlikely(!p)) {
        return RX_NOT_SIMPLE;
    }
    put_frame_in_buffer(dev, p, pkt, need);
    advance(&pr->avail_idx, &pr->avail_wrap, 1, vr->size);
    put_used(vr, d.id, need, 1);
    return RX_DELIVERED;
}

/*
 * Four frames into the four one-descriptor buffers from the ring's next
 * available slot (batch_fits), each as enqueue_simple puts one.  Returns
 * the frames' bytes, or 0 if any buffer is not such a buffer or is too
 * small: then nothing is written.  Their used entries go in after the four
 * copies, back to back.
 */
static inline uint32_t enqueue_batch(struct vs_vhost_dev *dev, struct vs_vring *vr, struct vs_pkt *const *pkts)
{
    struct vs_packed_ring *pr = &vr->pk;
    uint16_t idx = pr->avail_idx;
    uint16_t flags = avail_bits(pr->avail_wrap);
    /* A receive ring returns each buffer as it takes it, so its used side
     * stands where its avail side does, and the used entries fill this line. */
    if (unlikely(pr->used_idx != idx) || !batch_avail(pr->desc, idx, flags | VIRTQ_DESC_F_WRITE)) {
        return 0;
    }
    uint32_t hdr_len = dev->hdr_len;
    uint32_t size = vr->size;
    uint16_t ids[BATCH];
    uint32_t needs[BATCH];
    uint8_t *bufs[BATCH];
    for (uint32_t i = 0; i < BATCH; i++) {
        struct vring_packed_desc d = read_pdesc_after(pr->desc, idx + i, flags);
        needs[i] = hdr_len + pkts[i]->len;
        ids[i] = d.id;
        if (d.len < needs[i] || d.id >= size) {
            return 0;
        }
        bufs[i] = buf_to_hva_range(dev, d.addr, needs[i], VS_IOTLB_ACCESS_WO);
        if (unlikely(!bufs[i])) {
            return 0;
        }
    }
    uint32_t bytes = needs[0] + needs[1] + needs[2] + needs[3] - BATCH * hdr_len;
    for (uint32_t i = 0; i < BATCH; i++) {
        put_frame_in_buffer(dev, bufs[i], pkts[i], needs[i]);
    }
    advance(&pr->avail_idx, &pr->avail_wrap, BATCH, size);
    put_used_batch(vr, ids, needs);
    return bytes;
}

/* Finds guest buffers for one frame, copies it, and writes the used entries. */
static enum rx_result enqueue_one(struct vs_vhost_dev *dev, struct vs_vring *vr,
                                  const struct vs_pkt *pkt, bool mergeable)
{
    struct vs_packed_ring *pr = &vr->pk;
    struct vs_seg segs[RX_MAX_SEGS];
    uint16_t ids[RX_MAX_BUFS], counts[RX_MAX_BUFS];
    uint32_t caps[RX_MAX_BUFS];
    uint32_t nsegs = 0, nbufs = 0;
    uint32_t max_bufs = mergeable ? RX_MAX_BUFS : 1;
    uint64_t need = (uint64_t)dev->hdr_len + pkt->len;
    uint64_t have = 0;
    uint16_t idx = pr->avail_idx;
    uint8_t wrap = pr->avail_wrap;

    while (have < need) {
        if (nbufs == max_bufs) {
            return RX_TOO_SMALL;
        }
        uint16_t flags = __atomic_load_n(&pr->desc[idx].flags, __ATOMIC_ACQUIRE);
        if (!desc_is_avail(flags, wrap)) {
            return RX_RING_EMPTY;
        }
        uint64_t cap = 0;
        uint16_t id = 0, count = 0;
        int err = walk_chain(dev, vr, idx, wrap, true, segs, RX_MAX_SEGS, &nsegs, &cap, UINT32_MAX,
                             &id, &count);
        if (err == VS_VQ_ERR_TOO_MANY_SEGS && nbufs) {
            /* Not the chain's fault: this frame needs more pieces than we gather. */
            return RX_TOO_SMALL;
        }
        if (unlikely(err == VS_VQ_ERR_IOTLB_MISS)) {
            return RX_RING_EMPTY;  /* nothing consumed: the ring waits for the front-end's answer */
        }
        advance(&idx, &wrap, count, vr->size);
        ids[nbufs] = id;
        counts[nbufs] = count;
        caps[nbufs] = (uint32_t)cap;
        nbufs++;
        if (unlikely(err)) {
            /* Consume everything up to the bad chain, so the ring moves on. */
            vs_vq_record_error(vr, err, id);
            pr->avail_idx = idx;
            pr->avail_wrap = wrap;
            for (uint32_t i = 0; i < nbufs; i++) {
                put_used(vr, ids[i], 0, counts[i]);
            }
            return RX_BAD_CHAIN;
        }
        have += cap;
    }

    uint8_t hdr[12];
    build_net_hdr(hdr, dev, pkt, nbufs);
    vs_vq_copy_frame(segs, hdr, dev->hdr_len, pkt);
    if (unlikely(dev->log)) {
        vs_dirty_log_segs(dev, segs, need);
    }
    pr->avail_idx = idx;
    pr->avail_wrap = wrap;
    uint64_t left = need;
    for (uint32_t i = 0; i < nbufs; i++) {
        uint32_t used_len = left < caps[i] ? (uint32_t)left : caps[i];
        put_used(vr, ids[i], used_len, counts[i]);
        left -= used_len;
    }
    return RX_DELIVERED;
}

uint32_t vs_packed_enqueue_burst(struct vs_vhost_dev *dev, struct vs_vring *vr,
                                 struct vs_pkt **pkts, uint32_t n)
{
    uint32_t delivered = 0;
    uint64_t bytes = 0;
    bool mergeable = dev->features & (1ULL << VIRTIO_NET_F_MRG_RXBUF);

    vs_spin_lock(&vr->lock);
    if (unlikely(!vs_vring_is_enabled(vr))) {
        vr->stats.dropped += n;
        vs_spin_unlock(&vr->lock);
        return 0;
    }
    uint32_t i;
    for (i = 0; i < n; i++) {
        uint32_t batch_bytes;
        if (i + BATCH <= n && batch_fits(vr->pk.avail_idx, vr->size) &&
            (batch_bytes = enqueue_batch(dev, vr, &pkts[i]))) {
            bytes += batch_bytes;
            delivered += BATCH;
            i += BATCH - 1;
            continue;
        }
        enum rx_result r = enqueue_simple(dev, vr, pkts[i]);
        if (r == RX_NOT_SIMPLE) {
            r = enqueue_one(dev, vr, pkts[i], mergeable);
        }
        if (likely(r == RX_DELIVERED)) {
            delivered++;
            bytes += pkts[i]->len;
        } else if (r == RX_TOO_SMALL || r == RX_BAD_CHAIN) {
            vr->stats.dropped++;
            vr->stats.too_big += r == RX_TOO_SMALL;
        } else {
            break;
        }
    }
    /* The ring ran out of buffers: the rest of the burst is lost. */
    vr->stats.dropped += n - i;
    vr->stats.packets += delivered;
    vr->stats.bytes += bytes;
    vr->stats.bursts += delivered != 0;
    bool notify = publish_used_quietly(dev, vr);
    vs_spin_unlock(&vr->lock);
    if (notify) {
        vs_vq_notify_guest(dev, vr);
    }
    return delivered;
}
