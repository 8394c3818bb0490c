/*
 * Kernel-side ports: TAP interfaces and AF_PACKET sockets, read and written
 * by the PMD in bursts.
 *
 * TAP: the kernel offers no batch read on a TAP fd, so a receive burst is
 * one read() per frame into the port's buffer pool (stopped by EAGAIN), and
 * a transmit is one writev() per frame, straight from the source segments:
 * no copy besides the kernel's own.  Every frame carries a virtio-net
 * header (IFF_VNET_HDR), so checksum and TSO offloads pass between a guest
 * and the host stack untouched when both sides can handle them.
 *
 * AF_PACKET: mmap'd TPACKET_V2 rings, no syscall per frame.  Received
 * frames are read in place in the RX ring and the slots go back to the
 * kernel at the next poll of the queue, after the PMD has forwarded them.
 * Transmitted frames are copied into the TX ring and sent with one
 * sendto() per burst; PACKET_QDISC_BYPASS skips the qdisc layer (a switch
 * port queues nothing), PACKET_IGNORE_OUTGOING keeps our own frames out of
 * the RX ring, and PACKET_MR_PROMISC holds the interface promiscuous for
 * exactly as long as the socket lives.
 *
 * Down is not gone.  A write that meets a down interface (EIO from the tun
 * driver, ENETDOWN from a packet socket) drops its frames and counts them
 * in tx_dropped; the control plane follows the link (vs_kport_link_state,
 * woken by the notifications described there) and the PMD stops sending
 * while it is down.  Only an fd that reports the interface gone for good
 * (EBADF, EBADFD: the TAP was deleted; ENXIO, ENODEV: the packet socket
 * lost its interface) sets kp->fault; the port then neither reads nor
 * writes until the control plane closes it.  Nothing here ever blocks.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <linux/if_tun.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <poll.h>
#include <sched.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>
#include <arpa/inet.h>

#include "vswitch.h"

_Static_assert(VS_KPORT_MAX_QUEUES <= VS_MAX_PORT_QUEUES, "the PMD has a poll slot for every queue (pmd.h)");

/* AF_PACKET ring geometry. */
#define RX_FRAME_SIZE 2048            /* without a virtio-net header: one MTU-sized frame */
#define RX_FRAMES 1024
#define RX_VNET_FRAME_SIZE (65536 + 4096) /* with offloads a frame may be a 64 KiB GSO frame */
#define RX_VNET_FRAMES 64
#define TX_FRAME_SIZE 16384           /* a 9000-byte jumbo frame plus headers */
#define TX_FRAMES 256
#define TX_VNET_FRAME_SIZE (65536 + 4096) /* with offloads: a 64 KiB GSO frame */
#define TX_VNET_FRAMES 64

/* Where frame data starts in a TX slot (the kernel's tp_hdrlen - sizeof(sockaddr_ll)). */
#define TX_DATA_OFF TPACKET_ALIGN(sizeof(struct tpacket2_hdr))

void vs_kport_init(struct vs_kport *kp)
{
    memset(kp, 0, sizeof *kp);
    for (uint32_t q = 0; q < VS_KPORT_MAX_QUEUES; q++) {
        kp->fds[q] = -1;
    }
    kp->link_fd = -1;
}

/* The calling thread enters netns_fd (if >= 0); *saved is where it came from. */
int vs_enter_netns(int netns_fd, int *saved)
{
    *saved = -1;
    if (netns_fd < 0) {
        return 0;
    }
    *saved = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
    if (*saved < 0) {
        return -errno;
    }
    if (setns(netns_fd, CLONE_NEWNET) < 0) {
        int err = -errno;
        close(*saved);
        *saved = -1;
        return err;
    }
    return 0;
}

void vs_leave_netns(int saved)
{
    if (saved >= 0) {
        /* Cannot fail for a namespace we were in a moment ago. */
        if (setns(saved, CLONE_NEWNET) < 0) {
            perror("vswitch: setns back to the switch's network namespace");
        }
        close(saved);
    }
}

/* Gives the interface an MTU, before the port uses it (the interface is in
 * the calling thread's namespace). */
static int set_if_mtu(const char *ifname, uint32_t mtu)
{
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) {
        return -errno;
    }
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", ifname);
    ifr.ifr_mtu = (int)mtu;
    int err = ioctl(s, SIOCSIFMTU, &ifr) < 0 ? -errno : 0;
    close(s);
    return err;
}

/*
 * The interface's MTU, asked through a socket of the port's own namespace
 * (the packet socket, or a TAP's rtnetlink socket): the kernel answers
 * SIOCGIFMTU on any socket, for the socket's namespace.  A TAP moved to
 * another namespace is not found there: the caller keeps what it knew.
 */
