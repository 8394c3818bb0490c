/*
 * VXLAN tunnel ports (vxlan.h).  Receive: one recvmmsg per burst into the
 * port's own buffers, each datagram checked (source, flags, VNI) and
 * handed to the PMD in place, behind its 8-byte VXLAN header.  Transmit:
 * one sendmmsg per batch of datagrams, each an iovec of our 16 bytes of
 * UDP + VXLAN header followed by the frame's segments, so the kernel's copy
 * is the only one.  Several PMDs may transmit at once: everything the
 * transmit side writes is on its stack, or an atomic counter.
 *
 * With the AF_XDP underlay (vp->xsk) the same headers are checked and
 * written, only the I/O differs: a burst is the XDP socket's received
 * frames, each checked from its outer Ethernet header on
 * (vs_vxlan_parse_outer) and handed to the PMD in place; a transmit copies
 * each inner frame once into a UMEM frame behind the remote's template and
 * the 16 bytes of UDP + VXLAN header (af_xdp.c's vs_xsk_tx_*).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/filter.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include "vswitch.h"

#define SOCKET_BUFFER_BYTES (4 << 20)
#define TX_BATCH 32                      /* datagrams per sendmmsg */
#define ETH_HLEN 14
#define VLAN_HLEN 4
#define MAC_BYTES 12

int vs_vxlan_port_init(struct vs_vxlan_port *vp)
{
    vp->rx_fd = vp->tx_fd = -1;
    uint64_t hz = vs_tsc_hz();
    vp->rx_backoff_max_cycles = hz / 1000000 * VS_VXLAN_RX_BACKOFF_MAX_NS / 1000;
    vp->rx_backoff_min_cycles = hz / 8000000;
    vp->rx_backoff_cycles = 0;
    vp->rx_next_poll_tsc = 0;
    for (uint32_t i = 0; i < VS_VXLAN_MAX_REMOTES; i++) {
        vp->remotes[i].outer_cur = VS_VXLAN_NO_TEMPLATE;
    }
    if (vp->xsk) {
        vp->rx_bufs = NULL;
        return 0;
    }
    vp->rx_bufs = malloc((size_t)VS_BURST * VS_VXLAN_RX_BUF);
    return vp->rx_bufs ? 0 : -ENOMEM;
}

void vs_vxlan_port_fini(struct vs_vxlan_port *vp)
{
    if (vp->rx_fd >= 0) {
        close(vp->rx_fd);
    }
    if (vp->tx_fd >= 0) {
        close(vp->tx_fd);
    }
    vp->rx_fd = vp->tx_fd = -1;
    free(vp->rx_bufs);
    vp->rx_bufs = NULL;
}

static int fail(struct vs_vxlan_port *vp, const char *what)
{
    int err = errno;
    snprintf(vp->error, sizeof vp->error, "%s", what);
    return -err;
}

/* Bigger socket buffers than the default absorb a burst of 32 x remotes
 * datagrams; FORCE works for root, the plain option is the fallback. */
static void grow_buffer(int fd, int force_opt, int opt)
{
    int bytes = SOCKET_BUFFER_BYTES;
    if (setsockopt(fd, SOL_SOCKET, force_opt, &bytes, sizeof bytes) < 0) {
        setsockopt(fd, SOL_SOCKET, opt, &bytes, sizeof bytes);
    }
}

static int open_sockets(struct vs_vxlan_port *vp)
{
    struct sockaddr_in local = { .sin_family = AF_INET, .sin_addr.s_addr = vp->local_addr,
                                 .sin_port = htons((uint16_t)vp->dst_port) };
    vp->rx_fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (vp->rx_fd < 0) {
        return fail(vp, "UDP socket");
    }
    grow_buffer(vp->rx_fd, SO_RCVBUFFORCE, SO_RCVBUF);
    if (bind(vp->rx_fd, (struct sockaddr *)&local, sizeof local) < 0) {
        return fail(vp, "bind local_ip:dst_port");
    }
    vp->tx_fd = socket(AF_INET, SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_UDP);
    if (vp->tx_fd < 0) {
        return fail(vp, "raw UDP socket (needs CAP_NET_RAW)");
    }
    /* A raw UDP socket would also get a copy of every UDP datagram the host
     * receives: a filter that keeps none of them. */
    struct sock_filter drop_all = BPF_STMT(BPF_RET | BPF_K, 0);
    struct sock_fprog prog = { .len = 1, .filter = &drop_all };
    if (setsockopt(vp->tx_fd, SOL_SOCKET, SO_ATTACH_FILTER, &prog, sizeof prog) < 0) {
        return fail(vp, "filter on the raw socket");
    }
    /* As Linux's vxlan devices by default: no DF bit, the switch itself
     * drops inner frames too large for the underlay (tx_dropped_mtu). */
    int pmtu = IP_PMTUDISC_DONT;
    if (setsockopt(vp->tx_fd, IPPROTO_IP, IP_MTU_DISCOVER, &pmtu, sizeof pmtu) < 0) {
        return fail(vp, "IP_MTU_DISCOVER");
    }
    grow_buffer(vp->tx_fd, SO_SNDBUFFORCE, SO_SNDBUF);
    local.sin_port = 0;
    if (bind(vp->tx_fd, (struct sockaddr *)&local, sizeof local) < 0) {
        return fail(vp, "bind the raw socket to local_ip");
    }
    return 0;
}

