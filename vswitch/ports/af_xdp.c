/*
 * AF_XDP ports (af_xdp.h): one XDP socket per queue, driven by the PMD
 * through the operations table at the end.
 *
 * libxdp is loaded at run time.  The switch must run where libxdp is not
 * installed (most of its users have no AF_XDP port), so the extension does
 * not link it: <xdp/xsk.h> is read at build time for the ring layout and
 * the inline ring helpers, and the few libxdp functions the control plane
 * calls are taken with dlsym when the first AF_XDP port opens, into
 * pointers of the functions' own types.  $VSWITCH_LIBXDP names another
 * library file (the tests point it at a missing one).
 *
 * Receive: the RX half of the UMEM is always posted to the fill ring; a
 * burst hands frames to the PMD in place and rx_done posts the same frames
 * again, so the fill ring never runs dry while the switch keeps up.
 * Transmit: each frame is copied once into a free frame of the TX half
 * (from the source guest's memory: the one copy), the ring is kicked with
 * sendto() only when the kernel asks for it (XDP_USE_NEED_WAKEUP), and the
 * completion ring gives the frames back at the next transmit.  The fill
 * ring is woken with recvfrom() likewise, only when it asks.
 *
 * The XDP program is libxdp's default XSK program, attached by libxdp
 * (through its dispatcher where the kernel allows: it needs BTF and a BPF
 * filesystem) when the first socket is created and detached when the
 * last is deleted.  A port that wants only one UDP destination (udp_port
 * set: a VXLAN underlay) gets instead a program of our own, a few
 * hand-written BPF instructions (filter_program below) loaded with
 * libbpf, also taken with dlsym; its sockets are created without libxdp's
 * program and put in the program's map.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <arpa/inet.h>
#include <net/if.h>
#include <linux/bpf.h>
#include <linux/ethtool.h>
#include <linux/if_link.h>
#include <linux/if_xdp.h>
#include <linux/sockios.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "vswitch.h"

/* Without libxdp's headers (libxdp-dev, libbpf-dev) the switch still
 * builds: AF_XDP ports are then refused with a line saying why (the
 * stand-ins at the end of this file). */
#if __has_include(<xdp/xsk.h>) && __has_include(<xdp/libxdp.h>) && __has_include(<bpf/libbpf.h>) && \
    !defined(VS_WITHOUT_XSK_HEADERS)
#define VS_HAVE_XSK_HEADERS 1
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <xdp/libxdp.h>
#include <xdp/xsk.h>
#endif

#ifdef VS_HAVE_XSK_HEADERS

/* --- libxdp, loaded at run time ------------------------------------------- */

#define LIBXDP_DEFAULT "libxdp.so.1"
#define LIBBPF_DEFAULT "libbpf.so.1"

/* One pointer per libxdp function used, typed from libxdp's own header. */
#define LIBXDP_FUNCTIONS(X)                 \
    X(xsk_umem__create)                     \
    X(xsk_umem__delete)                     \
    X(xsk_socket__create)                   \
    X(xsk_socket__delete)                   \
    X(xsk_socket__fd)                       \
    X(libxdp_get_error)                     \
    X(xdp_multiprog__get_from_ifindex)      \
    X(xdp_multiprog__close)                 \
    X(xdp_multiprog__is_legacy)             \
    X(xdp_multiprog__main_prog)             \
    X(xdp_multiprog__next_prog)             \
    X(xdp_multiprog__attach_mode)           \
    X(xdp_multiprog__detach)                \
    X(xdp_program__name)                    \
    X(xdp_program__id)                      \
    X(xdp_program__detach)                  \
    X(xsk_socket__update_xskmap)

/* And libbpf's, for the UDP filter program (libxdp depends on libbpf, so it is there). */
#define LIBBPF_FUNCTIONS(X)                 \
    X(bpf_prog_load)                        \
    X(bpf_map_create)                       \
    X(bpf_xdp_attach)                       \
    X(bpf_xdp_detach)                       \
    X(bpf_xdp_query_id)                     \
    X(bpf_obj_get_info_by_fd)

#define DECLARE_POINTER(fn) __typeof__(fn) *fn;
static struct {
    void *handle;
    void *bpf_handle;
    LIBXDP_FUNCTIONS(DECLARE_POINTER)
    LIBBPF_FUNCTIONS(DECLARE_POINTER)
} xdp;

static char libxdp_error[256];

/* Control plane only (one thread at a time), so no lock. */
int vs_xsk_load_libxdp(void)
{
    if (xdp.handle) {
        return 0;
    }
    const char *name = getenv("VSWITCH_LIBXDP");
    if (!name || !*name) {
        name = LIBXDP_DEFAULT;
    }
    void *handle = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
        snprintf(libxdp_error, sizeof libxdp_error, "%s", dlerror());
        return -ELIBACC;
    }
#define TAKE_POINTER(fn)                                                                  \
    xdp.fn = (__typeof__(fn) *)dlsym(handle, #fn);                                       \
    if (!xdp.fn) {                                                                        \
        snprintf(libxdp_error, sizeof libxdp_error, "%s has no %s (libxdp too old?)", name, #fn); \
        dlclose(handle);                                                                  \
        return -ELIBACC;                                                                  \
    }
    LIBXDP_FUNCTIONS(TAKE_POINTER)
    void *libxdp_handle = handle;
    name = LIBBPF_DEFAULT;
    handle = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
        snprintf(libxdp_error, sizeof libxdp_error, "%s", dlerror());
        dlclose(libxdp_handle);
        return -ELIBACC;
    }
    LIBBPF_FUNCTIONS(TAKE_POINTER)
    xdp.bpf_handle = handle;
    xdp.handle = libxdp_handle;
    libxdp_error[0] = 0;
    return 0;
}

