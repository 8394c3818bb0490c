/*
 * The IOTLB of a device whose guest uses a vIOMMU: see iotlb.h for the
 * model (entries written by the control plane under a sequence counter,
 * generation-tagged translations cached per PMD thread, misses recorded for
 * the control plane to send).
 *
 * Rules for what the front-end sends (each refusal is counted by reason):
 * an UPDATE of size 0, one whose IOVA or user range wraps around, one with
 * an access other than RO/WO/RW, and one whose user range is not wholly
 * guest memory are refused.  Entries never overlap: an UPDATE that repeats
 * an entry exactly is kept as a duplicate (two misses for one page get two
 * answers), any other overlap is refused and the old entry stays; the
 * front-end invalidates a range before it maps it anew.  An INVALIDATE is
 * never refused: a range that wraps (QEMU sends size 0 = 2^64 for "all")
 * runs to the end of the IOVA space, and entries it touches go whole.
 *
 * Translations are cached per PMD thread rather than per ring: a thread
 * polls its rings one after the other, the cache needs no ring passed
 * through the copy helpers, and a ring's RX side is filled by several
 * threads anyway.
 */
#include <unistd.h>

#include "vswitch.h"

static const char *const iotlb_error_names[VS_IOTLB_ERR_MAX] = {
    [VS_IOTLB_OK] = "ok",
    [VS_IOTLB_ERR_SIZE] = "size 0",
    [VS_IOTLB_ERR_WRAP] = "range wraps around the address space",
    [VS_IOTLB_ERR_PERM] = "access is not RO, WO or RW",
    [VS_IOTLB_ERR_OVERLAP] = "overlaps a different entry",
    [VS_IOTLB_ERR_OUTSIDE] = "user address range outside guest memory",
    [VS_IOTLB_DUPLICATE] = "duplicate entry",
};

const char *vs_iotlb_error_name(uint32_t err)
{
    return err < VS_IOTLB_ERR_MAX ? iotlb_error_names[err] : "unknown error";
}

/* Generations are unique across devices, so a thread's cache tag names one table state. */
static uint64_t next_gen = 2;

static uint64_t new_gen(void)
{
    return __atomic_add_fetch(&next_gen, 1, __ATOMIC_RELAXED);
}

void vs_iotlb_init(struct vs_iotlb *tlb)
{
    memset(tlb, 0, sizeof *tlb);
    tlb->gen = new_gen();
}

static inline uint64_t entry_last(const struct vs_iotlb_entry *e)
{
    return e->iova + (e->size - 1);
}

