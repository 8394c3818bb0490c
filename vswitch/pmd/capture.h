/*
 * Capture and mirroring (README "Capture and mirroring").
 *
 * A port being captured or mirrored has a struct vs_monitor (port.h: monitor);
 * every other port has NULL there, and the PMD pays one predictable branch
 * per burst for it.  Like a port's VLAN settings, a vs_monitor never changes
 * once published: the control plane builds a new one, publishes it with one
 * pointer store and frees the old one after a quiescent point.
 *
 * A capture is a ring of fixed-size slots in memory the control plane
 * allocated.  Several PMDs may write one ring (a port's queues are spread
 * over them, and frames are sent to a port from any PMD), so a producer
 * claims a slot by moving the head with a compare-and-swap, fills it, then
 * marks it ready by storing its sequence number; the one reader (the
 * control plane) takes ready slots in order and moves the tail.  A full
 * ring drops the frame and counts it: a slow reader never slows forwarding.
 */

#define VS_MONITOR_MAX 8                /* captures, and mirrors, one port may have per direction */
#define VS_CAPTURE_HDR 24               /* bytes of struct vs_capture_slot before data */

/* One captured frame; data holds its first caplen bytes. */
struct vs_capture_slot {
    uint64_t seq;                       /* shared: position + 1 once the slot is filled */
    uint64_t time_ns;                   /* CLOCK_REALTIME when the PMD took it */
    uint32_t wire_len;                  /* the frame's length on the wire */
    uint32_t caplen;                    /* bytes kept: min(wire_len, snaplen) */
    uint8_t data[];
};

struct vs_capture {
    uint32_t snaplen;                   /* control: bytes kept per frame */
    uint32_t slot_size;                 /* control: VS_CAPTURE_HDR + snaplen, rounded up to 8 */
    uint32_t n_slots;                   /* control: a power of two */
    uint8_t *slots;                     /* control: n_slots * slot_size bytes */
    uint64_t head;                      /* shared: positions claimed by PMDs */
    uint64_t tail;                      /* shared: positions the reader has consumed */
    uint64_t captured;                  /* shared: frames written to the ring */
    uint64_t dropped;                   /* shared: frames lost to a full ring (capture_dropped) */
};

/* What the PMD does for one port: copy frames into captures, send copies to mirror outputs. */
struct vs_monitor {
    uint32_t n_rx_captures;             /* frames the port receives */
    uint32_t n_tx_captures;             /* frames the switch sends to the port */
    struct vs_capture *rx_captures[VS_MONITOR_MAX];
    struct vs_capture *tx_captures[VS_MONITOR_MAX];
    uint32_t n_rx_mirrors;
    uint32_t n_tx_mirrors;
    struct vs_port *rx_mirrors[VS_MONITOR_MAX];    /* mirror outputs for the port's received frames */
    struct vs_port *tx_mirrors[VS_MONITOR_MAX];    /* and for the frames sent to it */
    uint32_t mirror_output;             /* 1: the port is a mirror's output; what it receives is dropped */
};

/* Control: sets up a ring over slots (n_slots * slot_size bytes, n_slots a power of two); 0 or -EINVAL. */
int vs_capture_init(struct vs_capture *cap, uint8_t *slots, uint32_t n_slots, uint32_t snaplen);
/* The reader: copies ready frames, oldest first, into out as records of
 * VS_CAPTURE_HDR bytes (struct vs_capture_slot, seq unused) then caplen bytes,
 * each padded to 8, while they fit in out_len; returns the bytes written and
 * the number of frames in *frames. */
uint32_t vs_capture_read(struct vs_capture *cap, uint8_t *out, uint32_t out_len, uint32_t *frames);
/* Any thread: copies n frames into the ring (the PMD's side, exposed for tests). */
void vs_capture_frames(struct vs_capture *cap, struct vs_pkt *const *pkts, uint32_t n, uint64_t time_ns);
