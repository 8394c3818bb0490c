/*
 * The virtqueue ring engine: moves frames out of a guest's TX ring and into
 * a guest's RX ring (split virtqueues, virtio 1.x section 2.7).
 *
 * Security model: the guest owns the rings and the buffers and may change
 * them at any moment.  Every descriptor is copied to the stack once before
 * it is checked and used; every address is translated through the device's
 * own memory table with bounds checks; chains are limited to the ring size
 * (or the indirect table size) so loops end; indirect tables may not nest;
 * the avail index may not jump by more than the ring size.  A bad chain is
 * dropped, returned with length 0 and counted; a bad ring index stops the
 * ring (vr->broken) until the front-end restarts it.  Nothing here reads or
 * writes outside the guest's mapped regions or the caller's buffers.
 *
 * Used-ring entries are written as buffers are consumed, but used->idx is
 * published, and the guest notified, once per burst.  The notification is
 * decided under the ring lock and written after it is released: the call
 * eventfd belongs to the front-end too, and a write to it can block.
 * Buffers are always used in the order the guest made them available, so
 * VIRTIO_F_IN_ORDER is offered: the driver may then free descriptors in
 * ring order instead of walking each chain (a cost a DPDK virtio-user peer
 * pays per frame).
 */
#include <errno.h>
#include <unistd.h>

#include "vswitch.h"
#include "vhost/ring_internal.h"

static const char *const vq_error_names[VS_VQ_ERR_MAX] = {
    [VS_VQ_OK] = "ok",
    [VS_VQ_ERR_ADDR] = "buffer outside guest memory",
    [VS_VQ_ERR_LOOP] = "descriptor chain loops",
    [VS_VQ_ERR_NEXT] = "next index past the table",
    [VS_VQ_ERR_NESTED_INDIRECT] = "nested indirect table",
    [VS_VQ_ERR_INDIRECT_LEN] = "bad indirect table length",
    [VS_VQ_ERR_HEAD] = "avail ring head past the ring",
    [VS_VQ_ERR_AVAIL_JUMP] = "avail index jumped by more than the ring size",
    [VS_VQ_ERR_NO_READABLE] = "TX chain without a frame",
    [VS_VQ_ERR_NO_WRITABLE] = "RX chain with a read-only descriptor",
    [VS_VQ_ERR_WRITE_IN_TX] = "TX chain with a writable descriptor",
    [VS_VQ_ERR_TOO_LONG] = "frame too long",
    [VS_VQ_ERR_TOO_MANY_SEGS] = "too many buffer pieces",
    [VS_VQ_ERR_SHORT_HEADER] = "chain shorter than the virtio-net header",
    [VS_VQ_ERR_RING_ADDR] = "ring outside guest memory or misaligned",
    [VS_VQ_ERR_RING_SIZE] = "bad ring size",
    [VS_VQ_ERR_NET_HDR] = "virtio-net header asks for an offload not negotiated",
    [VS_VQ_ERR_WRAP] = "chain runs into a descriptor not made available (wrap counter)",
    [VS_VQ_ERR_BAD_ID] = "buffer id past the ring",
    [VS_VQ_ERR_INDIRECT_CHAINED] = "indirect descriptor chained to others",
    [VS_VQ_ERR_BASE] = "ring base past the ring",
    [VS_VQ_ERR_IOTLB_MISS] = "IOTLB miss",
    [VS_VQ_ERR_IOTLB_PERM] = "IOTLB entry denies the access",
};

const char *vs_vq_error_name(uint32_t err)
{
    return err < VS_VQ_ERR_MAX ? vq_error_names[err] : "unknown error";
}

uint8_t *vs_mem_translate_uva(const struct vs_memtable *mem, uint64_t uva, uint64_t len)
{
    if (!mem) {
        return NULL;
    }
    for (uint32_t i = 0; i < mem->nregions; i++) {
        const struct vs_mem_region *r = &mem->regions[i];
        uint64_t off = uva - r->user_addr;
        if (uva >= r->user_addr && off < r->size && r->size - off >= len) {
            return r->host_addr + off;
        }
    }
    return NULL;
}