/* The smallest path MTU the kernel's routes give towards the remotes (0 if
 * none is known yet): what the underlay takes unless the config says. */
static uint32_t route_mtu(const struct vs_vxlan_port *vp)
{
    uint32_t smallest = 0;
    for (uint32_t i = 0; i < vp->n_remotes; i++) {
        int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        if (fd < 0) {
            continue;
        }
        struct sockaddr_in to = { .sin_family = AF_INET, .sin_addr.s_addr = vp->remotes[i].addr,
                                  .sin_port = htons((uint16_t)vp->dst_port) };
        int mtu = 0;
        socklen_t len = sizeof mtu;
        if (connect(fd, (struct sockaddr *)&to, sizeof to) == 0 &&
            getsockopt(fd, IPPROTO_IP, IP_MTU, &mtu, &len) == 0 && mtu > 0 &&
            (smallest == 0 || (uint32_t)mtu < smallest)) {
            smallest = (uint32_t)mtu;
        }
        close(fd);
    }
    return smallest;
}

int vs_vxlan_port_open(struct vs_vxlan_port *vp, int netns_fd)
{
    int saved;
    int rc = vs_enter_netns(netns_fd, &saved);
    if (rc < 0) {
        snprintf(vp->error, sizeof vp->error, "enter the network namespace");
        return rc;
    }
    /* The AF_XDP underlay needs no socket: its XDP socket is opened by the control plane. */
    rc = vp->xsk ? 0 : open_sockets(vp);
    if (rc == 0) {
        vp->route_mtu = route_mtu(vp);
    }
    vs_leave_netns(saved);
    return rc;
}

static inline int remote_index(const struct vs_vxlan_port *vp, uint32_t addr)
{
    for (uint32_t i = 0; i < vp->n_remotes; i++) {
        if (vp->remotes[i].addr == addr) {
            return (int)i;
        }
    }
    return -1;
}

int vs_vxlan_decap(const struct vs_vxlan_port *vp, uint32_t from_addr, uint8_t *data, uint32_t len,
                   uint16_t *sub)
{
    int remote = remote_index(vp, from_addr);
    if (remote < 0) {
        return VS_VXLAN_UNKNOWN_REMOTE;
    }
    /* Reserved bits are ignored on receipt (RFC 7348 5); the I flag is not. */
    if (len < VS_VXLAN_HLEN + ETH_HLEN || !(data[0] & VS_VXLAN_FLAG_I)) {
        return VS_VXLAN_MALFORMED;
    }
    uint32_t vni = (uint32_t)data[4] << 16 | (uint32_t)data[5] << 8 | data[6];
    *sub = (uint16_t)(remote + 1);
    if (vni == vp->vni) {
        return VS_VXLAN_HLEN;
    }
    for (uint32_t i = 0; i < vp->n_map; i++) {
        if (vp->map_vni[i] == vni) {
            /* The VLAN's tag goes back in, in the room the VXLAN header leaves. */
            uint8_t *frame = data + VS_VXLAN_HLEN - VLAN_HLEN;
            memmove(frame, data + VS_VXLAN_HLEN, MAC_BYTES);
            frame[12] = 0x81;
            frame[13] = 0x00;
            frame[14] = (uint8_t)(vp->map_vlan[i] >> 8);
            frame[15] = (uint8_t)vp->map_vlan[i];
            return VS_VXLAN_HLEN - VLAN_HLEN;
        }
    }
    return VS_VXLAN_WRONG_VNI;
}

/* Copies up to n bytes of the frame's start to out; the number copied. */
static uint32_t frame_start(const struct vs_pkt *pkt, uint8_t *out, uint32_t n)
{
    uint32_t got = 0;
    for (uint32_t s = 0; s < pkt->nsegs && got < n; s++) {
        uint32_t k = pkt->segs[s].len < n - got ? pkt->segs[s].len : n - got;
        memcpy(out + got, pkt->segs[s].addr, k);
        got += k;
    }
    return got;
}

static inline uint32_t mix(uint32_t h, uint32_t v)
{
    h ^= v;
    h *= 0x9e3779b1u;
    return h ^ (h >> 15);
}

static inline uint32_t load32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

