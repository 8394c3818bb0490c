/*
 * How long a cache line takes to go from one core to another and back
 * (tools/core_rtt.py, the benchmark's per-sample probe, README
 * "Performance"): two threads pinned to the two cores hand one line back and
 * forth.  On a virtual machine the hypervisor may move its vCPUs between
 * physical cores that share a cache and cores that do not, and then every
 * line a producer hands to a consumer (ring indexes, descriptors, frames)
 * costs several times more; a throughput figure means little without it.
 *
 * No #include: cffi reads this file.
 */

#define VS_CORE_PROBE_MAX_BATCHES 64

struct vs_core_probe {
    int32_t cpu_a;               /* the core that starts each round trip */
    int32_t cpu_b;               /* the core that answers */
    uint32_t round_trips;        /* per batch, 1 .. 1,000,000 */
    uint32_t batches;            /* 1 .. VS_CORE_PROBE_MAX_BATCHES */
    /* 1: both threads run SCHED_FIFO, so that they are not shared with busy
     * threads already on those cores (the benchmark's PMDs); needs root. */
    uint32_t realtime;
    uint32_t timeout_ms;         /* give up if the other side stops answering */
    double ns[VS_CORE_PROBE_MAX_BATCHES];  /* out: nanoseconds per round trip, each batch */
};

/* 0, -EINVAL (bad settings or a core this process may not use), -EPERM
 * (realtime asked for and refused), -ETIMEDOUT, or another -errno. */
int vs_core_probe_run(struct vs_core_probe *p);

/*
 * How long the kernel takes to wake a thread blocked in ppoll() on an
 * eventfd from another core (tools/wake_floor.py, README "Latency and
 * scale"): the floor under a sleeping PMD's latency, since a guest's kick
 * wakes the PMD the same way.  A sleeper thread on cpu_sleeper blocks; a
 * waker thread on cpu_waker waits gap_us (asleep, then spinning its last
 * 200 us so that its own wake-up is left out), reads the clock and writes
 * the eventfd, then spins until the sleeper has answered, as a guest
 * spins on its ring; the sleeper reads the clock as ppoll() returns.
 */
#define VS_WAKE_PROBE_MAX 10000

struct vs_wake_probe {
    int32_t cpu_waker;
    int32_t cpu_sleeper;
    uint32_t wakes;              /* 1 .. VS_WAKE_PROBE_MAX */
    uint32_t gap_us;             /* idle time before each wake-up, 1 .. 10,000,000 */
    uint32_t timeout_ms;         /* give up if a wake-up does not come within this */
    uint32_t ns[VS_WAKE_PROBE_MAX];  /* out: each wake-up, clock read to clock read, nanoseconds */
};

/* 0, -EINVAL (bad settings or a core this process may not use),
 * -ETIMEDOUT, or another -errno. */
int vs_wake_probe_run(struct vs_wake_probe *p);