/* Publishes a complete memory table: a PMD that loads the pointer after this
 * store sees every region written before it. */
void vs_vhost_dev_set_mem(struct vs_vhost_dev *dev, struct vs_memtable *mem)
{
    __atomic_store_n(&dev->mem, mem, __ATOMIC_RELEASE);
}

void vs_vhost_dev_init(struct vs_vhost_dev *dev, uint32_t nr_queue_pairs)
{
    memset(dev, 0, sizeof *dev);
    dev->nr_queue_pairs = nr_queue_pairs;
    dev->hdr_len = 12;
    for (uint32_t i = 0; i < VS_MAX_VRINGS; i++) {
        dev->vrings[i].callfd = -1;
        dev->vrings[i].kickfd = -1;
    }
}

void vs_vhost_dev_set_features(struct vs_vhost_dev *dev, uint64_t features)
{
    dev->features = features;
    /* virtio 1.x always has num_buffers; legacy only with MRG_RXBUF. */
    bool long_hdr = features & ((1ULL << VIRTIO_NET_F_MRG_RXBUF) | (1ULL << VIRTIO_F_VERSION_1));
    dev->hdr_len = long_hdr ? 12 : 10;
}

int vs_vring_setup(struct vs_vhost_dev *dev, uint32_t index, uint32_t size,
                   uint64_t desc_uva, uint64_t avail_uva, uint64_t used_uva,
                   uint32_t base)
{
    if (index >= VS_MAX_VRINGS) {
        return VS_VQ_ERR_RING_ADDR;
    }
    if (size == 0 || size > VS_MAX_RING_SIZE || (size & (size - 1))) {
        return VS_VQ_ERR_RING_SIZE;
    }
    struct vs_vring *vr = &dev->vrings[index];
    /* The layout is fixed for as long as the ring runs; the PMD dispatches on it once per burst. */
    vr->packed = (dev->features & (1ULL << VIRTIO_F_RING_PACKED)) != 0;
    if (vr->packed) {
        return vs_packed_setup(dev, vr, size, desc_uva, avail_uva, used_uva, base);
    }
    /* Each ring part, with the trailing event index word (event idx). */
    void *desc = vs_mem_translate_uva(dev->mem, desc_uva, (uint64_t)size * sizeof(struct virtq_desc));
    void *avail = vs_mem_translate_uva(dev->mem, avail_uva, 4 + 2ULL * size + 2);
    void *used = vs_mem_translate_uva(dev->mem, used_uva, 4 + 8ULL * size + 2);
    if (!desc || !avail || !used ||
        ((uintptr_t)desc & 15) || ((uintptr_t)avail & 1) || ((uintptr_t)used & 3)) {
        return VS_VQ_ERR_RING_ADDR;
    }
    vr->desc = desc;
    vr->avail = avail;
    vr->used = used;
    vr->size = size;
    /*
     * Every buffer we consumed was returned on the used ring before the ring
     * stopped, so the used index in guest memory is where we stopped.  A
     * front-end that restarts against a new back-end (after a crash) may send
     * another base (virtio-user sends 0): resume from the used index instead,
     * as DPDK's vhost library does.  Frames in flight at the crash are resent
     * (TX) or lost (RX).  The guest chooses the base either way, so this gives
     * it nothing new, and an avail index past used + size still stops the ring.
     */
    uint16_t used_idx = __atomic_load_n(&vr->used->idx, __ATOMIC_ACQUIRE);
    if (used_idx != base) {
        base = used_idx;
        vr->resumed_from_used++;
    }
    vr->last_avail_idx = base;
    vr->last_used_idx = base;
    vr->pending_used = 0;
    vr->signalled_used_valid = 0;
    __atomic_store_n(&vr->broken, 0, __ATOMIC_RELAXED);
    /* The PMD polls, so the guest need not kick us (ignored with event idx). */
    __atomic_store_n(&vr->used->flags, VIRTQ_USED_F_NO_NOTIFY, __ATOMIC_RELAXED);
    if (unlikely(dev->log)) {
        vs_dirty_log_used(dev, vr, offsetof(struct virtq_used, flags), sizeof(uint16_t));
    }
    return VS_VQ_OK;
}

