/*
 * Private header of the C fast path: system headers, then every public
 * header in the order cffi reads them, then small inline helpers.
 */
#ifndef VSWITCH_H
#define VSWITCH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "pmd/packet.h"
#include "vhost/virtio.h"
#include "vhost/packed_ring.h"
#include "vhost/dirty_log.h"
#include "ports/port.h"
#include "pmd/capture.h"
#include "vhost/virtqueue.h"
#include "vhost/iotlb.h"
#include "vhost/guestmem.h"
#include "vhost/port_ops.h"
#include "pmd/offload.h"
#include "ports/kernel.h"
#include "ports/null.h"
#include "ports/af_xdp.h"
#include "ports/vxlan.h"
#include "fib/fib.h"
#include "pmd/pmd.h"
#include "pmd/copy_bench.h"
#include "pmd/core_probe.h"

#define likely(x) __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)

static inline void vs_spin_lock(int *lock)
{
    while (__atomic_exchange_n(lock, 1, __ATOMIC_ACQUIRE)) {
        while (__atomic_load_n(lock, __ATOMIC_RELAXED)) {
            __builtin_ia32_pause();
        }
    }
}

static inline void vs_spin_unlock(int *lock)
{
    __atomic_store_n(lock, 0, __ATOMIC_RELEASE);
}

/*
 * Copies n bytes the guest may be rewriting into dst, exactly once.  The
 * empty asm claims to change dst, so the compiler can neither read the
 * guest's bytes again in place of the copy nor drop the copy.  vs_keep_copy
 * alone does the same for a copy made piece by piece.
 */
#define vs_keep_copy(dst, n) __asm__("" : "+m"(*(uint8_t (*)[n])(void *)(dst)))
#define vs_copy_once(dst, src, n) do {                                    \
        memcpy((dst), (src), (n));                                        \
        vs_keep_copy((dst), n);                                           \
    } while (0)

static inline uint64_t vs_rdtsc(void)
{
    return __builtin_ia32_rdtsc();
}

/* The entry for key in bucket, or VS_FIB_NONE; *probes is the number of
 * entries compared (on a miss, the bucket's length, never more than
 * VS_FIB_MAX_CHAIN).  Here, not in fib.c, so that the PMD's check for a
 * known source inlines it.  The caller holds the table's lock. */
static inline uint32_t vs_fib_find_in_bucket(const struct vs_fib *fib, uint32_t bucket, uint64_t key,
                                             uint32_t *probes)
{
    uint32_t i = fib->buckets[bucket], n = 0;
    while (i != VS_FIB_NONE) {
        n++;
        if (fib->entries[i].key == key) {
            break;
        }
        i = fib->entries[i].hash_next;
    }
    *probes = n;
    return i;
}

/* What vs_fib_learn_at(fib, key, bucket, entry, port_no, sub, now) needs:
 * key's entry in bucket, or VS_FIB_NONE; or VS_FIB_NOOP if that learn would
 * change nothing (key is static, or known behind port_no and sub and
 * already seen in second now).  Most frames of many sources are a no-op,
 * and this answers them without a call or a store; a known source the
 * learn must change (moved, or seen in a new second) walks its bucket once.
 * The caller holds the lock until the learn. */
static inline uint32_t vs_fib_learn_check(const struct vs_fib *fib, uint64_t key, uint32_t bucket,
                                          uint32_t port_no, uint16_t sub, uint64_t now)
{
    uint32_t probes;
    uint32_t i = vs_fib_find_in_bucket(fib, bucket, key, &probes);
    if (i == VS_FIB_NONE) {
        return i;
    }
    const struct vs_fib_entry *e = &fib->entries[i];
    bool noop = (e->flags & VS_FIB_F_STATIC) ||
                (e->port_no == port_no && e->sub == sub && e->last_seen == (uint32_t)now);
    return noop ? VS_FIB_NOOP : i;
}

#endif