int vs_kport_mtu(struct vs_kport *kp)
{
    int s = kp->kind == VS_KPORT_AF_PACKET ? kp->fds[0] : kp->link_fd;
    if (s < 0) {
        return -EBADF;
    }
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", kp->ifname);
    if (ioctl(s, SIOCGIFMTU, &ifr) < 0) {
        return -errno;
    }
    return ifr.ifr_mtu;
}

static int set_if_up(const char *ifname)
{
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) {
        return -errno;
    }
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", ifname);
    int rc = ioctl(s, SIOCGIFFLAGS, &ifr);
    if (rc == 0 && !(ifr.ifr_flags & IFF_UP)) {
        ifr.ifr_flags |= IFF_UP;
        rc = ioctl(s, SIOCSIFFLAGS, &ifr);
    }
    int err = rc < 0 ? -errno : 0;
    close(s);
    return err;
}

/*
 * Following the link without polling it.  The control plane waits on
 * kp->link_fd, an rtnetlink socket subscribed to link changes in the
 * namespace the port's fds were opened in, and looks at the link
 * (vs_kport_link_state) when one arrives; its once-a-second housekeeping
 * looks too, as a backstop.  That namespace is already held alive by the
 * port's own fds, so the socket pins nothing new.
 *
 * A TAP may move into another namespace (container tools do this) and
 * its fd stays valid there.  NETLINK_LISTEN_ALL_NSID also brings the link
 * changes of the namespaces that have an id here, and the kernel gives the
 * target one when it moves an interface out of here.  Wherever the TAP
 * is, its fd itself tells whether it is up (POLLOUT, see tap_link_state),
 * and it turns writable when the TAP comes up (the tun driver wakes
 * writers then, for writers that met EIO), which the control plane waits
 * for while the link is down.  No socket is ever opened in the TAP's new
 * namespace: it would keep that namespace, and the TAP in it, alive after
 * its container is gone.
 *
 * Failing to open the socket costs promptness only, so it is not an error.
 */
int vs_link_watch_open(void)
{
    int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC, NETLINK_ROUTE);
    if (fd < 0) {
        return -1;
    }
    struct sockaddr_nl snl;
    memset(&snl, 0, sizeof snl);
    snl.nl_family = AF_NETLINK;
    snl.nl_groups = RTMGRP_LINK;
    if (bind(fd, (struct sockaddr *)&snl, sizeof snl) < 0) {
        close(fd);
        return -1;
    }
    int one = 1;
    (void)setsockopt(fd, SOL_NETLINK, NETLINK_LISTEN_ALL_NSID, &one, sizeof one);
    return fd;
}

static void open_link_watch(struct vs_kport *kp)
{
    kp->link_fd = vs_link_watch_open();
}

static int open_tap_queues(struct vs_kport *kp, const char *ifname, uint32_t nqueues, int offloads)
{
    for (uint32_t q = 0; q < nqueues; q++) {
        int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
        if (fd < 0) {
            return -errno;
        }
        kp->fds[q] = fd;
        struct ifreq ifr;
        memset(&ifr, 0, sizeof ifr);
        ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (nqueues > 1 ? IFF_MULTI_QUEUE : 0);
        /* The first queue creates the interface; the others attach to it by its real name. */
        snprintf(ifr.ifr_name, IFNAMSIZ, "%s", q == 0 ? ifname : kp->ifname);
        if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
            return -errno;
        }
        if (q == 0) {
            snprintf(kp->ifname, sizeof kp->ifname, "%s", ifr.ifr_name);
        }
        int hdr_len = VS_KPORT_NET_HDR_LEN;
        if (ioctl(fd, TUNSETVNETHDRSZ, &hdr_len) < 0) {
            return -errno;
        }
        /* Without TUN_F_CSUM the kernel completes checksums before handing us
         * a frame and never sends GSO frames; with it, both pass through. */
        unsigned int flags = offloads ? TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN : 0;
        if (ioctl(fd, TUNSETOFFLOAD, flags) < 0) {
            return -errno;
        }
    }
    return 0;
}

