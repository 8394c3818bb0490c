/*
 * The forwarding information base: a MAC learning table keyed by (MAC, VLAN),
 * read and written by PMD threads once per burst under a spinlock, and by the
 * control plane through the locked vs_fib_* calls.
 *
 * Semantics follow OVS mac-learning: learn on ingress, an entry moves when
 * its MAC appears on another port, idle entries age out, static entries are
 * never learned over or aged, and when the table is full the port holding the
 * most dynamic entries gives up its least recently seen one, so that one
 * port flooding random source MACs cannot push out the other ports' entries.
 *
 * Buckets are chosen by a keyed hash under a random key drawn when the
 * table is created (three AES rounds where the CPU has AES-NI, else
 * SipHash-1-3; fib.c says why), so MACs that collide cannot be computed
 * offline, and a bucket holds at most VS_FIB_MAX_CHAIN entries: a learn
 * into a full bucket is refused and counted, so no lookup ever compares
 * more than that.
 */

#define VS_FIB_NONE 4294967295   /* "no entry" in chains and lists */
#define VS_FIB_NOOP 4294967294   /* vs_fib_learn_check: the learn would change nothing */
#define VS_FIB_NO_PORT -1
#define VS_FIB_F_STATIC 1
#define VS_FIB_MAX_CHAIN 12      /* per bucket; random keys fill a full table past it once in 10^9 */
/* The largest table vs_fib_create() makes (fdb.max_entries at most this). */
#define VS_FIB_MAX_CAPACITY 4194304
/* Entries the control plane ages, evicts or removes per hold of the lock,
 * and slots it scans per hold: the PMD waits for the lock at most that long
 * (tens of microseconds), however large the table. */
#define VS_FIB_WORK_PER_LOCK 64
#define VS_FIB_SCAN_PER_LOCK 8192
#define VS_FIB_WAIT_BUCKETS 40   /* struct vs_fib_stats lock_wait_log2: up to 2^40 cycles, minutes */

/* 32 bytes, and the array aligned to a cache line, so that reading an entry
 * never takes two lines (a 40-byte entry did half the time). */
struct vs_fib_entry {
    uint64_t key;                /* MAC in the low 48 bits (first octet highest), VLAN above */
    uint32_t last_seen;          /* seconds, vs_now_sec() (boot-time seconds fit 32 bits for 136 years) */
    uint32_t hash_next;          /* bucket chain */
    uint32_t lru_prev;           /* per-port list, oldest first; free list uses lru_next */
    uint32_t lru_next;
    uint16_t port_no;            /* below VS_MAX_PORTS */
    uint16_t sub;                /* the port's sub-destination behind which the MAC is (port.h subs); 0: none */
    uint8_t flags;               /* VS_FIB_F_STATIC */
    uint8_t in_use;
};

struct vs_fib_stats {
    uint64_t learned;
    uint64_t moved;
    uint64_t aged;
    uint64_t evicted;
    uint64_t lookups;
    uint64_t hits;
    uint64_t refused;            /* learns refused: the key's bucket held VS_FIB_MAX_CHAIN entries */
    uint64_t probes;             /* entries compared by vs_fib_lookup, for tests and tuning */
    uint64_t lock_wait_max;      /* longest wait for the lock, TSC cycles, by any thread (0 to restart) */
    /* Contention between PMDs (README "Multi-core plan"): each is one add
     * made while holding the lock, on a line the holder writes anyway. */
    uint64_t lock_acquired;      /* times the lock was taken, by any thread */
    uint64_t lock_contended;     /* of those, times another thread held it */
    uint64_t lock_wait_cycles;   /* TSC cycles spent waiting in all of those */
    /* Contended waits by length: [i] counts waits of 2^i to 2^(i+1) - 1 TSC
     * cycles.  An average hides whether PMDs queue behind each other's
     * bursts (short waits) or behind a holder the kernel preempted (a time
     * slice): the two ends of this tell them apart. */
    uint64_t lock_wait_log2[VS_FIB_WAIT_BUCKETS];
    /* The most CPU time (the holder's own: time it was preempted left out)
     * one hold of the lock took in the control plane's long jobs (age,
     * flush, set_max, dump), in ns (0 to restart): the stall the design
     * allows a PMD, whatever the machine's load. */
    uint64_t hold_cpu_max_ns;
};

struct vs_fib {
    uint32_t lock_next;          /* ticket lock, see vs_fib_lock(): next ticket to hand out */
    uint32_t lock_owner;         /* the ticket that holds the lock */
    uint32_t capacity;           /* entries allocated */
    uint32_t max_entries;        /* current limit, at most capacity */
    uint32_t n_entries;
    uint32_t aging_seconds;
    uint32_t bucket_mask;
    /* The bucket hash and its key, both chosen at creation (tests change them while empty). */
    uint32_t hash_aes;           /* 1: three AES rounds (the CPU has AES-NI); 0: SipHash-1-3 */
    uint64_t hash_key[8];        /* from getrandom(): AES's four round keys, or SipHash's key in [0] and [1] */
    uint32_t *buckets;
    struct vs_fib_entry *entries;
    uint32_t free_head;          /* entries freed since creation; NONE: take next_fresh */
    uint32_t next_fresh;         /* entries at and above this were never used, nor touched in memory */
    uint32_t port_count[VS_MAX_PORTS];    /* dynamic entries per port */
    uint32_t lru_head[VS_MAX_PORTS];
    uint32_t lru_tail[VS_MAX_PORTS];
    struct vs_fib_stats stats;
};