uint16_t vs_vxlan_source_port(const struct vs_pkt *pkt)
{
    uint8_t h[ETH_HLEN + VLAN_HLEN + 40 + 4];
    uint32_t len = frame_start(pkt, h, sizeof h);
    uint32_t hash = 0x811c9dc5u;
    if (len < ETH_HLEN) {
        return VS_VXLAN_SRC_PORT_MIN;
    }
    uint32_t off = 12;
    if (h[off] == 0x81 && h[off + 1] == 0x00 && len >= ETH_HLEN + VLAN_HLEN) {
        off += VLAN_HLEN;
    }
    uint16_t type = (uint16_t)(h[off] << 8 | h[off + 1]);
    off += 2;
    uint32_t l4 = 0, proto = 0;
    if (type == 0x0800 && len >= off + 20) {
        uint32_t ihl = (h[off] & 15) * 4u;
        proto = h[off + 9];
        hash = mix(mix(mix(hash, load32(h + off + 12)), load32(h + off + 16)), proto);
        bool first_fragment = (h[off + 6] & 0x1f) == 0 && h[off + 7] == 0;
        if (first_fragment && !(h[off + 6] & 0x20)) {
            l4 = off + ihl;
        }
    } else if (type == 0x86dd && len >= off + 40) {
        proto = h[off + 6];
        for (uint32_t i = 8; i < 40; i += 4) {
            hash = mix(hash, load32(h + off + i));
        }
        hash = mix(hash, proto);
        l4 = off + 40;
    } else {
        /* Not IP: the MAC addresses make the flow. */
        hash = mix(mix(mix(hash, load32(h)), load32(h + 4)), load32(h + 8));
    }
    if (l4 && (proto == 6 || proto == 17) && len >= l4 + 4) {
        hash = mix(hash, load32(h + l4));
    }
    return (uint16_t)(VS_VXLAN_SRC_PORT_MIN + (hash & VS_VXLAN_SRC_PORT_MASK));
}

/* The frame's VLAN id if it starts with an 802.1Q header, else -1. */
static int frame_vlan(const struct vs_pkt *pkt)
{
    uint8_t h[ETH_HLEN + VLAN_HLEN];
    if (frame_start(pkt, h, sizeof h) < sizeof h || h[12] != 0x81 || h[13] != 0x00) {
        return -1;
    }
    return (h[14] & 0x0f) << 8 | h[15];
}

void vs_vxlan_encap_header(const struct vs_vxlan_port *vp, const struct vs_pkt *pkt, uint8_t *out,
                           int *strip_tag)
{
    uint32_t vni = vp->vni;
    *strip_tag = 0;
    if (vp->n_map) {
        int vid = frame_vlan(pkt);
        for (uint32_t i = 0; vid >= 0 && i < vp->n_map; i++) {
            if (vp->map_vlan[i] == vid) {
                vni = vp->map_vni[i];
                *strip_tag = 1;
                break;
            }
        }
    }
    uint16_t src = vs_vxlan_source_port(pkt);
    uint32_t udp_len = VS_VXLAN_UDP_HLEN + VS_VXLAN_HLEN + pkt->len - (*strip_tag ? VLAN_HLEN : 0);
    out[0] = (uint8_t)(src >> 8);
    out[1] = (uint8_t)src;
    out[2] = (uint8_t)(vp->dst_port >> 8);
    out[3] = (uint8_t)vp->dst_port;
    out[4] = (uint8_t)(udp_len >> 8);
    out[5] = (uint8_t)udp_len;
    out[6] = out[7] = 0;                 /* no UDP checksum over IPv4 (RFC 7348 5) */
    memset(out + 8, 0, VS_VXLAN_HLEN);
    out[8] = VS_VXLAN_FLAG_I;
    out[12] = (uint8_t)(vni >> 16);
    out[13] = (uint8_t)(vni >> 8);
    out[14] = (uint8_t)vni;
}

/* --- the AF_XDP underlay's outer headers ------------------------------------ */

