/*
 * enroll.h - the create-with-intent engine behind RequestServiceIdentity
 * and CreateAgentIdentity.
 *
 * One object per request, one state at a time, each state's work in
 * enroll_on_<state>(); every transition goes through one function that checks
 * the edge against the table of the saga's kind and logs it:
 *
 *   service: INTENT -> CREATE -> FETCH_JWT -> VERIFY_JWT -> KEYGEN_CSR -> SIGN
 *            -> ASSEMBLE -> COMMIT -> REPLY -> DONE
 *   agent, sandbox:
 *            INTENT -> REPLACE -> CREATE -> FETCH_JWT -> COMMIT -> REPLY
 *            -> DONE
 *   app, runner (enrolled here, like a service identity):
 *            INTENT -> REPLACE -> CREATE -> FETCH_JWT -> VERIFY_JWT
 *            -> KEYGEN_CSR -> SIGN -> ASSEMBLE -> COMMIT -> REPLY -> DONE
 *   device (the caller's name): INTENT -> CHECK -> ARM -> CREATE -> FETCH_JWT
 *            -> COMMIT -> REPLY -> DONE
 *   tunnel:  INTENT -> CREATE -> FETCH_JWT -> COMMIT -> REPLY -> DONE
 *   any failure after INTENT, before COMMIT is durable -> COMPENSATE -> DONE
 *
 * INTENT writes a durable pending record (the identity's name; for an agent
 * also the agent id, which makes a second concurrent creation for the same
 * agent fail with ABORTED) before the controller is asked to create
 * anything: a crash at any later point leaves a trace that recovery
 * (src/lease/recover.c) resolves by name. REPLACE retires the agent's
 * previous identities (durably DELETING before each controller DELETE).
 * COMMIT replaces the pending record with the lease or the mapping in one
 * store unit (device and tunnel identities have no record of ours, as in
 * the Go service: their COMMIT is the lifecycle's HANDOVER, which drops the
 * pending record once the caller gets the id). CHECK proves the caller's
 * name absent before ARM makes the intent one that recovery may resolve by
 * that name (a name that exists fails the call: nothing is created).
 * Cancellation or the deadline before COMMIT leads to COMPENSATE (the created
 * identity is condemned: tombstone, then DELETE; nothing created: the pending
 * record goes); an unanswered create leaves the pending record to recovery.
 * Every state change goes through the lifecycle (include/zm/lifecycle.h).
 */
#ifndef ZM_ENROLL_H
#define ZM_ENROLL_H

#define ZM_ENROLL_STATES(X)                                                    \
  X(INTENT)                                                                    \
  X(REPLACE)                                                                   \
  X(CHECK)                                                                     \
  X(ARM)                                                                       \
  X(CREATE)                                                                    \
  X(FETCH_JWT)                                                                 \
  X(VERIFY_JWT)                                                                \
  X(KEYGEN_CSR)                                                                \
  X(SIGN)                                                                      \
  X(ASSEMBLE)                                                                  \
  X(COMMIT)                                                                    \
  X(REPLY)                                                                     \
  X(COMPENSATE)                                                                \
  X(DONE)

typedef enum {
#define X(s) ZM_ENROLL_##s,
  ZM_ENROLL_STATES(X)
#undef X
      ZM_ENROLL__COUNT
} zm_enroll_state_t;

/* "INTENT", "CREATE", ... */
const char *zm_enroll_state_name(zm_enroll_state_t s);
typedef enum {
  ZM_ENROLL_KIND_SERVICE,
  ZM_ENROLL_KIND_AGENT,
  ZM_ENROLL_KIND_SANDBOX,
  ZM_ENROLL_KIND_APP,
  ZM_ENROLL_KIND_RUNNER,
  ZM_ENROLL_KIND_DEVICE,
  ZM_ENROLL_KIND_TUNNEL,
  ZM_ENROLL_KIND__COUNT
} zm_enroll_kind_t;

/* 1 if a saga of this kind may go from a to b. */
int zm_enroll_edge_ok(zm_enroll_kind_t kind, zm_enroll_state_t a,
                      zm_enroll_state_t b);

/* Sets up the queue of ready enrollment steps (app->enroll_idle). */
void zm_enroll_init(zm_app_t *app);
/* Runs whatever steps are still queued, then closes the queue's handle. */
void zm_enroll_close(zm_app_t *app);

/* Random lower-case hex suffix for identity names (n - 1 digits + NUL). */
int zm_enroll_short_id(char *out, size_t n);

#endif /* ZM_ENROLL_H */
