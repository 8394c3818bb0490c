/*
 * libFuzzer harness for the ring engine (vswitch/vhost/virtqueue.c), used
 * the way the PMD uses it: dequeue a burst from a guest's TX ring, fix
 * offloads for the destination (vs_offload_fit), enqueue into another
 * guest's RX ring, return the TX buffers (vs_vring_dequeue_done).
 *
 * The input describes two devices: ring sizes, base indexes, negotiated
 * features, descriptor tables, avail rings, indirect tables and the bytes
 * of the buffers (virtio-net headers included).  Every ring part lives in a
 * guest region of its own, allocated with exactly its size, so ASan sees a
 * read or write one byte past any of them; buffers span three regions that
 * are contiguous in guest-physical space but not in ours.
 *
 * In "race" inputs a second thread keeps rewriting descriptors, avail
 * entries and indexes, used rings and header bytes while the engine reads
 * them, as a hostile guest on another vCPU would.
 *
 * Invariants checked after each call, beyond "no sanitizer report":
 *   - every segment handed out lies inside one mapped guest region;
 *   - heads are inside the ring; a frame's segments add up to its length,
 *     which is between 14 and VS_MAX_FRAME; nsegs within bounds;
 *   - a TX header's offloads were allowed by the negotiated features;
 *   - each consumed avail entry gets exactly one used entry; used ids are
 *     inside the ring; used->idx is what the engine says it published;
 *   - the counters add up: packets, bytes, dropped, errors per reason;
 *   - RX used lengths add up to the header plus the frame delivered.
 *
 * Packed rings (packed_ring.c): an eighth of the inputs, and half of the
 * races, lay both devices out as packed rings instead: descriptors with
 * AVAIL/USED bits mostly right for the lap, ids mostly their slot, random
 * driver event structures, a random base and wrap counter.  Checked there:
 * after each burst the used position (index and wrap) has caught up with
 * the avail position (every slot taken is covered by a used entry), ids
 * handed out are inside the ring, and the counters add up as above.
 *
 * FUZZ_STATS_FILE=path makes it write its counts there every second and at exit;
 * FUZZ_RACE_ONLY=1 makes every input a race.
 */
#include <pthread.h>
#include <time.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "fuzz_common.h"

#define UVA_OFFSET 0x7f0000000000ULL
#define GPA_DESC 0x10000ULL
#define GPA_AVAIL 0x30000ULL
#define GPA_USED 0x50000ULL
#define GPA_INDIRECT 0x90000ULL
#define GPA_DATA 0x100000ULL
#define NDATA 3
#define INDIRECT_DESCS 64
#define MAX_LOG2_SIZE 9

enum { R_DESC, R_AVAIL, R_USED, R_INDIRECT, R_DATA0 };
#define NREGIONS (R_DATA0 + NDATA)

struct guest {
    struct vs_vhost_dev dev;
    struct vs_memtable mem;
    uint8_t *host[NREGIONS];
    uint64_t gpa[NREGIONS];
    uint32_t size[NREGIONS];
    uint32_t ring_size;
    uint32_t data_total;
    struct vs_vring *vr;
};

static struct {
    uint64_t inputs, chains_tx, chains_rx, frames_tx, frames_rx, bad_chains, race_inputs, packed_inputs, packed_chains;
    uint64_t iommu_inputs;
} stats;
static int callfd = -1;
static uint64_t race_writes;            /* stores by the racing thread */

static void write_stats(void)
{
    const char *path = getenv("FUZZ_STATS_FILE");
    FILE *f = path ? fopen(path, "w") : NULL;
    if (f) {
        fprintf(f, "inputs %llu\nchains %llu\nchains_tx %llu\nchains_rx %llu\nframes_tx %llu\n"
                "frames_rx %llu\nbad_chains %llu\nrace_inputs %llu\nrace_writes %llu\npacked_inputs %llu\n"
                "packed_chains %llu\niommu_inputs %llu\n",
                (unsigned long long)stats.inputs, (unsigned long long)(stats.chains_tx + stats.chains_rx),
                (unsigned long long)stats.chains_tx, (unsigned long long)stats.chains_rx,
                (unsigned long long)stats.frames_tx, (unsigned long long)stats.frames_rx,
                (unsigned long long)stats.bad_chains, (unsigned long long)stats.race_inputs,
                (unsigned long long)__atomic_load_n(&race_writes, __ATOMIC_RELAXED),
                (unsigned long long)stats.packed_inputs, (unsigned long long)stats.packed_chains,
                (unsigned long long)stats.iommu_inputs);
        fclose(f);
    }
}

/* --- the racing guest ------------------------------------------------------ */

struct race_area {
    uint8_t *p;
    uint32_t len;
};

static struct {
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int armed;                      /* under mu, and read atomically by the racer */
    int busy;                       /* the racer is between arm and disarm */
    struct race_area areas[2 * NREGIONS];
    uint32_t nareas;
    int headers_only;               /* flip the GSO bytes of the TX frames, nothing else */
    uint64_t seed;
} race = { .mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER };

