/*
 * Dirty page logging for live migration: see dirty_log.h.  Everything here
 * runs only while a device logs, so it favours being plainly right over
 * being fast: one locked OR per page, which also orders the guest memory
 * writes before it (the front-end's migration thread clears bits as it
 * copies pages, and must find ours set only once our data is there).
 */
#include "vswitch.h"

uint64_t vs_dirty_log_bytes_for(uint64_t gpa_end)
{
    uint64_t pages = (gpa_end >> VS_LOG_PAGE_SHIFT) + ((gpa_end & ((1u << VS_LOG_PAGE_SHIFT) - 1)) != 0);
    return (pages + 7) / 8;
}

void vs_dirty_log_gpa(struct vs_dirty_log *log, uint64_t gpa, uint64_t len)
{
    if (len == 0) {
        return;
    }
    uint64_t first = gpa >> VS_LOG_PAGE_SHIFT;
    uint64_t last = (gpa + len - 1) >> VS_LOG_PAGE_SHIFT;
    if (gpa + len - 1 < gpa) {
        last = UINT64_MAX >> VS_LOG_PAGE_SHIFT;  /* a range that wraps: log to the end, then stop */
    }
    for (uint64_t page = first; page <= last; page++) {
        uint64_t byte = page >> 3;
        if (unlikely(byte >= log->size)) {
            __atomic_add_fetch(&log->outside, 1, __ATOMIC_RELAXED);
            return;
        }
        /* A locked OR, also when the bit looks set: a plain read could pass the buffer
         * stores still on their way, and the front-end may clear the bit meanwhile. */
        uint8_t bit = (uint8_t)(1u << (page & 7));
        if (!(__atomic_fetch_or(&log->bitmap[byte], bit, __ATOMIC_SEQ_CST) & bit)) {
            __atomic_add_fetch(&log->bits_set, 1, __ATOMIC_RELAXED);
        }
    }
}

void vs_dirty_log_hva(const struct vs_vhost_dev *dev, const void *hva, uint64_t len)
{
    struct vs_dirty_log *log = dev->log;
    const struct vs_memtable *mem = dev->mem;
    uintptr_t p = (uintptr_t)hva;
    if (!log || !mem || len == 0) {
        return;
    }
    /* The host address of a guest write lies in one of our mappings of the guest's memory. */
    for (uint32_t i = 0; i < mem->nregions; i++) {
        const struct vs_mem_region *r = &mem->regions[i];
        uintptr_t start = (uintptr_t)r->host_addr;
        if (p >= start && p - start < r->size) {
            uint64_t off = p - start;
            uint64_t n = r->size - off < len ? r->size - off : len;
            vs_dirty_log_gpa(log, r->guest_phys_addr + off, n);
            if (n < len) {
                vs_dirty_log_hva(dev, (const uint8_t *)hva + n, len - n);
            }
            return;
        }
    }
    __atomic_add_fetch(&log->outside, 1, __ATOMIC_RELAXED);
}

void vs_dirty_log_segs(const struct vs_vhost_dev *dev, const struct vs_seg *segs, uint64_t len)
{
    for (const struct vs_seg *s = segs; len; s++) {
        uint64_t n = s->len < len ? s->len : len;
        vs_dirty_log_hva(dev, s->addr, n);
        len -= n;
    }
}

void vs_dirty_log_used(const struct vs_vhost_dev *dev, const struct vs_vring *vr, uint64_t offset, uint64_t len)
{
    struct vs_dirty_log *log = dev->log;
    if (!log) {
        return;
    }
    if (vr->log_used) {
        vs_dirty_log_gpa(log, vr->log_used_gpa + offset, len);
    } else {
        /* The front-end gave no log address: the used ring's own place in guest memory. */
        vs_dirty_log_hva(dev, (const uint8_t *)vr->used + offset, len);
    }
}

void vs_dirty_log_split_used(const struct vs_vhost_dev *dev, const struct vs_vring *vr, uint16_t first,
                             uint32_t count)
{
    uint32_t slot = first & (vr->size - 1);
    uint32_t head = count < vr->size - slot ? count : vr->size - slot;
    uint64_t entry = sizeof(struct virtq_used_elem);
    vs_dirty_log_used(dev, vr, offsetof(struct virtq_used, ring) + entry * slot, entry * head);
    if (count > head) {
        vs_dirty_log_used(dev, vr, offsetof(struct virtq_used, ring), entry * (count - head));
    }
    vs_dirty_log_used(dev, vr, offsetof(struct virtq_used, idx), sizeof(uint16_t));
}

void vs_dirty_log_packed_descs(const struct vs_vhost_dev *dev, const struct vs_vring *vr, uint16_t first,
                               uint16_t end)
{
    const struct vring_packed_desc *ring = vr->pk.desc;
    uint64_t d = sizeof *ring;
    if (end > first) {
        vs_dirty_log_hva(dev, ring + first, d * (end - first));
    } else {
        vs_dirty_log_hva(dev, ring + first, d * (vr->size - first));
        vs_dirty_log_hva(dev, ring, d * end);
    }
}