const char *vs_xsk_libxdp_error(void)
{
    return libxdp_error;
}

/* --- one queue's rings ------------------------------------------------------ */

struct vs_xsk_rings {
    struct xsk_umem *umem;
    struct xsk_socket *xsk;
    struct xsk_ring_prod fill;
    struct xsk_ring_cons comp;
    struct xsk_ring_cons rx;
    struct xsk_ring_prod tx;
    uint32_t rx_held;                     /* RX descriptors handed to the PMD, not yet given back */
    uint64_t held[VS_BURST];              /* their frames, posted to the fill ring again */
};

void vs_xsk_init(struct vs_xsk_port *xp)
{
    memset(xp, 0, sizeof *xp);
    xp->link_fd = -1;
    xp->ioctl_fd = -1;
    xp->netns_fd = -1;
    xp->filter_prog_fd = xp->filter_map_fd = -1;
    for (uint32_t q = 0; q < VS_XSK_MAX_QUEUES; q++) {
        xp->queues[q].fd = -1;
    }
}

static void set_fault(struct vs_xsk_port *xp, int err)
{
    __atomic_store_n(&xp->fault_errno, err, __ATOMIC_RELAXED);
    __atomic_store_n(&xp->fault, 1, __ATOMIC_RELEASE);
}

/* The interface's channels (the larger of combined and rx), 0 if it does not say. */
static uint32_t channel_count(const char *ifname)
{
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) {
        return 0;
    }
    struct ethtool_channels ch = { .cmd = ETHTOOL_GCHANNELS };
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", ifname);
    ifr.ifr_data = (void *)&ch;
    int rc = ioctl(s, SIOCETHTOOL, &ifr);
    close(s);
    if (rc < 0) {
        return 0;
    }
    return ch.combined_count > ch.rx_count ? ch.combined_count : ch.rx_count;
}

/* The XSK program on the interface, or the one in the way (busy_prog): what
 * runs there, whether under the dispatcher, and its id. */
static void look_at_program(struct vs_xsk_port *xp, bool ours)
{
    struct xdp_multiprog *mp = xdp.xdp_multiprog__get_from_ifindex(xp->ifindex);
    if (xdp.libxdp_get_error(mp) || !mp) {
        return;
    }
    bool legacy = xdp.xdp_multiprog__is_legacy(mp);
    struct xdp_program *found = NULL;
    if (legacy) {
        found = xdp.xdp_multiprog__main_prog(mp);
    } else {
        for (struct xdp_program *p = xdp.xdp_multiprog__next_prog(NULL, mp); p;
             p = xdp.xdp_multiprog__next_prog(p, mp)) {
            if (!ours || strcmp(xdp.xdp_program__name(p), "xsk_def_prog") == 0) {
                found = p;
                break;
            }
        }
    }
    if (found && ours) {
        xp->prog_id = xdp.xdp_program__id(found);
        xp->dispatcher = !legacy;
    } else if (found) {
        snprintf(xp->busy_prog, sizeof xp->busy_prog, "%s", xdp.xdp_program__name(found));
    }
    xdp.xdp_multiprog__close(mp);
}

/* Detaches the program stale_id if it is still on the interface: left behind by a killed switch. */
static void remove_stale_program(struct vs_xsk_port *xp, uint32_t stale_id)
{
    struct xdp_multiprog *mp = xdp.xdp_multiprog__get_from_ifindex(xp->ifindex);
    if (xdp.libxdp_get_error(mp) || !mp) {
        return;
    }
    if (xdp.xdp_multiprog__is_legacy(mp)) {
        struct xdp_program *main = xdp.xdp_multiprog__main_prog(mp);
        if (main && xdp.xdp_program__id(main) == stale_id) {
            (void)xdp.xdp_multiprog__detach(mp);
        }
    } else {
        for (struct xdp_program *p = xdp.xdp_multiprog__next_prog(NULL, mp); p;
             p = xdp.xdp_multiprog__next_prog(p, mp)) {
            if (xdp.xdp_program__id(p) == stale_id) {
                (void)xdp.xdp_program__detach(p, xp->ifindex, xdp.xdp_multiprog__attach_mode(mp), 0);
                break;
            }
        }
    }
    xdp.xdp_multiprog__close(mp);
}