uint64_t vs_now_sec(void);
uint64_t vs_fib_key(const uint8_t *mac, uint16_t vlan);
uint64_t vs_fib_hash(const struct vs_fib *fib, uint64_t key);
struct vs_fib *vs_fib_create(uint32_t capacity, uint32_t max_entries, uint32_t aging_seconds);
void vs_fib_destroy(struct vs_fib *fib);
void vs_fib_lock(struct vs_fib *fib);
void vs_fib_unlock(struct vs_fib *fib);

/* Control plane: each takes the lock itself, and those that may touch many
 * entries (flush, age, dump, set_max) release it every VS_FIB_WORK_PER_LOCK
 * entries, so that no PMD waits for it longer than that much work. */
int vs_fib_add_static(struct vs_fib *fib, uint64_t key, uint32_t port_no);
int vs_fib_remove(struct vs_fib *fib, uint64_t key);
/* Removes the entries on port_no (-1: any port) in VLAN vlan (-1: any VLAN). */
uint32_t vs_fib_flush(struct vs_fib *fib, int port_no, int vlan, int include_static);
uint32_t vs_fib_age(struct vs_fib *fib, uint64_t now);
/* As vs_fib_age, but ages at most budget entries: the rest waits for the next call. */
uint32_t vs_fib_age_some(struct vs_fib *fib, uint64_t now, uint32_t budget);
/* Copies the entries in use; with the lock released between steps, an entry
 * that moves meanwhile may be missed or seen twice. */
uint32_t vs_fib_dump(struct vs_fib *fib, struct vs_fib_entry *out, uint32_t max);
int vs_fib_set_max(struct vs_fib *fib, uint32_t max_entries);
int vs_fib_lookup_locked(struct vs_fib *fib, uint64_t key);
void vs_fib_learn_locked(struct vs_fib *fib, uint64_t key, uint32_t port_no);
void vs_fib_learn_sub_locked(struct vs_fib *fib, uint64_t key, uint32_t port_no, uint16_t sub);

/* Fast path: the caller holds the lock. */
void vs_fib_learn(struct vs_fib *fib, uint64_t key, uint32_t port_no, uint64_t now);
/* As vs_fib_learn, behind sub-destination sub of the port: a MAC that
 * appears behind another sub-destination of the same port has moved.
 * Returns 1 if an entry was added, moved or evicted (what the PMD remembers
 * of the table may be stale), 0 if the key was known where it was. */
int vs_fib_learn_sub(struct vs_fib *fib, uint64_t key, uint32_t port_no, uint16_t sub, uint64_t now);
/* As vs_fib_learn_sub, with key's bucket already known (vs_fib_prefetch_bucket). */
int vs_fib_learn_sub_bucket(struct vs_fib *fib, uint64_t key, uint32_t bucket, uint32_t port_no, uint16_t sub,
                            uint64_t now);
/* As vs_fib_learn_sub_bucket, with the bucket already walked under this
 * hold of the lock (vs_fib_learn_check): entry is key's entry there, or
 * VS_FIB_NONE (then the bucket is walked again, to count it). */
int vs_fib_learn_at(struct vs_fib *fib, uint64_t key, uint32_t bucket, uint32_t entry, uint32_t port_no,
                    uint16_t sub, uint64_t now);
int vs_fib_lookup(struct vs_fib *fib, uint64_t key);
/* Without the lock: starts loading key's bucket head into the cache and
 * returns the bucket; vs_fib_prefetch_entry then starts loading the first
 * entry of that bucket.  Hints only, for a burst of many sources: a large
 * table misses the cache on both, and these overlap the misses. */
uint32_t vs_fib_prefetch_bucket(const struct vs_fib *fib, uint64_t key);
void vs_fib_prefetch_entry(const struct vs_fib *fib, uint32_t bucket);
/* Without the lock: the buckets of n keys, as vs_fib_prefetch_bucket
 * returns them one at a time (and starts loading each bucket head), in one
 * loop whose hashes the CPU overlaps: for a burst of many sources. */
void vs_fib_buckets_of(const struct vs_fib *fib, const uint64_t *keys, uint32_t n, uint32_t *buckets);
/* As vs_fib_lookup; *sub is the entry's sub-destination (0 on a miss). */
int vs_fib_lookup_sub(struct vs_fib *fib, uint64_t key, uint16_t *sub);
