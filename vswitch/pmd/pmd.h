/*
 * A PMD (poll-mode driver) thread: the whole per-packet loop.  It polls the
 * receive queues in its table, learns source MACs, looks up destinations,
 * copies each frame once into the destination port, and counts.
 *
 * The control plane never changes a table the PMD is reading: it builds a
 * new vs_port_table, publishes it with vs_pmd_publish() (one pointer swap),
 * and calls vs_pmd_quiesce() before freeing the old one.
 */

/* Room for every queue of every port (VS_MAX_PORTS x VS_MAX_PORT_QUEUES,
 * checked in pmd.c), so that no port the switch can hold is ever refused
 * for want of a poll slot, however the queues are spread over the PMDs. */
#define VS_MAX_POLL 4096
/* A call write pending this long is cut short (vs_pmd_call_watchdog). */
#define VS_PMD_CALL_STALL_MS 50

struct vs_pollq {
    struct vs_port *port;
    uint32_t queue;              /* queue pair index */
};

struct vs_port_table {
    struct vs_port *ports[VS_MAX_PORTS]; /* by port_no; NULL where free */
    uint32_t n_live;
    uint16_t live[VS_MAX_PORTS];         /* port_no of each port, for flooding */
    uint32_t n_vlan;                     /* ports with VLAN settings; 0: the plain path, VLANs ignored */
    uint32_t n_poll;
    struct vs_pollq poll[VS_MAX_POLL];   /* what this PMD polls */
};

struct vs_pmd_stats {
    uint64_t loops;              /* passes over the poll list */
    uint64_t packets;            /* frames received */
    uint64_t bursts;             /* non-empty receive bursts */
    uint64_t busy_cycles;        /* TSC cycles in passes that moved packets */
    uint64_t idle_cycles;        /* TSC cycles in passes that moved none */
    uint64_t sleeps;             /* times the thread went to sleep */
    uint64_t yields;             /* sched_yield() calls after light passes (pmd.yield) */
    uint64_t yield_sleeps;       /* sleeps after empty passes whose yields ran no other thread (pmd.yield) */
    uint64_t shared_sleeps;      /* early sleeps after empty passes on a CPU another thread was found to want */
    uint64_t kick_wakeups;       /* port fds that ended a sleep (a guest's kick, a kernel port's frame) */
    uint64_t flooded;            /* frames flooded (unknown, broadcast, multicast) */
    uint64_t unicast;            /* frames sent to one learned port */
    uint64_t dropped_same_port;  /* destination learned on the ingress port */
    /* The longest time from the start of one pass to the start of the next,
     * sleeps left out: how long forwarding stood still (a lock held by the
     * control plane, a slow burst, or the thread preempted).  Since start or
     * since the last gap_reset. */
    uint64_t max_gap_cycles;
};

/*
 * Where a busy pass's cycles go, when vs_pmd.profiling is set (tools/scale.py
 * --profile, README "The switch's own cost"): a TSC read at the end of each
 * stage of each burst.  Profiling runs a second copy of the loop, compiled
 * with the reads; the loop that runs otherwise has none (one test of the
 * flag per pass: tests/unit/test_pmd_profile.py counts it with callgrind).
 */
#define VS_PMD_STAGE_RX 0        /* rx_burst: frames off the source port (vhost: its TX ring), empty polls too */
#define VS_PMD_STAGE_HOOKS 1     /* capture, mirroring and policing of the received burst */
#define VS_PMD_STAGE_LEARN 2     /* MAC copies, prefetch, the FIB lock (and its wait), learning and lookup */
#define VS_PMD_STAGE_GROUP 3     /* grouping by output port, flooding */
#define VS_PMD_STAGE_TX 4        /* MTU, offloads, tx_burst: buffers, the copy, used entries, notify */
#define VS_PMD_STAGE_RX_DONE 5   /* rx_done: the source's buffers given back (vhost: its used ring) */
#define VS_PMD_STAGE_VLAN 6      /* the VLAN path (some port has VLAN settings), learning to transmit */
#define VS_PMD_STAGES 7

struct vs_pmd_profile {
    uint64_t cycles[VS_PMD_STAGES]; /* TSC cycles per stage, busy passes only */
    uint64_t busy_cycles;        /* whole busy passes: the stages, the loop, the TSC reads */
    uint64_t packets;            /* frames received in those passes */
    uint64_t bursts;             /* non-empty receive bursts in those passes */
};

