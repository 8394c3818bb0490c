/*
 * MAC learning table (see fib.h for the semantics).
 *
 * Entries live in one preallocated array; a bucket array of chain heads
 * finds them by key, and each port keeps a doubly linked list of its dynamic
 * entries, least recently seen first, which makes aging and fair eviction
 * O(1) per entry.  Why C: the PMD learns and looks up on every frame, and
 * a Python dict behind the GIL would cost more than the frame copy.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <time.h>
#include <wmmintrin.h>

#include "vswitch.h"

#define NONE VS_FIB_NONE

uint64_t vs_now_sec(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (uint64_t)ts.tv_sec;
}

uint64_t vs_fib_key(const uint8_t *mac, uint16_t vlan)
{
    uint64_t key = 0;
    for (int i = 0; i < 6; i++) {
        key = (key << 8) | mac[i];
    }
    return key | ((uint64_t)(vlan & 0xfff) << 48);
}

/*
 * The bucket hash is keyed: any hash an attacker can compute lets a guest
 * send source MACs that all land in one bucket (an unkeyed multiply put
 * 8000 of them in one chain and made each lookup 30 to 40 times slower).
 * A burst of many sources spends most of its table work hashing, so where
 * the CPU has AES-NI the hash is three AES rounds under four random round
 * keys, as Go's runtime hashes its maps' 8-byte keys: about 7 instructions
 * a key.  Three rounds diffuse every input bit over the whole block
 * twice, the output never leaves the switch, and the chain bound
 * (VS_FIB_MAX_CHAIN) caps what a collision found anyway could cost.
 * Without AES-NI, SipHash-1-3 (a PRF built for short inputs, as Rust's
 * and Python's hash tables use): about 75 instructions a key.  Both are
 * written out, not taken from a library, so that the burst loop inlines
 * them.
 */
#define SIPROUND(v0, v1, v2, v3) do {                                             \
        v0 += v1; v1 = rotl64(v1, 13); v1 ^= v0; v0 = rotl64(v0, 32);             \
        v2 += v3; v3 = rotl64(v3, 16); v3 ^= v2;                                  \
        v0 += v3; v3 = rotl64(v3, 21); v3 ^= v0;                                  \
        v2 += v1; v1 = rotl64(v1, 17); v1 ^= v2; v2 = rotl64(v2, 32);             \
    } while (0)

static inline uint64_t rotl64(uint64_t x, int b)
{
    return (x << b) | (x >> (64 - b));
}

/* SipHash-1-3 (Aumasson and Bernstein) of one 8-byte message, the key as little-endian bytes. */
static inline uint64_t siphash13_u64(const uint64_t key[2], uint64_t m)
{
    uint64_t v0 = key[0] ^ 0x736f6d6570736575ULL, v1 = key[1] ^ 0x646f72616e646f6dULL;
    uint64_t v2 = key[0] ^ 0x6c7967656e657261ULL, v3 = key[1] ^ 0x7465646279746573ULL;
    const uint64_t last = 8ULL << 56;   /* no tail bytes; the length in the top byte */
    v3 ^= m;
    SIPROUND(v0, v1, v2, v3);
    v0 ^= m;
    v3 ^= last;
    SIPROUND(v0, v1, v2, v3);
    v0 ^= last;
    v2 ^= 0xff;
    SIPROUND(v0, v1, v2, v3);
    SIPROUND(v0, v1, v2, v3);
    SIPROUND(v0, v1, v2, v3);
    return v0 ^ v1 ^ v2 ^ v3;
}

/* The message in the low 8 bytes of a block XORed with round key 0, then
 * AESENC (ShiftRows, SubBytes, MixColumns, XOR the round key) under round
 * keys 1, 2 and 3; the hash is the block's low 8 bytes. */
struct aes3_keys {
    __m128i k[4];
};

__attribute__((target("aes")))
static inline struct aes3_keys aes3_load(const uint64_t key[8])
{
    struct aes3_keys r;
    for (int i = 0; i < 4; i++) {
        r.k[i] = _mm_loadu_si128((const __m128i *)&key[2 * i]);
    }
    return r;
}

__attribute__((target("aes")))
static inline uint64_t aes3_u64(const struct aes3_keys *rk, uint64_t m)
{
    __m128i x = _mm_xor_si128(_mm_cvtsi64_si128((long long)m), rk->k[0]);
    x = _mm_aesenc_si128(x, rk->k[1]);
    x = _mm_aesenc_si128(x, rk->k[2]);
    x = _mm_aesenc_si128(x, rk->k[3]);
    return (uint64_t)_mm_cvtsi128_si64(x);
}

