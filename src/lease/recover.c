/*
 * recover.c - recovery (include/zm/collect.h): what crashes, failed
 * compensations and ambiguous deletes left behind.
 *
 * 1. Pending creations whose create can no longer land (resolve_after has
 *    passed in the store clock, and the clock has been steady for a
 *    controller timeout plus margin: a step of it is an outage, see
 *    lifecycle.h) are claimed and looked up by name: what the controller has
 *    is condemned (PENDING -> DELETING, then deleted), a name it does not
 *    have is abandoned (PENDING -> GONE). A failed lookup leaves the row
 *    claimed: the claim running out is the backoff.
 * 2. Tombstones due for another attempt are claimed and deleted again.
 */
#include "zm/collect.h"

#include "zm/audit.h"
#include "zm/log.h"
#include "zm/zm.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CLAIM_MAX 32u

typedef enum { R_IDLE, R_PENDING, R_TOMBS } phase_t;

struct zm_recover {
  uv_loop_t *loop;
  zm_store_t *store;
  zm_life_t *life;
  zm_ziti_t *ziti;
  zm_sweep_config_t cfg;
  zm_recover_stats_t stats;
  uv_timer_t timer;
  phase_t phase;
  int claiming, at_end;
  unsigned want; /* rows asked for by the claim in flight */
  unsigned inflight;
  int stopping, timer_closed;
  void (*stop_done)(void *);
  void *stop_data;
};

/* An armed object intent looks up (collection, exact name) pairs: a
 * service and the two configs named after it, a policy, or a config. */
#define MAX_LOOKUPS 3

typedef struct {
  zm_recover_t *r;
  char *name;
  int kind, type;
  unsigned left; /* condemnations in flight */
  int failed;
  /* object kinds */
  char *lookup_name[MAX_LOOKUPS];
  int lookup_kind[MAX_LOOKUPS]; /* ZM_TOMB_Z* */
  size_t n_lookups, next_lookup;
  char **found; /* ids found so far */
  int *found_kind;
  size_t n_found;
  char *config_service; /* ZCONFIG: the service it was to be attached to */
} pend_t;

static void pump(zm_recover_t *r);

static void pend_free(pend_t *p) {
  zm_recover_t *r = p->r;
  if (p->failed)
    r->stats.pending_failed++;
  else
    r->stats.pending_resolved++;
  free(p->name);
  for (size_t i = 0; i < p->n_lookups; i++)
    free(p->lookup_name[i]);
  for (size_t i = 0; i < p->n_found; i++)
    free(p->found[i]);
  free(p->found);
  free(p->found_kind);
  free(p->config_service);
  free(p);
  r->inflight--;
  pump(r);
}

static void on_condemned(int err, void *data) {
  pend_t *p = data;
  if (err != 0 && err != ZM_E_TIMEOUT && err != ZM_E_UNAVAILABLE)
    ZM_DEBUG("recover: %s: delete deferred: %s", p->name, zm_strerror(err));
  /* deferred or not, the identity is DELETING now: resolved */
  if (--p->left == 0)
    pend_free(p);
}

static void on_abandoned(int err, void *data) {
  pend_t *p = data;
  if (err != 0) {
    ZM_WARN("recover: cannot drop pending %s: %s", p->name, zm_strerror(err));
    p->failed = 1;
  } else {
    ZM_INFO("recover: %s was never created on the controller: dropped",
            p->name);
    zm_audit("recovery_abandoned", "name", p->name, NULL);
  }
  pend_free(p);
}

static void on_found(const zm_ziti_result_t *res, void *data) {
  pend_t *p = data;
  zm_recover_t *r = p->r;
  if (res->err != 0) {
    ZM_WARN("recover: lookup of %s failed: %s; retried when its claim runs "
            "out",
            p->name, zm_strerror(res->err));
    p->failed = 1;
    pend_free(p);
    return;
  }
  if (res->n_ids == 0) {
    zm_life_abandon(r->life, p->name, on_abandoned, p);
    return;
  }
  ZM_INFO("recover: %s exists on the controller (%zu): deleting", p->name,
          res->n_ids);
  for (size_t i = 0; i < res->n_ids; i++)
    zm_audit("recovery_condemned", "name", p->name, "id", res->ids[i], NULL);
  p->left = (unsigned)res->n_ids;
  /* names are unique on the controller; more than one is handled anyway:
   * the last condemnation also drops the pending row */
  for (size_t i = 0; i < res->n_ids; i++)
    zm_life_condemn(r->life, i + 1 == res->n_ids ? p->name : NULL, res->ids[i],
                    p->type, on_condemned, p);
}

