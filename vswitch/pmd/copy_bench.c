/*
 * The copy benchmark (copy_bench.h).  Whole loops are timed, not single
 * copies, so that the TSC reads are not part of the figure; an empty asm
 * after each copy keeps the compiler from merging or dropping copies.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <sys/mman.h>

#include "vswitch.h"
#include "vhost/ring_internal.h"

/* Cold buffers start three pages apart, so that no two share a line; a
 * 9216-byte frame 2048 bytes into its buffer, with its header, fits. */
#define COLD_STRIDE 12288

static void *pool(size_t bytes)
{
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        return NULL;
    }
    madvise(p, bytes, MADV_HUGEPAGE);   /* as a guest's memory usually is; a hint only */
    memset(p, 0x5a, bytes);              /* mapped and written before the clock starts */
    return p;
}

static inline void copy_one(uint32_t routine, uint8_t *dst, uint8_t *src, uint32_t size)
{
    if (routine == VS_COPY_MEMCPY) {
        memcpy(dst, src, size);
    } else {
        static const uint8_t hdr[12];
        struct vs_pkt pkt;
        pkt.nsegs = 1;
        pkt.len = size;
        pkt.segs[0].addr = src;
        pkt.segs[0].len = size;
        struct vs_seg seg = { .addr = dst, .len = size + (uint32_t)sizeof hdr };
        vs_vq_copy_frame(&seg, hdr, sizeof hdr, &pkt);
    }
    __asm__ volatile("" ::: "memory");
}

int vs_copy_bench_run(struct vs_copy_bench *b)
{
    if (b->size == 0 || b->size > VS_COPY_MAX_SIZE || b->routine > VS_COPY_FRAME || b->copies == 0 ||
        b->dst_offset > VS_COPY_MAX_OFFSET) {
        return -EINVAL;
    }
    uint32_t hdr = b->routine == VS_COPY_FRAME ? 12 : 0;
    size_t bytes = b->cold ? VS_COPY_POOL_BYTES : COLD_STRIDE;
    uint32_t n_bufs = (uint32_t)(bytes / COLD_STRIDE);
    uint8_t *src = pool(bytes), *dst = pool(bytes);
    uint32_t *order = malloc(sizeof *order * n_bufs);
    int rc = 0;
    if (!src || !dst || !order) {
        rc = -ENOMEM;
        goto out;
    }
    /* A random order (Fisher-Yates, xorshift), so that no prefetcher guesses the next buffer. */
    uint64_t x = 0x9e3779b97f4a7c15ULL;
    for (uint32_t i = 0; i < n_bufs; i++) {
        order[i] = i;
    }
    for (uint32_t i = n_bufs - 1; i > 0; i--) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        uint32_t j = (uint32_t)(x % (i + 1));
        uint32_t tmp = order[i];
        order[i] = order[j];
        order[j] = tmp;
    }
    for (uint32_t i = 0; i < b->size; i++) {
        src[i] = (uint8_t)(i * 7 + 1);   /* buffer 0's frame, checked after the copies */
    }
    if (b->cold) {
        /* Each buffer once, and none of them in any cache: written back and evicted line by line. */
        if (b->copies > n_bufs) {
            b->copies = n_bufs;
        }
        for (size_t off = 0; off < bytes; off += 64) {
            __builtin_ia32_clflush(src + off);
            __builtin_ia32_clflush(dst + off);
        }
        __builtin_ia32_mfence();
    }
    uint64_t start = vs_rdtsc();
    for (uint32_t c = 0, k = 0; c < b->copies; c++) {
        size_t off = (size_t)order[k] * COLD_STRIDE;
        copy_one(b->routine, dst + off + b->dst_offset, src + off, b->size);
        if (++k == n_bufs) {
            k = 0;
        }
    }
    b->cycles = vs_rdtsc() - start;
    b->bytes = (uint64_t)b->copies * (b->size + hdr);
    /* Buffer 0 was copied if copies reached it; check it whole. */
    if (n_bufs == 1 || b->copies >= n_bufs) {
        for (uint32_t i = 0; i < b->size; i++) {
            if (dst[b->dst_offset + hdr + i] != (uint8_t)(i * 7 + 1)) {
                rc = -EIO;
                break;
            }
        }
    }
out:
    free(order);
    if (src) {
        munmap(src, bytes);
    }
    if (dst) {
        munmap(dst, bytes);
    }
    return rc;
}
