/* Checks shared by the C tests: each CHECK counts, and a failure prints
 * where, why, and the library's last error. Every test prints
 * "NAME: N checks, M failures" last and exits non-zero on a failure.
 */
#ifndef NBD_TESTS_CHECK_H
#define NBD_TESTS_CHECK_H

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <libnbd.h>

static int failures, checks;

#define CHECK(cond, ...) do {                                   \
    checks++;                                                   \
    if (!(cond)) {                                              \
      failures++;                                               \
      fprintf (stderr, "FAIL %s:%d: ", __FILE__, __LINE__);     \
      fprintf (stderr, __VA_ARGS__);                            \
      fprintf (stderr, " [%s]\n", nbd_get_error () ? nbd_get_error () : ""); \
    }                                                           \
  } while (0)

/* An error with this errno whose message starts with the function name. */
#define CHECK_ERR(r, fn, err) do {                                        \
    long r_ = (long) (r);                                                 \
    const char *m_ = nbd_get_error ();                                    \
    int e_ = nbd_get_errno ();                                            \
    CHECK (r_ == -1, "%s should fail (got %ld)", fn, r_);                 \
    CHECK (e_ == (err), "%s: errno %d (%s), want %d (%s)", fn,            \
           e_, strerror (e_), (err), strerror (err));                     \
    CHECK (m_ && strncmp (m_, fn, strlen (fn)) == 0,                      \
           "%s: message does not name the function", fn);               \
  } while (0)

/* Whether the allocated string S (freed here; NULL is no match) is WANT.
 * A mismatch is noted on stderr, for the CHECK that fails on it. */
static bool __attribute__ ((unused))
str_is (char *s, const char *want)
{
  bool ok = s && strcmp (s, want) == 0;
  if (!ok)
    fprintf (stderr, "note: got \"%s\", want \"%s\"\n", s ? s : "(null)", want);
  free (s);
  return ok;
}

#endif