/* ---- controller objects (services, configs, policies) -------------------
 */

static void object_next(pend_t *p);

static void on_object_condemned(int err, void *data) {
  pend_t *p = data;
  if (err != 0 && err != ZM_E_TIMEOUT && err != ZM_E_UNAVAILABLE)
    ZM_DEBUG("recover: %s: delete deferred: %s", p->name, zm_strerror(err));
  if (--p->left == 0)
    pend_free(p);
}

/* Everything the lookups found is condemned (tombstone, then DELETE); the
 * last condemnation drops the pending row. Nothing found: abandoned. */
static void object_condemn_all(pend_t *p) {
  zm_recover_t *r = p->r;
  if (p->n_found == 0) {
    ZM_INFO("recover: %s was never created on the controller: dropped",
            p->name);
    zm_life_abandon(r->life, p->name, on_abandoned, p);
    return;
  }
  ZM_INFO("recover: %s exists on the controller (%zu objects): deleting",
          p->name, p->n_found);
  p->left = (unsigned)p->n_found;
  for (size_t i = 0; i < p->n_found; i++)
    zm_life_condemn_kind(r->life, i + 1 == p->n_found ? p->name : NULL,
                         p->found[i], p->found_kind[i], 0, on_object_condemned,
                         p);
}

static void on_config_attached(const zm_ziti_result_t *res, void *data) {
  pend_t *p = data;
  if (res->err != 0 && res->err != ZM_E_NOT_FOUND) {
    ZM_WARN("recover: %s: cannot read the service's configs: %s; retried "
            "when its claim runs out",
            p->name, zm_strerror(res->err));
    p->failed = 1;
    pend_free(p);
    return;
  }
  json_t *data_arr = json_object_get((json_t *)res->json, "data");
  size_t i;
  json_t *it;
  json_array_foreach(data_arr, i, it) {
    const char *id = json_string_value(json_object_get(it, "id"));
    if (id != NULL && p->n_found == 1 && strcmp(id, p->found[0]) == 0) {
      /* the service PATCH landed: the config is the service's now */
      ZM_INFO("recover: %s is attached to its service: kept", p->name);
      zm_life_abandon(p->r->life, p->name, on_abandoned, p);
      return;
    }
  }
  object_condemn_all(p);
}

static void on_object_found(const zm_ziti_result_t *res, void *data) {
  pend_t *p = data;
  if (res->err != 0) {
    ZM_WARN("recover: lookup of %s failed: %s; retried when its claim runs "
            "out",
            p->name, zm_strerror(res->err));
    p->failed = 1;
    pend_free(p);
    return;
  }
  json_t *arr = json_object_get((json_t *)res->json, "data");
  size_t i;
  json_t *it;
  json_array_foreach(arr, i, it) {
    const char *id = json_string_value(json_object_get(it, "id"));
    const char *nm = json_string_value(json_object_get(it, "name"));
    if (id == NULL || nm == NULL ||
        strcmp(nm, p->lookup_name[p->next_lookup - 1]) != 0)
      continue;
    p->found = zm_xrealloc(p->found, (p->n_found + 1) * sizeof *p->found);
    p->found_kind =
        zm_xrealloc(p->found_kind, (p->n_found + 1) * sizeof *p->found_kind);
    p->found[p->n_found] = zm_xstrdup(id);
    p->found_kind[p->n_found] = p->lookup_kind[p->next_lookup - 1];
    p->n_found++;
  }
  object_next(p);
}

static void object_next(pend_t *p) {
  zm_recover_t *r = p->r;
  if (p->next_lookup < p->n_lookups) {
    size_t k = p->next_lookup++;
    const char *coll = p->lookup_kind[k] == ZM_TOMB_ZSERVICE ? "/services"
                       : p->lookup_kind[k] == ZM_TOMB_ZCONFIG
                           ? "/configs"
                           : "/service-policies";
    char *q = zm_ziti_quote(p->lookup_name[k]);
    char *filter = NULL;
    if (q != NULL) {
      size_t len = strlen(q) + sizeof "name = ";
      filter = zm_xmalloc(len);
      snprintf(filter, len, "name = %s", q);
    }
    free(q);
    zm_ziti_list(r->ziti, coll, filter, 10, 0,
                 uv_now(r->loop) + r->cfg.ziti_timeout_ms, on_object_found, p);
    free(filter);
    return;
  }
  if (p->kind == ZM_PENDING_ZCONFIG && p->n_found == 1 &&
      p->config_service != NULL) {
    char *path = zm_ziti_path("services", p->config_service, "/configs");
    zm_ziti_list(r->ziti, path, NULL, ZM_ZITI_LIST_MAX, 0,
                 uv_now(r->loop) + r->cfg.ziti_timeout_ms, on_config_attached,
                 p);
    free(path);
    return;
  }
  object_condemn_all(p);
}