static uint16_t ip_checksum(const uint8_t *h, uint32_t len)
{
    uint32_t sum = 0;
    for (uint32_t i = 0; i + 1 < len; i += 2) {
        sum += (uint32_t)h[i] << 8 | h[i + 1];
    }
    while (sum >> 16) {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    return (uint16_t)~sum;
}

void vs_vxlan_set_next_hop(struct vs_vxlan_port *vp, uint32_t remote, const uint8_t *next_hop)
{
    struct vs_vxlan_remote *r = &vp->remotes[remote];
    if (!next_hop) {
        __atomic_store_n(&r->outer_cur, VS_VXLAN_NO_TEMPLATE, __ATOMIC_RELEASE);
        memset(r->next_hop_mac, 0, sizeof r->next_hop_mac);
        return;
    }
    uint32_t cur = __atomic_load_n(&r->outer_cur, __ATOMIC_RELAXED);
    if (cur != VS_VXLAN_NO_TEMPLATE && memcmp(r->next_hop_mac, next_hop, 6) == 0 &&
        memcmp(r->outer[cur] + 6, vp->src_mac, 6) == 0) {
        return;   /* unchanged: the template in use stays */
    }
    uint32_t next = cur == 0 ? 1 : 0;
    uint8_t *h = r->outer[next];
    memcpy(h, next_hop, 6);
    memcpy(h + 6, vp->src_mac, 6);
    h[12] = 0x08;
    h[13] = 0x00;
    uint8_t *ip = h + ETH_HLEN;
    memset(ip, 0, 20);
    ip[0] = 0x45;
    ip[8] = 64;                          /* TTL, as Linux's vxlan device by default */
    ip[9] = 17;
    /* No DF, as the socket path (IP_PMTUDISC_DONT): the switch drops what is too long itself. */
    memcpy(ip + 12, &vp->local_addr, 4);
    memcpy(ip + 16, &r->addr, 4);
    uint16_t sum = ip_checksum(ip, 20);  /* over total length and id 0: each datagram adds its own */
    ip[10] = (uint8_t)(sum >> 8);
    ip[11] = (uint8_t)sum;
    memcpy(r->next_hop_mac, next_hop, 6);
    __atomic_store_n(&r->outer_cur, next, __ATOMIC_RELEASE);
}

/* The remote's current Ethernet + IPv4 template, NULL if its next hop is not resolved. */
static inline const uint8_t *template_of(const struct vs_vxlan_port *vp, uint32_t remote)
{
    const struct vs_vxlan_remote *r = &vp->remotes[remote];
    uint32_t cur = __atomic_load_n(&r->outer_cur, __ATOMIC_ACQUIRE);
    return cur < VS_VXLAN_NO_TEMPLATE ? r->outer[cur] : NULL;
}

/*
 * Writes the outer Ethernet, IPv4, UDP and VXLAN headers of a datagram from
 * the remote's template and its UDP + VXLAN header udp (vs_vxlan_encap_header,
 * whose UDP length gives the IPv4 one).  The transmit path (xsk_tx) and
 * vs_vxlan_outer_header both write with this, so what the tests check is
 * what goes out.
 */
static inline void write_outer(const uint8_t *template, const uint8_t *udp, uint16_t ip_id, uint8_t *out)
{
    memcpy(out, template, VS_VXLAN_ETH_IP_HLEN);
    uint8_t *ip = out + ETH_HLEN;
    uint32_t total = 20 + ((uint32_t)udp[4] << 8 | udp[5]);
    /* The template's checksum covers length and id 0: add them (RFC 1624). */
    uint32_t sum = (uint16_t)~((uint32_t)ip[10] << 8 | ip[11]);
    sum += total + ip_id;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    ip[2] = (uint8_t)(total >> 8);
    ip[3] = (uint8_t)total;
    ip[4] = (uint8_t)(ip_id >> 8);
    ip[5] = (uint8_t)ip_id;
    ip[10] = (uint8_t)(~sum >> 8);
    ip[11] = (uint8_t)~sum;
    memcpy(out + VS_VXLAN_ETH_IP_HLEN, udp, VS_VXLAN_UDP_HLEN + VS_VXLAN_HLEN);
}

int vs_vxlan_outer_header(const struct vs_vxlan_port *vp, uint32_t remote, const struct vs_pkt *pkt,
                          uint16_t ip_id, uint8_t *out, int *strip_tag)
{
    uint8_t udp[VS_VXLAN_UDP_HLEN + VS_VXLAN_HLEN];
    vs_vxlan_encap_header(vp, pkt, udp, strip_tag);
    const uint8_t *template = template_of(vp, remote);
    if (!template) {
        return -1;
    }
    write_outer(template, udp, ip_id, out);
    return 0;
}

int vs_vxlan_parse_outer(const struct vs_vxlan_port *vp, uint8_t *frame, uint32_t len, uint16_t *sub,
                         uint32_t *inner_len)
{
    if (len < VS_VXLAN_ETH_IP_HLEN + VS_VXLAN_UDP_HLEN) {
        return VS_VXLAN_MALFORMED;
    }
    const uint8_t *ip = frame + ETH_HLEN;
    /* The XDP program let only IPv4/UDP with IHL 5 to local_addr:dst_port
     * through; checked again, since a frame's bytes are all this sees. */
    uint16_t dport = (uint16_t)(ip[22] << 8 | ip[23]);
    if (frame[12] != 0x08 || frame[13] != 0x00 || ip[0] != 0x45 || ip[9] != 17 ||
        memcmp(ip + 16, &vp->local_addr, 4) != 0 || dport != vp->dst_port) {
        return VS_VXLAN_MALFORMED;
    }
    if ((ip[6] & 0x3f) || ip[7]) {       /* MF set or a fragment offset */
        return VS_VXLAN_FRAGMENT;
    }
    uint32_t total = (uint32_t)ip[2] << 8 | ip[3];
    uint32_t udp_len = (uint32_t)ip[24] << 8 | ip[25];
    /* Ethernet may pad a short frame: the IPv4 length says where it ends. */
    if (total > len - ETH_HLEN || udp_len != total - 20 || udp_len < VS_VXLAN_UDP_HLEN) {
        return VS_VXLAN_MALFORMED;
    }
    uint32_t from;
    memcpy(&from, ip + 12, 4);
    uint8_t *payload = frame + VS_VXLAN_ETH_IP_HLEN + VS_VXLAN_UDP_HLEN;
    uint32_t payload_len = udp_len - VS_VXLAN_UDP_HLEN;
    int off = vs_vxlan_decap(vp, from, payload, payload_len, sub);
    if (off < 0) {
        return off;
    }
    *inner_len = payload_len - (uint32_t)off;
    return VS_VXLAN_ETH_IP_HLEN + VS_VXLAN_UDP_HLEN + off;
}

/*
 * Calls piece(ctx, bytes, len) for each run of the frame's bytes in order,
 * leaving out bytes [12, 16) if strip_tag: the one walk of a frame's
 * segments both transmits use, the sockets to make iovecs for the kernel,
 * the AF_XDP underlay to copy into a UMEM frame.  Always inlined, so that
 * piece is inlined too and the copy costs what a walk of its own would.
 */
typedef void frame_piece_fn(void *ctx, uint8_t *bytes, uint32_t len);

static inline __attribute__((always_inline)) void frame_walk(const struct vs_pkt *pkt, int strip_tag,
                                                             frame_piece_fn *piece, void *ctx)
{
    uint32_t off = 0;
    uint32_t skip_from = strip_tag ? MAC_BYTES : UINT32_MAX, skip_to = MAC_BYTES + VLAN_HLEN;
    for (uint32_t s = 0; s < pkt->nsegs; s++) {
        uint8_t *p = pkt->segs[s].addr;
        uint32_t start = off, end = off + pkt->segs[s].len;
        off = end;
        if (end <= skip_from || start >= skip_to) {
            if (end > start) {
                piece(ctx, p, end - start);
            }
            continue;
        }
        if (start < skip_from) {
            piece(ctx, p, skip_from - start);
        }
        if (end > skip_to) {
            piece(ctx, p + (skip_to - start), end - skip_to);
        }
    }
}

/* frame_walk's piece for the AF_XDP underlay: ctx is the write pointer. */
static inline void copy_piece(void *ctx, uint8_t *bytes, uint32_t len)
{
    uint8_t **out = ctx;
    memcpy(*out, bytes, len);
    *out += len;
}

/* frame_walk's piece for the sockets: ctx is the iovecs so far. */
struct iov_list {
    struct iovec *iov;
    uint32_t n;
};

static inline void iov_piece(void *ctx, uint8_t *bytes, uint32_t len)
{
    struct iov_list *l = ctx;
    l->iov[l->n++] = (struct iovec){ .iov_base = bytes, .iov_len = len };
}

/* Whether remote has a template (its next hop's MAC is known). */
static inline bool resolved(const struct vs_vxlan_port *vp, uint32_t remote)
{
    return template_of(vp, remote) != NULL;
}

/* The most frames the switch hands a port at once (a burst, or what
 * vs_offload_fit makes of one): xsk_tx takes more in turns of this many. */
#define XSK_TX_MAX VS_OFFLOAD_MAX_OUT

static void xsk_tx_some(struct vs_port *port, struct vs_vxlan_port *vp, struct vs_pkt **pkts, uint32_t n)
{
    struct vs_xsk_port *xp = vp->xsk;
    if (unlikely(__atomic_load_n(&xp->fault, __ATOMIC_ACQUIRE))) {
        __atomic_add_fetch(&port->stats.tx_dropped_down, n, __ATOMIC_RELAXED);
        return;
    }
    uint32_t max = __atomic_load_n(&port->max_frame, __ATOMIC_RELAXED);
    uint64_t too_big = 0, no_neighbour = 0;
    /* First the frames that fit, and how many datagrams: one per resolved
     * remote a frame goes to. */
    const struct vs_pkt *fit[XSK_TX_MAX];
    uint32_t n_fit = 0, need = 0;
    for (uint32_t i = 0; i < n; i++) {
        const struct vs_pkt *pkt = pkts[i];
        if (unlikely((max && pkt->len > max) || pkt->len + VS_VXLAN_OUTER_HLEN > VS_XSK_FRAME_SIZE)) {
            too_big++;
            continue;
        }
        fit[n_fit++] = pkt;
        uint32_t sub = pkt->sub;
        if (sub != VS_SUB_ALL && sub <= vp->n_remotes) {
            bool ok = resolved(vp, sub - 1);
            need += ok;
            no_neighbour += !ok;
            continue;
        }
        for (uint32_t r = 0; r < vp->n_remotes; r++) {
            bool ok = resolved(vp, r);
            need += ok;
            no_neighbour += !ok;
        }
    }
    uint32_t room = need ? vs_xsk_tx_begin(xp, 0, need) : 0;
    uint16_t ip_id = room ? __atomic_fetch_add(&vp->ip_id, (uint16_t)room, __ATOMIC_RELAXED) : 0;
    uint32_t used = 0;
    uint64_t bytes = 0;
    for (uint32_t i = 0; i < n_fit && used < room; i++) {
        const struct vs_pkt *pkt = fit[i];
        uint8_t udp[VS_VXLAN_UDP_HLEN + VS_VXLAN_HLEN];
        int strip_tag;
        vs_vxlan_encap_header(vp, pkt, udp, &strip_tag);
        uint32_t inner = pkt->len - (strip_tag ? VLAN_HLEN : 0);
        uint32_t sub = pkt->sub;
        bool one = sub != VS_SUB_ALL && sub <= vp->n_remotes;
        uint32_t first = one ? sub - 1 : 0, last = one ? sub : vp->n_remotes;
        for (uint32_t r = first; r < last && used < room; r++) {
            /* A remote that lost its template since the count is skipped (its
             * descriptor stays unused and vs_xsk_tx_end gives it back). */
            const uint8_t *template = template_of(vp, r);
            if (unlikely(!template)) {
                continue;
            }
            uint8_t *out = vs_xsk_tx_frame(xp, 0, used, VS_VXLAN_OUTER_HLEN + inner);
            write_outer(template, udp, (uint16_t)(ip_id + used), out);
            out += VS_VXLAN_OUTER_HLEN;
            frame_walk(pkt, strip_tag, copy_piece, &out);
            __atomic_add_fetch(&vp->remotes[r].tx_packets, 1, __ATOMIC_RELAXED);
            used++;
            bytes += pkt->len;
        }
    }
    if (need) {
        vs_xsk_tx_end(xp, 0, room, used, bytes);   /* only after a vs_xsk_tx_begin: it drops the lock */
    }
    __atomic_add_fetch(&vp->stats.tx_packets, used, __ATOMIC_RELAXED);
    __atomic_add_fetch(&vp->stats.tx_bytes, bytes, __ATOMIC_RELAXED);
    if (unlikely(need > room)) {
        __atomic_add_fetch(&vp->stats.tx_ring_full, need - room, __ATOMIC_RELAXED);
    }
    if (unlikely(no_neighbour)) {
        __atomic_add_fetch(&vp->stats.tx_no_neighbour, no_neighbour, __ATOMIC_RELAXED);
    }
    if (unlikely(too_big)) {
        __atomic_add_fetch(&port->stats.tx_dropped_mtu, too_big, __ATOMIC_RELAXED);
    }
}

static void xsk_tx(struct vs_port *port, struct vs_vxlan_port *vp, struct vs_pkt **pkts, uint32_t n)
{
    for (; n > XSK_TX_MAX; pkts += XSK_TX_MAX, n -= XSK_TX_MAX) {
        xsk_tx_some(port, vp, pkts, XSK_TX_MAX);
    }
    xsk_tx_some(port, vp, pkts, n);
}

static uint32_t xsk_rx(struct vs_vxlan_port *vp, struct vs_pkt *pkts, uint32_t max)
{
    uint32_t n = vs_xsk_rx(vp->xsk, 0, pkts, max);
    uint32_t got = 0;
    uint64_t bytes = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint8_t *frame = pkts[i].segs[0].addr;
        uint16_t sub = 0;
        uint32_t inner_len = 0;
        int off = vs_vxlan_parse_outer(vp, frame, pkts[i].len, &sub, &inner_len);
        if (unlikely(off < 0)) {
            vp->stats.rx_unknown_remote += off == VS_VXLAN_UNKNOWN_REMOTE;
            vp->stats.rx_malformed += off == VS_VXLAN_MALFORMED;
            vp->stats.rx_wrong_vni += off == VS_VXLAN_WRONG_VNI;
            vp->stats.rx_fragments += off == VS_VXLAN_FRAGMENT;
            continue;
        }
        struct vs_pkt *pkt = &pkts[got++];
        pkt->len = inner_len;
        pkt->nsegs = 1;
        pkt->head = 0;
        pkt->sub = sub;
        memset(&pkt->vnet, 0, sizeof pkt->vnet);
        pkt->segs[0].addr = frame + off;
        pkt->segs[0].len = inner_len;
        vp->remotes[sub - 1].rx_packets++;
        bytes += inner_len;
    }
    vp->stats.rx_packets += got;
    vp->stats.rx_bytes += bytes;
    return got;
}

