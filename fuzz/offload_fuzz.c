/*
 * libFuzzer harness for the software offloads (vswitch/pmd/offload.c):
 * vs_offload_fit with random frames, scattered over segments that are each
 * allocated with exactly their size (ASan sees any read past one), random
 * virtio-net headers and random destination capabilities.
 *
 * Invariants, beyond "no sanitizer report":
 *   - vs_offload_fit always makes progress and never overfills its batch;
 *   - a frame that needs no work is passed through untouched;
 *   - every output segment lies in the batch's header area or inside one of
 *     the source frame's segments; segments add up to the frame length;
 *   - checksum fill: the output equals the input but for the 2-byte field,
 *     and the Internet checksum from csum_start verifies;
 *   - segmentation: the payloads put back together are the input payload,
 *     none is longer than gso_size, and each segment's IP length, IPv4
 *     header checksum and TCP checksum are right;
 *   - a refused frame produces nothing and counts one error; a batch of
 *     frames gives the same outputs and errors as the frames one by one.
 *
 * FUZZ_STATS_FILE=path makes it write its counts there every second and at exit.
 */
#include <time.h>

#include "fuzz_common.h"

#define MAX_FRAMES 8
#define MAX_SEGS 8

struct frame {
    struct vs_pkt pkt;
    uint8_t *flat;                  /* the whole frame, for reference */
    uint8_t *seg_mem[MAX_SEGS];
};

static struct {
    uint64_t inputs, headers, frames_fixed, frames_passed, frames_refused, segments_out;
} stats;

static void write_stats(void)
{
    const char *path = getenv("FUZZ_STATS_FILE");
    FILE *f = path ? fopen(path, "w") : NULL;
    if (f) {
        fprintf(f, "inputs %llu\nheaders %llu\nfixed %llu\npassed %llu\nrefused %llu\nsegments_out %llu\n",
                (unsigned long long)stats.inputs, (unsigned long long)stats.headers,
                (unsigned long long)stats.frames_fixed, (unsigned long long)stats.frames_passed,
                (unsigned long long)stats.frames_refused, (unsigned long long)stats.segments_out);
        fclose(f);
    }
}

static void frame_build(struct frame *f, struct input *in)
{
    memset(f, 0, sizeof *f);
    uint8_t m = in_u8(in);
    uint32_t len;
    switch (m & 7) {
    case 0:
        len = in_u16(in) % 80;                          /* shorter than any header */
        break;
    case 1:
        len = VS_MAX_FRAME - (m & 8 ? 0 : in_u8(in) % 64); /* the largest frames */
        break;
    case 2:
        len = 60000 + in_u16(in) % (VS_MAX_FRAME - 60000);
        break;
    default:
        len = 60 + in_u16(in) % 3000;
        break;
    }
    f->flat = malloc(len ? len : 1);
    uint64_t fill = in_u64(in) | 1;
    for (uint32_t off = 0; off < len; off += 8) {
        uint64_t v = rng_next(&fill);
        memcpy(f->flat + off, &v, len - off < 8 ? len - off : 8);
    }
    uint32_t l3 = write_frame(in, f->flat, len < 120 ? len : 120);

    /* Scatter it: segment boundaries anywhere, empty segments included. */
    uint32_t nsegs = 1 + in_u8(in) % MAX_SEGS, off = 0;
    for (uint32_t s = 0; s < nsegs; s++) {
        uint32_t left = len - off;
        uint32_t n = s == nsegs - 1 ? left : (in_u8(in) & 1 ? in_u8(in) % (left + 1) : in_u16(in) % (left + 1));
        f->seg_mem[s] = malloc(n ? n : 1);
        memcpy(f->seg_mem[s], f->flat + off, n);
        f->pkt.segs[s].addr = f->seg_mem[s];
        f->pkt.segs[s].len = n;
        off += n;
    }
    f->pkt.nsegs = (uint16_t)nsegs;
    f->pkt.len = len;

    /* The virtio-net header: mostly plausible, sometimes anything. */
    struct vs_net_hdr *v = &f->pkt.vnet;
    uint8_t k = in_u8(in);
    v->flags = k & 1 ? VS_NET_HDR_F_NEEDS_CSUM : (k & 2 ? in_u8(in) : 0);
    static const uint8_t gso[] = { 0, VS_NET_HDR_GSO_TCPV4, VS_NET_HDR_GSO_TCPV6, VS_NET_HDR_GSO_UDP,
                                   VS_NET_HDR_GSO_TCPV4 | VS_NET_HDR_GSO_ECN,
                                   VS_NET_HDR_GSO_TCPV6 | VS_NET_HDR_GSO_ECN, 0, 0 };
    v->gso_type = (k & 0x1c) == 0x1c ? in_u8(in) : gso[(k >> 2) & 7];
    uint32_t l4 = l3 + (l3 && f->flat[l3 - 1] == 0xdd ? 40 : 20);
    v->hdr_len = k & 0x20 ? in_u16(in) : (uint16_t)(l4 + 20);
    uint8_t g = in_u8(in);
    v->gso_size = (g & 0xc0) == 0xc0 ? (uint16_t)(0xffff - g % 16) : g & 0x80 ? in_u16(in)
                : g & 0x40 ? (uint16_t)(1 + g % 64) : (uint16_t)(536 + g * 8);
    v->csum_start = k & 0x40 ? in_u16(in) : (uint16_t)l4;
    v->csum_offset = k & 0x80 ? in_u16(in) : (in_u8(in) & 1 ? 6 : 16);
}

