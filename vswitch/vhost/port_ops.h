/*
 * The vhost-user port type's operations table (port.h): a struct
 * vs_vhost_dev as port->priv, polled and fed through its rings.
 * No #include: cffi reads this file.
 */

const struct vs_port_ops *vs_vhost_port_ops(void);