struct tx_batch {
    uint32_t n;
    struct mmsghdr msgs[TX_BATCH];
    struct sockaddr_in to[TX_BATCH];
    uint8_t hdrs[TX_BATCH][VS_VXLAN_UDP_HLEN + VS_VXLAN_HLEN];
    uint32_t inner_len[TX_BATCH];
    uint32_t remote[TX_BATCH];
    /* Each frame may need a segment more than it has (the header) and one
     * more where a stripped tag splits a segment. */
    struct iovec iov[TX_BATCH][VS_PKT_MAX_SEGS + 2];
};

static void flush(struct vs_vxlan_port *vp, struct tx_batch *b)
{
    uint32_t sent = 0;
    uint64_t packets = 0, bytes = 0, errors = 0;
    while (sent < b->n) {
        int r = sendmmsg(vp->tx_fd, b->msgs + sent, b->n - sent, MSG_DONTWAIT);
        if (r < 0) {
            if (errno == EINTR) {
                continue;
            }
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS) {
                errors += b->n - sent;   /* the socket's buffer is full: the rest is dropped */
                break;
            }
            errors++;                    /* this one datagram (no route, no neighbour ...) */
            sent++;
            continue;
        }
        for (int k = 0; k < r; k++) {
            bytes += b->inner_len[sent + k];
            __atomic_add_fetch(&vp->remotes[b->remote[sent + k]].tx_packets, 1, __ATOMIC_RELAXED);
        }
        packets += (uint64_t)r;
        sent += (uint32_t)r;
    }
    __atomic_add_fetch(&vp->stats.tx_packets, packets, __ATOMIC_RELAXED);
    __atomic_add_fetch(&vp->stats.tx_bytes, bytes, __ATOMIC_RELAXED);
    if (errors) {
        __atomic_add_fetch(&vp->stats.tx_errors, errors, __ATOMIC_RELAXED);
    }
    b->n = 0;
}

