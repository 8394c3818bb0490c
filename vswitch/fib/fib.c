/*
 * MAC learning table (see fib.h for the semantics).
 *
 * Entries live in one preallocated array; a bucket array of chain heads
 * finds them by key, and each port keeps a doubly linked list of its dynamic
 * entries, least recently seen first, which makes aging and fair eviction
 * O(1) per entry.  Why C: the PMD learns and looks up on every frame, and
 * a Python dict behind the GIL would cost more than the frame copy.
 */
#include <stdlib.h>
#include <time.h>

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

static inline uint32_t bucket_of(const struct vs_fib *fib, uint64_t key)
{
    /* Fibonacci hashing: the multiply spreads the MAC's low bytes. */
    return (uint32_t)((key * 0x9e3779b97f4a7c15ULL) >> 32) & fib->bucket_mask;
}

struct vs_fib *vs_fib_create(uint32_t capacity, uint32_t max_entries, uint32_t aging_seconds)
{
    if (capacity == 0 || max_entries > capacity || capacity > (1u << 24)) {
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
    fib->buckets = malloc(nbuckets * sizeof *fib->buckets);
    fib->entries = calloc(capacity, sizeof *fib->entries);
    if (!fib->buckets || !fib->entries) {
        vs_fib_destroy(fib);
        return NULL;
    }
    fib->capacity = capacity;
    fib->max_entries = max_entries;
    fib->aging_seconds = aging_seconds;
    fib->bucket_mask = nbuckets - 1;
    for (uint32_t i = 0; i < nbuckets; i++) {
        fib->buckets[i] = NONE;
    }
    for (uint32_t i = 0; i < capacity; i++) {
        fib->entries[i].lru_next = i + 1 < capacity ? i + 1 : NONE;
    }
    fib->free_head = 0;
    for (uint32_t p = 0; p < VS_MAX_PORTS; p++) {
        fib->lru_head[p] = fib->lru_tail[p] = NONE;
    }
    return fib;
}

void vs_fib_destroy(struct vs_fib *fib)
{
    if (fib) {
        free(fib->buckets);
        free(fib->entries);
        free(fib);
    }
}

void vs_fib_lock(struct vs_fib *fib)
{
    vs_spin_lock(&fib->lock);
}

void vs_fib_unlock(struct vs_fib *fib)
{
    vs_spin_unlock(&fib->lock);
}

static uint32_t find(const struct vs_fib *fib, uint64_t key)
{
    uint32_t i = fib->buckets[bucket_of(fib, key)];
    while (i != NONE && fib->entries[i].key != key) {
        i = fib->entries[i].hash_next;
    }
    return i;
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

static uint32_t insert(struct vs_fib *fib, uint64_t key, uint32_t port_no, uint32_t flags, uint64_t now)
{
    while (fib->n_entries >= fib->max_entries) {
        if (!evict_one(fib)) {
            return NONE;
        }
    }
    uint32_t i = fib->free_head;
    struct vs_fib_entry *e = &fib->entries[i];
    fib->free_head = e->lru_next;
    uint32_t b = bucket_of(fib, key);
    *e = (struct vs_fib_entry){
        .key = key, .last_seen = now, .port_no = port_no, .flags = flags,
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
    uint32_t i = find(fib, key);
    if (likely(i != NONE)) {
        struct vs_fib_entry *e = &fib->entries[i];
        if (e->flags & VS_FIB_F_STATIC) {
            return;
        }
        if (unlikely(e->port_no != port_no)) {
            lru_unlink(fib, i);
            fib->port_count[e->port_no]--;
            e->port_no = port_no;
            fib->port_count[port_no]++;
            e->last_seen = now;
            lru_append(fib, i);
            fib->stats.moved++;
        } else if (e->last_seen != now) {
            /* Refresh at most once a second: the list moves are not free. */
            e->last_seen = now;
            lru_unlink(fib, i);
            lru_append(fib, i);
        }
        return;
    }
    if (port_no < VS_MAX_PORTS && fib->max_entries && insert(fib, key, port_no, 0, now) != NONE) {
        fib->stats.learned++;
    }
}

int vs_fib_lookup(struct vs_fib *fib, uint64_t key)
{
    fib->stats.lookups++;
    uint32_t i = find(fib, key);
    if (i == NONE) {
        return VS_FIB_NO_PORT;
    }
    fib->stats.hits++;
    return (int)fib->entries[i].port_no;
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
    vs_fib_lock(fib);
    vs_fib_learn(fib, key, port_no, vs_now_sec());
    vs_fib_unlock(fib);
}

int vs_fib_add_static(struct vs_fib *fib, uint64_t key, uint32_t port_no)
{
    if (port_no >= VS_MAX_PORTS) {
        return -1;
    }
    vs_fib_lock(fib);
    uint32_t i = find(fib, key);
    if (i != NONE) {
        remove_entry(fib, i);
    }
    i = insert(fib, key, port_no, VS_FIB_F_STATIC, vs_now_sec());
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

uint32_t vs_fib_flush(struct vs_fib *fib, int port_no, int include_static)
{
    uint32_t removed = 0;
    vs_fib_lock(fib);
    for (uint32_t i = 0; i < fib->capacity; i++) {
        struct vs_fib_entry *e = &fib->entries[i];
        if (e->in_use && (port_no < 0 || e->port_no == (uint32_t)port_no) &&
            (include_static || !(e->flags & VS_FIB_F_STATIC))) {
            remove_entry(fib, i);
            removed++;
        }
    }
    vs_fib_unlock(fib);
    return removed;
}

uint32_t vs_fib_age(struct vs_fib *fib, uint64_t now)
{
    uint32_t aged = 0;
    vs_fib_lock(fib);
    for (uint32_t p = 0; p < VS_MAX_PORTS; p++) {
        /* Lists are oldest first: stop at the first entry still fresh. */
        while (fib->lru_head[p] != NONE &&
               fib->entries[fib->lru_head[p]].last_seen + fib->aging_seconds <= now) {
            remove_entry(fib, fib->lru_head[p]);
            aged++;
        }
    }
    fib->stats.aged += aged;
    vs_fib_unlock(fib);
    return aged;
}

uint32_t vs_fib_dump(struct vs_fib *fib, struct vs_fib_entry *out, uint32_t max)
{
    uint32_t n = 0;
    vs_fib_lock(fib);
    for (uint32_t i = 0; i < fib->capacity && n < max; i++) {
        if (fib->entries[i].in_use) {
            out[n++] = fib->entries[i];
        }
    }
    vs_fib_unlock(fib);
    return n;
}

int vs_fib_set_max(struct vs_fib *fib, uint32_t max_entries)
{
    if (max_entries > fib->capacity) {
        return -1;
    }
    vs_fib_lock(fib);
    fib->max_entries = max_entries;
    while (fib->n_entries > fib->max_entries && evict_one(fib)) {
        continue;
    }
    vs_fib_unlock(fib);
    return 0;
}