__attribute__((target("aes")))
static uint64_t aes3_one(const uint64_t key[8], uint64_t m)
{
    struct aes3_keys rk = aes3_load(key);
    return aes3_u64(&rk, m);
}

uint64_t vs_fib_hash(const struct vs_fib *fib, uint64_t key)
{
    return fib->hash_aes ? aes3_one(fib->hash_key, key) : siphash13_u64(fib->hash_key, key);
}

static inline uint32_t bucket_of(const struct vs_fib *fib, uint64_t key)
{
    return (uint32_t)vs_fib_hash(fib, key) & fib->bucket_mask;
}

/* The keys are independent, so the CPU overlaps their AES rounds. */
__attribute__((target("aes")))
static void aes3_buckets_of(const struct vs_fib *fib, const uint64_t *keys, uint32_t n, uint32_t *buckets)
{
    const struct aes3_keys rk = aes3_load(fib->hash_key);
    const uint32_t mask = fib->bucket_mask;
    uint32_t *heads = fib->buckets;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t b = (uint32_t)aes3_u64(&rk, keys[i]) & mask;
        __builtin_prefetch(&heads[b]);
        buckets[i] = b;
    }
}

void vs_fib_buckets_of(const struct vs_fib *fib, const uint64_t *keys, uint32_t n, uint32_t *buckets)
{
    if (fib->hash_aes) {
        aes3_buckets_of(fib, keys, n, buckets);
        return;
    }
    /* vs_fib_prefetch_bucket's work, with the choice of hash made once for the loop. */
    for (uint32_t i = 0; i < n; i++) {
        buckets[i] = (uint32_t)siphash13_u64(fib->hash_key, keys[i]) & fib->bucket_mask;
        __builtin_prefetch(&fib->buckets[buckets[i]]);
    }
}

/* A fresh key per table, so collisions found in one run say nothing about the next. */
static bool random_key(uint8_t *p, size_t size)
{
    size_t got = 0;
    while (got < size) {
        ssize_t n = getrandom(p + got, size - got, 0);
        if (n < 0 && errno != EINTR) {
            return false;
        }
        got += n > 0 ? (size_t)n : 0;
    }
    return true;
}

/*
 * A large table's bucket heads and entries are read at random, a cache
 * miss each, and with 4 KiB pages a TLB miss each too (a page walk before
 * the miss itself).  So an array of 2 MiB or more is mapped on a 2 MiB
 * boundary and offered to transparent huge pages, as DPDK puts its tables
 * in huge pages: at a million MACs this took the PMD from 3.0-3.2x to
 * 2.65-2.84x the cycles a frame of two MACs (README "Latency and
 * scale").  Only a hint: without THP the pages stay small.  As with
 * calloc, pages never touched take no memory.
 */
#define HUGE_PAGE ((size_t)2 << 20)

static size_t huge_round(size_t size)
{
    return (size + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1);
}

_Static_assert(sizeof(struct vs_fib_entry) == 32, "an entry is half a cache line");
_Static_assert(VS_MAX_PORTS <= 65536, "vs_fib_entry.port_no is 16 bits");

#define CACHE_LINE 64

/* Zeroed and aligned to a cache line, so that no entry straddles two. */
static void *table_alloc(size_t size)
{
    if (size < HUGE_PAGE) {
        size_t len = (size + CACHE_LINE - 1) & ~(size_t)(CACHE_LINE - 1);
        void *p = aligned_alloc(CACHE_LINE, len);
        if (p) {
            memset(p, 0, len);
        }
        return p;
    }
    size_t len = huge_round(size);
    uint8_t *p = mmap(NULL, len + HUGE_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        return NULL;
    }
    uint8_t *a = (uint8_t *)(((uintptr_t)p + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1));
    if (a > p) {
        munmap(p, (size_t)(a - p));
    }
    munmap(a + len, (size_t)(p + HUGE_PAGE - a));   /* a < p + HUGE_PAGE: never empty */
    madvise(a, len, MADV_HUGEPAGE);
    return a;
}

static void table_free(void *p, size_t size)
{
    if (p && size < HUGE_PAGE) {
        free(p);
    } else if (p) {
        munmap(p, huge_round(size));
    }
}