static void add(struct vs_vxlan_port *vp, struct tx_batch *b, const struct vs_pkt *pkt, const uint8_t *hdr,
                int strip_tag, uint32_t remote)
{
    uint32_t i = b->n++;
    memcpy(b->hdrs[i], hdr, sizeof b->hdrs[i]);
    b->to[i] = (struct sockaddr_in){ .sin_family = AF_INET, .sin_addr.s_addr = vp->remotes[remote].addr };
    b->inner_len[i] = pkt->len;
    b->remote[i] = remote;
    memset(&b->msgs[i], 0, sizeof b->msgs[i]);
    b->msgs[i].msg_hdr.msg_name = &b->to[i];
    b->msgs[i].msg_hdr.msg_namelen = sizeof b->to[i];
    b->msgs[i].msg_hdr.msg_iov = b->iov[i];
    struct iov_list l = { .iov = b->iov[i], .n = 0 };
    iov_piece(&l, b->hdrs[i], sizeof b->hdrs[i]);
    frame_walk(pkt, strip_tag, iov_piece, &l);
    b->msgs[i].msg_hdr.msg_iovlen = l.n;
    if (b->n == TX_BATCH) {
        flush(vp, b);
    }
}

static void vxlan_tx_burst(struct vs_port *port, uint32_t queue_hint, struct vs_pkt **pkts, uint32_t n,
                           uint32_t unicast)
{
    struct vs_vxlan_port *vp = port->priv;
    if (vp->xsk) {
        xsk_tx(port, vp, pkts, n);
        return;
    }
    struct tx_batch b;
    uint8_t hdr[VS_VXLAN_UDP_HLEN + VS_VXLAN_HLEN];
    uint32_t max = __atomic_load_n(&port->max_frame, __ATOMIC_RELAXED);
    uint64_t too_big = 0;
    b.n = 0;
    for (uint32_t i = 0; i < n; i++) {
        const struct vs_pkt *pkt = pkts[i];
        int strip_tag;
        /* The PMD lets GSO frames past its MTU check; their segments are checked here. */
        if (unlikely(max && pkt->len > max)) {
            too_big++;
            continue;
        }
        vs_vxlan_encap_header(vp, pkt, hdr, &strip_tag);
        uint32_t sub = pkt->sub;
        if (sub != VS_SUB_ALL && sub <= vp->n_remotes) {
            add(vp, &b, pkt, hdr, strip_tag, sub - 1);
            continue;
        }
        /* Unknown destination or broadcast: a copy to every remote (head-end replication). */
        for (uint32_t r = 0; r < vp->n_remotes; r++) {
            add(vp, &b, pkt, hdr, strip_tag, r);
        }
    }
    if (b.n) {
        flush(vp, &b);
    }
    if (unlikely(too_big)) {
        __atomic_add_fetch(&port->stats.tx_dropped_mtu, too_big, __ATOMIC_RELAXED);
    }
}