static void *racer(void *arg)
{
    (void)arg;
    for (;;) {
        pthread_mutex_lock(&race.mu);
        while (!race.armed) {
            race.busy = 0;
            pthread_cond_broadcast(&race.cv);
            pthread_cond_wait(&race.cv, &race.mu);
        }
        race.busy = 1;
        uint64_t s = race.seed;
        uint32_t nareas = race.nareas;
        int headers_only = race.headers_only;
        pthread_mutex_unlock(&race.mu);
        /* A GSO byte the guest may send (TCPV4) and ones it may not (with ECN, UDP):
         * a header checked in one read and copied in another lets the latter through. */
        static const uint8_t gso_bytes[4] = { VS_NET_HDR_GSO_TCPV4, VS_NET_HDR_GSO_TCPV4 | VS_NET_HDR_GSO_ECN,
                                              VS_NET_HDR_GSO_TCPV4, VS_NET_HDR_GSO_UDP };
        while (headers_only && __atomic_load_n(&race.armed, __ATOMIC_RELAXED)) {
            uint64_t r = rng_next(&s);
            for (uint32_t k = 0; k < NDATA; k++) {
                struct race_area *a = &race.areas[R_DATA0 + k];
                for (uint32_t off = 1; off < a->len; off += 256) {
                    __atomic_store_n(a->p + off, gso_bytes[(r + off) & 3], __ATOMIC_RELAXED);
                }
            }
            __atomic_fetch_add(&race_writes, 1, __ATOMIC_RELAXED);
        }
        while (__atomic_load_n(&race.armed, __ATOMIC_RELAXED)) {
            uint64_t r = rng_next(&s);
            struct race_area *a = &race.areas[r % nareas];
            uint32_t off = (uint32_t)(r >> 8) % a->len & ~1u;
            uint8_t *p = a->p + off;
            switch ((r >> 40) & 3) {
            case 0:
                __atomic_store_n(p, (uint8_t)(r >> 48), __ATOMIC_RELAXED);
                break;
            case 1:
                if (off + 2 <= a->len) {
                    /* Small deltas too, so indexes move plausibly as well as wildly. */
                    uint16_t v = __atomic_load_n((uint16_t *)p, __ATOMIC_RELAXED);
                    v = (r >> 50) & 1 ? (uint16_t)(v + ((r >> 51) & 7)) : (uint16_t)(r >> 48);
                    __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELAXED);
                }
                break;
            default:
                if (off + 4 <= a->len && !(off & 3)) {
                    __atomic_store_n((uint32_t *)p, (uint32_t)(r >> 32), __ATOMIC_RELAXED);
                }
                break;
            }
            __atomic_fetch_add(&race_writes, 1, __ATOMIC_RELAXED);
        }
    }
    return NULL;
}

static void race_arm(struct guest *g, struct guest *h, uint64_t seed, int headers_only)
{
    pthread_mutex_lock(&race.mu);
    race.headers_only = headers_only;
    race.nareas = 0;
    struct guest *gs[2] = { g, h };
    for (int k = 0; k < 2; k++) {
        for (int r = 0; r < NREGIONS; r++) {
            race.areas[race.nareas++] = (struct race_area){ gs[k]->host[r], gs[k]->size[r] };
        }
    }
    race.seed = seed | 1;
    race.armed = 1;
    pthread_cond_broadcast(&race.cv);
    pthread_mutex_unlock(&race.mu);
}

static void race_disarm(void)
{
    pthread_mutex_lock(&race.mu);
    __atomic_store_n(&race.armed, 0, __ATOMIC_RELAXED);
    while (race.busy) {
        pthread_cond_wait(&race.cv, &race.mu);
    }
    pthread_mutex_unlock(&race.mu);
}

/* --- guest memory and rings ------------------------------------------------- */

static uint8_t *alloc_exact(uint32_t len, uint32_t align)
{
    /* aligned_alloc wants a multiple of the alignment; ASan still guards the end. */
    uint32_t rounded = (len + align - 1) / align * align;
    uint8_t *p = aligned_alloc(align, rounded);
    CHECK(p, "out of memory");
    return p;
}

static uint64_t pick_addr(struct input *in, const struct guest *g, bool rx)
{
    uint8_t m = in_u8(in);
    switch (m & 7) {
    case 0:
        return in_u64(in);                                  /* anything at all */
    case 1:
        return UINT64_MAX - (in_u8(in) & 63);               /* wraps */
    case 2: {
        /* A ring, or the indirect area.  Not an RX buffer over the used ring: that is
         * legal for a guest (its own loss) but would defeat the used-ring checks. */
        int r = (m >> 3) % R_DATA0;
        if (r == R_USED && rx) {
            r = R_DESC;
        }
        return g->gpa[r] + in_u16(in) % (g->size[r] + 16);
    }
    case 3:
        return GPA_DATA + in_u32(in) % (g->data_total + 64); /* anywhere in (or just past) the data */
    default:
        return GPA_DATA + (in_u16(in) % (g->data_total / 256 + 1)) * 256; /* a frame's start */
    }
}

static uint32_t pick_len(struct input *in)
{
    uint8_t m = in_u8(in);
    switch (m & 7) {
    case 0:
        return in_u32(in);
    case 1:
        return UINT32_MAX - (in_u8(in) & 15);
    case 2:
        return in_u8(in);
    default:
        return in_u16(in) % 2100;
    }
}

