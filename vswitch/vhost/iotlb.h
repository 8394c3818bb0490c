/*
 * The IOTLB of a vhost-user device whose guest uses a vIOMMU
 * (VIRTIO_F_ACCESS_PLATFORM negotiated; vhost-user.rst, "IOMMU support").
 * Descriptor and ring addresses are then I/O virtual addresses (IOVAs): the
 * front-end tells us which IOVA ranges map where in its address space (UVA)
 * and with which access (VHOST_USER_IOTLB_MSG UPDATE / INVALIDATE), and we
 * ask it for a range we lack (a MISS on the back-end request channel).
 *
 * The table is a sorted array of non-overlapping entries, written by the
 * control plane only, read by the PMDs under a sequence counter (seq: odd
 * while a change is under way; a reader that sees it move looks again).
 * Every change also takes a new, globally unique generation number (gen):
 * each PMD thread caches its last few translations tagged with the
 * generation they came from, and drops them when it differs, so a change is
 * seen by the next lookup.  An INVALIDATE is acknowledged only after the
 * PMDs have passed a quiescent point (vswitch/vhost/iotlb.py), so no burst
 * still uses what it took away.  A lookup that finds nothing records the
 * miss in the table and wakes the control plane (the guestmem eventfd),
 * which sends the MISS; the ring stops where it is and tries again on its
 * next burst.
 *
 * An entry holds a UVA, never a host pointer: each lookup goes through the
 * device's current memory table, so a region that went away is never
 * touched (the lookup fails as "outside guest memory").
 *
 * cdef-clean: no #include.
 */

#define VS_IOTLB_MAX_ENTRIES 4096    /* a full table forgets its oldest entry: a later lookup misses */
#define VS_IOTLB_CACHE_SIZE 4        /* translations each PMD thread keeps */
#define VS_IOTLB_PROBE_DEPTH 16      /* receive buffers looked up ahead of the frames (vs_iotlb_probe_rx) */
#define VS_IOTLB_MISS_SLOTS 16       /* misses recorded at once, for the control plane to send together */

/* vhost_iotlb_msg.perm */
#define VS_IOTLB_ACCESS_RO 1         /* the device may read */
#define VS_IOTLB_ACCESS_WO 2         /* the device may write */
#define VS_IOTLB_ACCESS_RW 3

/* vhost_iotlb_msg.type */
#define VS_IOTLB_MSG_MISS 1
#define VS_IOTLB_MSG_UPDATE 2
#define VS_IOTLB_MSG_INVALIDATE 3
#define VS_IOTLB_MSG_ACCESS_FAIL 4

/* Why an UPDATE was refused; names in vs_iotlb_error_name(). */
enum vs_iotlb_error {
    VS_IOTLB_OK = 0,
    VS_IOTLB_ERR_SIZE = 1,           /* size 0 */
    VS_IOTLB_ERR_WRAP = 2,           /* iova + size or uaddr + size wraps around */
    VS_IOTLB_ERR_PERM = 3,           /* access not RO, WO or RW */
    VS_IOTLB_ERR_OVERLAP = 4,        /* overlaps an entry that differs from it */
    VS_IOTLB_ERR_OUTSIDE = 5,        /* the user address range is not all guest memory */
    VS_IOTLB_DUPLICATE = 6,          /* the same entry again (a repeated miss's answer): kept, no error */
    VS_IOTLB_ERR_MAX = 7
};

struct vs_iotlb_entry {
    uint64_t iova;
    uint64_t size;               /* > 0, iova + size does not wrap */
    uint64_t uva;                /* the front-end's address of iova */
    uint32_t perm;               /* VS_IOTLB_ACCESS_* */
    uint32_t pad;
};

/* A miss for the control plane: state 0 free, 2 being written by a PMD, 1 ready. */
struct vs_iotlb_miss {
    uint64_t iova;
    uint32_t perm;
    uint32_t state;
};

struct vs_iotlb {
    uint64_t seq;                /* shared: odd while the control plane changes entries */
    uint64_t gen;                /* shared: changes with every change of the entries */
    uint32_t nentries;           /* control */
    uint32_t evict_next;         /* control: which entry a full table forgets next */
    /* shared: misses for the control plane to send, and the pages recorded in this generation
     * (the same page is not recorded again until the table changes). */
    struct vs_iotlb_miss miss[VS_IOTLB_MISS_SLOTS];
    uint64_t reported_gen;
    uint64_t reported_page[VS_IOTLB_MISS_SLOTS];   /* page | perm in the low bits */
    uint32_t reported_next;
    uint32_t pad;
    /* counters: PMDs (atomics) */
    uint64_t misses;             /* lookups that found no entry */
    uint64_t perm_denied;        /* lookups that found an entry without the access needed */
    uint64_t outside;            /* lookups whose UVA is not guest memory (any more) */
    /* counters: control plane */
    uint64_t updates;
    uint64_t invalidations;
    uint64_t evictions;
    uint64_t refused[VS_IOTLB_ERR_MAX];
    struct vs_iotlb_entry entries[VS_IOTLB_MAX_ENTRIES];
};

/* Control plane. */
void vs_iotlb_init(struct vs_iotlb *tlb);
const char *vs_iotlb_error_name(uint32_t err);
/* Adds an entry: enum vs_iotlb_error (VS_IOTLB_OK or VS_IOTLB_DUPLICATE on success). */
int vs_iotlb_update(struct vs_iotlb *tlb, const struct vs_memtable *mem,
                    uint64_t iova, uint64_t size, uint64_t uva, uint32_t perm);
/* Removes every entry overlapping [iova, iova + size); a range that wraps runs to the end of the
 * IOVA space.  Returns how many went.  The caller waits for the PMDs before it acknowledges. */
uint32_t vs_iotlb_invalidate(struct vs_iotlb *tlb, uint64_t iova, uint64_t size);
/* Makes every PMD thread drop its cached translations (the memory table changed). */
void vs_iotlb_flush_caches(struct vs_iotlb *tlb);
/* The UVA of [iova, iova + len) if the entries map it all, contiguously in UVA, with access perm;
 * else 0 and *missing is the first IOVA without an entry (or one without perm: *missing_perm 0). */
uint64_t vs_iotlb_translate_uva(struct vs_iotlb *tlb, uint64_t iova, uint64_t len, uint32_t perm,
                                uint64_t *missing, uint32_t *missing_perm);
/* Takes a recorded miss: 1 and its iova and perm, or 0 if none is left. */
int vs_iotlb_take_miss(struct vs_iotlb *tlb, uint64_t *iova, uint32_t *perm);

/* Fast path (ring engines, through ring_internal.h). */
uint8_t *vs_iotlb_to_hva(const struct vs_vhost_dev *dev, uint64_t iova, uint32_t perm, uint64_t *contig);
/*
 * Looks up the next `depth` buffers the guest has made available on a receive
 * ring, without taking them, so that a miss is asked before a frame needs
 * the buffer: a frame that meets a miss is dropped (the PMD cannot hold it),
 * and a Linux guest flushes its whole IOTLB every few milliseconds.  Several
 * misses may be recorded at once.  Read-only; any thread.
 */
void vs_iotlb_probe_rx(const struct vs_vhost_dev *dev, const struct vs_vring *vr, uint32_t depth);
/* Why the calling thread's last vs_iotlb_to_hva failed: VS_VQ_ERR_IOTLB_MISS, _IOTLB_PERM or _ADDR. */
int vs_iotlb_failure(void);
