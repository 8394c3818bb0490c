/*
 * Dirty page logging for live migration (vhost-user.rst, "Migration").
 *
 * While the front-end migrates a guest it copies guest memory in rounds and
 * asks every writer of that memory which pages changed since.  The switch
 * writes guest memory too (receive buffers, used rings, packed descriptors),
 * so once VHOST_F_LOG_ALL is negotiated and SET_LOG_BASE gave it the
 * front-end's bitmap, it sets one bit per 4 KiB page of guest-physical
 * address for every page it writes, after the write, with an atomic OR (the
 * front-end clears bits concurrently).  The ring engines call in here only
 * when vs_vhost_dev.log is set: the cost without logging is one branch.
 *
 * Addresses: a buffer's host address is turned back into a guest-physical
 * one through the device's memory table, so the bit is right whatever
 * translated the buffer's address first.  A split ring's used ring is
 * logged at the guest-physical address SET_VRING_ADDR gave with
 * VHOST_VRING_F_LOG (log_guest_addr), as the spec asks.
 *
 * cdef-clean: no #include, integer #defines only.
 */

#define VS_LOG_PAGE_SHIFT 12          /* one bit per 4 KiB page */

struct vs_dirty_log {
    uint8_t *bitmap;                  /* control: the front-end's log (after its mmap offset) */
    uint64_t size;                    /* control: bytes in bitmap */
    uint64_t bits_set;                /* shared, atomic: bits this switch set (not already set) */
    uint64_t outside;                 /* shared, atomic: writes past the bitmap or outside guest memory */
};

struct vs_vhost_dev;
struct vs_vring;
struct vs_seg;

/* Control plane: the bytes of bitmap a guest-physical space of `gpa_end` bytes needs. */
uint64_t vs_dirty_log_bytes_for(uint64_t gpa_end);

/* Fast path, only with dev->log set. */
void vs_dirty_log_gpa(struct vs_dirty_log *log, uint64_t gpa, uint64_t len);
void vs_dirty_log_hva(const struct vs_vhost_dev *dev, const void *hva, uint64_t len);
/* The first `len` bytes of a list of guest buffer pieces (a received frame). */
void vs_dirty_log_segs(const struct vs_vhost_dev *dev, const struct vs_seg *segs, uint64_t len);
/* Bytes [offset, offset+len) of a split ring's used ring. */
void vs_dirty_log_used(const struct vs_vhost_dev *dev, const struct vs_vring *vr, uint64_t offset, uint64_t len);
/* count used entries of a split ring from index first, and its used index. */
void vs_dirty_log_split_used(const struct vs_vhost_dev *dev, const struct vs_vring *vr, uint16_t first,
                             uint32_t count);
/* A packed ring's descriptors from slot first up to (not including) slot end; all of them if equal. */
void vs_dirty_log_packed_descs(const struct vs_vhost_dev *dev, const struct vs_vring *vr, uint16_t first,
                               uint16_t end);