static void frame_free(struct frame *f)
{
    for (int s = 0; s < MAX_SEGS; s++) {
        free(f->seg_mem[s]);
    }
    free(f->flat);
}

static uint32_t flatten(const struct vs_pkt *p, uint8_t *dst)
{
    uint32_t off = 0;
    for (uint32_t s = 0; s < p->nsegs; s++) {
        memcpy(dst + off, p->segs[s].addr, p->segs[s].len);
        off += p->segs[s].len;
    }
    return off;
}

static void check_out(const struct vs_offload_batch *b, const struct frame *fs, uint32_t nf, const struct vs_pkt *o)
{
    CHECK(o->nsegs >= 1 && o->nsegs <= VS_PKT_MAX_SEGS, "nsegs %u", o->nsegs);
    uint64_t total = 0;
    for (uint32_t s = 0; s < o->nsegs; s++) {
        const struct vs_seg *seg = &o->segs[s];
        const uint8_t *hb = (const uint8_t *)b->hdrs;
        bool ok = seg->addr >= hb && seg->addr + seg->len <= hb + sizeof b->hdrs;
        for (uint32_t k = 0; k < nf && !ok; k++) {
            const struct vs_pkt *src = &fs[k].pkt;
            for (uint32_t t = 0; t < src->nsegs && !ok; t++) {
                const uint8_t *a = src->segs[t].addr;
                ok = seg->addr >= a && seg->addr + seg->len <= a + src->segs[t].len;
            }
        }
        CHECK(ok, "output segment %u (%u bytes) outside the batch and the source", s, seg->len);
        total += seg->len;
    }
    CHECK(total == o->len, "output segments %llu, len %u", (unsigned long long)total, o->len);
}

static uint16_t get16(const uint8_t *p)
{
    return (uint16_t)(p[0] << 8 | p[1]);
}

static void check_csum_fill(const struct frame *f, const uint8_t *out, uint32_t len)
{
    const struct vs_net_hdr *v = &f->pkt.vnet;
    uint32_t field = (uint32_t)v->csum_start + v->csum_offset;
    CHECK(len == f->pkt.len, "checksum fill changed the length %u -> %u", f->pkt.len, len);
    CHECK(field + 2 <= len, "checksum field %u past the frame (%u)", field, len);
    CHECK(memcmp(out, f->flat, field) == 0 && memcmp(out + field + 2, f->flat + field + 2, len - field - 2) == 0,
          "checksum fill changed more than the field");
    /* The field gets the complement of the sum from csum_start over the input,
     * whose field held the pseudo-header sum; 0 is sent as 0xffff. */
    uint32_t odd = 0;
    uint16_t want = (uint16_t)~ref_sum(0, f->flat + v->csum_start, len - v->csum_start, &odd);
    want = want ? want : 0xffff;
    CHECK(get16(out + field) == want, "checksum field %#x, expected %#x", get16(out + field), want);
}