static void write_desc(struct input *in, const struct guest *g, struct virtq_desc *d, uint32_t table_size,
                       bool rx, uint32_t i)
{
    uint8_t mode = in_u8(in);
    if (mode < 0x90) {
        /* A well-formed buffer (or a link to the next descriptor), the common case for a real guest. */
        uint32_t frames = g->data_total / 256;
        d->addr = GPA_DATA + (uint64_t)(mode % (frames ? frames : 1)) * 256;
        d->len = rx ? 64 + in_u8(in) * (mode & 1 ? 2u : 16u) : 12 + 14 + in_u8(in) * (mode & 1 ? 1u : 8u);
        d->flags = (uint16_t)((rx ? VIRTQ_DESC_F_WRITE : 0) | (mode & 6 ? 0 : VIRTQ_DESC_F_NEXT));
        d->next = (uint16_t)((i + 1) % table_size);
        return;
    }
    if (mode < 0x98) {
        /* An empty link back to itself or on to the next: without the chain budget, a loop forever. */
        d->addr = GPA_DATA;
        d->len = 0;
        d->flags = (uint16_t)(VIRTQ_DESC_F_NEXT | (rx ? VIRTQ_DESC_F_WRITE : 0));
        d->next = (uint16_t)(mode & 1 ? i : (i + 1) % table_size);
        return;
    }
    d->addr = pick_addr(in, g, rx);
    if (rx && d->addr - GPA_USED < GPA_INDIRECT - GPA_USED) {
        d->addr -= GPA_USED - GPA_DESC;     /* see pick_addr: no RX buffer over the used ring */
    }
    d->len = pick_len(in);
    uint8_t f = in_u8(in);
    d->flags = f & 0x80 ? in_u16(in) : (uint16_t)(f & 7);
    if ((f & 0x18) == 0) {
        /* Mostly the right direction, so chains get past that first check. */
        d->flags = (uint16_t)((d->flags & ~VIRTQ_DESC_F_WRITE) | (rx ? VIRTQ_DESC_F_WRITE : 0));
    }
    if ((f & 0x60) == 0x60) {
        d->flags = (uint16_t)((d->flags & ~VIRTQ_DESC_F_INDIRECT) | VIRTQ_DESC_F_INDIRECT);
        d->addr = GPA_INDIRECT + (in_u8(in) % INDIRECT_DESCS) * 16;
        d->len = (in_u8(in) % 20) * 16 + ((f & 1) ? 0 : in_u8(in) % 3);
    }
    uint8_t nx = in_u8(in);
    d->next = nx & 0x80 ? in_u16(in) : (uint16_t)(nx % (table_size + 2));
}

/* Packed ring flags that make a slot available in lap `wrap`, usually; now and then anything. */
static uint16_t packed_avail_bits(struct input *in, bool wrap)
{
    uint8_t m = in_u8(in);
    if (m < 0xe0) {
        return wrap ? VIRTQ_DESC_F_AVAIL : VIRTQ_DESC_F_USED;
    }
    static const uint16_t any[4] = { 0, VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED, VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED };
    return any[m & 3];
}

/* A packed descriptor from a split one written the same way: addr, len and
 * the low flags; id mostly the slot; AVAIL/USED as the caller says. */
static void write_packed_desc(struct input *in, const struct guest *g, struct vring_packed_desc *pd,
                              uint32_t table_size, bool rx, uint32_t i, uint16_t avail_bits)
{
    struct virtq_desc d;
    write_desc(in, g, &d, table_size, rx, i);
    pd->addr = d.addr;
    pd->len = d.len;
    pd->id = in_u8(in) < 0xf0 ? (uint16_t)i : in_u16(in);
    pd->flags = (uint16_t)((d.flags & (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_INDIRECT)) | avail_bits);
}

/* The driver makes the slots from the device's position on available for the next lap. */
static void packed_repost(struct guest *g, struct input *in)
{
    const struct vs_packed_ring *pr = &g->vr->pk;
    struct vring_packed_desc *ring = (struct vring_packed_desc *)g->host[R_DESC];
    uint32_t size = g->ring_size;
    uint32_t n = in_u8(in) % (size + 1);
    for (uint32_t j = 0; j < n; j++) {
        uint32_t slot = (pr->avail_idx + j) & (size - 1);
        bool wrap = pr->avail_wrap ^ (pr->avail_idx + j >= size);
        uint16_t bits = packed_avail_bits(in, wrap);
        ring[slot].flags = (uint16_t)((ring[slot].flags & ~(VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED)) | bits);
    }
}

/*
 * Inputs whose next byte is below 0x40 (or that ran out of bytes) run as a
 * guest behind a vIOMMU (iotlb.c): descriptor
 * addresses are IOVAs, mapped here for the indirect table and the data
 * regions in up to two pieces each, with random access, some left out, and
 * the second piece sometimes leading back to the region's start, so that
 * misses, refused access and buffers across entries all occur.
 */
static struct vs_iotlb fuzz_iotlb;

static void attach_iotlb(struct guest *g, struct input *in)
{
    vs_iotlb_init(&fuzz_iotlb);
    for (uint32_t r = R_INDIRECT; r < NREGIONS; r++) {
        if (!g->size[r]) {
            continue;
        }
        uint32_t cut = in_u16(in) % g->size[r];
        uint8_t k = in_u8(in);
        uint64_t uva = g->gpa[r] + UVA_OFFSET;
        if ((k & 1) && cut) {
            vs_iotlb_update(&fuzz_iotlb, &g->mem, g->gpa[r], cut, uva, 1 + (k >> 1) % 3);
        }
        if (k & 8) {
            vs_iotlb_update(&fuzz_iotlb, &g->mem, g->gpa[r] + cut, g->size[r] - cut, k & 16 ? uva : uva + cut,
                            1 + (k >> 5) % 3);
        }
    }
    g->dev.iotlb = &fuzz_iotlb;
    stats.iommu_inputs++;
}