static uint32_t vxlan_rx_burst(struct vs_port *port, uint32_t queue, struct vs_pkt *pkts, uint32_t max)
{
    struct vs_vxlan_port *vp = port->priv;
    struct mmsghdr msgs[VS_BURST];
    struct iovec iov[VS_BURST];
    struct sockaddr_in from[VS_BURST];
    if (max > VS_BURST) {
        max = VS_BURST;
    }
    if (vp->xsk) {
        return xsk_rx(vp, pkts, max);
    }
    /* An empty recvmmsg is a system call for nothing, and most polls of an
     * idle or lightly loaded tunnel are empty: after one, the socket is left
     * alone for a while that doubles up to rx_backoff_max_cycles. */
    uint64_t now = 0;
    if (vp->rx_backoff_cycles) {
        now = vs_rdtsc();
        if (now < vp->rx_next_poll_tsc) {
            vp->stats.rx_polls_skipped++;
            return 0;
        }
    }
    for (uint32_t i = 0; i < max; i++) {
        iov[i] = (struct iovec){ .iov_base = vp->rx_bufs + (size_t)i * VS_VXLAN_RX_BUF,
                                 .iov_len = VS_VXLAN_RX_BUF };
        memset(&msgs[i], 0, sizeof msgs[i]);
        msgs[i].msg_hdr.msg_name = &from[i];
        msgs[i].msg_hdr.msg_namelen = sizeof from[i];
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    int r = recvmmsg(vp->rx_fd, msgs, max, MSG_DONTWAIT, NULL);
    vp->stats.rx_polls++;
    if (r <= 0) {
        if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            vp->stats.rx_errors++;
        }
        vp->stats.rx_empty_polls++;
        uint64_t b = vp->rx_backoff_cycles ? vp->rx_backoff_cycles * 2 : vp->rx_backoff_min_cycles;
        vp->rx_backoff_cycles = b < vp->rx_backoff_max_cycles ? b : vp->rx_backoff_max_cycles;
        vp->rx_next_poll_tsc = (now ? now : vs_rdtsc()) + vp->rx_backoff_cycles;
        return 0;
    }
    vp->rx_backoff_cycles = 0;
    uint32_t got = 0;
    uint64_t bytes = 0;
    for (int i = 0; i < r; i++) {
        uint8_t *data = iov[i].iov_base;
        uint32_t len = msgs[i].msg_len;
        uint16_t sub = 0;
        int off = (msgs[i].msg_hdr.msg_flags & MSG_TRUNC) || msgs[i].msg_hdr.msg_namelen < sizeof from[i]
                      ? VS_VXLAN_MALFORMED
                      : vs_vxlan_decap(vp, from[i].sin_addr.s_addr, data, len, &sub);
        if (unlikely(off < 0)) {
            vp->stats.rx_unknown_remote += off == VS_VXLAN_UNKNOWN_REMOTE;
            vp->stats.rx_malformed += off == VS_VXLAN_MALFORMED;
            vp->stats.rx_wrong_vni += off == VS_VXLAN_WRONG_VNI;
            continue;
        }
        struct vs_pkt *pkt = &pkts[got++];
        pkt->len = len - (uint32_t)off;
        pkt->nsegs = 1;
        pkt->head = 0;
        pkt->sub = sub;
        memset(&pkt->vnet, 0, sizeof pkt->vnet);
        pkt->segs[0].addr = data + off;
        pkt->segs[0].len = pkt->len;
        vp->remotes[sub - 1].rx_packets++;
        bytes += pkt->len;
    }
    vp->stats.rx_packets += got;
    vp->stats.rx_bytes += bytes;
    return got;
}

