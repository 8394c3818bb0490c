/*
 * Software checksum and TCP segmentation, for destinations that cannot take
 * a frame's virtio-net header as it is (see offload.h).
 *
 * Checksum fill (NEEDS_CSUM): the Internet checksum of the bytes from
 * csum_start to the end of the frame, whose checksum field already holds
 * the pseudo-header sum, is stored at csum_start + csum_offset (virtio 1.x,
 * 5.1.6.2).  The headers up to that field are copied; the rest of the frame
 * stays where it is.
 *
 * Segmentation (GSO TCPV4 / TCPV6): the payload after the TCP header is cut
 * into gso_size pieces; each gets a copy of the headers with the IP length
 * (and IPv4 id, +1 per segment, and header checksum), the TCP sequence
 * number, the flags (CWR on the first segment only; FIN and PSH on the last
 * only) and a complete TCP checksum; its payload points into the source.
 *
 * Everything in the header is untrusted: offsets are checked against the
 * frame, unknown layouts are dropped and counted, never guessed at.  A port
 * that takes offloads gets the header as it came, so the same checks
 * (vs_offload_hdr_valid) run before it does: the kernel behind a TAP or an
 * AF_PACKET socket, or another guest, would otherwise trust whatever a guest
 * wrote there.
 */
#include <arpa/inet.h>
#include <stdlib.h>

#include "vswitch.h"

#define ETH_HLEN 14
#define ETHERTYPE_IPV4 0x0800
#define ETHERTYPE_IPV6 0x86dd
#define ETHERTYPE_VLAN 0x8100
#define ETHERTYPE_QINQ 0x88a8
#define IPPROTO_TCP_ 6
#define TCP_FIN 0x01
#define TCP_PSH 0x08
#define TCP_CWR 0x80

uint32_t vs_offload_caps_from_features(uint64_t features)
{
    uint32_t caps = 0;
    if (features & (1ULL << VIRTIO_NET_F_GUEST_CSUM)) {
        caps |= VS_OFFLOAD_CSUM;
        if (features & (1ULL << VIRTIO_NET_F_GUEST_TSO4)) {
            caps |= VS_OFFLOAD_TSO4;
        }
        if (features & (1ULL << VIRTIO_NET_F_GUEST_TSO6)) {
            caps |= VS_OFFLOAD_TSO6;
        }
        if (features & (1ULL << VIRTIO_NET_F_GUEST_ECN)) {
            caps |= VS_OFFLOAD_ECN;
        }
    }
    return caps;
}

/* True if a GSO frame of this type must be segmented for a port with caps. */
static inline bool gso_needs_fix(uint8_t gso, uint32_t caps)
{
    if (gso == VS_NET_HDR_GSO_NONE) {
        return false;
    }
    uint8_t kind = gso & (uint8_t)~VS_NET_HDR_GSO_ECN;
    uint32_t need = kind == VS_NET_HDR_GSO_TCPV4 ? VS_OFFLOAD_TSO4
                  : kind == VS_NET_HDR_GSO_TCPV6 ? VS_OFFLOAD_TSO6
                  : 0x10000;   /* UDP or unknown: no port takes it */
    if (gso & VS_NET_HDR_GSO_ECN) {
        need |= VS_OFFLOAD_ECN;
    }
    return (caps & need) != need;
}

/* True if the frame must go through vs_offload_fit: fixed in software, or dropped. */
static inline bool needs_fix(const struct vs_pkt *pkt, uint32_t caps)
{
    const struct vs_net_hdr *h = &pkt->vnet;
    /* No offload asked for: the checksum and GSO fields mean nothing to anyone. */
    if (likely((h->flags | h->gso_type | h->hdr_len) == 0)) {
        return false;
    }
    return gso_needs_fix(h->gso_type, caps) ||
           ((h->flags & VS_NET_HDR_F_NEEDS_CSUM) && !(caps & VS_OFFLOAD_CSUM)) ||
           !vs_offload_hdr_valid(pkt);
}