void vs_vring_set_enabled(struct vs_vring *vr, int enabled)
{
    __atomic_store_n(&vr->enabled, enabled ? 1 : 0, __ATOMIC_SEQ_CST);
}

int vs_vring_is_enabled(const struct vs_vring *vr)
{
    return __atomic_load_n(&vr->enabled, __ATOMIC_ACQUIRE) && !__atomic_load_n(&vr->broken, __ATOMIC_RELAXED);
}

uint32_t vs_vring_base(const struct vs_vring *vr)
{
    if (vr->packed) {
        uint32_t avail = vr->pk.avail_idx | (uint32_t)vr->pk.avail_wrap << VIRTQ_EVENT_WRAP_SHIFT;
        uint32_t used = vr->pk.used_idx | (uint32_t)vr->pk.used_wrap << VIRTQ_EVENT_WRAP_SHIFT;
        return avail | used << 16;
    }
    return vr->last_avail_idx;
}

void vs_vring_enable_notify(const struct vs_vhost_dev *dev, struct vs_vring *vr, int enable)
{
    if (vr->packed) {
        vs_packed_enable_notify(dev, vr, enable);
        return;
    }
    if (dev->features & (1ULL << VIRTIO_RING_F_EVENT_IDX)) {
        /* Ask for a kick once the guest makes anything past what we consumed available.
         * Disabling leaves avail_event behind, so the guest will not cross it again soon. */
        if (enable) {
            uint16_t *avail_event = (uint16_t *)&vr->used->ring[vr->size];
            __atomic_store_n(avail_event, vr->last_avail_idx, __ATOMIC_RELAXED);
            if (unlikely(dev->log)) {
                vs_dirty_log_hva(dev, avail_event, sizeof *avail_event);
            }
        }
    } else {
        __atomic_store_n(&vr->used->flags, enable ? 0 : VIRTQ_USED_F_NO_NOTIFY, __ATOMIC_RELAXED);
        if (unlikely(dev->log)) {
            vs_dirty_log_used(dev, vr, offsetof(struct virtq_used, flags), sizeof(uint16_t));
        }
    }
}

int vs_vring_has_avail(const struct vs_vring *vr)
{
    if (vr->packed) {
        return vs_packed_has_avail(vr);
    }
    return __atomic_load_n(&vr->avail->idx, __ATOMIC_ACQUIRE) != vr->last_avail_idx;
}

static void record_error(struct vs_vring *vr, uint32_t err, uint32_t index)
{
    vr->stats.errors++;
    vr->error_count[err < VS_VQ_ERR_MAX ? err : 0]++;
    __atomic_store_n(&vr->last_error_index, index, __ATOMIC_RELAXED);
    __atomic_store_n(&vr->last_error, err, __ATOMIC_RELEASE);
}

static void break_ring(struct vs_vring *vr, uint32_t err, uint32_t index)
{
    record_error(vr, err, index);
    __atomic_store_n(&vr->broken, 1, __ATOMIC_RELEASE);
}

/* Copies a descriptor out of guest memory exactly once. */
static inline struct virtq_desc read_desc(const struct virtq_desc *table, uint32_t idx)
{
    const volatile struct virtq_desc *vd = &table[idx];
    struct virtq_desc d = { .addr = vd->addr, .len = vd->len, .flags = vd->flags, .next = vd->next };
    return d;
}

static inline uint16_t read_avail_entry(const struct vs_vring *vr, uint16_t idx)
{
    return __atomic_load_n(&vr->avail->ring[idx & (vr->size - 1)], __ATOMIC_RELAXED);
}