struct vs_fib *vs_fib_create(uint32_t capacity, uint32_t max_entries, uint32_t aging_seconds)
{
    if (capacity == 0 || max_entries > capacity || capacity > VS_FIB_MAX_CAPACITY) {
        return NULL;
    }
    struct vs_fib *fib = calloc(1, sizeof *fib);
    if (!fib) {
        return NULL;
    }
    uint32_t nbuckets = 1;
    while (nbuckets < capacity * 2) {
        nbuckets <<= 1;
    }
    fib->capacity = capacity;
    fib->bucket_mask = nbuckets - 1;
    fib->buckets = table_alloc(nbuckets * sizeof *fib->buckets);
    fib->entries = table_alloc(capacity * sizeof *fib->entries);
    if (!fib->buckets || !fib->entries || !random_key((uint8_t *)fib->hash_key, sizeof fib->hash_key)) {
        vs_fib_destroy(fib);
        return NULL;
    }
    fib->hash_aes = __builtin_cpu_supports("aes") ? 1 : 0;
    fib->max_entries = max_entries;
    fib->aging_seconds = aging_seconds;
    for (uint32_t i = 0; i < nbuckets; i++) {
        fib->buckets[i] = NONE;
    }
    fib->free_head = NONE;
    fib->next_fresh = 0;
    for (uint32_t p = 0; p < VS_MAX_PORTS; p++) {
        fib->lru_head[p] = fib->lru_tail[p] = NONE;
    }
    return fib;
}

void vs_fib_destroy(struct vs_fib *fib)
{
    if (fib) {
        table_free(fib->buckets, ((size_t)fib->bucket_mask + 1) * sizeof *fib->buckets);
        table_free(fib->entries, (size_t)fib->capacity * sizeof *fib->entries);
        free(fib);
    }
}

/*
 * A ticket lock, first come first served: when the control plane lets go
 * between steps of a long job and asks again, a PMD already waiting goes
 * first.  With a plain test-and-set lock the releasing thread usually wins
 * the race again, and the PMD would wait for the whole job.
 */
void vs_fib_lock(struct vs_fib *fib)
{
    uint32_t ticket = __atomic_fetch_add(&fib->lock_next, 1, __ATOMIC_RELAXED);
    if (likely(__atomic_load_n(&fib->lock_owner, __ATOMIC_ACQUIRE) == ticket)) {
        fib->stats.lock_acquired++;   /* we hold the lock: no other writer */
        return;
    }
    /* Contended: time the wait, the stall a lock holder causes. */
    uint64_t start = vs_rdtsc();
    while (__atomic_load_n(&fib->lock_owner, __ATOMIC_ACQUIRE) != ticket) {
        __builtin_ia32_pause();
    }
    uint64_t waited = vs_rdtsc() - start;
    fib->stats.lock_acquired++;
    fib->stats.lock_contended++;
    fib->stats.lock_wait_cycles += waited;
    uint32_t bucket = 63 - (uint32_t)__builtin_clzll(waited | 1);
    fib->stats.lock_wait_log2[bucket < VS_FIB_WAIT_BUCKETS ? bucket : VS_FIB_WAIT_BUCKETS - 1]++;
    if (waited > fib->stats.lock_wait_max) {
        fib->stats.lock_wait_max = waited;   /* we hold the lock: no other writer */
    }
}

void vs_fib_unlock(struct vs_fib *fib)
{
    __atomic_store_n(&fib->lock_owner, fib->lock_owner + 1, __ATOMIC_RELEASE);
}

/*
 * The control plane's long jobs hold the lock in steps: job_begin takes it,
 * job_step lets a waiting PMD in and takes it back, job_end lets go.  Each
 * step's CPU time is kept in stats.hold_cpu_max_ns, read from the thread's
 * own clock so that a preemption of the holder does not count as work.
 */
static uint64_t thread_cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static uint64_t job_begin(struct vs_fib *fib)
{
    vs_fib_lock(fib);
    return thread_cpu_ns();
}

static void job_end(struct vs_fib *fib, uint64_t held_since)
{
    uint64_t held = thread_cpu_ns() - held_since;
    if (held > fib->stats.hold_cpu_max_ns) {
        fib->stats.hold_cpu_max_ns = held;
    }
    vs_fib_unlock(fib);
}

static uint64_t job_step(struct vs_fib *fib, uint64_t held_since)
{
    job_end(fib, held_since);
    return job_begin(fib);
}

