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
    uint64_t tsc_hz;             /* TSC ticks per second, measured at init */
    uint64_t last_work_tsc;      /* when a pass last moved packets */
    uint64_t linger_cycles;      /* after traffic, poll through gaps this long before sleeping */
    uint32_t sleep_us;           /* current backoff */
    uint32_t poll_only;          /* shared: never sleep when idle (pmd.sleep: false), a core for the lowest latency */
    unsigned long thread;        /* pthread_t of vs_pmd_run's thread, valid while running */
    struct vs_call_watch call_watch; /* its guest notifications, for vs_pmd_call_watchdog() */
    struct vs_pmd_stats stats;
    uint32_t gap_reset;          /* shared: set by the control plane to restart stats.max_gap_cycles */
};

int vs_pmd_init(struct vs_pmd *pmd, struct vs_fib *fib);
void vs_pmd_fini(struct vs_pmd *pmd);
void vs_pmd_publish(struct vs_pmd *pmd, struct vs_port_table *table);
int vs_pmd_quiesce(struct vs_pmd *pmd, uint32_t timeout_ms);
void vs_pmd_stop(struct vs_pmd *pmd);
void vs_pmd_run(struct vs_pmd *pmd);
uint32_t vs_pmd_poll_once(struct vs_pmd *pmd);

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