/* Appends the guest buffer [gpa, gpa+len) to segs, split where it crosses regions. */
static int add_segments(const struct vs_vhost_dev *dev, uint32_t access, uint64_t gpa, uint32_t len,
                        struct vs_seg *segs, uint32_t max_segs, uint32_t *nsegs,
                        uint64_t *total, uint64_t max_total)
{
    if (*total + len > max_total) {
        return VS_VQ_ERR_TOO_LONG;
    }
    while (len) {
        uint64_t contig;
        uint8_t *p = buf_to_hva(dev, gpa, access, &contig);
        if (unlikely(!p)) {
            return buf_error(dev);
        }
        if (unlikely(*nsegs == max_segs)) {
            return VS_VQ_ERR_TOO_MANY_SEGS;
        }
        uint32_t n = contig < len ? (uint32_t)contig : len;
        segs[*nsegs].addr = p;
        segs[*nsegs].len = n;
        (*nsegs)++;
        *total += n;
        gpa += n;
        len -= n;
    }
    return VS_VQ_OK;
}

/*
 * Walks the chain starting at head and appends its buffers to segs.  Every
 * descriptor must be writable (an RX chain) or every one readable (TX).
 */
static int walk_chain(const struct vs_vhost_dev *dev, const struct vs_vring *vr, uint16_t head,
                      bool writable, struct vs_seg *segs, uint32_t max_segs, uint32_t *nsegs,
                      uint64_t *total, uint64_t max_total)
{
    const struct virtq_desc *table = vr->desc;
    uint32_t table_size = vr->size;
    uint32_t budget = vr->size;
    uint32_t idx = head;
    bool in_indirect = false;

    for (;;) {
        if (unlikely(idx >= table_size)) {
            return VS_VQ_ERR_NEXT;
        }
        if (unlikely(budget-- == 0)) {
            return VS_VQ_ERR_LOOP;
        }
        struct virtq_desc d = read_desc(table, idx);
        if (d.flags & VIRTQ_DESC_F_INDIRECT) {
            if (unlikely(in_indirect)) {
                return VS_VQ_ERR_NESTED_INDIRECT;
            }
            if (unlikely(d.len == 0 || d.len % sizeof(struct virtq_desc) ||
                         d.len / sizeof(struct virtq_desc) > vr->size)) {
                return VS_VQ_ERR_INDIRECT_LEN;
            }
            table = buf_to_hva_range(dev, d.addr, d.len, VS_IOTLB_ACCESS_RO);
            if (unlikely(!table)) {
                return buf_error(dev);
            }
            if (unlikely((uintptr_t)table & 7)) {
                return VS_VQ_ERR_ADDR;
            }
            /* The indirect table replaces the rest of the chain (virtio 2.7.5.3). */
            table_size = budget = d.len / sizeof(struct virtq_desc);
            idx = 0;
            in_indirect = true;
            continue;
        }
        if (unlikely(!!(d.flags & VIRTQ_DESC_F_WRITE) != writable)) {
            return writable ? VS_VQ_ERR_NO_WRITABLE : VS_VQ_ERR_WRITE_IN_TX;
        }
        if (d.len) {
            int err = add_segments(dev, writable ? VS_IOTLB_ACCESS_WO : VS_IOTLB_ACCESS_RO, d.addr, d.len,
                                   segs, max_segs, nsegs, total, max_total);
            if (unlikely(err)) {
                return err;
            }
        }
        if (!(d.flags & VIRTQ_DESC_F_NEXT)) {
            return VS_VQ_OK;
        }
        idx = d.next;
    }
}

/* Drops the first n bytes (the virtio-net header) from a packet's segments,
 * copying them to hdr (which has room for 12). */
static int strip_header(struct vs_pkt *pkt, uint32_t n, uint8_t *hdr)
{
    if (pkt->len < n) {
        return VS_VQ_ERR_SHORT_HEADER;
    }
    pkt->len -= n;
    uint32_t first = 0;
    while (n) {
        struct vs_seg *s = &pkt->segs[first];
        uint32_t take = s->len < n ? s->len : n;
        memcpy(hdr, s->addr, take);
        hdr += take;
        if (s->len <= n) {
            n -= s->len;
            first++;
        } else {
            s->addr += n;
            s->len -= n;
            n = 0;
        }
    }
    if (first) {
        pkt->nsegs -= first;
        memmove(pkt->segs, pkt->segs + first, pkt->nsegs * sizeof pkt->segs[0]);
    }
    return VS_VQ_OK;
}