static void guest_build(struct guest *g, struct input *in, bool rx, uint64_t features, bool packed)
{
    memset(g, 0, sizeof *g);
    uint32_t size = 1u << (in_u8(in) % (MAX_LOG2_SIZE + 1));
    g->ring_size = size;
    g->size[R_DESC] = 16 * size;
    g->size[R_AVAIL] = packed ? 4 : 4 + 2 * size + 2;     /* packed: the driver event structure */
    g->size[R_USED] = packed ? 4 : 4 + 8 * size + 2;      /* packed: the device event structure */
    g->size[R_INDIRECT] = 16 * INDIRECT_DESCS;
    g->gpa[R_DESC] = GPA_DESC;
    g->gpa[R_AVAIL] = GPA_AVAIL;
    g->gpa[R_USED] = GPA_USED;
    g->gpa[R_INDIRECT] = GPA_INDIRECT;
    uint64_t gpa = GPA_DATA;
    for (int i = 0; i < NDATA; i++) {
        uint32_t len = 64 + in_u16(in) % 4096;
        g->gpa[R_DATA0 + i] = gpa;
        g->size[R_DATA0 + i] = len;
        gpa += len;
        g->data_total += len;
    }
    /* Now and then a hole between two data regions. */
    if (in_u8(in) & 1) {
        g->gpa[R_DATA0 + NDATA - 1] += 4096;
    }
    static const uint32_t align[NREGIONS] = { 16, 2, 4, 16, 16, 1, 1 };
    for (int r = 0; r < NREGIONS; r++) {
        g->host[r] = alloc_exact(g->size[r], align[r]);
        g->mem.regions[r] = (struct vs_mem_region){ g->gpa[r], g->gpa[r] + UVA_OFFSET, g->size[r], g->host[r] };
    }
    g->mem.nregions = NREGIONS;

    /* Buffers: a frame (virtio-net header first) at every 256-byte step. */
    for (int i = 0; i < NDATA; i++) {
        uint8_t *p = g->host[R_DATA0 + i];
        uint32_t len = g->size[R_DATA0 + i];
        uint64_t fill = in_u64(in) | 1;
        for (uint32_t off = 0; off < len; off += 8) {
            uint64_t v = rng_next(&fill);
            memcpy(p + off, &v, len - off < 8 ? len - off : 8);
        }
        for (uint32_t off = 0; off + 12 < len; off += 256) {
            uint8_t k = in_u8(in);
            if (k & 0x80) {
                continue;                       /* random bytes */
            }
            uint32_t n = len - off < 256 ? len - off : 256;
            uint8_t *h = p + off;
            uint32_t l3 = write_frame(in, h + 12, n - 12 < 96 ? n - 12 : 96);
            memset(h, 0, 12);
            if (k & 1) {
                h[0] = k & 2 ? VS_NET_HDR_F_NEEDS_CSUM : 0;
                h[1] = (k >> 2) & 1 ? VS_NET_HDR_GSO_TCPV4 : (k >> 3) & 1 ? VS_NET_HDR_GSO_TCPV6 : in_u8(in);
                uint16_t hdr_len = (uint16_t)(l3 + 60), gso = (uint16_t)(in_u8(in) + 1);
                uint16_t cs = (uint16_t)(l3 + (k & 16 ? 40 : 20)), co = k & 32 ? 16 : 6;
                memcpy(h + 2, &hdr_len, 2);
                memcpy(h + 4, &gso, 2);
                memcpy(h + 6, &cs, 2);
                memcpy(h + 8, &co, 2);
            }
        }
    }

    struct vs_vhost_dev *dev = &g->dev;
    vs_vhost_dev_init(dev, 1);
    dev->mem = &g->mem;
    vs_vhost_dev_set_features(dev, features | (packed ? 1ULL << VIRTIO_F_RING_PACKED : 0));
    if (in_u8(in) < 0x40) {
        attach_iotlb(g, in);
    }
    uint32_t index = rx ? 0 : 1;                /* even = guest RX, odd = guest TX */

    if (packed) {
        uint16_t base = in_u16(in) & (uint16_t)(size - 1);
        bool wrap = in_u8(in) & 1;
        uint32_t avail = in_u8(in) % (size + 1);
        struct vring_packed_desc *ring = (struct vring_packed_desc *)g->host[R_DESC];
        for (uint32_t j = 0; j < size; j++) {
            uint32_t slot = (base + j) & (size - 1);
            bool lap = wrap ^ (base + j >= size);
            /* The slots past `avail` look used (the last lap's), or anything. */
            uint16_t bits = j < avail ? packed_avail_bits(in, lap) : packed_avail_bits(in, !lap);
            write_packed_desc(in, g, &ring[slot], size, rx, slot, bits);
        }
        struct vring_packed_desc *ind = (struct vring_packed_desc *)g->host[R_INDIRECT];
        for (uint32_t i = 0; i < INDIRECT_DESCS; i++) {
            write_packed_desc(in, g, &ind[i], INDIRECT_DESCS, rx, i, in_u8(in) < 0xf0 ? 0 : in_u16(in));
        }
        struct vring_packed_desc_event *drv = (struct vring_packed_desc_event *)g->host[R_AVAIL];
        drv->flags = in_u8(in) % 4;
        drv->off_wrap = in_u16(in);
        uint32_t vbase = base | (wrap ? 1u << 15 : 0);
        if (in_u8(in) & 1) {
            /* QEMU's form: a used side in the high half, which the ring resumes from. */
            vbase |= (uint32_t)((in_u16(in) & (size - 1)) | (in_u8(in) & 1) << 15) << 16;
        }
        int rc = vs_vring_setup(dev, index, size, g->gpa[R_DESC] + UVA_OFFSET, g->gpa[R_AVAIL] + UVA_OFFSET,
                                g->gpa[R_USED] + UVA_OFFSET, vbase);
        CHECK(rc == VS_VQ_OK, "vs_vring_setup refused a good packed ring: %d", rc);
        g->vr = &dev->vrings[index];
        CHECK(g->vr->packed, "a packed ring set up split");
        g->vr->callfd = in_u8(in) & 1 ? callfd : -1;
        vs_vring_set_enabled(g->vr, 1);
        return;
    }

    struct virtq_desc *desc = (struct virtq_desc *)g->host[R_DESC];
    for (uint32_t i = 0; i < size; i++) {
        write_desc(in, g, &desc[i], size, rx, i);
    }
    struct virtq_desc *ind = (struct virtq_desc *)g->host[R_INDIRECT];
    for (uint32_t i = 0; i < INDIRECT_DESCS; i++) {
        write_desc(in, g, &ind[i], INDIRECT_DESCS, rx, i);
    }
    uint16_t base = in_u8(in) & 1 ? in_u16(in) : 0;
    struct virtq_avail *avail = (struct virtq_avail *)g->host[R_AVAIL];
    avail->flags = in_u8(in) & 1;
    bool in_order = in_u8(in) & 1;
    for (uint32_t i = 0; i <= size; i++) {      /* the ring, then used_event */
        uint8_t m = in_u8(in);
        /* Heads past the ring stop it for good, so they are the exception. */
        avail->ring[i] = in_order && m < 0xf0 ? (uint16_t)((i + base) & (size - 1))
                       : m >= 0xfc ? in_u16(in) : m >= 0xf8 ? (uint16_t)size : (uint16_t)(m % size);
    }
    uint8_t m = in_u8(in);
    avail->idx = (uint16_t)(base + ((m & 0xe0) == 0xe0 ? in_u16(in) : m & 0x80 ? size : m % (size + 1)));
    memset(g->host[R_USED], 0, g->size[R_USED]);
    ((struct virtq_used *)g->host[R_USED])->idx = base;    /* where a restarted guest left it */

    int rc = vs_vring_setup(dev, index, size, g->gpa[R_DESC] + UVA_OFFSET, g->gpa[R_AVAIL] + UVA_OFFSET,
                            g->gpa[R_USED] + UVA_OFFSET, base);
    CHECK(rc == VS_VQ_OK, "vs_vring_setup refused a good ring: %d", rc);
    g->vr = &dev->vrings[index];
    g->vr->callfd = in_u8(in) & 1 ? callfd : -1;
    vs_vring_set_enabled(g->vr, 1);
}

