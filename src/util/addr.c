/*
 * addr.c - listen addresses (include/zm/addr.h).
 */
#include "zm/addr.h"

#include "zm/zm.h"

#include <stdlib.h>
#include <string.h>
#include <uv.h>

int zm_addr_parse(const char *addr, struct sockaddr_storage *ss) {
  memset(ss, 0, sizeof *ss);
  const char *colon = strrchr(addr, ':');
  if (colon == NULL)
    return ZM_E_INVAL;
  char *end;
  long port = strtol(colon + 1, &end, 10);
  if (*end != '\0' || colon[1] == '\0' || port < 0 || port > 65535)
    return ZM_E_INVAL;
  char host[64];
  size_t hl = (size_t)(colon - addr);
  if (hl >= sizeof host)
    return ZM_E_INVAL;
  memcpy(host, addr, hl);
  host[hl] = '\0';
  if (hl >= 2 && host[0] == '[' && host[hl - 1] == ']') {
    memmove(host, host + 1, hl - 2);
    host[hl - 2] = '\0';
    return uv_ip6_addr(host, (int)port, (struct sockaddr_in6 *)ss) == 0
               ? 0
               : ZM_E_INVAL;
  }
  if (hl == 0)
    return uv_ip6_addr("::", (int)port, (struct sockaddr_in6 *)ss) == 0
               ? 0
               : ZM_E_INVAL;
  if (strcmp(host, "localhost") == 0)
    return uv_ip4_addr("127.0.0.1", (int)port, (struct sockaddr_in *)ss) == 0
               ? 0
               : ZM_E_INVAL;
  if (uv_ip4_addr(host, (int)port, (struct sockaddr_in *)ss) == 0)
    return 0;
  if (strchr(host, ':') != NULL &&
      uv_ip6_addr(host, (int)port, (struct sockaddr_in6 *)ss) == 0)
    return 0;
  return ZM_E_INVAL;
}
