/*
 * Capture rings (capture.h): the PMDs write, the control plane reads.
 */
#include <errno.h>

#include "vswitch.h"

_Static_assert(sizeof(struct vs_capture_slot) == VS_CAPTURE_HDR, "the record header the reader parses");

int vs_capture_init(struct vs_capture *cap, uint8_t *slots, uint32_t n_slots, uint32_t snaplen)
{
    if (!slots || !n_slots || (n_slots & (n_slots - 1)) || !snaplen || snaplen > VS_MAX_FRAME) {
        return -EINVAL;
    }
    memset(cap, 0, sizeof *cap);
    cap->snaplen = snaplen;
    cap->slot_size = (VS_CAPTURE_HDR + snaplen + 7) & ~7u;
    cap->n_slots = n_slots;
    cap->slots = slots;
    for (uint32_t i = 0; i < n_slots; i++) {
        /* No slot is ready for any position at first (position i is ready at i + 1). */
        struct vs_capture_slot *s = (struct vs_capture_slot *)(slots + (size_t)i * cap->slot_size);
        __atomic_store_n(&s->seq, 0, __ATOMIC_RELAXED);
    }
    return 0;
}

/* Claims the next position, or returns false if the ring is full. */
static inline bool claim(struct vs_capture *cap, uint64_t *pos)
{
    uint64_t head = __atomic_load_n(&cap->head, __ATOMIC_RELAXED);
    do {
        if (head - __atomic_load_n(&cap->tail, __ATOMIC_ACQUIRE) >= cap->n_slots) {
            return false;
        }
    } while (!__atomic_compare_exchange_n(&cap->head, &head, head + 1, true, __ATOMIC_ACQUIRE,
                                          __ATOMIC_RELAXED));
    *pos = head;
    return true;
}

void vs_capture_frames(struct vs_capture *cap, struct vs_pkt *const *pkts, uint32_t n, uint64_t time_ns)
{
    uint64_t taken = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint64_t pos;
        if (!claim(cap, &pos)) {
            __atomic_add_fetch(&cap->dropped, n - i, __ATOMIC_RELAXED);
            break;
        }
        const struct vs_pkt *pkt = pkts[i];
        struct vs_capture_slot *s = (struct vs_capture_slot *)(cap->slots + (pos & (cap->n_slots - 1)) *
                                                               (size_t)cap->slot_size);
        uint32_t want = pkt->len < cap->snaplen ? pkt->len : cap->snaplen;
        uint32_t copied = 0;
        for (uint32_t k = 0; k < pkt->nsegs && copied < want; k++) {
            uint32_t m = pkt->segs[k].len < want - copied ? pkt->segs[k].len : want - copied;
            memcpy(s->data + copied, pkt->segs[k].addr, m);
            copied += m;
        }
        s->time_ns = time_ns;
        s->wire_len = pkt->len;
        s->caplen = copied;
        __atomic_store_n(&s->seq, pos + 1, __ATOMIC_RELEASE);
        taken++;
    }
    if (taken) {
        __atomic_add_fetch(&cap->captured, taken, __ATOMIC_RELAXED);
    }
}

uint32_t vs_capture_read(struct vs_capture *cap, uint8_t *out, uint32_t out_len, uint32_t *frames)
{
    uint64_t tail = __atomic_load_n(&cap->tail, __ATOMIC_RELAXED);
    uint32_t used = 0, count = 0;
    for (;;) {
        struct vs_capture_slot *s = (struct vs_capture_slot *)(cap->slots + (tail & (cap->n_slots - 1)) *
                                                               (size_t)cap->slot_size);
        if (__atomic_load_n(&s->seq, __ATOMIC_ACQUIRE) != tail + 1) {
            break;               /* not written yet (a PMD may still be filling it) */
        }
        uint32_t size = (VS_CAPTURE_HDR + s->caplen + 7) & ~7u;
        if (used + size > out_len) {
            break;
        }
        memcpy(out + used, s, VS_CAPTURE_HDR + s->caplen);
        used += size;
        count++;
        tail++;
        /* The slot is free for a producer once the tail has moved past it. */
        __atomic_store_n(&cap->tail, tail, __ATOMIC_RELEASE);
    }
    *frames = count;
    return used;
}