static void guest_free(struct guest *g)
{
    for (int r = 0; r < NREGIONS; r++) {
        free(g->host[r]);
    }
}

/* The region holding [p, p+len), or -1. */
static int region_of(const struct guest *g, const uint8_t *p, uint32_t len)
{
    for (int r = 0; r < NREGIONS; r++) {
        const uint8_t *h = g->host[r];
        if (p >= h && p <= h + g->size[r] && len <= (size_t)(h + g->size[r] - p)) {
            return r;
        }
    }
    return -1;
}

static uint64_t error_sum(const struct vs_vring *vr)
{
    uint64_t s = 0;
    for (int i = 0; i < VS_VQ_ERR_MAX; i++) {
        s += vr->error_count[i];
    }
    return s;
}

static void check_used(const struct guest *g, uint16_t from, uint16_t to, bool racing, uint64_t *len_sum)
{
    const struct virtq_used *used = (const struct virtq_used *)g->host[R_USED];
    uint32_t size = g->ring_size;
    if (!racing) {
        CHECK(used->idx == g->vr->last_used_idx, "used->idx %u, engine says %u", used->idx, g->vr->last_used_idx);
    }
    for (uint16_t i = from; i != to; i++) {
        const struct virtq_used_elem *e = &used->ring[i & (size - 1)];
        if (!racing) {
            CHECK(e->id < size, "used id %u past the ring of %u", e->id, size);
            *len_sum += e->len;
        }
    }
}

/* --- one PMD pass ---------------------------------------------------------- */