int vs_kport_open_tap(struct vs_kport *kp, const char *ifname, uint32_t nqueues, int netns_fd,
                      int offloads)
{
    if (nqueues == 0 || nqueues > VS_KPORT_MAX_QUEUES) {
        return -EINVAL;
    }
    kp->kind = VS_KPORT_TAP;
    kp->nqueues = nqueues;
    kp->vnet_hdr = 1;
    for (uint32_t q = 0; q < nqueues; q++) {
        kp->pool[q] = mmap(NULL, (size_t)VS_BURST * VS_KPORT_BUF_SIZE, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (kp->pool[q] == MAP_FAILED) {
            kp->pool[q] = NULL;
            return -ENOMEM;
        }
    }
    int saved;
    int err = vs_enter_netns(netns_fd, &saved);
    if (err) {
        return err;
    }
    kp->offload_caps = offloads ? VS_OFFLOAD_ALL : 0;
    err = open_tap_queues(kp, ifname, nqueues, offloads);
    if (!err && kp->mtu_request) {
        err = set_if_mtu(kp->ifname, kp->mtu_request);
    }
    if (!err) {
        err = set_if_up(kp->ifname);
    }
    if (!err) {
        kp->ifindex = (int)if_nametoindex(kp->ifname);
        open_link_watch(kp);
    }
    vs_leave_netns(saved);
    return err;
}

static int setsockopt_int(int fd, int level, int name, int value)
{
    return setsockopt(fd, level, name, &value, sizeof value) < 0 ? -errno : 0;
}

/* Sets up the RX and TX rings of one AF_PACKET socket and maps them. */
static int setup_rings(int fd, struct vs_kport_ring *r, int vnet_hdr)
{
    uint32_t frame = vnet_hdr ? RX_VNET_FRAME_SIZE : RX_FRAME_SIZE;
    uint32_t frames = vnet_hdr ? RX_VNET_FRAMES : RX_FRAMES;
    struct tpacket_req rx;
    memset(&rx, 0, sizeof rx);
    rx.tp_block_size = frame;               /* a multiple of the page size */
    rx.tp_block_nr = frames;
    rx.tp_frame_size = frame;
    rx.tp_frame_nr = frames;
    r->rx_slots = frames;
    r->rx_slot_size = frame;
    if (setsockopt(fd, SOL_PACKET, PACKET_RX_RING, &rx, sizeof rx) < 0) {
        return -errno;
    }
    uint32_t tx_frame = vnet_hdr ? TX_VNET_FRAME_SIZE : TX_FRAME_SIZE;
    uint32_t tx_frames = vnet_hdr ? TX_VNET_FRAMES : TX_FRAMES;
    struct tpacket_req tx;
    memset(&tx, 0, sizeof tx);
    tx.tp_block_size = tx_frame;
    tx.tp_block_nr = tx_frames;
    tx.tp_frame_size = tx_frame;
    tx.tp_frame_nr = tx_frames;
    if (setsockopt(fd, SOL_PACKET, PACKET_TX_RING, &tx, sizeof tx) < 0) {
        return -errno;
    }
    uint64_t rx_bytes = (uint64_t)rx.tp_block_size * rx.tp_block_nr;
    uint64_t tx_bytes = (uint64_t)tx_frame * tx_frames;
    void *map = mmap(NULL, rx_bytes + tx_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
    if (map == MAP_FAILED) {
        return -errno;
    }
    r->map = map;
    r->map_len = rx_bytes + tx_bytes;
    r->rx = map;
    r->tx = (uint8_t *)map + rx_bytes;
    r->tx_frames = tx_frames;
    r->tx_frame_size = tx_frame;
    return 0;
}

static int open_packet_socket(struct vs_kport *kp, int vnet_hdr)
{
    int fd = socket(AF_PACKET, SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);  /* 0: nothing until bind */
    if (fd < 0) {
        return -errno;
    }
    kp->fds[0] = fd;
    int err = setsockopt_int(fd, SOL_PACKET, PACKET_VERSION, TPACKET_V2);
    if (!err && vnet_hdr) {
        err = setsockopt_int(fd, SOL_PACKET, PACKET_VNET_HDR, 1);
    }
    if (!err) {
        err = setsockopt_int(fd, SOL_PACKET, PACKET_QDISC_BYPASS, 1);
    }
    if (!err) {
        err = setsockopt_int(fd, SOL_PACKET, PACKET_IGNORE_OUTGOING, 1);
    }
    if (!err) {
        err = setup_rings(fd, &kp->rings[0], vnet_hdr);
    }
    if (err) {
        return err;
    }
    struct sockaddr_ll sll;
    memset(&sll, 0, sizeof sll);
    sll.sll_family = AF_PACKET;
    sll.sll_protocol = htons(ETH_P_ALL);
    sll.sll_ifindex = kp->ifindex;
    if (bind(fd, (struct sockaddr *)&sll, sizeof sll) < 0) {
        return -errno;
    }
    struct packet_mreq mreq;
    memset(&mreq, 0, sizeof mreq);
    mreq.mr_ifindex = kp->ifindex;
    mreq.mr_type = PACKET_MR_PROMISC;
    if (setsockopt(fd, SOL_PACKET, PACKET_ADD_MEMBERSHIP, &mreq, sizeof mreq) < 0) {
        return -errno;
    }
    return 0;
}

int vs_kport_open_af_packet(struct vs_kport *kp, const char *ifname, int netns_fd, int vnet_hdr)
{
    kp->kind = VS_KPORT_AF_PACKET;
    kp->nqueues = 1;
    kp->vnet_hdr = vnet_hdr ? 1 : 0;
    /* The kernel segments and checksums what we send with a virtio-net header. */
    kp->offload_caps = vnet_hdr ? VS_OFFLOAD_ALL : 0;
    snprintf(kp->ifname, sizeof kp->ifname, "%s", ifname);
    int saved;
    int err = vs_enter_netns(netns_fd, &saved);
    if (err) {
        return err;
    }
    kp->ifindex = (int)if_nametoindex(ifname);
    if (kp->ifindex == 0) {
        err = -ENODEV;
    } else if (kp->mtu_request) {
        err = set_if_mtu(ifname, kp->mtu_request);
    }
    if (!err) {
        err = open_packet_socket(kp, vnet_hdr);
    }
    if (!err) {
        open_link_watch(kp);
    }
    vs_leave_netns(saved);
    return err;
}

void vs_kport_close(struct vs_kport *kp)
{
    for (uint32_t q = 0; q < VS_KPORT_MAX_QUEUES; q++) {
        struct vs_kport_ring *r = &kp->rings[q];
        if (r->map) {
            munmap(r->map, r->map_len);
            r->map = NULL;
        }
        if (kp->fds[q] >= 0) {
            /* Closing the last TAP fd deletes the interface; closing a
             * packet socket drops its promiscuous membership. */
            close(kp->fds[q]);
            kp->fds[q] = -1;
        }
        if (kp->pool[q]) {
            munmap(kp->pool[q], (size_t)VS_BURST * VS_KPORT_BUF_SIZE);
            kp->pool[q] = NULL;
        }
    }
    if (kp->link_fd >= 0) {
        close(kp->link_fd);
        kp->link_fd = -1;
    }
}

static void set_fault(struct vs_kport *kp, int err)
{
    __atomic_store_n(&kp->fault_errno, err, __ATOMIC_RELAXED);
    __atomic_store_n(&kp->fault, VS_KPORT_GONE, __ATOMIC_RELEASE);
}

/* A TAP, wherever it lives now: its fd answers, no socket in its namespace needed. */
static int tap_link_state(struct vs_kport *kp)
{
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    if (ioctl(kp->fds[0], TUNGETIFF, &ifr) < 0) {
        return -errno;   /* EBADFD: the interface was deleted */
    }
    /* The tun driver reports POLLOUT exactly while the interface is up
     * (a TAP's send buffer is unlimited), POLLERR while it is going away. */
    struct pollfd p = { .fd = kp->fds[0], .events = POLLOUT };
    if (poll(&p, 1, 0) < 0) {
        return -errno;
    }
    if (p.revents & (POLLERR | POLLNVAL)) {
        return -EBADFD;
    }
    return (p.revents & POLLOUT) ? 1 : 0;
}

/* A packet socket asks about its interface in the socket's own namespace. */
static int packet_link_state(struct vs_kport *kp)
{
    int s = kp->fds[0];
    struct sockaddr_ll sll;
    socklen_t len = sizeof sll;
    if (getsockname(s, (struct sockaddr *)&sll, &len) < 0) {
        return -errno;
    }
    /* The kernel unbinds the socket (ifindex -1) when its interface is
     * deleted or leaves the namespace, and never binds it again. */
    if (sll.sll_ifindex != kp->ifindex) {
        return -ENODEV;
    }
    /* Since the interface went down the socket holds ENETDOWN as a pending
     * error: take it, or the PMD's poll reports it over and over, and the
     * first send after the link returns fails on it. */
    int pending;
    len = sizeof pending;
    (void)getsockopt(s, SOL_SOCKET, SO_ERROR, &pending, &len);
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_ifindex = kp->ifindex;
    if (ioctl(s, SIOCGIFNAME, &ifr) < 0 || ioctl(s, SIOCGIFFLAGS, &ifr) < 0) {
        return -errno;   /* ENODEV: deleted this very moment */
    }
    return (ifr.ifr_flags & IFF_UP) && (ifr.ifr_flags & IFF_RUNNING) ? 1 : 0;
}

/* The interface is gone for this fd for good. */
static inline bool gone_errno(int err)
{
    return err == EBADF || err == EBADFD || err == ENXIO || err == ENODEV;
}

/* The interface is there but down: the frames are dropped, the link follows. */
static inline bool down_errno(int err)
{
    return err == EIO || err == ENETDOWN;
}

int vs_kport_link_state(struct vs_kport *kp)
{
    if (__atomic_load_n(&kp->fault, __ATOMIC_ACQUIRE)) {
        return -__atomic_load_n(&kp->fault_errno, __ATOMIC_RELAXED);
    }
    if (kp->fds[0] < 0) {
        return -EBADF;
    }
    int state = kp->kind == VS_KPORT_AF_PACKET ? packet_link_state(kp) : tap_link_state(kp);
    if (state < 0 && gone_errno(-state)) {
        /* The PMD stops polling an fd that would only report errors from now on. */
        set_fault(kp, -state);
    }
    return state;
}

int vs_link_watch_drain(int link_fd)
{
    if (link_fd < 0) {
        return -EBADF;
    }
    /* Only "something changed" matters, as the caller then looks at the
     * link itself: the messages are not parsed.  ENOBUFS (the socket
     * overflowed and lost some) says the same. */
    char buf[8192];
    int n = 0;
    /* Bounded: a storm of link changes must not hold the event loop; it calls again. */
    while (n < 64) {
        ssize_t r = recv(link_fd, buf, sizeof buf, MSG_DONTWAIT);
        if (r >= 0 || errno == ENOBUFS || errno == EINTR) {
            n++;
            continue;
        }
        return errno == EAGAIN ? n : -errno;
    }
    return n;
}

int vs_kport_link_events(struct vs_kport *kp)
{
    return vs_link_watch_drain(kp->link_fd);
}

static inline void hdr_from_wire(struct vs_net_hdr *h, const uint8_t *p)
{
    h->flags = p[0];
    h->gso_type = p[1];
    memcpy(&h->hdr_len, p + 2, 2);    /* little endian on x86, as the tun driver's default */
    memcpy(&h->gso_size, p + 4, 2);
    memcpy(&h->csum_start, p + 6, 2);
    memcpy(&h->csum_offset, p + 8, 2);
}

static inline void hdr_to_wire(uint8_t *p, const struct vs_net_hdr *h)
{
    p[0] = h->flags;
    p[1] = h->gso_type;
    memcpy(p + 2, &h->hdr_len, 2);
    memcpy(p + 4, &h->gso_size, 2);
    memcpy(p + 6, &h->csum_start, 2);
    memcpy(p + 8, &h->csum_offset, 2);
}

/* --- TAP ------------------------------------------------------------------ */

static uint32_t tap_rx_burst(struct vs_kport *kp, uint32_t q, struct vs_pkt *pkts, uint32_t max)
{
    struct vs_kport_stats *st = &kp->stats[q];
    uint8_t *pool = kp->pool[q];
    uint32_t got = 0;
    uint64_t bytes = 0;
    /* One read per frame: a TAP fd has no batch receive. */
    for (uint32_t tries = 0; got < max && tries < max; tries++) {
        uint8_t *buf = pool + (size_t)got * VS_KPORT_BUF_SIZE;
        ssize_t n = read(kp->fds[q], buf, VS_KPORT_BUF_SIZE);
        if (n < 0) {
            if (errno != EAGAIN && errno != EINTR) {
                st->rx_errors++;
                if (gone_errno(errno)) {
                    set_fault(kp, errno);
                }
            }
            break;
        }
        if (unlikely(n < VS_KPORT_NET_HDR_LEN + 14)) {
            st->rx_dropped++;
            continue;
        }
        struct vs_pkt *pkt = &pkts[got++];
        hdr_from_wire(&pkt->vnet, buf);
        pkt->len = (uint32_t)n - VS_KPORT_NET_HDR_LEN;
        pkt->nsegs = 1;
        pkt->head = 0;
        pkt->segs[0].addr = buf + VS_KPORT_NET_HDR_LEN;
        pkt->segs[0].len = pkt->len;
        bytes += pkt->len;
    }
    st->rx_packets += got;
    st->rx_bytes += bytes;
    return got;
}

static void tap_tx_burst(struct vs_kport *kp, uint32_t q, struct vs_pkt **pkts, uint32_t n)
{
    struct vs_kport_stats *st = &kp->stats[q];
    struct iovec iov[VS_PKT_MAX_SEGS + 1];
    uint8_t hdr[VS_KPORT_NET_HDR_LEN];
    iov[0].iov_base = hdr;
    iov[0].iov_len = sizeof hdr;
    for (uint32_t i = 0; i < n; i++) {
        const struct vs_pkt *pkt = pkts[i];
        hdr_to_wire(hdr, &pkt->vnet);
        for (uint32_t s = 0; s < pkt->nsegs; s++) {
            iov[s + 1].iov_base = pkt->segs[s].addr;
            iov[s + 1].iov_len = pkt->segs[s].len;
        }
        /* One writev per frame, from the source's memory: the only copy is the kernel's. */
        ssize_t w = writev(kp->fds[q], iov, (int)pkt->nsegs + 1);
        if (likely(w >= 0)) {
            st->tx_packets++;
            st->tx_bytes += pkt->len;
        } else if (errno == EAGAIN) {
            st->tx_dropped++;
        } else if (down_errno(errno)) {
            st->tx_dropped += n - i;   /* the rest of the burst would meet the same */
            return;
        } else {
            st->tx_errors++;
            if (gone_errno(errno)) {
                set_fault(kp, errno);
                st->tx_dropped += n - i - 1;
                return;
            }
        }
    }
}

/* --- AF_PACKET ------------------------------------------------------------- */

/* Gives the slots the PMD has finished with back to the kernel. */
static inline void release_held(struct vs_kport_ring *r)
{
    for (uint32_t i = 0; i < r->rx_hold_n; i++) {
        uint32_t slot = (r->rx_hold_first + i) % r->rx_slots;
        struct tpacket2_hdr *h = (void *)(r->rx + (size_t)slot * r->rx_slot_size);
        __atomic_store_n(&h->tp_status, TP_STATUS_KERNEL, __ATOMIC_RELEASE);
    }
    r->rx_hold_n = 0;
}

/*
 * The kernel hands AF_PACKET sockets a VLAN-tagged frame without its tag,
 * which it keeps in tp_vlan_tci (it untags every frame on receive, or the
 * device did).  The switch carries tags in the frame, so the tag goes back
 * in: the 12 MAC bytes move 4 bytes down into the slot's slack before the
 * frame (there are at least 14: the kernel aligns the network header to 16
 * past the tpacket2_hdr and sockaddr_ll) and the tag is written after them.
 * The virtio-net header before the frame has been read by then.
 */
static inline bool restore_vlan_tag(struct tpacket2_hdr *h, struct vs_pkt *pkt, uint8_t **mac, uint32_t *snaplen)
{
    if (likely(!(h->tp_status & TP_STATUS_VLAN_VALID))) {
        return true;
    }
    uint8_t *floor = (uint8_t *)h + TPACKET_ALIGN(sizeof(struct tpacket2_hdr)) + sizeof(struct sockaddr_ll);
    if (unlikely(*mac - 4 < floor)) {
        return false;
    }
    uint16_t tpid = (h->tp_status & TP_STATUS_VLAN_TPID_VALID) && h->tp_vlan_tpid ? h->tp_vlan_tpid : 0x8100;
    uint8_t *m = *mac - 4;
    memmove(m, *mac, 12);
    m[12] = (uint8_t)(tpid >> 8);
    m[13] = (uint8_t)tpid;
    m[14] = (uint8_t)(h->tp_vlan_tci >> 8);
    m[15] = (uint8_t)h->tp_vlan_tci;
    *mac = m;
    *snaplen += 4;
    if (pkt->vnet.flags & VS_NET_HDR_F_NEEDS_CSUM) {
        pkt->vnet.csum_start += 4;
    }
    if (pkt->vnet.hdr_len) {
        pkt->vnet.hdr_len += 4;
    }
    return true;
}

/* Turns one received frame (at mac, snaplen of len bytes) into pkt; false if dropped. */
static inline bool take_frame(struct vs_kport *kp, struct vs_kport_stats *st, struct vs_pkt *pkt,
                              struct tpacket2_hdr *h, uint8_t *mac, uint32_t snaplen, uint32_t len)
{
    if (unlikely(snaplen < len || snaplen < 14)) {
        st->rx_dropped++;     /* truncated: bigger than a ring slot */
        return false;
    }
    if (kp->vnet_hdr) {
        hdr_from_wire(&pkt->vnet, mac - VS_KPORT_NET_HDR_LEN);
    } else {
        memset(&pkt->vnet, 0, sizeof pkt->vnet);
    }
    if (unlikely(!restore_vlan_tag(h, pkt, &mac, &snaplen))) {
        st->rx_dropped++;
        return false;
    }
    pkt->len = snaplen;
    pkt->nsegs = 1;
    pkt->head = 0;
    pkt->segs[0].addr = mac;
    pkt->segs[0].len = snaplen;
    return true;
}

static uint32_t ring_rx_burst(struct vs_kport *kp, struct vs_kport_ring *r, struct vs_kport_stats *st,
                              struct vs_pkt *pkts, uint32_t max)
{
    uint32_t got = 0;
    r->rx_hold_first = r->rx_next;
    for (uint32_t seen = 0; got < max && seen < r->rx_slots; seen++) {
        struct tpacket2_hdr *h = (void *)(r->rx + (size_t)r->rx_next * r->rx_slot_size);
        uint32_t status = __atomic_load_n(&h->tp_status, __ATOMIC_ACQUIRE);
        if (!(status & TP_STATUS_USER)) {
            break;
        }
        r->rx_next = (r->rx_next + 1) % r->rx_slots;
        r->rx_hold_n++;
        if (take_frame(kp, st, &pkts[got], h, (uint8_t *)h + h->tp_mac, h->tp_snaplen, h->tp_len)) {
            got++;
        }
    }
    return got;
}

static uint32_t packet_rx_burst(struct vs_kport *kp, uint32_t q, struct vs_pkt *pkts, uint32_t max)
{
    struct vs_kport_ring *r = &kp->rings[q];
    struct vs_kport_stats *st = &kp->stats[q];
    release_held(r);
    uint32_t got = ring_rx_burst(kp, r, st, pkts, max);
    uint64_t bytes = 0;
    for (uint32_t i = 0; i < got; i++) {
        bytes += pkts[i].len;
    }
    st->rx_packets += got;
    st->rx_bytes += bytes;
    return got;
}

/*
 * After a kick that failed because the interface is down, takes back the
 * frames of this burst the kernel left unsent, the latest first, so they
 * are dropped now rather than sent stale whenever the link returns.  Safe:
 * the kernel reads TX slots only inside our send calls (serialised by the
 * port's TX lock), and it stops at its first unsent slot, which becomes
 * our next one again.  Returns how many frames (and bytes) were taken back.
 */
static uint32_t take_back_unsent(struct vs_kport_ring *r, uint32_t queued, uint32_t hdr_len,
                                 uint64_t *bytes)
{
    uint32_t taken = 0;
    while (taken < queued) {
        uint32_t prev = (r->tx_next + r->tx_frames - 1) % r->tx_frames;
        struct tpacket2_hdr *h = (void *)(r->tx + (size_t)prev * r->tx_frame_size);
        if (__atomic_load_n(&h->tp_status, __ATOMIC_ACQUIRE) != TP_STATUS_SEND_REQUEST) {
            break;
        }
        *bytes += h->tp_len - hdr_len;
        __atomic_store_n(&h->tp_status, TP_STATUS_AVAILABLE, __ATOMIC_RELEASE);
        r->tx_next = prev;
        taken++;
    }
    return taken;
}

static void packet_tx_burst(struct vs_kport *kp, uint32_t q, struct vs_pkt **pkts, uint32_t n)
{
    struct vs_kport_ring *r = &kp->rings[q];
    struct vs_kport_stats *st = &kp->stats[q];
    uint32_t hdr_len = kp->vnet_hdr ? VS_KPORT_NET_HDR_LEN : 0;
    uint32_t room = r->tx_frame_size - TX_DATA_OFF - hdr_len;
    uint32_t queued = 0;
    uint64_t bytes = 0;

    for (uint32_t i = 0; i < n; i++) {
        const struct vs_pkt *pkt = pkts[i];
        uint8_t *slot = r->tx + (size_t)r->tx_next * r->tx_frame_size;
        struct tpacket2_hdr *h = (void *)slot;
        uint32_t status = __atomic_load_n(&h->tp_status, __ATOMIC_ACQUIRE);
        if (status == TP_STATUS_WRONG_FORMAT) {
            st->tx_errors++;   /* the kernel refused the frame we left here */
        } else if (status != TP_STATUS_AVAILABLE) {
            st->tx_dropped += n - i;   /* ring full: the kernel is still sending */
            break;
        }
        if (unlikely(pkt->len > room)) {
            st->tx_errors++;
            continue;
        }
        uint8_t *p = slot + TX_DATA_OFF;
        if (hdr_len) {
            hdr_to_wire(p, &pkt->vnet);
            p += hdr_len;
        }
        for (uint32_t s = 0; s < pkt->nsegs; s++) {
            memcpy(p, pkt->segs[s].addr, pkt->segs[s].len);
            p += pkt->segs[s].len;
        }
        h->tp_len = pkt->len + hdr_len;
        h->tp_snaplen = pkt->len + hdr_len;
        __atomic_store_n(&h->tp_status, TP_STATUS_SEND_REQUEST, __ATOMIC_RELEASE);
        r->tx_next = (r->tx_next + 1) % r->tx_frames;
        queued++;
        bytes += pkt->len;
    }
    if (!queued) {
        return;
    }
    /* One kick sends every frame queued in the ring. */
    if (sendto(kp->fds[q], NULL, 0, MSG_DONTWAIT, NULL, 0) < 0 && errno != EAGAIN && errno != ENOBUFS) {
        int err = errno;
        if (down_errno(err)) {
            uint64_t dropped_bytes = 0;
            uint32_t dropped = take_back_unsent(r, queued, hdr_len, &dropped_bytes);
            st->tx_dropped += dropped;
            st->tx_packets += queued - dropped;
            st->tx_bytes += bytes - dropped_bytes;
            return;
        }
        st->tx_errors++;
        if (gone_errno(err)) {
            set_fault(kp, err);
        }
        return;
    }
    st->tx_packets += queued;
    st->tx_bytes += bytes;
}

/* --- Operations tables (port.h) --------------------------------------------- */

static inline bool rx_ok(struct vs_kport *kp, uint32_t queue)
{
    return likely(queue < kp->nqueues && !__atomic_load_n(&kp->fault, __ATOMIC_ACQUIRE));
}

/* Serialises the transmits of several PMD threads per queue; fn is inlined. */
static inline void locked_tx(struct vs_kport *kp, uint32_t queue, struct vs_pkt **pkts, uint32_t n,
                             void (*fn)(struct vs_kport *, uint32_t, struct vs_pkt **, uint32_t))
{
    uint32_t q = queue % kp->nqueues;
    if (unlikely(__atomic_load_n(&kp->fault, __ATOMIC_ACQUIRE))) {
        kp->stats[q].tx_dropped += n;
        return;
    }
    vs_spin_lock(&kp->tx_lock[q]);
    fn(kp, q, pkts, n);
    vs_spin_unlock(&kp->tx_lock[q]);
}

void vs_kport_tx_burst(struct vs_kport *kp, uint32_t queue, struct vs_pkt **pkts, uint32_t n)
{
    locked_tx(kp, queue, pkts, n, kp->kind == VS_KPORT_TAP ? tap_tx_burst : packet_tx_burst);
}

static uint32_t tap_port_rx_burst(struct vs_port *port, uint32_t queue, struct vs_pkt *pkts, uint32_t max)
{
    struct vs_kport *kp = port->priv;
    return rx_ok(kp, queue) ? tap_rx_burst(kp, queue, pkts, max) : 0;
}

static uint32_t packet_port_rx_burst(struct vs_port *port, uint32_t queue, struct vs_pkt *pkts, uint32_t max)
{
    struct vs_kport *kp = port->priv;
    return rx_ok(kp, queue) ? packet_rx_burst(kp, queue, pkts, max) : 0;
}

/* A kernel port always has a queue to send to, down or not: unicast is not needed. */
static void tap_port_tx_burst(struct vs_port *port, uint32_t queue_hint, struct vs_pkt **pkts, uint32_t n,
                              uint32_t unicast)
{
    locked_tx(port->priv, queue_hint, pkts, n, tap_tx_burst);
}

static void packet_port_tx_burst(struct vs_port *port, uint32_t queue_hint, struct vs_pkt **pkts,
                                 uint32_t n, uint32_t unicast)
{
    locked_tx(port->priv, queue_hint, pkts, n, packet_tx_burst);
}

static uint32_t kport_offload_caps(const struct vs_port *port)
{
    const struct vs_kport *kp = port->priv;
    return kp->offload_caps;
}

/* A kernel port's fd turns readable when a frame arrives; receiving drains it. */
static int kport_idle_arm(struct vs_port *port, uint32_t queue)
{
    struct vs_kport *kp = port->priv;
    if (__atomic_load_n(&kp->fault, __ATOMIC_RELAXED)) {
        return VS_IDLE_NOTHING;  /* a dead fd would report an error at once, forever */
    }
    int fd = queue < kp->nqueues ? kp->fds[queue] : -1;
    return fd >= 0 ? fd : VS_IDLE_CANNOT_WAKE;
}

static int kport_link_state(struct vs_port *port)
{
    return vs_kport_link_state(port->priv);
}

static const struct vs_port_ops tap_port_ops = {
    .name = "tap",
    .rx_burst = tap_port_rx_burst,
    .tx_burst = tap_port_tx_burst,
    .offload_caps = kport_offload_caps,
    .idle_arm = kport_idle_arm,
    .link_state = kport_link_state,
};

static const struct vs_port_ops af_packet_port_ops = {
    .name = "af-packet",
    .rx_burst = packet_port_rx_burst,   /* gives the previous burst's slots back first */
    .tx_burst = packet_port_tx_burst,
    .offload_caps = kport_offload_caps,
    .idle_arm = kport_idle_arm,
    .link_state = kport_link_state,
};

const struct vs_port_ops *vs_tap_port_ops(void)
{
    return &tap_port_ops;
}

const struct vs_port_ops *vs_af_packet_port_ops(void)
{
    return &af_packet_port_ops;
}