struct vs_pmd {
    struct vs_port_table *table; /* shared: vs_pmd_publish() */
    struct vs_fib *fib;
    uint64_t epoch;              /* shared: bumped once per pass, see vs_pmd_quiesce() */
    int stop;                    /* shared: set to end vs_pmd_run() */
    int running;                 /* shared: set while vs_pmd_run() loops */
    int wakefd;                  /* eventfd that wakes a sleeping PMD */
    uint32_t max_sleep_us;       /* longest sleep when some queue cannot wake us */
    uint32_t max_notify_sleep_ms; /* longest sleep when every queue can wake us */
    uint32_t idle_passes;        /* consecutive empty passes */
    uint32_t idle_yields;        /* consecutive empty passes whose sched_yield() ran no other thread */
    uint64_t yield_handover_cycles; /* a sched_yield() shorter than this ran no other thread */
    uint64_t preempted_cycles;   /* held off the CPU longer than this: it is shared */
    uint64_t shared_window_cycles; /* how long after that the PMD sleeps early */
    uint64_t shared_until_tsc;   /* sleep early until then */
    uint64_t tsc_hz;             /* TSC ticks per second, measured at init */
    uint64_t last_work_tsc;      /* when a pass last moved packets */
    uint64_t linger_cycles;      /* after traffic, poll through gaps this long before sleeping */
    uint32_t sleep_us;           /* current backoff */
    uint32_t poll_only;          /* shared: never sleep when idle (pmd.sleep: false), a core for the lowest latency */
    uint32_t yield_light;        /* shared: sched_yield() after a pass that moved under half a burst (pmd.yield) */
    unsigned long thread;        /* pthread_t of vs_pmd_run's thread, valid while running */
    struct vs_call_watch call_watch; /* its guest notifications, for vs_pmd_call_watchdog() */
    struct vs_pmd_stats stats;
    uint32_t gap_reset;          /* shared: set by the control plane to restart stats.max_gap_cycles */
    uint32_t profiling;          /* shared: set to time each stage into profile */
    struct vs_pmd_profile profile;
    /* Tests and tools/pmd_cost.py: nonzero, the time in seconds every pass
     * uses instead of the clock, so that runs under valgrind (slow) see the
     * table's once-a-second refreshes where they choose. */
    uint64_t clock_sec;
};

/* TSC ticks per second, measured at the first call. */
uint64_t vs_tsc_hz(void);
int vs_pmd_init(struct vs_pmd *pmd, struct vs_fib *fib);
void vs_pmd_fini(struct vs_pmd *pmd);
void vs_pmd_publish(struct vs_pmd *pmd, struct vs_port_table *table);
int vs_pmd_quiesce(struct vs_pmd *pmd, uint32_t timeout_ms);
void vs_pmd_stop(struct vs_pmd *pmd);
void vs_pmd_run(struct vs_pmd *pmd);
uint32_t vs_pmd_poll_once(struct vs_pmd *pmd);

/* The RARP frame of an announcement: the shortest Ethernet frame (FCS left
 * out), as QEMU's own announcement and DPDK's vhost library build it. */
#define VS_RARP_FRAME_LEN 60

/*
 * A migrated guest's announcement (vhost-user SEND_RARP, sent by QEMU for a
 * guest without VIRTIO_NET_F_GUEST_ANNOUNCE): asks the PMD that next polls
 * one of the port's queues to send a RARP frame from mac (broadcast, EtherType
 * 0x8035) as if the port had received it, so that it is learned and flooded
 * like a frame of the guest's own.  A request for the MAC already pending
 * adds a frame; another MAC replaces the pending one.  Returns the frames
 * now pending, or -EINVAL for a multicast or all-zero MAC.  The caller wakes
 * the PMDs: a sleeping one would see the request only when it wakes.
 */
int vs_port_announce(struct vs_port *port, const uint8_t *mac);

/* The signal vs_pmd_call_watchdog() sends; its handler, installed by
 * vs_pmd_init(), does nothing (and without SA_RESTART, so a write fails). */
int vs_pmd_watchdog_signal(void);
/* Cuts short a call write pending longer than stall_ms (struct vs_call_watch);
 * returns 1 if it did.  Called by vs_call_watchdog_run() and vs_pmd_quiesce(),
 * never while vs_pmd_stop() may be ending the thread. */
int vs_pmd_call_watchdog(struct vs_pmd *pmd, uint32_t stall_ms);

/* A thread that looks at every PMD's pending call write each interval_ms.
 * A thread of its own rather than a timer on the control loop: it costs a
 * nanosleep per look, and works while the control loop is busy. */
struct vs_call_watchdog {
    struct vs_pmd **pmds;        /* control: set before vs_call_watchdog_run() */
    uint32_t n_pmds;
    uint32_t interval_ms;
    uint32_t stall_ms;
    int stop;                    /* shared: ends vs_call_watchdog_run() within interval_ms */
};

void vs_call_watchdog_run(struct vs_call_watchdog *wd);