static inline uint32_t find_counted(const struct vs_fib *fib, uint64_t key, uint32_t *probes)
{
    return vs_fib_find_in_bucket(fib, bucket_of(fib, key), key, probes);
}

static uint32_t find(const struct vs_fib *fib, uint64_t key)
{
    uint32_t probes;
    return find_counted(fib, key, &probes);
}

static void lru_unlink(struct vs_fib *fib, uint32_t i)
{
    struct vs_fib_entry *e = &fib->entries[i];
    if (e->lru_prev != NONE) {
        fib->entries[e->lru_prev].lru_next = e->lru_next;
    } else {
        fib->lru_head[e->port_no] = e->lru_next;
    }
    if (e->lru_next != NONE) {
        fib->entries[e->lru_next].lru_prev = e->lru_prev;
    } else {
        fib->lru_tail[e->port_no] = e->lru_prev;
    }
    e->lru_prev = e->lru_next = NONE;
}

static void lru_append(struct vs_fib *fib, uint32_t i)
{
    struct vs_fib_entry *e = &fib->entries[i];
    uint32_t tail = fib->lru_tail[e->port_no];
    e->lru_prev = tail;
    e->lru_next = NONE;
    if (tail != NONE) {
        fib->entries[tail].lru_next = i;
    } else {
        fib->lru_head[e->port_no] = i;
    }
    fib->lru_tail[e->port_no] = i;
}

static void remove_entry(struct vs_fib *fib, uint32_t i)
{
    struct vs_fib_entry *e = &fib->entries[i];
    uint32_t *link = &fib->buckets[bucket_of(fib, e->key)];
    while (*link != i) {
        link = &fib->entries[*link].hash_next;
    }
    *link = e->hash_next;
    if (!(e->flags & VS_FIB_F_STATIC)) {
        lru_unlink(fib, i);
        fib->port_count[e->port_no]--;
    }
    e->in_use = 0;
    e->lru_next = fib->free_head;
    fib->free_head = i;
    fib->n_entries--;
}

/* Frees one dynamic entry: the oldest of the port that holds the most. */
static bool evict_one(struct vs_fib *fib)
{
    uint32_t victim_port = 0, most = 0;
    for (uint32_t p = 0; p < VS_MAX_PORTS; p++) {
        if (fib->port_count[p] > most) {
            most = fib->port_count[p];
            victim_port = p;
        }
    }
    if (most == 0) {
        return false;
    }
    remove_entry(fib, fib->lru_head[victim_port]);
    fib->stats.evicted++;
    return true;
}

/* Adds key, known to be absent from a bucket of chain_len entries; NONE if
 * the bucket is full or no entry can be freed. */
static uint32_t insert(struct vs_fib *fib, uint64_t key, uint32_t chain_len, uint32_t port_no, uint32_t flags,
                       uint64_t now)
{
    if (unlikely(chain_len >= VS_FIB_MAX_CHAIN)) {
        fib->stats.refused++;
        return NONE;
    }
    /* One eviction makes room in a full table; a second one per learn
     * helps vs_fib_set_max() shrink it without this PMD's learn doing all
     * of that work under the lock. */
    for (int k = 0; k < 2 && fib->n_entries >= fib->max_entries; k++) {
        if (!evict_one(fib)) {
            break;
        }
    }
    if (fib->n_entries >= fib->max_entries) {
        return NONE;
    }
    uint32_t i = fib->free_head;
    if (i != NONE) {
        fib->free_head = fib->entries[i].lru_next;
    } else {
        i = fib->next_fresh++;   /* n_entries < capacity and no entry free: one was never used */
    }
    struct vs_fib_entry *e = &fib->entries[i];
    uint32_t b = bucket_of(fib, key);
    *e = (struct vs_fib_entry){
        .key = key, .last_seen = (uint32_t)now, .port_no = (uint16_t)port_no, .flags = (uint8_t)flags,
        .hash_next = fib->buckets[b], .lru_prev = NONE, .lru_next = NONE, .in_use = 1,
    };
    fib->buckets[b] = i;
    fib->n_entries++;
    if (!(flags & VS_FIB_F_STATIC)) {
        lru_append(fib, i);
        fib->port_count[port_no]++;
    }
    return i;
}

void vs_fib_learn(struct vs_fib *fib, uint64_t key, uint32_t port_no, uint64_t now)
{
    vs_fib_learn_sub(fib, key, port_no, 0, now);
}