static inline void put_used(struct vs_vring *vr, uint16_t id, uint32_t len)
{
    uint16_t slot = (uint16_t)(vr->last_used_idx + vr->pending_used) & (vr->size - 1);
    vr->used->ring[slot].id = id;
    vr->used->ring[slot].len = len;
    vr->pending_used++;
}

/* virtio 2.7.7.2: notify if the guest's event index lies in (old, new]. */
static inline bool need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old_idx)
{
    return (uint16_t)(new_idx - event_idx - 1) < (uint16_t)(new_idx - old_idx);
}

/* Whether the guest wants an interrupt for used entries up to new_idx; called
 * by the ring's owner (under the lock for a receive ring), as it updates
 * signalled_used. */
static bool want_notify(const struct vs_vhost_dev *dev, struct vs_vring *vr, uint16_t new_idx)
{
    bool notify;
    /* Our used->idx store must be visible before we read the guest's wishes. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (dev->features & (1ULL << VIRTIO_RING_F_EVENT_IDX)) {
        uint16_t event = __atomic_load_n(&vr->avail->ring[vr->size], __ATOMIC_RELAXED);
        uint16_t old = vr->signalled_used;
        notify = !vr->signalled_used_valid || need_event(event, new_idx, old);
    } else {
        notify = !(__atomic_load_n(&vr->avail->flags, __ATOMIC_RELAXED) & VIRTQ_AVAIL_F_NO_INTERRUPT);
    }
    vr->signalled_used = new_idx;
    vr->signalled_used_valid = 1;
    return notify && vr->callfd >= 0 && !__atomic_load_n(&vr->call_broken, __ATOMIC_RELAXED);
}

/* The calling thread's watch over its call writes; NULL: not watched. */
static __thread struct vs_call_watch *call_watch;

void vs_vring_watch_calls(struct vs_call_watch *watch)
{
    call_watch = watch;
}

/* A write the watchdog cut short: this call fd is not written again. */
static void call_blocked(struct vs_vhost_dev *dev, struct vs_vring *vr, struct vs_call_watch *w)
{
    __atomic_store_n(&vr->call_broken, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&vr->stats.calls_blocked, 1, __ATOMIC_RELAXED);
    vs_vhost_dev_raise_fault(dev, VS_DEV_FAULT_CALL_BLOCKED);  /* the control plane disconnects it at once */
    w->blocked++;
}

/*
 * Interrupts the guest.  Never called with a ring lock held: several PMDs
 * may write the same call fd at once, and any write may block (see struct
 * vs_call_watch); callfd itself cannot change while a pass is under way.
 */
static void notify_guest(struct vs_vhost_dev *dev, struct vs_vring *vr)
{
    uint64_t one = 1;
    struct vs_call_watch *w = call_watch;
    uint64_t seq = 0;
    if (w) {
        seq = w->seq + 1;
        __atomic_store_n(&w->seq, seq, __ATOMIC_RELEASE);
        __atomic_store_n(&w->since_tsc, vs_rdtsc(), __ATOMIC_RELEASE);
    }
    for (;;) {
        ssize_t r = write(vr->callfd, &one, sizeof one);
        if (r == sizeof one) {
            __atomic_add_fetch(&vr->stats.notifications, 1, __ATOMIC_RELAXED);
            break;
        }
        if (r >= 0 || errno != EINTR) {
            break;  /* EAGAIN: the counter is already non-zero, the guest will wake */
        }
        if (w && __atomic_load_n(&w->interrupt_seq, __ATOMIC_ACQUIRE) == seq) {
            call_blocked(dev, vr, w);
            break;
        }
        /* A signal meant for an earlier write, or not for us at all: try again. */
    }
    if (w) {
        __atomic_store_n(&w->since_tsc, 0, __ATOMIC_RELEASE);
    }
}

/* Makes the used entries written so far visible to the guest, once; returns
 * whether the guest must be notified (after any lock is dropped). */
static bool publish_used_quietly(const struct vs_vhost_dev *dev, struct vs_vring *vr)
{
    if (!vr->pending_used) {
        return false;
    }
    uint16_t new_idx = vr->last_used_idx + vr->pending_used;
    __atomic_store_n(&vr->used->idx, new_idx, __ATOMIC_RELEASE);
    if (unlikely(dev->log)) {
        vs_dirty_log_split_used(dev, vr, vr->last_used_idx, vr->pending_used);
    }
    vr->last_used_idx = new_idx;
    vr->pending_used = 0;
    return want_notify(dev, vr, new_idx);
}

/* For a ring only one thread uses (a guest's TX ring): publish and notify. */
static void publish_used(struct vs_vhost_dev *dev, struct vs_vring *vr)
{
    if (publish_used_quietly(dev, vr)) {
        notify_guest(dev, vr);
    }
}

/*
 * The common case, checked first: the whole chain is one readable
 * descriptor (header and frame together) inside one memory region.
 * Anything else, including every malformed chain, takes walk_chain().
 */
static inline bool dequeue_simple(const struct vs_vhost_dev *dev, const struct vs_vring *vr,
                                  uint16_t head, struct vs_pkt *pkt)
{
    struct virtq_desc d = read_desc(vr->desc, head);
    uint32_t hdr_len = dev->hdr_len;
    if (d.flags & (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE) ||
        d.len < hdr_len + 14 || d.len > VS_MAX_FRAME + hdr_len) {
        return false;
    }
    uint8_t *p = buf_to_hva_range(dev, d.addr, d.len, VS_IOTLB_ACCESS_RO);
    if (unlikely(!p)) {
        return false;
    }
    pkt->segs[0].addr = p + hdr_len;
    pkt->segs[0].len = d.len - hdr_len;
    pkt->nsegs = 1;
    pkt->len = d.len - hdr_len;
    pkt->head = head;
    if (unlikely(capture_net_hdr(dev, pkt, p))) {
        return false;  /* the full path refuses it and counts why */
    }
    __builtin_prefetch(p + hdr_len);
    return true;
}

uint32_t vs_vring_dequeue_burst(struct vs_vhost_dev *dev, struct vs_vring *vr,
                                struct vs_pkt *pkts, uint32_t max)
{
    uint16_t avail_idx = __atomic_load_n(&vr->avail->idx, __ATOMIC_ACQUIRE);
    uint16_t pending = avail_idx - vr->last_avail_idx;
    if (pending == 0) {
        return 0;
    }
    if (unlikely(pending > vr->size)) {
        break_ring(vr, VS_VQ_ERR_AVAIL_JUMP, avail_idx);
        return 0;
    }
    uint32_t n = pending < max ? pending : max;
    uint32_t got = 0;
    uint64_t bytes = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint16_t head = read_avail_entry(vr, vr->last_avail_idx);
        if (unlikely(head >= vr->size)) {
            /* It cannot be returned on the used ring: the ring is unusable. */
            break_ring(vr, VS_VQ_ERR_HEAD, head);
            break;
        }
        vr->last_avail_idx++;
        struct vs_pkt *pkt = &pkts[got];
        if (likely(dequeue_simple(dev, vr, head, pkt))) {
            bytes += pkt->len;
            got++;
            continue;
        }
        uint32_t nsegs = 0;
        uint64_t total = 0;
        int err = walk_chain(dev, vr, head, false, pkt->segs, VS_PKT_MAX_SEGS, &nsegs, &total,
                             VS_MAX_FRAME + dev->hdr_len);
        pkt->nsegs = nsegs;
        pkt->len = (uint32_t)total;
        pkt->head = head;
        uint8_t hdr[12];
        if (likely(!err)) {
            err = strip_header(pkt, dev->hdr_len, hdr);
        }
        if (likely(!err)) {
            err = capture_net_hdr(dev, pkt, hdr);
        }
        if (likely(!err) && unlikely(pkt->len < 14)) {
            err = VS_VQ_ERR_NO_READABLE;
        }
        if (unlikely(err)) {
            if (got || err == VS_VQ_ERR_IOTLB_MISS) {
                /* Used entries go back in the order the chains came (IN_ORDER):
                 * this one waits, first in the next burst, behind the good ones. */
                vr->last_avail_idx--;
                break;
            }
            record_error(vr, err, head);
            put_used(vr, head, 0);
            continue;
        }
        bytes += pkt->len;
        got++;
    }
    vr->stats.packets += got;
    vr->stats.bytes += bytes;
    vr->stats.bursts += got != 0;
    return got;
}

