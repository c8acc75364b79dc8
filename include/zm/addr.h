/*
 * addr.h - listen addresses ("host:port", ":port", "[v6]:port",
 * "localhost:port"), shared by the gRPC and metrics listeners.
 */
#ifndef ZM_ADDR_H
#define ZM_ADDR_H

#include <sys/socket.h>

/* Fills ss (zeroed first) from addr: an IPv4 or IPv6 literal, "[v6]",
 * "localhost" (127.0.0.1) or nothing (all interfaces, "::"), then ":port"
 * (0..65535). No name lookup. Returns 0 or ZM_E_INVAL. */
int zm_addr_parse(const char *addr, struct sockaddr_storage *ss);

#endif /* ZM_ADDR_H */