int vs_offload_needed(struct vs_pkt **pkts, uint32_t n, uint32_t caps)
{
    for (uint32_t i = 0; i < n; i++) {
        if (unlikely(needs_fix(pkts[i], caps))) {
            return 1;
        }
    }
    return 0;
}

/* --- Internet checksum (RFC 1071) over scattered bytes ------------------- */

/* Sum of 16-bit big-endian words of p[0..len), as if p started at an even offset. */
static uint64_t sum_bytes(const uint8_t *p, uint32_t len)
{
    uint64_t sum = 0;
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        /* Native-endian 32-bit halves summed; the byte order is fixed at the end. */
        sum += (w & 0xffffffffULL) + (w >> 32);
        p += 8;
        len -= 8;
    }
    while (len >= 2) {
        uint16_t w;
        memcpy(&w, p, 2);
        sum += w;
        p += 2;
        len -= 2;
    }
    if (len) {
        uint16_t w = 0;
        memcpy(&w, p, 1);       /* the odd byte is the high byte of a big-endian word */
        sum += w;
    }
    return sum;
}

static inline uint16_t fold(uint64_t sum)
{
    while (sum >> 16) {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    return (uint16_t)sum;
}

/* Running checksum over pieces: `odd` says the next piece starts at an odd offset. */
struct csum {
    uint64_t sum;               /* native byte order, like sum_bytes */
    bool odd;
};

static inline void csum_add(struct csum *c, const uint8_t *p, uint32_t len)
{
    uint16_t s = fold(sum_bytes(p, len));
    if (c->odd) {
        s = (uint16_t)((s << 8) | (s >> 8));   /* shifted by one byte */
    }
    c->sum += s;
    c->odd ^= len & 1;
}

/* The final checksum field value, ready to store (network order bytes). */
static inline uint16_t csum_result(const struct csum *c)
{
    uint16_t r = (uint16_t)~fold(c->sum);
    return r;
}

/* Adds bytes [off, off+len) of the frame (its segments) to c. */
static void csum_add_frame(struct csum *c, const struct vs_pkt *pkt, uint32_t off, uint32_t len)
{
    for (uint32_t s = 0; s < pkt->nsegs && len; s++) {
        uint32_t sl = pkt->segs[s].len;
        if (off >= sl) {
            off -= sl;
            continue;
        }
        uint32_t n = sl - off < len ? sl - off : len;
        csum_add(c, pkt->segs[s].addr + off, n);
        len -= n;
        off = 0;
    }
}

/* Copies bytes [0, len) of the frame into dst; false if the frame is shorter. */
static bool gather(uint8_t *dst, const struct vs_pkt *pkt, uint32_t len)
{
    if (len > pkt->len) {
        return false;
    }
    for (uint32_t s = 0; s < pkt->nsegs && len; s++) {
        uint32_t n = pkt->segs[s].len < len ? pkt->segs[s].len : len;
        memcpy(dst, pkt->segs[s].addr, n);
        dst += n;
        len -= n;
    }
    return len == 0;
}

/* Appends bytes [off, off+len) of src's segments to dst's. */
static bool append_range(struct vs_pkt *dst, const struct vs_pkt *src, uint32_t off, uint32_t len)
{
    for (uint32_t s = 0; s < src->nsegs && len; s++) {
        uint32_t sl = src->segs[s].len;
        if (off >= sl) {
            off -= sl;
            continue;
        }
        if (dst->nsegs == VS_PKT_MAX_SEGS) {
            return false;
        }
        uint32_t n = sl - off < len ? sl - off : len;
        dst->segs[dst->nsegs].addr = src->segs[s].addr + off;
        dst->segs[dst->nsegs].len = n;
        dst->nsegs++;
        dst->len += n;
        len -= n;
        off = 0;
    }
    return len == 0;
}

/* A fixed copy of src goes to the same sub-destination (a tunnel's remote) as src. */
static struct vs_pkt *new_out(struct vs_offload_batch *b, uint8_t **hdr, const struct vs_pkt *src)
{
    struct vs_pkt *p = &b->pkts[b->used];
    *hdr = b->hdrs[b->used];
    b->used++;
    memset(&p->vnet, 0, sizeof p->vnet);
    p->len = 0;
    p->nsegs = 0;
    p->head = 0;
    p->sub = src->sub;
    return p;
}

/* --- Checksum fill ---------------------------------------------------------- */

/* A checksum request names a TCP (16) or UDP (6) checksum field, after an
 * Ethernet and an IP header, and inside the frame. */
static bool csum_fields_ok(const struct vs_pkt *pkt)
{
    uint32_t start = pkt->vnet.csum_start, offset = pkt->vnet.csum_offset;
    return start >= ETH_HLEN + 20 && (offset == 6 || offset == 16) && start + offset + 2 <= pkt->len;
}

static bool fill_csum(struct vs_offload_batch *b, const struct vs_pkt *pkt)
{
    uint32_t start = pkt->vnet.csum_start, field = start + pkt->vnet.csum_offset;
    if (!csum_fields_ok(pkt) || field + 2 > VS_OFFLOAD_HDR_MAX) {
        return false;
    }
    uint8_t *hdr;
    struct vs_pkt *out = new_out(b, &hdr, pkt);
    if (!gather(hdr, pkt, field + 2)) {
        b->used--;
        return false;
    }
    struct csum c = { 0, false };
    csum_add_frame(&c, pkt, start, pkt->len - start);
    uint16_t v = csum_result(&c);
    if (v == 0) {
        v = 0xffff;   /* 0 means "no checksum" to UDP; the same value to TCP */
    }
    memcpy(hdr + field, &v, 2);
    out->segs[0].addr = hdr;
    out->segs[0].len = field + 2;
    out->nsegs = 1;
    out->len = field + 2;
    if (!append_range(out, pkt, field + 2, pkt->len - field - 2)) {
        b->used--;
        return false;
    }
    b->out[b->n++] = out;
    return true;
}

/* --- TCP segmentation -------------------------------------------------------- */

struct l3l4 {
    uint32_t l3;                /* offset of the IP header */
    uint32_t l4;                /* offset of the TCP header */
    uint32_t payload;           /* offset of the TCP payload (end of headers) */
    bool v6;
};

/* Parses Ethernet (with up to two VLAN tags), IPv4 or IPv6 (no extension headers), TCP. */
static bool parse_tcp(const uint8_t *h, uint32_t avail, struct l3l4 *o)
{
    uint32_t off = 12;
    uint16_t type;
    for (int tags = 0;; tags++) {
        if (off + 2 > avail) {
            return false;
        }
        type = (uint16_t)(h[off] << 8 | h[off + 1]);
        if ((type == ETHERTYPE_VLAN || type == ETHERTYPE_QINQ) && tags < 2) {
            off += 4;
            continue;
        }
        break;
    }
    o->l3 = off + 2;
    if (type == ETHERTYPE_IPV4) {
        if (o->l3 + 20 > avail || (h[o->l3] >> 4) != 4) {
            return false;
        }
        uint32_t ihl = (h[o->l3] & 15) * 4u;
        if (ihl < 20 || h[o->l3 + 9] != IPPROTO_TCP_) {
            return false;
        }
        o->l4 = o->l3 + ihl;
        o->v6 = false;
    } else if (type == ETHERTYPE_IPV6) {
        if (o->l3 + 40 > avail || (h[o->l3] >> 4) != 6 || h[o->l3 + 6] != IPPROTO_TCP_) {
            return false;
        }
        o->l4 = o->l3 + 40;
        o->v6 = true;
    } else {
        return false;
    }
    if (o->l4 + 20 > avail) {
        return false;
    }
    uint32_t doff = (h[o->l4 + 12] >> 4) * 4u;
    if (doff < 20) {
        return false;
    }
    o->payload = o->l4 + doff;
    return o->payload <= avail;
}

static inline void put16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static inline uint16_t get16(const uint8_t *p)
{
    return (uint16_t)(p[0] << 8 | p[1]);
}

static bool segment_tcp(struct vs_offload_batch *b, const struct vs_pkt *pkt)
{
    uint8_t first[VS_OFFLOAD_HDR_MAX];
    uint32_t avail = pkt->len < VS_OFFLOAD_HDR_MAX ? pkt->len : VS_OFFLOAD_HDR_MAX;
    struct l3l4 o;
    if (!gather(first, pkt, avail) || !parse_tcp(first, avail, &o)) {
        return false;
    }
    bool v6 = (pkt->vnet.gso_type & ~VS_NET_HDR_GSO_ECN) == VS_NET_HDR_GSO_TCPV6;
    uint32_t mss = pkt->vnet.gso_size;
    uint32_t total = pkt->len - o.payload;
    if (v6 != o.v6 || mss == 0) {
        return false;
    }
    uint32_t nseg = total ? (total + mss - 1) / mss : 1;
    if (nseg > VS_OFFLOAD_MAX_SEGS || b->used + nseg > VS_OFFLOAD_MAX_OUT) {
        return false;
    }
    uint32_t hlen = o.payload;
    /* The IP length of the largest segment must fit its 16-bit field (IPv6's
     * excludes the fixed header): a wrapped length is a different packet. */
    uint32_t largest_l4 = hlen - o.l4 + (total < mss ? total : mss);
    if ((o.v6 ? largest_l4 : o.l4 - o.l3 + largest_l4) > 0xffff) {
        return false;
    }
    uint32_t seq0;
    memcpy(&seq0, first + o.l4 + 4, 4);
    seq0 = ntohl(seq0);
    uint16_t id0 = o.v6 ? 0 : get16(first + o.l3 + 4);
    uint8_t flags0 = first[o.l4 + 13];
    uint32_t used_before = b->used, n_before = b->n;

    for (uint32_t i = 0; i < nseg; i++) {
        uint32_t off = i * mss;
        uint32_t len = total - off < mss ? total - off : mss;
        uint8_t *hdr;
        struct vs_pkt *out = new_out(b, &hdr, pkt);
        memcpy(hdr, first, hlen);
        uint8_t *ip = hdr + o.l3, *tcp = hdr + o.l4;
        uint32_t l4_len = hlen - o.l4 + len;
        struct csum c = { 0, false };
        /* Pseudo-header: addresses, protocol, TCP length. */
        uint8_t pseudo[8] = { 0 };
        if (o.v6) {
            put16(ip + 4, (uint16_t)l4_len);
            csum_add(&c, ip + 8, 32);
            pseudo[2] = (uint8_t)(l4_len >> 8);   /* 32-bit length, zeros, next header */
            pseudo[3] = (uint8_t)l4_len;
            pseudo[7] = IPPROTO_TCP_;
        } else {
            put16(ip + 2, (uint16_t)(o.l4 - o.l3 + l4_len));
            put16(ip + 4, (uint16_t)(id0 + i));
            put16(ip + 10, 0);
            struct csum ipc = { 0, false };
            csum_add(&ipc, ip, o.l4 - o.l3);
            uint16_t ipsum = csum_result(&ipc);
            memcpy(ip + 10, &ipsum, 2);
            csum_add(&c, ip + 12, 8);
            pseudo[1] = IPPROTO_TCP_;
            pseudo[2] = (uint8_t)(l4_len >> 8);
            pseudo[3] = (uint8_t)l4_len;
        }
        csum_add(&c, pseudo, o.v6 ? 8 : 4);
        uint32_t seq = htonl(seq0 + off);
        memcpy(tcp + 4, &seq, 4);
        uint8_t fl = flags0;
        if (i != 0) {
            fl &= (uint8_t)~TCP_CWR;
        }
        if (i != nseg - 1) {
            fl &= (uint8_t)~(TCP_FIN | TCP_PSH);
        }
        tcp[13] = fl;
        put16(tcp + 16, 0);
        csum_add(&c, tcp, hlen - o.l4);
        csum_add_frame(&c, pkt, o.payload + off, len);
        uint16_t tsum = csum_result(&c);
        memcpy(tcp + 16, &tsum, 2);
        out->segs[0].addr = hdr;
        out->segs[0].len = hlen;
        out->nsegs = 1;
        out->len = hlen;
        if (!append_range(out, pkt, o.payload + off, len)) {
            b->used = used_before;
            b->n = n_before;
            return false;
        }
        b->out[b->n++] = out;
    }
    return true;
}

/* --- What a port that takes offloads may be handed ---------------------------- */

/* A GSO request: TCP over the IP version it names, segments of a size the
 * receiver can take, and lengths that fit the IP header's 16-bit fields. */
static bool gso_ok(const struct vs_pkt *pkt)
{
    const struct vs_net_hdr *h = &pkt->vnet;
    uint8_t kind = h->gso_type & (uint8_t)~VS_NET_HDR_GSO_ECN;
    if (kind != VS_NET_HDR_GSO_TCPV4 && kind != VS_NET_HDR_GSO_TCPV6) {
        return false;
    }
    uint8_t first[VS_OFFLOAD_HDR_MAX];
    uint32_t avail = pkt->len < VS_OFFLOAD_HDR_MAX ? pkt->len : VS_OFFLOAD_HDR_MAX;
    struct l3l4 o;
    if (!gather(first, pkt, avail) || !parse_tcp(first, avail, &o) || o.v6 != (kind == VS_NET_HDR_GSO_TCPV6)) {
        return false;
    }
    /* IPv4's total length counts its header; IPv6's payload length does not. */
    uint32_t not_counted = o.l3 + (o.v6 ? 40 : 0);
    if (h->gso_size < VS_OFFLOAD_MIN_MSS || pkt->len - not_counted > 0xffff ||
        o.payload - not_counted + h->gso_size > 0xffff) {
        return false;
    }
    /* A checksum request with GSO is for the TCP checksum, nothing else. */
    return !(h->flags & VS_NET_HDR_F_NEEDS_CSUM) || (h->csum_start == o.l4 && h->csum_offset == 16);
}

int vs_offload_hdr_valid(const struct vs_pkt *pkt)
{
    const struct vs_net_hdr *h = &pkt->vnet;
    if ((h->flags & ~(VS_NET_HDR_F_NEEDS_CSUM | VS_NET_HDR_F_DATA_VALID)) || h->hdr_len > pkt->len) {
        return 0;
    }
    if ((h->flags & VS_NET_HDR_F_NEEDS_CSUM) && !csum_fields_ok(pkt)) {
        return 0;
    }
    return h->gso_type == VS_NET_HDR_GSO_NONE || gso_ok(pkt);
}

uint32_t vs_offload_fit(struct vs_offload_batch *b, struct vs_pkt **pkts, uint32_t n, uint32_t start,
                        uint32_t caps)
{
    b->n = 0;
    b->used = 0;
    uint32_t i;
    for (i = start; i < n; i++) {
        /* Room for this frame whatever it becomes: at most VS_OFFLOAD_MAX_SEGS frames. */
        if (b->n + VS_OFFLOAD_MAX_SEGS > VS_OFFLOAD_MAX_OUT) {
            break;
        }
        struct vs_pkt *pkt = pkts[i];
        if (!needs_fix(pkt, caps)) {
            b->out[b->n++] = pkt;
            continue;
        }
        if (!vs_offload_hdr_valid(pkt)) {
            b->errors++;
            continue;
        }
        uint8_t kind = pkt->vnet.gso_type & (uint8_t)~VS_NET_HDR_GSO_ECN;
        bool ok;
        if (gso_needs_fix(pkt->vnet.gso_type, caps)) {
            /* UDP GSO is offered to no one, so no one should send it. */
            ok = (kind == VS_NET_HDR_GSO_TCPV4 || kind == VS_NET_HDR_GSO_TCPV6) && segment_tcp(b, pkt);
        } else {
            ok = fill_csum(b, pkt);
        }
        if (!ok) {
            b->errors++;
        }
    }
    return i;
}

struct vs_offload_batch *vs_offload_thread_batch(void)
{
    static __thread struct vs_offload_batch *batch;
    if (unlikely(!batch)) {
        batch = calloc(1, sizeof *batch);
    }
    return batch;
}
