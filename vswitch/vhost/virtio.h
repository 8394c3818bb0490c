/*
 * The virtio and vhost-user numbers of the switch: feature bits, ring flags
 * and this back-end's limits.  This is their one definition, for the C fast
 * path and the Python control plane alike: Python reads them from cffi's
 * `lib` (vswitch/vhost/protocol.py names the feature bits for the protocol
 * code), so the two sides cannot disagree.  Bits only Python looks at
 * (what is offered, what a test front-end asks for) live here too, so that
 * every feature bit has one home.
 *
 * cdef-clean: no #include, integer #defines only.
 */

/* Limits of this back-end. */
#define VS_MAX_MEM_REGIONS 8     /* vhost-user limit without CONFIGURE_MEM_SLOTS */
#define VS_MAX_MEM_SLOTS 64      /* regions a memory table holds: answered to GET_MAX_MEM_SLOTS */
#define VS_MAX_QUEUE_PAIRS 16    /* answered to GET_QUEUE_NUM */
#define VS_MAX_VRINGS 32         /* two per queue pair: even = guest RX, odd = guest TX */
#define VS_MAX_RING_SIZE 32768

/* Descriptor and ring flags (virtio 1.x, 2.7). */
#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_DESC_F_INDIRECT 4
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1
#define VIRTQ_USED_F_NO_NOTIFY 1
#define VHOST_VRING_F_LOG 0              /* SET_VRING_ADDR flags bit: log_guest_addr is valid (dirty_log.h) */

/* Feature bit numbers (virtio 1.x, 5.1.3 and 6; vhost-user.rst). */
#define VIRTIO_NET_F_CSUM 0              /* the guest may send partial checksums */
#define VIRTIO_NET_F_GUEST_CSUM 1        /* the guest takes partial checksums */
#define VIRTIO_NET_F_MTU 3               /* the device tells the guest its MTU (NET_SET_MTU comes only then) */
#define VIRTIO_NET_F_GUEST_TSO4 7
#define VIRTIO_NET_F_GUEST_TSO6 8
#define VIRTIO_NET_F_GUEST_ECN 9
#define VIRTIO_NET_F_HOST_TSO4 11
#define VIRTIO_NET_F_HOST_TSO6 12
#define VIRTIO_NET_F_HOST_ECN 13
#define VIRTIO_NET_F_MRG_RXBUF 15
#define VIRTIO_NET_F_CTRL_VQ 17
#define VIRTIO_NET_F_GUEST_ANNOUNCE 21    /* the guest announces itself (GARPs) when the device asks; needs CTRL_VQ */
#define VIRTIO_NET_F_MQ 22
#define VHOST_F_LOG_ALL 26
#define VIRTIO_F_ANY_LAYOUT 27
#define VIRTIO_RING_F_INDIRECT_DESC 28
#define VIRTIO_RING_F_EVENT_IDX 29
#define VHOST_USER_F_PROTOCOL_FEATURES 30
#define VIRTIO_F_VERSION_1 32
#define VIRTIO_F_ACCESS_PLATFORM 33     /* addresses are IOVAs, translated through the IOTLB (iotlb.h) */
#define VIRTIO_F_RING_PACKED 34
#define VIRTIO_F_IN_ORDER 35

/* Packed virtqueues (virtio 1.1, 2.8): descriptor flags next to NEXT, WRITE
 * and INDIRECT, and the event suppression structures' flags. */
#define VIRTQ_DESC_F_AVAIL 128           /* 1 << 7: equals the driver's wrap counter when made available */
#define VIRTQ_DESC_F_USED 32768          /* 1 << 15: equals AVAIL once the device has used it */
#define VIRTQ_EVENT_F_ENABLE 0           /* notify on every used (or available) descriptor */
#define VIRTQ_EVENT_F_DISABLE 1          /* never notify */
#define VIRTQ_EVENT_F_DESC 2             /* notify at off_wrap only (needs EVENT_IDX) */
#define VIRTQ_EVENT_WRAP_SHIFT 15        /* off_wrap and the vring base: bit 15 is the wrap counter */