void vs_vring_dequeue_done(struct vs_vhost_dev *dev, struct vs_vring *vr,
                           const struct vs_pkt *pkts, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++) {
        put_used(vr, pkts[i].head, 0);
    }
    publish_used(dev, vr);
}

/* Copies the header and then the packet's segments into the writable pieces. */
static void copy_frame(const struct vs_seg *dst, const uint8_t *hdr, uint32_t hdr_len,
                       const struct vs_pkt *pkt)
{
    const struct vs_seg *d = dst;
    uint8_t *dp = d->addr;
    uint32_t dleft = d->len;
    for (int s = -1; s < (int)pkt->nsegs; s++) {
        const uint8_t *sp = s < 0 ? hdr : pkt->segs[s].addr;
        uint32_t sleft = s < 0 ? hdr_len : pkt->segs[s].len;
        while (sleft) {
            /* The caller checked the pieces hold the whole frame. */
            while (dleft == 0) {
                d++;
                dp = d->addr;
                dleft = d->len;
            }
            uint32_t n = sleft < dleft ? sleft : dleft;
            vs_copy(dp, sp, n);
            dp += n;
            dleft -= n;
            sp += n;
            sleft -= n;
        }
    }
}

/*
 * The common case, checked first: the next buffer is one writable
 * descriptor inside one region and large enough for the whole frame.
 */