static void vxlan_rx_done(struct vs_port *port, uint32_t queue, struct vs_pkt *pkts, uint32_t n)
{
    struct vs_vxlan_port *vp = port->priv;
    if (vp->xsk) {
        vs_xsk_rx_done(vp->xsk, 0);
    }
}

static int vxlan_idle_pending(struct vs_port *port, uint32_t queue)
{
    struct vs_vxlan_port *vp = port->priv;
    return vp->xsk ? vs_xsk_idle_pending(vp->xsk, 0) : 0;
}

static int vxlan_idle_arm(struct vs_port *port, uint32_t queue)
{
    struct vs_vxlan_port *vp = port->priv;
    if (vp->xsk) {
        return vs_xsk_idle_arm(vp->xsk, 0);
    }
    return vp->rx_fd >= 0 ? vp->rx_fd : VS_IDLE_NOTHING;
}

/* A sleep ends when the socket turns readable (or on a timeout): the next
 * pass looks at once, whatever the backoff said. */
static void vxlan_idle_disarm(struct vs_port *port, uint32_t queue, int woke)
{
    struct vs_vxlan_port *vp = port->priv;
    vp->rx_backoff_cycles = 0;
    vp->rx_next_poll_tsc = 0;
}

static int vxlan_link_state(struct vs_port *port)
{
    struct vs_vxlan_port *vp = port->priv;
    return vp->xsk ? vs_xsk_link_state(vp->xsk) : 1;
}

static const struct vs_port_ops vxlan_ops = {
    .name = "vxlan",
    .rx_burst = vxlan_rx_burst,
    .rx_done = vxlan_rx_done,
    .tx_burst = vxlan_tx_burst,
    /* No offloads: a partial checksum or a TSO frame is completed or cut
     * into MTU-sized frames by offload.c before it is encapsulated. */
    .offload_caps = NULL,
    .idle_arm = vxlan_idle_arm,
    .idle_disarm = vxlan_idle_disarm,
    .idle_pending = vxlan_idle_pending,
    .link_state = vxlan_link_state,
};

const struct vs_port_ops *vs_vxlan_port_ops(void)
{
    return &vxlan_ops;
}