int vs_fib_learn_sub(struct vs_fib *fib, uint64_t key, uint32_t port_no, uint16_t sub, uint64_t now)
{
    return vs_fib_learn_sub_bucket(fib, key, bucket_of(fib, key), port_no, sub, now);
}

/* The learn once key's bucket is walked: i is key's entry, or NONE and the
 * bucket holds chain_len entries. */
static inline int learn(struct vs_fib *fib, uint64_t key, uint32_t i, uint32_t chain_len, uint32_t port_no,
                        uint16_t sub, uint64_t now)
{
    if (likely(i != NONE)) {
        struct vs_fib_entry *e = &fib->entries[i];
        if (e->flags & VS_FIB_F_STATIC) {
            return 0;
        }
        if (unlikely(e->port_no != port_no)) {
            lru_unlink(fib, i);
            fib->port_count[e->port_no]--;
            e->port_no = (uint16_t)port_no;
            e->sub = sub;
            fib->port_count[port_no]++;
            e->last_seen = (uint32_t)now;
            lru_append(fib, i);
            fib->stats.moved++;
            return 1;
        } else if (unlikely(e->sub != sub)) {
            /* Behind another remote of the same tunnel port: moved too. */
            e->sub = sub;
            e->last_seen = (uint32_t)now;
            lru_unlink(fib, i);
            lru_append(fib, i);
            fib->stats.moved++;
            return 1;
        } else if (e->last_seen != (uint32_t)now) {
            /* Refresh at most once a second: the list moves are not free. */
            e->last_seen = (uint32_t)now;
            lru_unlink(fib, i);
            lru_append(fib, i);
        }
        return 0;
    }
    if (port_no < VS_MAX_PORTS && fib->max_entries) {
        i = insert(fib, key, chain_len, port_no, 0, now);
        if (i != NONE) {
            fib->entries[i].sub = sub;
            fib->stats.learned++;
        }
        return 1;
    }
    return 0;
}

int vs_fib_learn_sub_bucket(struct vs_fib *fib, uint64_t key, uint32_t bucket, uint32_t port_no, uint16_t sub,
                            uint64_t now)
{
    uint32_t chain_len;
    uint32_t i = vs_fib_find_in_bucket(fib, bucket, key, &chain_len);
    return learn(fib, key, i, chain_len, port_no, sub, now);
}

int vs_fib_learn_at(struct vs_fib *fib, uint64_t key, uint32_t bucket, uint32_t entry, uint32_t port_no,
                    uint16_t sub, uint64_t now)
{
    uint32_t chain_len = 0;
    if (entry == NONE) {
        /* A new key: the bucket is walked again to count it, since counting
         * in vs_fib_learn_check would cost every known source more. */
        vs_fib_find_in_bucket(fib, bucket, key, &chain_len);
    }
    return learn(fib, key, entry, chain_len, port_no, sub, now);
}

int vs_fib_lookup_sub(struct vs_fib *fib, uint64_t key, uint16_t *sub)
{
    uint32_t probes;
    uint32_t i = find_counted(fib, key, &probes);
    fib->stats.lookups++;
    fib->stats.probes += probes;
    if (i == NONE) {
        *sub = 0;
        return VS_FIB_NO_PORT;
    }
    fib->stats.hits++;
    *sub = fib->entries[i].sub;
    return (int)fib->entries[i].port_no;
}

uint32_t vs_fib_prefetch_bucket(const struct vs_fib *fib, uint64_t key)
{
    uint32_t b = bucket_of(fib, key);
    __builtin_prefetch(&fib->buckets[b]);
    return b;
}

void vs_fib_prefetch_entry(const struct vs_fib *fib, uint32_t bucket)
{
    /* Read without the lock: a stale index only prefetches the wrong line. */
    uint32_t i = __atomic_load_n(&fib->buckets[bucket], __ATOMIC_RELAXED);
    if (i < fib->capacity) {
        __builtin_prefetch(&fib->entries[i]);
    }
}

int vs_fib_lookup(struct vs_fib *fib, uint64_t key)
{
    uint16_t sub;
    return vs_fib_lookup_sub(fib, key, &sub);
}

int vs_fib_lookup_locked(struct vs_fib *fib, uint64_t key)
{
    vs_fib_lock(fib);
    uint32_t i = find(fib, key);
    int port = i == NONE ? VS_FIB_NO_PORT : (int)fib->entries[i].port_no;
    vs_fib_unlock(fib);
    return port;
}

void vs_fib_learn_locked(struct vs_fib *fib, uint64_t key, uint32_t port_no)
{
    vs_fib_learn_sub_locked(fib, key, port_no, 0);
}