static void check_tx_pkt(const struct guest *g, const struct vs_pkt *pkt, uint64_t features, bool racing)
{
    CHECK(pkt->head < g->ring_size, "head %u", pkt->head);
    CHECK(pkt->nsegs >= 1 && pkt->nsegs <= VS_PKT_MAX_SEGS, "nsegs %u", pkt->nsegs);
    CHECK(pkt->len >= 14 && pkt->len <= VS_MAX_FRAME, "len %u", pkt->len);
    uint64_t total = 0;
    volatile uint8_t sink = 0;
    for (uint32_t s = 0; s < pkt->nsegs; s++) {
        const struct vs_seg *seg = &pkt->segs[s];
        CHECK(region_of(g, seg->addr, seg->len) >= 0, "segment %u (%u bytes) outside guest memory", s, seg->len);
        total += seg->len;
        /* Touch every byte, so ASan vouches for the whole segment. */
        for (uint32_t i = 0; i < seg->len; i += 64) {
            sink ^= seg->addr[i];
        }
        if (seg->len) {
            sink ^= seg->addr[seg->len - 1];
        }
    }
    (void)sink;
    CHECK(total == pkt->len, "segments add up to %llu, len %u", (unsigned long long)total, pkt->len);
    const struct vs_net_hdr *v = &pkt->vnet;
    if (!(features & (1ULL << 0))) {
        CHECK(!v->flags && !v->gso_type, "offloads without VIRTIO_NET_F_CSUM");
    }
    (void)racing;
    if (v->gso_type) {
        uint8_t kind = v->gso_type & (uint8_t)~VS_NET_HDR_GSO_ECN;
        bool ok = (kind == VS_NET_HDR_GSO_TCPV4 && (features & (1ULL << 11))) ||
                  (kind == VS_NET_HDR_GSO_TCPV6 && (features & (1ULL << 12)));
        if (v->gso_type & VS_NET_HDR_GSO_ECN) {
            ok = ok && (features & (1ULL << 13));
        }
        CHECK(ok, "gso_type %#x passed without the feature (features %#llx)", v->gso_type,
              (unsigned long long)features);
    }
    CHECK(!(v->flags & ~VS_NET_HDR_F_NEEDS_CSUM), "TX flags %#x", v->flags);
}

static void check_out_pkt(const struct guest *g, const struct vs_offload_batch *b, const struct vs_pkt *pkt)
{
    CHECK(pkt->nsegs >= 1 && pkt->nsegs <= VS_PKT_MAX_SEGS, "offload nsegs %u", pkt->nsegs);
    uint64_t total = 0;
    for (uint32_t s = 0; s < pkt->nsegs; s++) {
        const struct vs_seg *seg = &pkt->segs[s];
        const uint8_t *hb = (const uint8_t *)b->hdrs;
        bool in_batch = seg->addr >= hb && seg->addr + seg->len <= hb + sizeof b->hdrs;
        CHECK(in_batch || region_of(g, seg->addr, seg->len) >= 0, "offload segment outside memory");
        total += seg->len;
    }
    CHECK(total == pkt->len, "offload segments %llu != len %u", (unsigned long long)total, pkt->len);
}

/* The device's used position has caught up with its avail position. */
static void check_packed_caught_up(const struct guest *g, const char *what)
{
    const struct vs_packed_ring *pr = &g->vr->pk;
    CHECK(pr->used_idx == pr->avail_idx && pr->used_wrap == pr->avail_wrap,
          "%s: used at %u (wrap %u), avail at %u (wrap %u)", what, pr->used_idx, pr->used_wrap,
          pr->avail_idx, pr->avail_wrap);
    CHECK(pr->avail_idx < g->ring_size && pr->batch_count == 0, "%s: avail %u, batch %u", what, pr->avail_idx,
          pr->batch_count);
}

static void enqueue_packed(struct guest *rxg, struct vs_pkt **pkts, uint32_t n)
{
    struct vs_vring *vr = rxg->vr;
    struct vs_queue_stats before = vr->stats;
    uint64_t err_before = error_sum(vr);
    bool enabled = vs_vring_is_enabled(vr);
    uint32_t got = vs_packed_enqueue_burst(&rxg->dev, vr, pkts, n);
    CHECK(got <= n, "delivered %u of %u", got, n);
    check_packed_caught_up(rxg, "RX");
    CHECK(vr->stats.packets - before.packets == got, "RX packets counter");
    if (enabled) {
        CHECK(vr->stats.dropped - before.dropped == n - got, "RX dropped %llu, expected %u",
              (unsigned long long)(vr->stats.dropped - before.dropped), n - got);
    }
    CHECK(vr->stats.errors - before.errors == error_sum(vr) - err_before, "RX error counters");
    CHECK(vr->stats.errors == error_sum(vr), "RX errors != sum per reason");
    stats.chains_rx += got + (error_sum(vr) - err_before);
    stats.packed_chains += got + (error_sum(vr) - err_before);
    stats.frames_rx += got;
}

static void enqueue(struct guest *rxg, struct vs_pkt **pkts, uint32_t n, bool racing)
{
    struct vs_vring *vr = rxg->vr;
    if (vr->packed) {
        enqueue_packed(rxg, pkts, n);
        return;
    }
    struct vs_queue_stats before = vr->stats;
    uint64_t err_before = error_sum(vr);
    uint16_t avail0 = vr->last_avail_idx, used0 = vr->last_used_idx;
    bool enabled = vs_vring_is_enabled(vr);
    uint32_t got = vs_vring_enqueue_burst(&rxg->dev, vr, pkts, n);
    CHECK(got <= n, "delivered %u of %u", got, n);
    uint16_t consumed = (uint16_t)(vr->last_avail_idx - avail0);
    uint16_t used = (uint16_t)(vr->last_used_idx - used0);
    CHECK(consumed == used, "RX: %u avail entries consumed, %u used entries", consumed, used);
    CHECK(consumed <= rxg->ring_size, "RX consumed %u > ring", consumed);
    CHECK(vr->stats.packets - before.packets == got, "RX packets counter");
    if (enabled) {
        CHECK(vr->stats.dropped - before.dropped == n - got, "RX dropped %llu, expected %u",
              (unsigned long long)(vr->stats.dropped - before.dropped), n - got);
    }
    CHECK(vr->stats.errors - before.errors == error_sum(vr) - err_before, "RX error counters");
    CHECK(vr->stats.errors == error_sum(vr), "RX errors != sum per reason");
    uint64_t used_len = 0;
    check_used(rxg, used0, vr->last_used_idx, racing, &used_len);
    if (!racing) {
        uint64_t want = (uint64_t)rxg->dev.hdr_len * got + (vr->stats.bytes - before.bytes);
        CHECK(used_len == want, "RX used lengths %llu, delivered %llu", (unsigned long long)used_len,
              (unsigned long long)want);
    }
    stats.chains_rx += consumed;
    stats.frames_rx += got;
}