static inline enum rx_result enqueue_simple(struct vs_vhost_dev *dev, struct vs_vring *vr,
                                            const struct vs_pkt *pkt, uint16_t avail_idx)
{
    if (vr->last_avail_idx == avail_idx) {
        return RX_RING_EMPTY;
    }
    uint16_t head = read_avail_entry(vr, vr->last_avail_idx);
    if (unlikely(head >= vr->size)) {
        return RX_NOT_SIMPLE;
    }
    struct virtq_desc d = read_desc(vr->desc, head);
    uint32_t need = dev->hdr_len + pkt->len;
    if ((d.flags & (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE)) != VIRTQ_DESC_F_WRITE ||
        d.len < need) {
        return RX_NOT_SIMPLE;
    }
    uint8_t *p = buf_to_hva_range(dev, d.addr, need, VS_IOTLB_ACCESS_WO);
    if (unlikely(!p)) {
        return RX_NOT_SIMPLE;
    }
    put_frame_in_buffer(dev, p, pkt, need);
    vr->last_avail_idx++;
    put_used(vr, head, need);
    return RX_DELIVERED;
}

/* Finds guest buffers for one frame, copies it, and writes the used entries. */
static enum rx_result enqueue_one(struct vs_vhost_dev *dev, struct vs_vring *vr,
                                  const struct vs_pkt *pkt, uint16_t avail_idx, bool mergeable)
{
    struct vs_seg segs[RX_MAX_SEGS];
    uint16_t heads[RX_MAX_BUFS];
    uint32_t caps[RX_MAX_BUFS];
    uint32_t nsegs = 0, nbufs = 0;
    uint32_t max_bufs = mergeable ? RX_MAX_BUFS : 1;
    uint64_t need = (uint64_t)dev->hdr_len + pkt->len;
    uint64_t have = 0;
    uint16_t next_avail = vr->last_avail_idx;

    while (have < need) {
        if (nbufs == max_bufs) {
            return RX_TOO_SMALL;
        }
        if (next_avail == avail_idx) {
            return RX_RING_EMPTY;
        }
        uint16_t head = read_avail_entry(vr, next_avail);
        if (unlikely(head >= vr->size)) {
            break_ring(vr, VS_VQ_ERR_HEAD, head);
            return RX_BROKEN;
        }
        next_avail++;
        uint64_t cap = 0;
        int err = walk_chain(dev, vr, head, true, segs, RX_MAX_SEGS, &nsegs, &cap, UINT32_MAX);
        if (err == VS_VQ_ERR_TOO_MANY_SEGS && nbufs) {
            /* Not the chain's fault: this frame needs more pieces than we gather. */
            return RX_TOO_SMALL;
        }
        if (unlikely(err == VS_VQ_ERR_IOTLB_MISS)) {
            return RX_RING_EMPTY;  /* nothing consumed: the ring waits for the front-end's answer */
        }
        heads[nbufs] = head;
        caps[nbufs] = (uint32_t)cap;
        nbufs++;
        if (unlikely(err)) {
            /* Consume everything up to the bad chain, so the ring moves on. */
            record_error(vr, err, head);
            vr->last_avail_idx = next_avail;
            for (uint32_t i = 0; i < nbufs; i++) {
                put_used(vr, heads[i], 0);
            }
            return RX_BAD_CHAIN;
        }
        have += cap;
    }

    uint8_t hdr[12];
    build_net_hdr(hdr, dev, pkt, nbufs);
    copy_frame(segs, hdr, dev->hdr_len, pkt);
    if (unlikely(dev->log)) {
        vs_dirty_log_segs(dev, segs, need);
    }
    vr->last_avail_idx = next_avail;
    uint64_t left = need;
    for (uint32_t i = 0; i < nbufs; i++) {
        uint32_t used_len = left < caps[i] ? (uint32_t)left : caps[i];
        put_used(vr, heads[i], used_len);
        left -= used_len;
    }
    return RX_DELIVERED;
}

