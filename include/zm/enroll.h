/*
 * enroll.h - the enrollment saga behind RequestServiceIdentity.
 *
 * One object per request, one state at a time, each state's work in
 * enroll_on_<state>(); every transition goes through one function that checks
 * the edge against a table and logs it:
 *
 *   INTENT -> CREATE -> FETCH_JWT -> VERIFY_JWT -> KEYGEN_CSR -> SIGN
 *          -> ASSEMBLE -> COMMIT -> REPLY -> DONE
 *   any failure after INTENT, before COMMIT is durable -> COMPENSATE -> DONE
 *
 * INTENT writes a durable pending record (the identity's name) before the
 * controller is asked to create anything: a crash at any later point leaves
 * a trace that recovery (src/lease/gc.c) resolves by name. COMMIT replaces the
 * pending record with the service-identity record (lease = now + TTL) in one
 * store unit. Cancellation or the deadline before COMMIT leads to COMPENSATE
 * (delete on the controller, then drop the pending record); if compensation
 * fails, the pending record stays for recovery.
 */
#ifndef ZM_ENROLL_H
#define ZM_ENROLL_H

#define ZM_ENROLL_STATES(X)                                                    \
  X(INTENT)                                                                    \
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
/* 1 if the saga may go from a to b. */
int zm_enroll_edge_ok(zm_enroll_state_t a, zm_enroll_state_t b);

/* Random lower-case alphanumeric suffix for identity names (n chars + NUL). */
int zm_enroll_short_id(char *out, size_t n);

#endif /* ZM_ENROLL_H */