static void add_lookup(pend_t *p, int tomb_kind, const char *name,
                       const char *suffix) {
  size_t n = strlen(name) + (suffix ? strlen(suffix) : 0) + 1;
  char *s = zm_xmalloc(n);
  snprintf(s, n, "%s%s", name, suffix ? suffix : "");
  p->lookup_name[p->n_lookups] = s;
  p->lookup_kind[p->n_lookups++] = tomb_kind;
}

/* What a pending row of each kind needs: unarmed rows never sent a create;
 * identities are looked up by their generated name; objects by the names
 * their intent covers. */
static void resolve_pending(pend_t *p) {
  zm_recover_t *r = p->r;
  const char *colon = strchr(p->name, ':');
  switch (p->kind) {
  case ZM_PENDING_DEVICE_CHECK:
  case ZM_PENDING_ZSERVICE_CHECK:
  case ZM_PENDING_ZPOLICY_CHECK:
  case ZM_PENDING_ZCONFIG_CHECK:
    ZM_INFO("recover: %s was never armed (no create sent): dropped", p->name);
    zm_life_abandon(r->life, p->name, on_abandoned, p);
    return;
  case ZM_PENDING_ZSERVICE:
    if (colon == NULL)
      break;
    add_lookup(p, ZM_TOMB_ZSERVICE, colon + 1, NULL);
    add_lookup(p, ZM_TOMB_ZCONFIG, colon + 1, "-host-v1");
    add_lookup(p, ZM_TOMB_ZCONFIG, colon + 1, "-intercept-v1");
    object_next(p);
    return;
  case ZM_PENDING_ZPOLICY:
    if (colon == NULL)
      break;
    add_lookup(p, ZM_TOMB_ZPOLICY, colon + 1, NULL);
    object_next(p);
    return;
  case ZM_PENDING_ZCONFIG: {
    const char *c2 = colon ? strchr(colon + 1, ':') : NULL;
    if (c2 == NULL)
      break;
    p->config_service = zm_xstrndup(colon + 1, (size_t)(c2 - colon - 1));
    add_lookup(p, ZM_TOMB_ZCONFIG, c2 + 1, NULL);
    object_next(p);
    return;
  }
  default: {
    /* an identity, named "device:<name>" when the name is the caller's */
    const char *name =
        p->kind == ZM_PENDING_DEVICE && colon ? colon + 1 : p->name;
    zm_ziti_find_identities(r->ziti, "name", name,
                            uv_now(r->loop) + r->cfg.ziti_timeout_ms, on_found,
                            p);
    return;
  }
  }
  ZM_WARN("recover: pending row %s (kind %d) is malformed: dropped", p->name,
          p->kind);
  zm_life_abandon(r->life, p->name, on_abandoned, p);
}

static void on_pending_claimed(int err, const zm_pending_row_t *rows, size_t n,
                               void *data) {
  zm_recover_t *r = data;
  r->claiming = 0;
  if (err != 0) {
    ZM_WARN("recover: cannot claim pending rows: %s", zm_strerror(err));
    n = 0;
  }
  for (size_t i = 0; i < n; i++) {
    pend_t *p = zm_xcalloc(1, sizeof *p);
    p->r = r;
    p->name = zm_xstrdup(rows[i].name);
    p->type = rows[i].type;
    p->kind = rows[i].kind;
    r->inflight++;
    resolve_pending(p);
  }
  if (n < r->want)
    r->at_end = 1;
  pump(r);
}

static void on_tomb_deleted(int err, void *data) {
  zm_recover_t *r = data;
  (void)err; /* deferred again on failure, by the lifecycle */
  r->inflight--;
  pump(r);
}