uint32_t vs_vring_enqueue_burst(struct vs_vhost_dev *dev, struct vs_vring *vr,
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
    uint16_t avail_idx = __atomic_load_n(&vr->avail->idx, __ATOMIC_ACQUIRE);
    if (unlikely((uint16_t)(avail_idx - vr->last_avail_idx) > vr->size)) {
        break_ring(vr, VS_VQ_ERR_AVAIL_JUMP, avail_idx);
        vr->stats.dropped += n;
        vs_spin_unlock(&vr->lock);
        return 0;
    }
    uint32_t i;
    for (i = 0; i < n; i++) {
        enum rx_result r = enqueue_simple(dev, vr, pkts[i], avail_idx);
        if (r == RX_NOT_SIMPLE) {
            r = enqueue_one(dev, vr, pkts[i], avail_idx, mergeable);
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
    /* The ring ran out of buffers (or broke): the rest of the burst is lost. */
    vr->stats.dropped += n - i;
    vr->stats.packets += delivered;
    vr->stats.bytes += bytes;
    vr->stats.bursts += delivered != 0;
    bool notify = publish_used_quietly(dev, vr);
    vs_spin_unlock(&vr->lock);
    if (notify) {
        notify_guest(dev, vr);
    }
    return delivered;
}

/* The helpers the packed ring engine shares (ring_internal.h). */
int vs_vq_add_segments(const struct vs_vhost_dev *dev, uint32_t access, uint64_t gpa, uint32_t len,
                       struct vs_seg *segs, uint32_t max_segs, uint32_t *nsegs,
                       uint64_t *total, uint64_t max_total)
{
    return add_segments(dev, access, gpa, len, segs, max_segs, nsegs, total, max_total);
}

int vs_vq_strip_header(struct vs_pkt *pkt, uint32_t n, uint8_t *hdr)
{
    return strip_header(pkt, n, hdr);
}

void vs_vq_copy_frame(const struct vs_seg *dst, const uint8_t *hdr, uint32_t hdr_len,
                      const struct vs_pkt *pkt)
{
    copy_frame(dst, hdr, hdr_len, pkt);
}

void vs_vq_record_error(struct vs_vring *vr, uint32_t err, uint32_t index)
{
    record_error(vr, err, index);
}

void vs_vq_notify_guest(struct vs_vhost_dev *dev, struct vs_vring *vr)
{
    notify_guest(dev, vr);
}