/* What the PMD does with a burst: offloads fixed for the destination, then enqueued. */
static void forward(struct guest *txg, struct guest *rxg, struct vs_pkt *pkts, uint32_t n, bool racing)
{
    if (n) {
        struct vs_pkt *ptrs[VS_BURST];
        for (uint32_t i = 0; i < n; i++) {
            ptrs[i] = &pkts[i];
        }
        uint32_t caps = vs_offload_caps_from_features(rxg->dev.features);
        if (!vs_offload_needed(ptrs, n, caps)) {
            enqueue(rxg, ptrs, n, racing);
        } else {
            struct vs_offload_batch *b = vs_offload_thread_batch();
            CHECK(b, "no offload batch");
            for (uint32_t next = 0; next < n;) {
                uint32_t after = vs_offload_fit(b, ptrs, n, next, caps);
                CHECK(after > next && after <= n, "vs_offload_fit made no progress (%u -> %u of %u)", next, after, n);
                CHECK(b->n <= VS_OFFLOAD_MAX_OUT && b->used <= b->n, "batch n %u used %u", b->n, b->used);
                for (uint32_t i = 0; i < b->n; i++) {
                    check_out_pkt(txg, b, b->out[i]);
                }
                next = after;
                enqueue(rxg, b->out, b->n, racing);
            }
            b->errors = 0;
        }
    }
}

static void pmd_pass_packed(struct guest *txg, struct guest *rxg, uint32_t max, bool racing)
{
    struct vs_vring *vr = txg->vr;
    struct vs_pkt pkts[VS_BURST];
    struct vs_queue_stats before = vr->stats;
    uint64_t err_before = error_sum(vr);
    uint32_t n = vs_packed_dequeue_burst(&txg->dev, vr, pkts, max);
    CHECK(n <= max, "dequeued %u > %u", n, max);
    uint32_t chains = vr->pk.npending;
    CHECK(chains >= n && chains <= max, "TX: %u chains taken for %u frames (max %u)", chains, n, max);
    uint64_t bytes = 0;
    for (uint32_t i = 0; i < n; i++) {
        check_tx_pkt(txg, &pkts[i], txg->dev.features, racing);
        bytes += pkts[i].len;
    }
    CHECK(vr->stats.packets - before.packets == n && vr->stats.bytes - before.bytes == bytes, "TX counters");
    uint64_t errs = error_sum(vr) - err_before;
    CHECK(vr->stats.errors - before.errors == errs, "TX errors");
    CHECK(errs == chains - n, "TX: %u chains dropped, %llu errors counted", chains - n, (unsigned long long)errs);
    stats.bad_chains += chains - n;
    forward(txg, rxg, pkts, n, racing);
    vs_packed_dequeue_done(&txg->dev, vr, pkts, n);
    CHECK(vr->pk.npending == 0, "TX: %u chains not returned", vr->pk.npending);
    check_packed_caught_up(txg, "TX");
    stats.chains_tx += chains;
    stats.frames_tx += n;
    stats.packed_chains += chains;
}

static void pmd_pass(struct guest *txg, struct guest *rxg, uint32_t max, bool racing)
{
    struct vs_vring *vr = txg->vr;
    if (!vs_vring_is_enabled(vr)) {
        return;
    }
    if (vr->packed) {
        pmd_pass_packed(txg, rxg, max, racing);
        return;
    }
    struct vs_pkt pkts[VS_BURST];
    struct vs_queue_stats before = vr->stats;
    uint64_t err_before = error_sum(vr);
    uint16_t avail0 = vr->last_avail_idx, used0 = vr->last_used_idx;
    uint32_t n = vs_vring_dequeue_burst(&txg->dev, vr, pkts, max);
    CHECK(n <= max, "dequeued %u > %u", n, max);
    uint16_t consumed = (uint16_t)(vr->last_avail_idx - avail0);
    CHECK(consumed >= n && consumed <= max, "TX consumed %u for %u frames (max %u)", consumed, n, max);
    uint64_t bytes = 0;
    for (uint32_t i = 0; i < n; i++) {
        check_tx_pkt(txg, &pkts[i], txg->dev.features, racing);
        bytes += pkts[i].len;
    }
    CHECK(vr->stats.packets - before.packets == n && vr->stats.bytes - before.bytes == bytes, "TX counters");
    uint64_t errs = error_sum(vr) - err_before;
    CHECK(vr->stats.errors - before.errors == errs, "TX errors");
    /* Every consumed chain is a frame, a counted error, or (broken ring) neither. */
    CHECK(errs >= (uint64_t)(consumed - n), "TX: %u chains dropped, %llu errors counted", consumed - n,
          (unsigned long long)errs);
    stats.bad_chains += consumed - n;

    forward(txg, rxg, pkts, n, racing);
    vs_vring_dequeue_done(&txg->dev, vr, pkts, n);
    CHECK((uint16_t)(vr->last_used_idx - used0) == consumed, "TX: %u consumed, %u used",
          consumed, (uint16_t)(vr->last_used_idx - used0));
    uint64_t unused = 0;
    check_used(txg, used0, vr->last_used_idx, racing, &unused);
    stats.chains_tx += consumed;
    stats.frames_tx += n;
}