static int create_umem(struct vs_xsk_queue *xq)
{
    xq->area_len = (uint64_t)(VS_XSK_RX_FRAMES + VS_XSK_TX_FRAMES) * VS_XSK_FRAME_SIZE;
    void *area = mmap(NULL, xq->area_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (area == MAP_FAILED) {
        return -ENOMEM;
    }
    xq->area = area;
    struct vs_xsk_rings *r = calloc(1, sizeof *r);
    if (!r) {
        return -ENOMEM;
    }
    xq->rings = r;
    struct xsk_umem_config cfg = {
        .fill_size = VS_XSK_RX_FRAMES,
        .comp_size = VS_XSK_TX_FRAMES,
        .frame_size = VS_XSK_FRAME_SIZE,
        .frame_headroom = 0,
        .flags = 0,
    };
    return xdp.xsk_umem__create(&r->umem, area, xq->area_len, &r->fill, &r->comp, &cfg);
}

static void delete_sockets(struct vs_xsk_port *xp)
{
    for (uint32_t q = 0; q < VS_XSK_MAX_QUEUES; q++) {
        struct vs_xsk_rings *r = xp->queues[q].rings;
        if (r && r->xsk) {
            xdp.xsk_socket__delete(r->xsk);
            r->xsk = NULL;
            xp->queues[q].fd = -1;
        }
    }
}

/* Deletes the UMEMs (after their sockets) and frees the rings. */
static void delete_umems(struct vs_xsk_port *xp)
{
    for (uint32_t q = 0; q < VS_XSK_MAX_QUEUES; q++) {
        struct vs_xsk_queue *xq = &xp->queues[q];
        if (xq->rings) {
            if (xq->rings->umem) {
                xdp.xsk_umem__delete(xq->rings->umem);
            }
            free(xq->rings);
            xq->rings = NULL;
        }
        if (xq->area) {
            munmap(xq->area, xq->area_len);
            xq->area = NULL;
        }
        xq->fd = -1;
    }
}

static int create_umems(struct vs_xsk_port *xp)
{
    for (uint32_t q = 0; q < xp->nqueues; q++) {
        int rc = create_umem(&xp->queues[q]);
        if (rc) {
            return rc < 0 ? rc : -rc;
        }
    }
    return 0;
}

/* Creates every queue's socket in one mode; on failure deletes those made. */
static int create_sockets(struct vs_xsk_port *xp, const char *ifname, uint32_t mode, bool zero_copy)
{
    struct xsk_socket_config cfg = {
        .rx_size = VS_XSK_RX_FRAMES,
        .tx_size = VS_XSK_TX_FRAMES,
        .libxdp_flags = xp->udp_port ? XSK_LIBXDP_FLAGS__INHIBIT_PROG_LOAD : 0,
        .xdp_flags = mode == VS_XSK_MODE_NATIVE ? XDP_FLAGS_DRV_MODE : XDP_FLAGS_SKB_MODE,
        .bind_flags = XDP_USE_NEED_WAKEUP | (zero_copy ? XDP_ZEROCOPY : XDP_COPY),
    };
    /* Fresh UMEMs for every try: libxdp's first socket of a UMEM is the
     * UMEM's own fd, and a failed try may leave it bound (EBUSY next time). */
    int rc = create_umems(xp);
    for (uint32_t q = 0; rc == 0 && q < xp->nqueues; q++) {
        struct vs_xsk_rings *r = xp->queues[q].rings;
        rc = xdp.xsk_socket__create(&r->xsk, ifname, q, r->umem, &r->rx, &r->tx, &cfg);
        if (rc) {
            r->xsk = NULL;
            rc = rc < 0 ? rc : -rc;
        } else {
            xp->queues[q].fd = xdp.xsk_socket__fd(r->xsk);
            if (xp->udp_port) {
                rc = xdp.xsk_socket__update_xskmap(r->xsk, xp->filter_map_fd);
                rc = rc < 0 ? rc : -rc;
            }
        }
    }
    if (rc) {
        delete_sockets(xp);
        delete_umems(xp);
    }
    return rc;
}

/* --- the UDP filter program (udp_port set) ---------------------------------- */

#define INSN(c, d, s, o, i) ((struct bpf_insn){ .code = (c), .dst_reg = (d), .src_reg = (s), .off = (o), .imm = (i) })
#define LDX(size, d, s, o) INSN(BPF_LDX | BPF_MEM | (size), d, s, o, 0)
#define JNE_K(d, imm, target, pc) INSN(BPF_JMP | BPF_JNE | BPF_K, d, 0, (target) - (pc) - 1, imm)
#define FILTER_PASS 21                    /* the index of the instructions that pass a frame on */
#define FILTER_LEN 23

/*
 * XDP_REDIRECT to the socket of the frame's queue for IPv4/UDP frames to
 * udp_addr:udp_port, XDP_PASS for everything else, so the kernel keeps
 * answering ARP and ICMP for the address and resolving its neighbours.
 * Multi-byte fields are compared as the CPU loads them from the frame:
 * udp_addr is kept in network order, and htons(udp_port) is what a 16-bit
 * load of the port gives on this (little-endian) host.
 */
static void filter_program(const struct vs_xsk_port *xp, struct bpf_insn *p)
{
    struct bpf_insn prog[FILTER_LEN] = {
        /* r2 = data, r3 = data_end (struct xdp_md); the verifier wants the
         * 42 bytes of Ethernet + IPv4 + UDP headers checked before any load. */
        LDX(BPF_W, BPF_REG_2, BPF_REG_1, 0),
        LDX(BPF_W, BPF_REG_3, BPF_REG_1, 4),
        INSN(BPF_ALU64 | BPF_MOV | BPF_X, BPF_REG_4, BPF_REG_2, 0, 0),
        INSN(BPF_ALU64 | BPF_ADD | BPF_K, BPF_REG_4, 0, 0, 42),
        INSN(BPF_JMP | BPF_JGT | BPF_X, BPF_REG_4, BPF_REG_3, FILTER_PASS - 4 - 1, 0),
        /* Ethertype IPv4 (loads are host-order, so compare with the network-order value); no VLAN tag. */
        LDX(BPF_H, BPF_REG_5, BPF_REG_2, 12),
        JNE_K(BPF_REG_5, htons(0x0800), FILTER_PASS, 6),
        /* Version 4 with a 20-byte header (IHL 5): the UDP header is at 34. */
        LDX(BPF_B, BPF_REG_5, BPF_REG_2, 14),
        JNE_K(BPF_REG_5, 0x45, FILTER_PASS, 8),
        /* Protocol UDP. */
        LDX(BPF_B, BPF_REG_5, BPF_REG_2, 23),
        JNE_K(BPF_REG_5, 17, FILTER_PASS, 10),
        /* Destination address: the tunnel's local address (a 32-bit compare). */
        LDX(BPF_W, BPF_REG_5, BPF_REG_2, 30),
        INSN(BPF_JMP32 | BPF_JNE | BPF_K, BPF_REG_5, 0, FILTER_PASS - 12 - 1, (int32_t)xp->udp_addr),
        /* UDP destination port: the tunnel's. */
        LDX(BPF_H, BPF_REG_5, BPF_REG_2, 36),
        JNE_K(BPF_REG_5, htons((uint16_t)xp->udp_port), FILTER_PASS, 14),
        /* bpf_redirect_map(xsks, ctx->rx_queue_index, XDP_PASS): a queue
         * without a socket (none yet, or the switch is gone) passes the
         * frame to the kernel instead of dropping it. */
        LDX(BPF_W, BPF_REG_2, BPF_REG_1, 16),
        INSN(BPF_LD | BPF_DW | BPF_IMM, BPF_REG_1, BPF_PSEUDO_MAP_FD, 0, xp->filter_map_fd),
        INSN(0, 0, 0, 0, 0),
        INSN(BPF_ALU64 | BPF_MOV | BPF_K, BPF_REG_3, 0, 0, XDP_PASS),
        INSN(BPF_JMP | BPF_CALL, 0, 0, 0, BPF_FUNC_redirect_map),
        INSN(BPF_JMP | BPF_EXIT, 0, 0, 0, 0),
        /* FILTER_PASS: not the tunnel's, the kernel's. */
        INSN(BPF_ALU64 | BPF_MOV | BPF_K, BPF_REG_0, 0, 0, XDP_PASS),
        INSN(BPF_JMP | BPF_EXIT, 0, 0, 0, 0),
    };
    memcpy(p, prog, sizeof prog);
}

static int filter_load(struct vs_xsk_port *xp)
{
    xp->filter_map_fd = xdp.bpf_map_create(BPF_MAP_TYPE_XSKMAP, "vs_xsks", sizeof(uint32_t), sizeof(uint32_t),
                                           VS_XSK_MAX_QUEUES, NULL);
    if (xp->filter_map_fd < 0) {
        return xp->filter_map_fd;
    }
    struct bpf_insn prog[FILTER_LEN];
    filter_program(xp, prog);
    xp->filter_prog_fd = xdp.bpf_prog_load(BPF_PROG_TYPE_XDP, "vs_udp_xsk", "GPL", prog, FILTER_LEN, NULL);
    if (xp->filter_prog_fd < 0) {
        return xp->filter_prog_fd;
    }
    struct bpf_prog_info info;
    memset(&info, 0, sizeof info);
    uint32_t len = sizeof info;
    if (xdp.bpf_obj_get_info_by_fd(xp->filter_prog_fd, &info, &len) == 0) {
        xp->prog_id = info.id;
    }
    return 0;
}

static int filter_attach(struct vs_xsk_port *xp, uint32_t mode)
{
    uint32_t flags = (mode == VS_XSK_MODE_NATIVE ? XDP_FLAGS_DRV_MODE : XDP_FLAGS_SKB_MODE) |
                     XDP_FLAGS_UPDATE_IF_NOEXIST;
    int rc = xdp.bpf_xdp_attach(xp->ifindex, xp->filter_prog_fd, flags, NULL);
    if (rc == 0) {
        xp->filter_flags = flags & ~XDP_FLAGS_UPDATE_IF_NOEXIST;
    }
    return rc;
}

/* Detaches our program, and only ours (XDP_FLAGS_REPLACE with its fd). */
static void filter_detach(struct vs_xsk_port *xp)
{
    if (xp->filter_flags && xp->filter_prog_fd >= 0) {
        LIBBPF_OPTS(bpf_xdp_attach_opts, opts, .old_prog_fd = xp->filter_prog_fd);
        (void)xdp.bpf_xdp_detach(xp->ifindex, xp->filter_flags, &opts);
    }
    xp->filter_flags = 0;
}

static void filter_close(struct vs_xsk_port *xp)
{
    if (xp->filter_prog_fd >= 0) {
        close(xp->filter_prog_fd);
    }
    if (xp->filter_map_fd >= 0) {
        close(xp->filter_map_fd);
    }
    xp->filter_prog_fd = xp->filter_map_fd = -1;
}

/* A filter program a killed switch left: in either mode, detached if it is stale_id. */
static void filter_remove_stale(struct vs_xsk_port *xp, uint32_t stale_id)
{
    static const uint32_t modes[] = { XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE };
    for (size_t i = 0; i < sizeof modes / sizeof modes[0]; i++) {
        uint32_t id = 0;
        if (xdp.bpf_xdp_query_id(xp->ifindex, (int)modes[i], &id) == 0 && id == stale_id) {
            (void)xdp.bpf_xdp_detach(xp->ifindex, modes[i], NULL);
        }
    }
}

/* Errors that say "not in this mode", after which the next mode is tried. */
static bool mode_unsupported(int err)
{
    return err == -EOPNOTSUPP || err == -EINVAL || err == -EPROTONOSUPPORT || err == -ENOTSUP;
}

struct attempt {
    uint32_t mode;                        /* VS_XSK_MODE_NATIVE or _GENERIC */
    bool zero_copy;
};

/* Tries the modes the port's keys allow, best first; 0 or -errno with xp->failure set. */
static int attach(struct vs_xsk_port *xp, const char *ifname, uint32_t mode, uint32_t zero_copy)
{
    struct attempt tries[3];
    int n = 0;
    bool native_ok = mode != VS_XSK_MODE_GENERIC, generic_ok = mode != VS_XSK_MODE_NATIVE;
    /* Zero-copy needs the driver's own XDP support: native mode only. */
    if (native_ok && zero_copy != VS_XSK_ZC_OFF) {
        tries[n++] = (struct attempt){ VS_XSK_MODE_NATIVE, true };
    }
    if (native_ok && zero_copy != VS_XSK_ZC_ON) {
        tries[n++] = (struct attempt){ VS_XSK_MODE_NATIVE, false };
    }
    if (generic_ok && zero_copy != VS_XSK_ZC_ON) {
        tries[n++] = (struct attempt){ VS_XSK_MODE_GENERIC, false };
    }
    int err = -EINVAL;
    for (int i = 0; i < n; i++) {
        int rc = xp->udp_port ? filter_attach(xp, tries[i].mode) : 0;
        if (rc == 0) {
            rc = create_sockets(xp, ifname, tries[i].mode, tries[i].zero_copy);
            if (rc && xp->udp_port) {
                filter_detach(xp);
            }
        }
        /* A socket the last try bound and closed frees its queue in
         * deferred work (EBUSY until then): give that up to half a second. */
        for (int wait = 0; i > 0 && rc == -EBUSY && wait < 50; wait++) {
            usleep(10000);
            rc = xp->udp_port ? filter_attach(xp, tries[i].mode) : 0;
            if (rc == 0) {
                rc = create_sockets(xp, ifname, tries[i].mode, tries[i].zero_copy);
                if (rc && xp->udp_port) {
                    filter_detach(xp);
                }
            }
        }
        if (rc == 0) {
            xp->mode = tries[i].mode;
            return 0;
        }
        if (i == 0) {
            err = rc;
        }
        if (rc == -EBUSY || rc == -EEXIST) {
            xp->failure = VS_XSK_FAIL_PROGRAM_BUSY;
            xp->prog_id = 0;
            look_at_program(xp, false);
            return rc;
        }
        if (!mode_unsupported(rc)) {
            xp->failure = VS_XSK_FAIL_SOCKET;
            return rc;
        }
    }
    if (mode == VS_XSK_MODE_NATIVE && zero_copy != VS_XSK_ZC_ON) {
        xp->failure = VS_XSK_FAIL_NATIVE;
    } else if (zero_copy == VS_XSK_ZC_ON) {
        xp->failure = VS_XSK_FAIL_ZERO_COPY;
    } else {
        xp->failure = VS_XSK_FAIL_SOCKET;
    }
    return err;
}

/* Posts every RX frame to the fill ring and lists every TX frame as free. */
static void post_frames(struct vs_xsk_queue *xq)
{
    struct vs_xsk_rings *r = xq->rings;
    uint32_t idx = 0;
    uint32_t got = xsk_ring_prod__reserve(&r->fill, VS_XSK_RX_FRAMES, &idx);
    for (uint32_t i = 0; i < got; i++) {
        *xsk_ring_prod__fill_addr(&r->fill, idx + i) = (uint64_t)i * VS_XSK_FRAME_SIZE;
    }
    xsk_ring_prod__submit(&r->fill, got);
    for (uint32_t i = 0; i < VS_XSK_TX_FRAMES; i++) {
        xq->tx_free[i] = (uint64_t)(VS_XSK_RX_FRAMES + i) * VS_XSK_FRAME_SIZE;
    }
    xq->tx_free_n = VS_XSK_TX_FRAMES;
}

static int open_in_netns(struct vs_xsk_port *xp, const char *ifname, uint32_t mode, uint32_t zero_copy,
                         uint32_t stale_prog_id)
{
    xp->netns_fd = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
    /* An XDP socket takes no interface ioctls: the link is asked through this one. */
    xp->ioctl_fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (xp->ioctl_fd < 0) {
        xp->failure = VS_XSK_FAIL_SOCKET;
        return -errno;
    }
    xp->ifindex = (int)if_nametoindex(ifname);
    if (!xp->ifindex) {
        xp->failure = VS_XSK_FAIL_NO_INTERFACE;
        return -ENODEV;
    }
    xp->channels = channel_count(ifname);
    if (xp->channels && xp->channels < xp->nqueues) {
        xp->failure = VS_XSK_FAIL_CHANNELS;
        return -EINVAL;
    }
    if (stale_prog_id) {
        if (xp->udp_port) {
            filter_remove_stale(xp, stale_prog_id);
        } else {
            remove_stale_program(xp, stale_prog_id);
        }
    }
    if (xp->udp_port) {
        int rc = filter_load(xp);
        if (rc) {
            xp->failure = VS_XSK_FAIL_FILTER;
            return rc;
        }
    }
    int rc = attach(xp, ifname, mode, zero_copy);
    if (rc) {
        return rc;
    }
    struct xdp_options opts = { 0 };
    socklen_t len = sizeof opts;
    if (getsockopt(xp->queues[0].fd, SOL_XDP, XDP_OPTIONS, &opts, &len) == 0) {
        xp->zero_copy = (opts.flags & XDP_OPTIONS_ZEROCOPY) != 0;
    }
    if (!xp->udp_port) {
        look_at_program(xp, true);
    }
    for (uint32_t q = 0; q < xp->nqueues; q++) {
        post_frames(&xp->queues[q]);
    }
    xp->link_fd = vs_link_watch_open();
    return 0;
}

int vs_xsk_open(struct vs_xsk_port *xp, const char *ifname, uint32_t nqueues, int netns_fd, uint32_t mode,
                uint32_t zero_copy, uint32_t stale_prog_id)
{
    if (nqueues == 0 || nqueues > VS_XSK_MAX_QUEUES) {
        return -EINVAL;
    }
    xp->nqueues = nqueues;
    int rc = vs_xsk_load_libxdp();
    if (rc) {
        xp->failure = VS_XSK_FAIL_LIBXDP;
        return rc;
    }
    int saved;
    rc = vs_enter_netns(netns_fd, &saved);
    if (rc) {
        return rc;
    }
    rc = open_in_netns(xp, ifname, mode, zero_copy, stale_prog_id);
    vs_leave_netns(saved);
    return rc;
}

void vs_xsk_close(struct vs_xsk_port *xp)
{
    int saved = -1;
    /* libxdp detaches the program by ifindex in the calling thread's namespace. */
    if (vs_enter_netns(xp->netns_fd, &saved) == 0) {
        if (xdp.handle) {
            delete_sockets(xp);
            filter_detach(xp);
        }
        vs_leave_netns(saved);
    }
    if (xdp.handle) {
        delete_sockets(xp);   /* only if entering the namespace failed */
        filter_detach(xp);
        delete_umems(xp);
        filter_close(xp);
    }
    if (xp->link_fd >= 0) {
        close(xp->link_fd);
        xp->link_fd = -1;
    }
    if (xp->ioctl_fd >= 0) {
        close(xp->ioctl_fd);
        xp->ioctl_fd = -1;
    }
    if (xp->netns_fd >= 0) {
        close(xp->netns_fd);
        xp->netns_fd = -1;
    }
}

int vs_xsk_link_state(struct vs_xsk_port *xp)
{
    if (__atomic_load_n(&xp->fault, __ATOMIC_ACQUIRE)) {
        return -__atomic_load_n(&xp->fault_errno, __ATOMIC_RELAXED);
    }
    int s = xp->ioctl_fd;
    if (s < 0 || xp->queues[0].fd < 0) {
        return -EBADF;
    }
    /* Asked in the sockets' namespace: an interface deleted or moved away
     * is gone (the kernel unbinds the XDP sockets for good). */
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_ifindex = xp->ifindex;
    if (ioctl(s, SIOCGIFNAME, &ifr) < 0 || ioctl(s, SIOCGIFFLAGS, &ifr) < 0) {
        int err = errno;
        if (err == ENODEV || err == ENXIO) {
            set_fault(xp, err);
        }
        return -err;
    }
    return (ifr.ifr_flags & IFF_UP) && (ifr.ifr_flags & IFF_RUNNING) ? 1 : 0;
}

int vs_xsk_kernel_stats(struct vs_xsk_port *xp, uint32_t queue, struct vs_xsk_kernel_stats *out)
{
    memset(out, 0, sizeof *out);
    if (queue >= xp->nqueues || xp->queues[queue].fd < 0) {
        return -EINVAL;
    }
    struct xdp_statistics st;
    memset(&st, 0, sizeof st);
    socklen_t len = sizeof st;
    if (getsockopt(xp->queues[queue].fd, SOL_XDP, XDP_STATISTICS, &st, &len) < 0) {
        return -errno;
    }
    out->rx_dropped = st.rx_dropped;
    out->rx_invalid_descs = st.rx_invalid_descs;
    out->tx_invalid_descs = st.tx_invalid_descs;
    out->rx_ring_full = st.rx_ring_full;
    out->rx_fill_ring_empty_descs = st.rx_fill_ring_empty_descs;
    out->tx_ring_empty_descs = st.tx_ring_empty_descs;
    return 0;
}

/* --- the packet path -------------------------------------------------------- */

static inline bool gone_errno(int err)
{
    return err == ENXIO || err == ENODEV || err == EBADF;
}

/* Gives the frames of the last burst back to the fill ring, and their RX descriptors back. */
static inline void recycle_rx(struct vs_xsk_rings *r)
{
    uint32_t n = r->rx_held;
    if (!n) {
        return;
    }
    uint32_t idx = 0;
    /* Cannot fail: the fill ring has room for every RX frame. */
    if (likely(xsk_ring_prod__reserve(&r->fill, n, &idx) == n)) {
        for (uint32_t i = 0; i < n; i++) {
            *xsk_ring_prod__fill_addr(&r->fill, idx + i) = r->held[i];
        }
        xsk_ring_prod__submit(&r->fill, n);
    }
    xsk_ring_cons__release(&r->rx, n);
    r->rx_held = 0;
}

uint32_t vs_xsk_rx(struct vs_xsk_port *xp, uint32_t queue, struct vs_pkt *pkts, uint32_t max)
{
    if (unlikely(queue >= xp->nqueues || __atomic_load_n(&xp->fault, __ATOMIC_ACQUIRE))) {
        return 0;
    }
    struct vs_xsk_queue *xq = &xp->queues[queue];
    struct vs_xsk_rings *r = xq->rings;
    recycle_rx(r);   /* a burst the PMD got nothing from (all dropped) has no rx_done */
    if (max > VS_BURST) {
        max = VS_BURST;
    }
    uint32_t idx = 0;
    uint32_t n = xsk_ring_cons__peek(&r->rx, max, &idx);
    if (!n) {
        if (xsk_ring_prod__needs_wakeup(&r->fill)) {
            xq->stats.fill_wakeups++;
            (void)recvfrom(xq->fd, NULL, 0, MSG_DONTWAIT, NULL, NULL);
        }
        return 0;
    }
    uint32_t got = 0;
    uint64_t bytes = 0;
    for (uint32_t i = 0; i < n; i++) {
        const struct xdp_desc *d = xsk_ring_cons__rx_desc(&r->rx, idx + i);
        uint64_t addr = d->addr;
        uint32_t len = d->len;
        r->held[i] = addr & ~(uint64_t)(VS_XSK_FRAME_SIZE - 1);
        if (unlikely(len < 14 || addr + len > xq->area_len)) {
            xq->stats.rx_dropped++;
            continue;
        }
        struct vs_pkt *pkt = &pkts[got++];
        memset(&pkt->vnet, 0, sizeof pkt->vnet);
        pkt->len = len;
        pkt->nsegs = 1;
        pkt->head = 0;
        pkt->segs[0].addr = xsk_umem__get_data(xq->area, addr);
        pkt->segs[0].len = len;
        bytes += len;
    }
    r->rx_held = n;
    xq->stats.rx_packets += got;
    xq->stats.rx_bytes += bytes;
    return got;
}

void vs_xsk_rx_done(struct vs_xsk_port *xp, uint32_t queue)
{
    recycle_rx(xp->queues[queue].rings);
}

static uint32_t xsk_rx_burst(struct vs_port *port, uint32_t queue, struct vs_pkt *pkts, uint32_t max)
{
    return vs_xsk_rx(port->priv, queue, pkts, max);
}

static void xsk_rx_done(struct vs_port *port, uint32_t queue, struct vs_pkt *pkts, uint32_t n)
{
    vs_xsk_rx_done(port->priv, queue);
}

/* Frames the kernel has sent are free again. */
static inline void reclaim_completed(struct vs_xsk_queue *xq)
{
    struct vs_xsk_rings *r = xq->rings;
    uint32_t idx = 0;
    uint32_t n = xsk_ring_cons__peek(&r->comp, VS_XSK_TX_FRAMES, &idx);
    for (uint32_t i = 0; i < n; i++) {
        xq->tx_free[xq->tx_free_n++] = *xsk_ring_cons__comp_addr(&r->comp, idx + i);
    }
    xsk_ring_cons__release(&r->comp, n);
}

/*
 * Kicks the TX ring if the kernel asks for it.  In copy mode one sendto()
 * sends a limited batch and says EAGAIN when more is left: kick again a few
 * times, so frames are not left in the ring until the next burst (which may
 * never come: a TCP flow's last segment).
 */
static inline void kick_tx(struct vs_xsk_port *xp, struct vs_xsk_queue *xq)
{
    struct vs_xsk_rings *r = xq->rings;
    for (int tries = 0; tries < 8 && xsk_ring_prod__needs_wakeup(&r->tx); tries++) {
        xq->stats.tx_kicks++;
        if (sendto(xq->fd, NULL, 0, MSG_DONTWAIT, NULL, 0) >= 0) {
            return;
        }
        int err = errno;
        if (err == EAGAIN || err == EBUSY || err == ENOBUFS) {
            continue;
        }
        if (err != ENETDOWN) {
            xq->stats.tx_errors++;   /* a down link is followed by the control plane */
        }
        if (gone_errno(err)) {
            set_fault(xp, err);
        }
        return;
    }
}

static void xsk_tx_burst(struct vs_port *port, uint32_t queue_hint, struct vs_pkt **pkts, uint32_t n,
                         uint32_t unicast)
{
    struct vs_xsk_port *xp = port->priv;
    uint32_t queue = queue_hint % xp->nqueues;
    struct vs_xsk_queue *xq = &xp->queues[queue];
    if (unlikely(__atomic_load_n(&xp->fault, __ATOMIC_ACQUIRE))) {
        __atomic_add_fetch(&port->stats.tx_dropped_down, n, __ATOMIC_RELAXED);
        return;
    }
    /* Frames too big for a UMEM frame are errors; the rest go as far as there is room. */
    uint32_t fit = 0;
    for (uint32_t i = 0; i < n; i++) {
        fit += pkts[i]->len <= VS_XSK_FRAME_SIZE;
    }
    uint32_t room = vs_xsk_tx_begin(xp, queue, fit);
    xq->stats.tx_errors += n - fit;
    uint32_t sent = 0;
    uint64_t bytes = 0;
    for (uint32_t i = 0; i < n && sent < room; i++) {
        const struct vs_pkt *pkt = pkts[i];
        if (pkt->len > VS_XSK_FRAME_SIZE) {
            continue;
        }
        uint8_t *p = vs_xsk_tx_frame(xp, queue, sent, pkt->len);
        for (uint32_t s = 0; s < pkt->nsegs; s++) {
            memcpy(p, pkt->segs[s].addr, pkt->segs[s].len);
            p += pkt->segs[s].len;
        }
        sent++;
        bytes += pkt->len;
    }
    vs_xsk_tx_end(xp, queue, room, sent, bytes);
}

uint32_t vs_xsk_tx_begin(struct vs_xsk_port *xp, uint32_t queue, uint32_t n)
{
    struct vs_xsk_queue *xq = &xp->queues[queue];
    vs_spin_lock(&xq->tx_lock);
    struct vs_xsk_rings *r = xq->rings;
    reclaim_completed(xq);
    uint32_t room = n < xq->tx_free_n ? n : xq->tx_free_n;
    room = xsk_prod_nb_free(&r->tx, room) < room ? xsk_prod_nb_free(&r->tx, room) : room;
    uint32_t idx = 0;
    if (room && xsk_ring_prod__reserve(&r->tx, room, &idx) != room) {
        room = 0;
    }
    xq->tx_idx = idx;
    xq->stats.tx_ring_full += n - room;
    return room;
}

uint8_t *vs_xsk_tx_frame(struct vs_xsk_port *xp, uint32_t queue, uint32_t i, uint32_t len)
{
    struct vs_xsk_queue *xq = &xp->queues[queue];
    uint64_t addr = xq->tx_free[--xq->tx_free_n];
    struct xdp_desc *d = xsk_ring_prod__tx_desc(&xq->rings->tx, xq->tx_idx + i);
    d->addr = addr;
    d->len = len;
    return xsk_umem__get_data(xq->area, addr);
}

void vs_xsk_tx_end(struct vs_xsk_port *xp, uint32_t queue, uint32_t reserved, uint32_t used, uint64_t bytes)
{
    struct vs_xsk_queue *xq = &xp->queues[queue];
    struct vs_xsk_rings *r = xq->rings;
    /* Descriptors reserved and not used are given back, as libxdp's
     * xsk_ring_prod__cancel does (not in every libxdp version). */
    r->tx.cached_prod -= reserved - used;
    if (used) {
        xsk_ring_prod__submit(&r->tx, used);
        xq->stats.tx_packets += used;
        xq->stats.tx_bytes += bytes;
    }
    kick_tx(xp, xq);
    vs_spin_unlock(&xq->tx_lock);
}

/*
 * The XDP socket turns readable when its RX ring has frames.  Before the
 * PMD polling this queue sleeps, frames the kernel left in the queue's TX
 * ring (kick_tx gave up on EAGAIN) are kicked once more, so none waits for
 * a transmit that may not come.  A sender holding the lock kicks anyway.
 */
int vs_xsk_idle_arm(struct vs_xsk_port *xp, uint32_t queue)
{
    if (queue >= xp->nqueues || __atomic_load_n(&xp->fault, __ATOMIC_RELAXED)) {
        return VS_IDLE_NOTHING;
    }
    struct vs_xsk_queue *xq = &xp->queues[queue];
    struct xsk_ring_prod *tx = &xq->rings->tx;
    if (__atomic_load_n(tx->consumer, __ATOMIC_ACQUIRE) != __atomic_load_n(tx->producer, __ATOMIC_RELAXED) &&
        !__atomic_exchange_n(&xq->tx_lock, 1, __ATOMIC_ACQUIRE)) {
        kick_tx(xp, xq);
        vs_spin_unlock(&xq->tx_lock);
    }
    return xq->fd;
}

int vs_xsk_idle_pending(struct vs_xsk_port *xp, uint32_t queue)
{
    return xsk_cons_nb_avail(&xp->queues[queue].rings->rx, 1) > 0;
}

static int xsk_idle_arm(struct vs_port *port, uint32_t queue)
{
    return vs_xsk_idle_arm(port->priv, queue);
}

static int xsk_idle_pending(struct vs_port *port, uint32_t queue)
{
    return vs_xsk_idle_pending(port->priv, queue);
}

int vs_xsk_interface_mac(struct vs_xsk_port *xp, uint8_t *mac)
{
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_ifindex = xp->ifindex;
    if (xp->ioctl_fd < 0 || ioctl(xp->ioctl_fd, SIOCGIFNAME, &ifr) < 0 ||
        ioctl(xp->ioctl_fd, SIOCGIFHWADDR, &ifr) < 0) {
        return xp->ioctl_fd < 0 ? -EBADF : -errno;
    }
    memcpy(mac, ifr.ifr_hwaddr.sa_data, 6);
    return 0;
}

static int xsk_link_state(struct vs_port *port)
{
    return vs_xsk_link_state(port->priv);
}

static const struct vs_port_ops af_xdp_port_ops = {
    .name = "af-xdp",
    .rx_burst = xsk_rx_burst,
    .rx_done = xsk_rx_done,
    .tx_burst = xsk_tx_burst,
    .offload_caps = NULL,   /* none: the PMD completes checksums and segments TSO first */
    .idle_arm = xsk_idle_arm,
    .idle_pending = xsk_idle_pending,
    .link_state = xsk_link_state,
};

const struct vs_port_ops *vs_af_xdp_port_ops(void)
{
    return &af_xdp_port_ops;
}

#else /* !VS_HAVE_XSK_HEADERS */

static const char no_headers[] =
    "vswitch was built without libxdp's headers (install libxdp-dev and libbpf-dev, then rebuild)";

int vs_xsk_load_libxdp(void)
{
    return -ENOTSUP;
}

const char *vs_xsk_libxdp_error(void)
{
    return no_headers;
}

void vs_xsk_init(struct vs_xsk_port *xp)
{
    memset(xp, 0, sizeof *xp);
    xp->link_fd = xp->ioctl_fd = xp->netns_fd = -1;
    xp->filter_prog_fd = xp->filter_map_fd = -1;
    for (uint32_t q = 0; q < VS_XSK_MAX_QUEUES; q++) {
        xp->queues[q].fd = -1;
    }
}

int vs_xsk_open(struct vs_xsk_port *xp, const char *ifname, uint32_t nqueues, int netns_fd, uint32_t mode,
                uint32_t zero_copy, uint32_t stale_prog_id)
{
    xp->failure = VS_XSK_FAIL_LIBXDP;
    return -ENOTSUP;
}

void vs_xsk_close(struct vs_xsk_port *xp)
{
}

int vs_xsk_link_state(struct vs_xsk_port *xp)
{
    return -EBADF;
}

int vs_xsk_kernel_stats(struct vs_xsk_port *xp, uint32_t queue, struct vs_xsk_kernel_stats *out)
{
    memset(out, 0, sizeof *out);
    return -EINVAL;
}

/* Never called: no port opens. */
uint32_t vs_xsk_rx(struct vs_xsk_port *xp, uint32_t queue, struct vs_pkt *pkts, uint32_t max)
{
    return 0;
}

void vs_xsk_rx_done(struct vs_xsk_port *xp, uint32_t queue)
{
}

uint32_t vs_xsk_tx_begin(struct vs_xsk_port *xp, uint32_t queue, uint32_t n)
{
    return 0;
}

uint8_t *vs_xsk_tx_frame(struct vs_xsk_port *xp, uint32_t queue, uint32_t i, uint32_t len)
{
    return NULL;
}

void vs_xsk_tx_end(struct vs_xsk_port *xp, uint32_t queue, uint32_t reserved, uint32_t used, uint64_t bytes)
{
}

int vs_xsk_idle_arm(struct vs_xsk_port *xp, uint32_t queue)
{
    return VS_IDLE_NOTHING;
}

int vs_xsk_idle_pending(struct vs_xsk_port *xp, uint32_t queue)
{
    return 0;
}

int vs_xsk_interface_mac(struct vs_xsk_port *xp, uint8_t *mac)
{
    return -ENOTSUP;
}

/* Never published: vs_xsk_open always fails. */
static const struct vs_port_ops af_xdp_port_ops = {
    .name = "af-xdp",
};

const struct vs_port_ops *vs_af_xdp_port_ops(void)
{
    return &af_xdp_port_ops;
}

#endif /* VS_HAVE_XSK_HEADERS */
