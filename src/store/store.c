/*
 * store.c - picks the backend (PostgreSQL when DATABASE_URL is set, else
 * SQLite) and forwards every call of include/zm/store.h to it.
 */
#include "store_internal.h"

#include "zm/log.h"
#include "zm/zm.h"

int zm_store_open(zm_store_t **out, uv_loop_t *loop,
                  const zm_store_config_t *cfg) {
  const zm__store_vt *vt =
      (cfg->url != NULL && cfg->url[0] != '\0') ? &zm__pg_vt : &zm__sqlite_vt;
  int rv = vt->open(out, loop, cfg);
  if (rv == 0)
    (*out)->vt = vt;
  return rv;
}

void zm_store_close(zm_store_t *st) { st->vt->close(st); }

int zm_store_shared(const zm_store_t *st) { return st->vt->shared; }

int zm_store_load(zm_store_t *st,
                  void (*on_managed)(const zm_managed_row_t *r, void *data),
                  void (*on_service)(const zm_service_row_t *r, void *data),
                  void (*on_pending)(const zm_pending_row_t *r, void *data),
                  void *data) {
  return st->vt->load(st, on_managed, on_service, on_pending, data);
}

void zm_store_submit(zm_store_t *st, const zm_store_op_t *ops, size_t n,
                     zm_store_cb cb, void *data) {
  st->vt->submit(st, ops, n, cb, data);
}

void zm_store_list_managed(zm_store_t *st, int type, const char *after_id,
                           size_t limit, zm_store_managed_list_cb cb,
                           void *data) {
  st->vt->list_managed(st, type, after_id, limit, cb, data);
}

void zm_store_get_managed(zm_store_t *st, const char *id,
                          zm_store_managed_list_cb cb, void *data) {
  st->vt->get_managed(st, id, cb, data);
}

void zm_store_find_managed(zm_store_t *st, const char *identity_id,
                           size_t limit, zm_store_managed_list_cb cb,
                           void *data) {
  st->vt->find_managed(st, identity_id, limit, cb, data);
}

void zm_store_find_managed_by_identity(zm_store_t *st, const char *identity_id,
                                       zm_store_managed_list_cb cb,
                                       void *data) {
  st->vt->find_managed_by_identity(st, identity_id, cb, data);
}

void zm_store_claim_expired(zm_store_t *st, int64_t cut_ms, int64_t now_ms,
                            int64_t claim_until_ms, size_t limit,
                            zm_store_tomb_list_cb cb, void *data) {
  st->vt->claim_expired(st, cut_ms, now_ms, claim_until_ms, limit, cb, data);
}

void zm_store_claim_tombs(zm_store_t *st, int64_t now_ms,
                          int64_t claim_until_ms, size_t limit,
                          zm_store_tomb_list_cb cb, void *data) {
  st->vt->claim_tombs(st, now_ms, claim_until_ms, limit, cb, data);
}

void zm_store_claim_pending(zm_store_t *st, int64_t now_ms,
                            int64_t claim_until_ms, size_t limit,
                            zm_store_pending_list_cb cb, void *data) {
  st->vt->claim_pending(st, now_ms, claim_until_ms, limit, cb, data);
}

void zm_store_heartbeat(zm_store_t *st, int64_t local_now_ms, int64_t gap_ms,
                        zm_store_beat_cb cb, void *data) {
  st->vt->heartbeat(st, local_now_ms, gap_ms, cb, data);
}

void zm_store_changes(zm_store_t *st, int64_t after_seq, int64_t since_ms,
                      size_t limit, zm_store_changes_cb cb, void *data) {
  st->vt->changes(st, after_seq, since_ms, limit, cb, data);
}

void zm_store_get_stats(const zm_store_t *st, zm_store_stats_t *out) {
  st->vt->get_stats(st, out);
}