/* The guest hands back what we consumed (the ring wraps onto the same
 * entries), or moves its index some other way. */
static void repost(struct guest *g, struct input *in)
{
    if (g->vr->packed) {
        packed_repost(g, in);
        return;
    }
    struct virtq_avail *a = (struct virtq_avail *)g->host[R_AVAIL];
    uint16_t outstanding = (uint16_t)(a->idx - g->vr->last_avail_idx);
    uint8_t m = in_u8(in);
    if (m < 0xe0 && outstanding <= g->ring_size) {
        a->idx = (uint16_t)(g->vr->last_avail_idx + g->ring_size);
    } else {
        /* A jump past the ring stops it for good, so it is the exception. */
        a->idx = (uint16_t)(a->idx + (m >= 0xfe ? in_u16(in) : m % 8));
    }
}

/* --- libFuzzer entry points -------------------------------------------------- */

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    callfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    CHECK(callfd >= 0, "eventfd");
    CHECK(pthread_create(&race.thread, NULL, racer, NULL) == 0, "pthread_create");
    atexit(write_stats);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct guest txg, rxg;
    struct input in;
    input_init(&in, data, size);
    uint8_t mode = in_u8(&in);
    uint8_t tf = in_u8(&in), rf = in_u8(&in);
    /* TX device: what the guest may ask of us (CSUM, HOST_TSO*, HOST_ECN). */
    uint64_t txf = (tf & 1 ? 1ULL << VIRTIO_NET_F_MRG_RXBUF : 0) | (tf & 2 ? 1ULL << VIRTIO_F_VERSION_1 : 0) |
                   (tf & 4 ? 1ULL << VIRTIO_RING_F_EVENT_IDX : 0) | (tf & 8 ? 1ULL << VIRTIO_RING_F_INDIRECT_DESC : 0) |
                   (tf & 16 ? 1ULL << 0 : 0) | (tf & 32 ? 1ULL << 11 : 0) | (tf & 64 ? 1ULL << 12 : 0) |
                   (tf & 128 ? 1ULL << 13 : 0);
    /* RX device: what the guest takes (GUEST_CSUM, GUEST_TSO*, GUEST_ECN). */
    uint64_t rxf = (rf & 1 ? 1ULL << VIRTIO_NET_F_MRG_RXBUF : 0) | (rf & 2 ? 1ULL << VIRTIO_F_VERSION_1 : 0) |
                   (rf & 4 ? 1ULL << VIRTIO_RING_F_EVENT_IDX : 0) | (rf & 8 ? 1ULL << VIRTIO_RING_F_INDIRECT_DESC : 0) |
                   (rf & 16 ? 1ULL << 1 : 0) | (rf & 32 ? 1ULL << 7 : 0) | (rf & 64 ? 1ULL << 8 : 0) |
                   (rf & 128 ? 1ULL << 9 : 0);
    /* FUZZ_RACE_ONLY=1: every input races (to hunt double fetches). */
    static int race_only = -1;
    if (race_only < 0) {
        race_only = getenv("FUZZ_RACE_ONLY") != NULL;
    }
    bool racing = race_only || (mode & 15) == 15;
    /* Packed rings: modes 11 and 12 (no seed in fuzz/corpus uses them), and half of the races. */
    bool packed = racing ? (mode & 32) != 0 : (mode & 15) == 11 || (mode & 15) == 12;
    guest_build(&txg, &in, false, txf, packed);
    guest_build(&rxg, &in, true, rxf, packed);
    stats.packed_inputs += packed;
    /* Many rounds per input: building the guests costs more than a burst. */
    uint32_t rounds = racing ? 64 : 16 + (mode >> 4) % 49;
    if (racing) {
        race_arm(&txg, &rxg, in.rng ^ (uint64_t)size, mode & 16);
        stats.race_inputs++;
    }
    for (uint32_t r = 0; r < rounds; r++) {
        if (!racing && !vs_vring_is_enabled(txg.vr) && !vs_vring_is_enabled(rxg.vr)) {
            break;                              /* both rings stopped: nothing more can happen */
        }
        uint8_t burst = in_u8(&in);
        pmd_pass(&txg, &rxg, burst & 0x80 ? VS_BURST : 1 + burst % VS_BURST, racing);
        if (!racing) {
            /* The guest makes more buffers available, plausibly or not. */
            repost(&txg, &in);
            repost(&rxg, &in);
        }
    }
    if (racing) {
        race_disarm();
    }
    guest_free(&txg);
    guest_free(&rxg);
    stats.inputs++;
    if ((stats.inputs & 0xff) == 0) {
        /* About once a second, so a run stopped from outside leaves its counts. */
        static time_t last;
        time_t now = time(NULL);
        if (now != last) {
            last = now;
            write_stats();
        }
    }
    return 0;
}