void vs_fib_learn_sub_locked(struct vs_fib *fib, uint64_t key, uint32_t port_no, uint16_t sub)
{
    vs_fib_lock(fib);
    vs_fib_learn_sub(fib, key, port_no, sub, vs_now_sec());
    vs_fib_unlock(fib);
}

int vs_fib_add_static(struct vs_fib *fib, uint64_t key, uint32_t port_no)
{
    if (port_no >= VS_MAX_PORTS) {
        return -1;
    }
    vs_fib_lock(fib);
    uint32_t chain_len;
    uint32_t i = find_counted(fib, key, &chain_len);
    if (i != NONE) {
        remove_entry(fib, i);
        chain_len = 0;   /* it takes the place of the entry it replaces */
    }
    i = insert(fib, key, chain_len, port_no, VS_FIB_F_STATIC, vs_now_sec());
    vs_fib_unlock(fib);
    return i == NONE ? -1 : 0;
}

int vs_fib_remove(struct vs_fib *fib, uint64_t key)
{
    vs_fib_lock(fib);
    uint32_t i = find(fib, key);
    if (i != NONE) {
        remove_entry(fib, i);
    }
    vs_fib_unlock(fib);
    return i == NONE ? -1 : 0;
}

uint32_t vs_fib_flush(struct vs_fib *fib, int port_no, int vlan, int include_static)
{
    uint32_t removed = 0;
    uint32_t i = 0;
    uint64_t held = job_begin(fib);
    while (i < fib->next_fresh) {
        uint32_t work = 0;
        for (uint32_t scanned = 0; i < fib->next_fresh && scanned < VS_FIB_SCAN_PER_LOCK &&
             work < VS_FIB_WORK_PER_LOCK; i++, scanned++) {
            struct vs_fib_entry *e = &fib->entries[i];
            if (e->in_use && (port_no < 0 || e->port_no == (uint32_t)port_no) &&
                (vlan < 0 || (e->key >> 48) == (uint64_t)vlan) &&
                (include_static || !(e->flags & VS_FIB_F_STATIC))) {
                remove_entry(fib, i);
                work++;
            }
        }
        removed += work;
        held = job_step(fib, held);
    }
    job_end(fib, held);
    return removed;
}

uint32_t vs_fib_age(struct vs_fib *fib, uint64_t now)
{
    return vs_fib_age_some(fib, now, UINT32_MAX);
}

uint32_t vs_fib_age_some(struct vs_fib *fib, uint64_t now, uint32_t budget)
{
    uint32_t aged = 0, work = 0;
    uint64_t held = job_begin(fib);
    for (uint32_t p = 0; p < VS_MAX_PORTS && aged < budget; p++) {
        /* Lists are oldest first: stop at the first entry still fresh. */
        while (aged < budget && fib->lru_head[p] != NONE &&
               (uint64_t)fib->entries[fib->lru_head[p]].last_seen + fib->aging_seconds <= now) {
            remove_entry(fib, fib->lru_head[p]);
            aged++;
            fib->stats.aged++;
            if (++work == VS_FIB_WORK_PER_LOCK) {
                /* A million entries idle at once must not hold the PMDs up. */
                held = job_step(fib, held);
                work = 0;
            }
        }
    }
    job_end(fib, held);
    return aged;
}

uint32_t vs_fib_dump(struct vs_fib *fib, struct vs_fib_entry *out, uint32_t max)
{
    uint32_t n = 0;
    uint64_t held = job_begin(fib);
    for (uint32_t i = 0; i < fib->next_fresh && n < max; i++) {
        if (fib->entries[i].in_use) {
            out[n++] = fib->entries[i];
        }
        if (i % VS_FIB_SCAN_PER_LOCK == VS_FIB_SCAN_PER_LOCK - 1) {
            held = job_step(fib, held);
        }
    }
    job_end(fib, held);
    return n;
}

int vs_fib_set_max(struct vs_fib *fib, uint32_t max_entries)
{
    if (max_entries > fib->capacity) {
        return -1;
    }
    uint64_t held = job_begin(fib);
    fib->max_entries = max_entries;
    uint32_t work = 0;
    while (fib->n_entries > fib->max_entries && evict_one(fib)) {
        if (++work == VS_FIB_WORK_PER_LOCK) {
            held = job_step(fib, held);
            work = 0;
        }
    }
    job_end(fib, held);
    return 0;
}
