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
#include "vhost/virtqueue.h"
#include "vhost/guestmem.h"
#include "pmd/offload.h"
#include "ports/kernel.h"
#include "ports/port.h"
#include "fib/fib.h"
#include "pmd/pmd.h"

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

static inline uint64_t vs_rdtsc(void)
{
    return __builtin_ia32_rdtsc();
}

#endif