/* Checks one TSO output segment: lengths and checksums. */
static void check_tso_segment(const uint8_t *o, uint32_t len, uint32_t hlen)
{
    uint32_t off = 12;
    uint16_t type = get16(o + off);
    for (int tags = 0; (type == 0x8100 || type == 0x88a8) && tags < 2; tags++) {
        off += 4;
        type = get16(o + off);
    }
    uint32_t l3 = off + 2, odd = 0, sum;
    if (type == 0x0800) {
        uint32_t ihl = (o[l3] & 15) * 4u;
        CHECK(get16(o + l3 + 2) == len - l3, "IPv4 total length %u, segment has %u", get16(o + l3 + 2), len - l3);
        sum = ref_sum(0, o + l3, ihl, &odd);
        CHECK(sum == 0xffff, "IPv4 header checksum does not verify: %#x", sum);
        uint32_t l4 = l3 + ihl, tcplen = len - l4;
        uint8_t pseudo[12] = { 0 };
        memcpy(pseudo, o + l3 + 12, 8);
        pseudo[9] = 6;
        pseudo[10] = (uint8_t)(tcplen >> 8), pseudo[11] = (uint8_t)tcplen;
        odd = 0;
        sum = ref_sum(0, pseudo, 12, &odd);
        odd = 0;
        sum = ref_sum(sum, o + l4, tcplen, &odd);
    } else {
        CHECK(type == 0x86dd, "segmented a frame that is neither IPv4 nor IPv6 (%#x)", type);
        CHECK(get16(o + l3 + 4) == len - l3 - 40, "IPv6 payload length %u, segment has %u",
              get16(o + l3 + 4), len - l3 - 40);
        uint32_t l4 = l3 + 40, tcplen = len - l4;
        uint8_t pseudo[40] = { 0 };
        memcpy(pseudo, o + l3 + 8, 32);
        pseudo[34] = (uint8_t)(tcplen >> 8), pseudo[35] = (uint8_t)tcplen;
        pseudo[39] = 6;
        sum = ref_sum(0, pseudo, 40, &odd);
        odd = 0;
        sum = ref_sum(sum, o + l4, tcplen, &odd);
    }
    CHECK(sum == 0xffff, "TCP checksum does not verify: %#x", sum);
    CHECK(hlen <= len, "header %u longer than the segment %u", hlen, len);
}

