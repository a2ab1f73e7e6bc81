/* port.c */
#include "internal.h"
PYLB_API int pylb_port_open(const struct pylb_port_conf *conf, struct pylb_port **out)
{ return pylb_fail(PYLB_EINVAL, "pylb_port_open: not implemented"); }

PYLB_API void pylb_port_close(struct pylb_port *p)
{}

PYLB_API int pylb_port_mac(const struct pylb_port *p, uint8_t mac[6])
{ return pylb_fail(PYLB_EINVAL, "pylb_port_mac: not implemented"); }

PYLB_API uint16_t pylb_port_id(const struct pylb_port *p)
{ return 0; }

PYLB_API int pylb_port_stats(const struct pylb_port *p, struct pylb_port_stats *out)
{ return pylb_fail(PYLB_EINVAL, "pylb_port_stats: not implemented"); }

PYLB_API int pylb_port_send(struct pylb_port *p, uint16_t queue, const uint8_t *const *frames,
                   const uint32_t *lens, uint32_t n, uint32_t *sent)
{ return pylb_fail(PYLB_EINVAL, "pylb_port_send: not implemented"); }

PYLB_API int pylb_port_recv(struct pylb_port *p, uint16_t queue, uint8_t *buf, uint32_t stride,
                   uint32_t *lens, uint32_t max, uint32_t *n, uint32_t *cut)
{ return pylb_fail(PYLB_EINVAL, "pylb_port_recv: not implemented"); }