static void write_begin(struct vs_iotlb *tlb)
{
    __atomic_store_n(&tlb->seq, tlb->seq + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
}

static void write_end(struct vs_iotlb *tlb)
{
    __atomic_store_n(&tlb->gen, new_gen(), __ATOMIC_RELEASE);
    __atomic_store_n(&tlb->seq, tlb->seq + 1, __ATOMIC_RELEASE);
}

/* The first entry whose last byte is at or past iova (entries are sorted and disjoint). */
static uint32_t first_ending_at_or_after(const struct vs_iotlb_entry *entries, uint32_t n, uint64_t iova)
{
    uint32_t lo = 0, hi = n;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (entry_last(&entries[mid]) < iova) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo;
}

/* The host address of user address uva, and how many bytes from there stay in its region. */
static inline uint8_t *uva_to_hva(const struct vs_memtable *mem, uint64_t uva, uint64_t *contig)
{
    if (!mem) {
        return NULL;
    }
    for (uint32_t i = 0; i < mem->nregions; i++) {
        const struct vs_mem_region *r = &mem->regions[i];
        uint64_t off = uva - r->user_addr;
        if (uva >= r->user_addr && off < r->size) {
            *contig = r->size - off;
            return r->host_addr + off;
        }
    }
    return NULL;
}

/* Whether [uva, uva + size) is all guest memory (it may span adjacent regions). */
static bool uva_range_mapped(const struct vs_memtable *mem, uint64_t uva, uint64_t size)
{
    while (size) {
        uint64_t contig;
        if (!uva_to_hva(mem, uva, &contig)) {
            return false;
        }
        if (contig >= size) {
            return true;
        }
        uva += contig;
        size -= contig;
    }
    return true;
}

static void remove_entries(struct vs_iotlb *tlb, uint32_t from, uint32_t count)
{
    memmove(&tlb->entries[from], &tlb->entries[from + count],
            (tlb->nentries - from - count) * sizeof tlb->entries[0]);
    tlb->nentries -= count;
}

int vs_iotlb_update(struct vs_iotlb *tlb, const struct vs_memtable *mem,
                    uint64_t iova, uint64_t size, uint64_t uva, uint32_t perm)
{
    int err = VS_IOTLB_OK;
    if (size == 0) {
        err = VS_IOTLB_ERR_SIZE;
    } else if (size - 1 > UINT64_MAX - iova || size - 1 > UINT64_MAX - uva) {
        err = VS_IOTLB_ERR_WRAP;
    } else if (perm != VS_IOTLB_ACCESS_RO && perm != VS_IOTLB_ACCESS_WO && perm != VS_IOTLB_ACCESS_RW) {
        err = VS_IOTLB_ERR_PERM;
    } else if (!uva_range_mapped(mem, uva, size)) {
        err = VS_IOTLB_ERR_OUTSIDE;
    }
    uint32_t pos = 0;
    if (!err) {
        pos = first_ending_at_or_after(tlb->entries, tlb->nentries, iova);
        if (pos < tlb->nentries && tlb->entries[pos].iova <= iova + (size - 1)) {
            const struct vs_iotlb_entry *e = &tlb->entries[pos];
            bool same = e->iova == iova && e->size == size && e->uva == uva && e->perm == perm;
            err = same ? VS_IOTLB_DUPLICATE : VS_IOTLB_ERR_OVERLAP;
        }
    }
    if (err) {
        tlb->refused[err]++;
        return err;
    }
    write_begin(tlb);
    if (tlb->nentries == VS_IOTLB_MAX_ENTRIES) {
        /* Forgetting a valid entry is safe: the next lookup misses and asks again. */
        uint32_t victim = tlb->evict_next++ % tlb->nentries;
        remove_entries(tlb, victim, 1);
        tlb->evictions++;
        if (victim < pos) {
            pos--;
        }
    }
    memmove(&tlb->entries[pos + 1], &tlb->entries[pos], (tlb->nentries - pos) * sizeof tlb->entries[0]);
    tlb->entries[pos] = (struct vs_iotlb_entry){ .iova = iova, .size = size, .uva = uva, .perm = perm };
    tlb->nentries++;
    tlb->updates++;
    write_end(tlb);
    return VS_IOTLB_OK;
}

uint32_t vs_iotlb_invalidate(struct vs_iotlb *tlb, uint64_t iova, uint64_t size)
{
    uint64_t last = (size == 0 || size - 1 > UINT64_MAX - iova) ? UINT64_MAX : iova + (size - 1);
    uint32_t from = first_ending_at_or_after(tlb->entries, tlb->nentries, iova);
    uint32_t to = from;
    while (to < tlb->nentries && tlb->entries[to].iova <= last) {
        to++;
    }
    tlb->invalidations++;
    write_begin(tlb);
    remove_entries(tlb, from, to - from);
    write_end(tlb);
    return to - from;
}

void vs_iotlb_flush_caches(struct vs_iotlb *tlb)
{
    __atomic_store_n(&tlb->gen, new_gen(), __ATOMIC_RELEASE);
}

uint64_t vs_iotlb_translate_uva(struct vs_iotlb *tlb, uint64_t iova, uint64_t len, uint32_t perm,
                                uint64_t *missing, uint32_t *missing_perm)
{
    uint64_t start = 0, cur = iova;
    uint64_t left = len;
    while (left) {
        uint32_t i = first_ending_at_or_after(tlb->entries, tlb->nentries, cur);
        const struct vs_iotlb_entry *e = &tlb->entries[i];
        if (i == tlb->nentries || e->iova > cur) {
            *missing = cur;
            *missing_perm = perm;
            return 0;
        }
        uint64_t u = e->uva + (cur - e->iova);
        if ((e->perm & perm) != perm || (cur != iova && u != start + (cur - iova))) {
            *missing = cur;       /* no access, or not contiguous: asking again would not help */
            *missing_perm = 0;
            return 0;
        }
        if (cur == iova) {
            start = u;
        }
        uint64_t in_entry = entry_last(e) - cur;   /* bytes left in the entry, less one */
        if (left - 1 <= in_entry) {
            break;
        }
        cur += in_entry + 1;
        left -= in_entry + 1;
    }
    return start;
}

int vs_iotlb_take_miss(struct vs_iotlb *tlb, uint64_t *iova, uint32_t *perm)
{
    for (uint32_t i = 0; i < VS_IOTLB_MISS_SLOTS; i++) {
        struct vs_iotlb_miss *m = &tlb->miss[i];
        if (__atomic_load_n(&m->state, __ATOMIC_ACQUIRE) == 1) {
            *iova = m->iova;
            *perm = m->perm;
            __atomic_store_n(&m->state, 0, __ATOMIC_RELEASE);
            return 1;
        }
    }
    return 0;
}

/* --- fast path ---------------------------------------------------------------- */

struct cached_translation {
    uint64_t iova;
    uint64_t len;                /* 0: empty */
    uint8_t *host;
    uint32_t perm;
};

struct translation_cache {
    uint64_t gen;
    const struct vs_memtable *mem;   /* the memory table the host addresses came from */
    uint32_t next;
    struct cached_translation e[VS_IOTLB_CACHE_SIZE];
};

static __thread struct translation_cache cache;
static __thread int last_failure;

int vs_iotlb_failure(void)
{
    return last_failure;
}

/* Records a miss for the control plane and wakes it, unless its page was recorded in this generation.
 * Threads racing here may record a page twice or skip one: the control plane asks once, and a
 * skipped miss is seen again on the next burst. */
static void record_miss(struct vs_iotlb *tlb, uint64_t iova, uint32_t perm, uint64_t gen)
{
    __atomic_add_fetch(&tlb->misses, 1, __ATOMIC_RELAXED);
    uint64_t key = (iova & ~4095ULL) | perm;
    if (__atomic_load_n(&tlb->reported_gen, __ATOMIC_RELAXED) != gen) {
        for (uint32_t i = 0; i < VS_IOTLB_MISS_SLOTS; i++) {
            __atomic_store_n(&tlb->reported_page[i], UINT64_MAX, __ATOMIC_RELAXED);
        }
        __atomic_store_n(&tlb->reported_gen, gen, __ATOMIC_RELAXED);
    }
    for (uint32_t i = 0; i < VS_IOTLB_MISS_SLOTS; i++) {
        if (__atomic_load_n(&tlb->reported_page[i], __ATOMIC_RELAXED) == key) {
            return;
        }
    }
    for (uint32_t i = 0; i < VS_IOTLB_MISS_SLOTS; i++) {
        struct vs_iotlb_miss *m = &tlb->miss[i];
        uint32_t idle = 0;
        if (__atomic_compare_exchange_n(&m->state, &idle, 2, false, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
            m->iova = iova;
            m->perm = perm;
            __atomic_store_n(&m->state, 1, __ATOMIC_RELEASE);
            uint32_t slot = __atomic_fetch_add(&tlb->reported_next, 1, __ATOMIC_RELAXED) % VS_IOTLB_MISS_SLOTS;
            __atomic_store_n(&tlb->reported_page[slot], key, __ATOMIC_RELAXED);
            int fd = vs_guestmem_eventfd();
            if (fd >= 0) {
                uint64_t one = 1;
                ssize_t r = write(fd, &one, sizeof one);
                (void)r;  /* EAGAIN: the counter is already non-zero, the control plane will wake */
            }
            return;
        }
    }
    /* Every slot waits to be sent: this miss is seen again on the next burst. */
}

/* Looks iova up under the sequence counter; 1 and a copy of its entry, 0 if none, -1 if it kept changing. */
static int lookup(const struct vs_iotlb *tlb, uint64_t iova, struct vs_iotlb_entry *out)
{
    for (int tries = 0; tries < 8; tries++) {
        uint64_t s1 = __atomic_load_n(&tlb->seq, __ATOMIC_ACQUIRE);
        if (s1 & 1) {
            __builtin_ia32_pause();
            continue;
        }
        uint32_t n = __atomic_load_n(&tlb->nentries, __ATOMIC_RELAXED);
        if (n > VS_IOTLB_MAX_ENTRIES) {
            continue;
        }
        const volatile struct vs_iotlb_entry *entries = tlb->entries;
        uint32_t lo = 0, hi = n;
        while (lo < hi) {
            uint32_t mid = lo + (hi - lo) / 2;
            if (entries[mid].iova + (entries[mid].size - 1) < iova) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        int found = 0;
        if (lo < n) {
            out->iova = entries[lo].iova;
            out->size = entries[lo].size;
            out->uva = entries[lo].uva;
            out->perm = entries[lo].perm;
            found = out->iova <= iova && out->size && iova - out->iova <= out->size - 1;
        }
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_load_n(&tlb->seq, __ATOMIC_RELAXED) == s1) {
            return found;
        }
    }
    return -1;
}

uint8_t *vs_iotlb_to_hva(const struct vs_vhost_dev *dev, uint64_t iova, uint32_t perm, uint64_t *contig)
{
    struct vs_iotlb *tlb = dev->iotlb;
    uint64_t gen = __atomic_load_n(&tlb->gen, __ATOMIC_ACQUIRE);
    if (unlikely(cache.gen != gen || cache.mem != dev->mem)) {
        memset(&cache, 0, sizeof cache);
        cache.gen = gen;
        cache.mem = dev->mem;
    }
    for (uint32_t i = 0; i < VS_IOTLB_CACHE_SIZE; i++) {
        const struct cached_translation *c = &cache.e[i];
        uint64_t off = iova - c->iova;
        if (off < c->len && (c->perm & perm) == perm) {
            *contig = c->len - off;
            return c->host + off;
        }
    }
    struct vs_iotlb_entry e;
    int found = lookup(tlb, iova, &e);
    if (found <= 0) {
        if (found == 0) {
            record_miss(tlb, iova, perm, gen);
        }
        last_failure = VS_VQ_ERR_IOTLB_MISS;   /* a table in flux: the ring tries again next burst */
        return NULL;
    }
    if (unlikely((e.perm & perm) != perm)) {
        __atomic_add_fetch(&tlb->perm_denied, 1, __ATOMIC_RELAXED);
        last_failure = VS_VQ_ERR_IOTLB_PERM;
        return NULL;
    }
    uint64_t in_region;
    uint8_t *host = uva_to_hva(dev->mem, e.uva + (iova - e.iova), &in_region);
    if (unlikely(!host)) {
        __atomic_add_fetch(&tlb->outside, 1, __ATOMIC_RELAXED);
        last_failure = VS_VQ_ERR_ADDR;
        return NULL;
    }
    /* Bytes left in the entry, less one (an entry may run to the end of the IOVA space). */
    uint64_t in_entry = entry_last(&e) - iova;
    uint64_t len = in_region - 1 < in_entry ? in_region : in_entry + 1;
    if (unlikely(len == 0)) {
        len = UINT64_MAX;
    }
    struct cached_translation *c = &cache.e[cache.next++ % VS_IOTLB_CACHE_SIZE];
    *c = (struct cached_translation){ .iova = iova, .len = len, .host = host, .perm = e.perm };
    *contig = len;
    return host;
}

void vs_iotlb_probe_rx(const struct vs_vhost_dev *dev, const struct vs_vring *vr, uint32_t depth)
{
    if (!dev->iotlb || !vs_vring_is_enabled(vr)) {
        return;
    }
    uint64_t contig;
    if (!vr->packed) {
        uint16_t avail = __atomic_load_n(&vr->avail->idx, __ATOMIC_ACQUIRE);
        uint16_t next = __atomic_load_n(&vr->last_avail_idx, __ATOMIC_RELAXED);
        if ((uint16_t)(avail - next) > vr->size) {
            return;  /* the ring engine stops such a ring */
        }
        for (uint32_t i = 0; i < depth && next != avail; i++, next++) {
            uint16_t head = __atomic_load_n(&vr->avail->ring[next & (vr->size - 1)], __ATOMIC_RELAXED);
            if (head >= vr->size) {
                return;
            }
            const volatile struct virtq_desc *d = &vr->desc[head];
            uint64_t addr = d->addr;
            if (!(d->flags & VIRTQ_DESC_F_INDIRECT)) {
                (void)vs_iotlb_to_hva(dev, addr, VS_IOTLB_ACCESS_WO, &contig);  /* a miss is recorded */
            }
        }
        return;
    }
    uint16_t idx = __atomic_load_n(&vr->pk.avail_idx, __ATOMIC_RELAXED);
    uint8_t wrap = __atomic_load_n(&vr->pk.avail_wrap, __ATOMIC_RELAXED);
    for (uint32_t i = 0; i < depth && idx < vr->size; i++) {
        const volatile struct vring_packed_desc *d = &vr->pk.desc[idx];
        uint16_t flags = __atomic_load_n(&vr->pk.desc[idx].flags, __ATOMIC_ACQUIRE);
        bool avail = !!(flags & VIRTQ_DESC_F_AVAIL) == wrap && !!(flags & VIRTQ_DESC_F_USED) != wrap;
        if (!avail) {
            return;
        }
        uint64_t addr = d->addr;
        if (!(flags & VIRTQ_DESC_F_INDIRECT)) {
            (void)vs_iotlb_to_hva(dev, addr, VS_IOTLB_ACCESS_WO, &contig);  /* a miss is recorded */
        }
        if (++idx == vr->size) {
            idx = 0;
            wrap ^= 1;
        }
    }
}