/* One frame alone: every output checked against the input.  Returns outputs, or -1 if refused. */
static int fit_one(struct vs_offload_batch *b, struct frame *f, uint32_t caps, uint8_t *scratch)
{
    struct vs_pkt *p = &f->pkt;
    uint64_t errors = b->errors;
    int needed = vs_offload_needed(&p, 1, caps);
    uint32_t next = vs_offload_fit(b, &p, 1, 0, caps);
    CHECK(next == 1, "no progress");
    CHECK(b->n <= VS_OFFLOAD_MAX_OUT && b->used <= b->n, "batch n %u used %u", b->n, b->used);
    if (!needed) {
        CHECK(b->n == 1 && b->out[0] == p && b->errors == errors, "a frame needing nothing was changed");
        stats.frames_passed++;
        return 1;
    }
    if (b->errors != errors) {
        CHECK(b->errors == errors + 1 && b->n == 0, "refused frame: %u outputs, errors +%llu", b->n,
              (unsigned long long)(b->errors - errors));
        stats.frames_refused++;
        return -1;
    }
    CHECK(b->n >= 1, "no output and no error");
    stats.frames_fixed++;
    stats.segments_out += b->n;
    bool gso = b->n > 1 || p->vnet.gso_type;
    if (!gso || !(p->vnet.gso_type & ~VS_NET_HDR_GSO_ECN) ||
        ((p->vnet.gso_type & ~VS_NET_HDR_GSO_ECN) == VS_NET_HDR_GSO_TCPV4 && (caps & VS_OFFLOAD_TSO4) &&
         (!(p->vnet.gso_type & VS_NET_HDR_GSO_ECN) || (caps & VS_OFFLOAD_ECN))) ||
        ((p->vnet.gso_type & ~VS_NET_HDR_GSO_ECN) == VS_NET_HDR_GSO_TCPV6 && (caps & VS_OFFLOAD_TSO6) &&
         (!(p->vnet.gso_type & VS_NET_HDR_GSO_ECN) || (caps & VS_OFFLOAD_ECN)))) {
        /* The GSO type is fine for the port: only the checksum was filled. */
        CHECK(b->n == 1, "checksum fill gave %u frames", b->n);
        check_out(b, f, 1, b->out[0]);
        uint32_t len = flatten(b->out[0], scratch);
        check_csum_fill(f, scratch, len);
        return 1;
    }
    /* Segmented: headers, then the payload in order, at most gso_size per segment. */
    uint32_t hlen = b->out[0]->segs[0].len, payload = 0;
    CHECK(hlen <= VS_OFFLOAD_HDR_MAX && hlen < p->len + 1, "header length %u", hlen);
    for (uint32_t i = 0; i < b->n; i++) {
        const struct vs_pkt *o = b->out[i];
        check_out(b, f, 1, o);
        CHECK(o->segs[0].len == hlen, "segment %u header %u != %u", i, o->segs[0].len, hlen);
        uint32_t len = flatten(o, scratch);
        uint32_t plen = len - hlen;
        CHECK(plen <= p->vnet.gso_size, "segment %u payload %u > gso_size %u", i, plen, p->vnet.gso_size);
        CHECK(i == b->n - 1 || plen == p->vnet.gso_size, "short segment %u before the last", i);
        CHECK(memcmp(scratch + hlen, f->flat + hlen + payload, plen) == 0, "segment %u payload differs", i);
        payload += plen;
        check_tso_segment(scratch, len, hlen);
    }
    CHECK(hlen + payload == p->len, "segments carry %u + %u bytes of %u", hlen, payload, p->len);
    return (int)b->n;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    atexit(write_stats);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct frame frames[MAX_FRAMES];
    static uint8_t scratch[VS_MAX_FRAME + VS_OFFLOAD_HDR_MAX];
    struct vs_offload_batch *b = vs_offload_thread_batch();
    CHECK(b, "no batch");
    struct input in;
    input_init(&in, data, size);
    uint32_t caps = in_u8(&in) & VS_OFFLOAD_ALL;
    uint32_t n = 1 + in_u8(&in) % MAX_FRAMES;
    int outs[MAX_FRAMES];
    uint64_t total_out = 0, refused = 0;
    for (uint32_t i = 0; i < n; i++) {
        frame_build(&frames[i], &in);
        outs[i] = fit_one(b, &frames[i], caps, scratch);
        total_out += outs[i] > 0 ? (uint64_t)outs[i] : 0;
        refused += outs[i] < 0;
    }
    /* All of them in one go, as the PMD does: the same outputs, in order. */
    struct vs_pkt *ptrs[MAX_FRAMES];
    for (uint32_t i = 0; i < n; i++) {
        ptrs[i] = &frames[i].pkt;
    }
    uint64_t errors = b->errors, got = 0;
    for (uint32_t next = 0; next < n;) {
        uint32_t after = vs_offload_fit(b, ptrs, n, next, caps);
        CHECK(after > next && after <= n, "batch: no progress at %u", next);
        CHECK(b->n <= VS_OFFLOAD_MAX_OUT, "batch overfilled: %u", b->n);
        for (uint32_t i = 0; i < b->n; i++) {
            check_out(b, frames, n, b->out[i]);
        }
        got += b->n;
        next = after;
    }
    CHECK(got == total_out && b->errors - errors == refused, "batch gave %llu frames and %llu errors, "
          "one by one %llu and %llu", (unsigned long long)got, (unsigned long long)(b->errors - errors),
          (unsigned long long)total_out, (unsigned long long)refused);
    b->errors = 0;
    for (uint32_t i = 0; i < n; i++) {
        frame_free(&frames[i]);
    }
    stats.headers += n;
    stats.inputs++;
    if ((stats.inputs & 0xff) == 0) {
        /* About once a second, so a run stopped from outside leaves its counts. */
        static time_t last;
        time_t now = time(NULL);
        if (now != last) {
            last = now;
            write_stats();
        }
    }
    return 0;
}
