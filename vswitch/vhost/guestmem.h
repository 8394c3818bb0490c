/*
 * Guest memory faults.  A front-end owns the files behind its guest memory
 * and may truncate or hole-punch them at any moment; the next access to such
 * a mapping raises SIGBUS, in a PMD or in the control thread.  Every guest
 * mapping is registered here, and a SIGBUS handler turns a fault inside one
 * into: anonymous zero memory mapped over that whole mapping (so the access
 * is retried and succeeds, as do later ones), VS_DEV_FAULT_MEMORY set on the
 * owning device, and a wake-up of the control plane on vs_guestmem_eventfd().
 * A fault anywhere else goes to the previous handler (or kills the process
 * as SIGBUS would have), so real bugs still crash.
 *
 * The registry is a fixed array read by the handler without locks or
 * allocation; register and unregister run on the control thread only.
 */

#define VS_GUESTMEM_MAX_MAPPINGS 4096   /* ports x regions, plus those waiting to be reclaimed */

/* Installs the handler (once) and creates the wake-up eventfd; 0 or -errno. */
int vs_guestmem_init(void);
/* The eventfd the handler (and vs_vhost_dev_raise_fault) writes; -1 before init. */
int vs_guestmem_eventfd(void);
/* Registers [addr, addr+len) as region `region` of `dev`; returns a slot, or -ENOSPC / -errno. */
int vs_guestmem_register(void *addr, uint64_t len, struct vs_vhost_dev *dev, uint32_t region);
/* Forgets a slot; returns once no handler is looking at it.  Call before unmapping. */
void vs_guestmem_unregister(int slot);
/* The first address that faulted in the slot's mapping, 0 if none. */
uint64_t vs_guestmem_fault_addr(int slot);
/* Faults recovered since start, in every mapping. */
uint64_t vs_guestmem_fault_count(void);

/* Any thread, async-signal-safe: sets fault bits (VS_DEV_FAULT_*) and wakes the control plane. */
void vs_vhost_dev_raise_fault(struct vs_vhost_dev *dev, uint32_t bits);
/* Control plane: returns the fault bits and clears them. */
uint32_t vs_vhost_dev_take_fault(struct vs_vhost_dev *dev);
