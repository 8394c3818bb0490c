/*
 * The copy's own speed limit (tools/copy_bench.py, README "The switch's own
 * cost"): TSC cycles for a number of copies of one frame size, by libc's
 * memcpy or by the routine that copies a frame into a guest's buffers
 * (vs_vq_copy_frame: a 12-byte virtio-net header, then the frame), from
 * and to buffers in the cache (warm: the same two buffers every time) or
 * not (cold: each copy from and to buffers of their own, flushed from the
 * caches, taken in a random order).
 *
 * No #include: cffi reads this file.
 */

#define VS_COPY_MEMCPY 0
#define VS_COPY_FRAME 1
#define VS_COPY_MAX_SIZE 9216        /* the largest frame size measured */
#define VS_COPY_MAX_OFFSET 2048
#define VS_COPY_POOL_BYTES 134217728 /* each cold pool (source, destination): 128 MiB */

struct vs_copy_bench {
    uint32_t size;               /* frame bytes, 1 .. VS_COPY_MAX_SIZE */
    uint32_t routine;            /* VS_COPY_* */
    uint32_t cold;               /* 1: buffers not in the cache */
    uint32_t copies;             /* cold: at most one per buffer of the pools (lowered to that) */
    /* Bytes the destination starts past the source's offset in its page
     * (0 .. VS_COPY_MAX_OFFSET), the virtio-net header's 12 not counted:
     * a copy's speed can depend on it. */
    uint32_t dst_offset;
    uint64_t cycles;             /* out: TSC cycles for all the copies */
    uint64_t bytes;              /* out: bytes copied (the header too) */
};

/* 0, -EINVAL (bad settings), -ENOMEM, or -EIO if a copy came out wrong. */
int vs_copy_bench_run(struct vs_copy_bench *b);