static void on_tombs_claimed(int err, const zm_tomb_row_t *rows, size_t n,
                             void *data) {
  zm_recover_t *r = data;
  r->claiming = 0;
  if (err != 0) {
    ZM_WARN("recover: cannot claim tombstones: %s", zm_strerror(err));
    n = 0;
  }
  for (size_t i = 0; i < n; i++) {
    r->stats.tombs_retried++;
    zm_audit("recovery_delete_retried", "id", rows[i].ziti_identity_id, NULL);
    r->inflight++;
    zm_life_delete_kind(r->life, rows[i].ziti_identity_id, rows[i].kind,
                        rows[i].attempts, on_tomb_deleted, r);
  }
  if (n < r->want)
    r->at_end = 1;
  pump(r);
}

static void finish(zm_recover_t *r) {
  r->phase = R_IDLE;
  if (r->stopping && r->timer_closed && r->stop_done != NULL) {
    void (*done)(void *) = r->stop_done;
    r->stop_done = NULL;
    done(r->stop_data);
  }
}

static void pump(zm_recover_t *r) {
  if (r->phase == R_IDLE) {
    if (r->stopping && r->inflight == 0)
      finish(r);
    return;
  }
  if (r->stopping)
    r->at_end = 1;
  if (r->claiming)
    return;
  if (!r->at_end && r->inflight < r->cfg.concurrency) {
    int64_t now = zm_life_now(r->life);
    r->claiming = 1;
    /* claim only what may start now: the concurrency bound holds, and
     * what this process has not started stays unclaimed for others */
    r->want = r->cfg.concurrency - r->inflight;
    if (r->want > CLAIM_MAX)
      r->want = CLAIM_MAX;
    if (r->phase == R_PENDING)
      /* the claim covers the lookup and the condemnation that follows it
       * (then the tombstone's own claim takes over); a process that dies
       * holding it delays the row by no more than this */
      zm_store_claim_pending(r->store, now,
                             now + 2 * (int64_t)r->cfg.ziti_timeout_ms +
                                 (int64_t)zm_life_margin_ms(r->life),
                             r->want, on_pending_claimed, r);
    else
      zm_store_claim_tombs(r->store, now,
                           now + (int64_t)r->cfg.ziti_timeout_ms +
                               (int64_t)zm_life_margin_ms(r->life),
                           r->want, on_tombs_claimed, r);
    return;
  }
  if (r->inflight != 0)
    return;
  if (r->phase == R_PENDING && !r->stopping) {
    r->phase = R_TOMBS;
    r->at_end = 0;
    pump(r);
    return;
  }
  finish(r);
}

static void sweep(zm_recover_t *r) {
  if (r->phase != R_IDLE || r->stopping || r->ziti == NULL)
    return;
  r->stats.sweeps++;
  if (!zm_life_settled(r->life,
                       r->cfg.ziti_timeout_ms + zm_life_margin_ms(r->life))) {
    /* right after a resume (or without a fresh heartbeat) only tombstones:
     * a pending creation may still land */
    r->phase = R_TOMBS;
  } else {
    r->phase = R_PENDING;
  }
  r->at_end = 0;
  pump(r);
}

static void on_timer(uv_timer_t *t) { sweep(t->data); }

zm_recover_t *zm_recover_new(uv_loop_t *loop, zm_store_t *store,
                             zm_life_t *life, zm_ziti_t *ziti,
                             const zm_sweep_config_t *cfg) {
  zm_recover_t *r = zm_xcalloc(1, sizeof *r);
  r->loop = loop;
  r->store = store;
  r->life = life;
  r->ziti = ziti;
  r->cfg = *cfg;
  if (r->cfg.concurrency == 0)
    r->cfg.concurrency = 1;
  uv_timer_init(loop, &r->timer);
  r->timer.data = r;
  return r;
}

void zm_recover_start(zm_recover_t *r) {
  uv_timer_start(&r->timer, on_timer, 0, r->cfg.interval_ms);
}

void zm_recover_trigger(zm_recover_t *r) { sweep(r); }

const zm_recover_stats_t *zm_recover_stats(const zm_recover_t *r) {
  return &r->stats;
}

static void on_timer_closed(uv_handle_t *h) {
  zm_recover_t *r = h->data;
  r->timer_closed = 1;
  pump(r);
}

void zm_recover_stop(zm_recover_t *r, void (*done)(void *), void *data) {
  r->stopping = 1;
  r->stop_done = done;
  r->stop_data = data;
  uv_close((uv_handle_t *)&r->timer, on_timer_closed);
}

void zm_recover_free(zm_recover_t *r) { free(r); }
