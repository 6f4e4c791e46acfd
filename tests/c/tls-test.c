/* TLS against real peers: nbdkit (PSK and X.509, --tls=require and
 * --tls=on, plaintext and oldstyle servers, the tls-fallback filter,
 * --tls-verify-peer, a socketpair via connect_command), qemu-nbd
 * (tls-creds-psk, tls-creds-x509 with client certificates) and nbd-server
 * (X.509 with client certificates, force_tls exports); nbds URIs; opt mode
 * and aio connects over TLS; when libnbd verifies a certificate (only
 * with a ca-cert.pem and a host name) and its default directories
 * ($HOME/.pki/libnbd, tried as user nobody); the default user name; and
 * large and many small AIO transfers through TLS, driven by nbd_poll and
 * by the caller's own poll loop.  Every expected value is what libnbd
 * (GnuTLS) does: 1.14.2 where it verifies less (strict_tls below), 1.22.2
 * elsewhere; tests/c-compare.sh runs this on Debian's 1.14.2, on 1.22.2
 * and on ours, and the README lists where ours differs.
 * tests/tls-certs.sh makes the certificates and PSK files in a private
 * temporary directory; the servers are started there and everything is
 * removed at the end, even on failure.  A missing server binary is a
 * failure, never a skip.
 *
 * TLS_TEST_VERBOSE=1 prints every error message the library gave, to
 * compare the wording between libraries.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <stdarg.h>
#include <string.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <grp.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <libnbd.h>

#include "servers.h"

static bool verbose;

/* Memory the test keeps until it exits: reachable, so valgrind does not
 * count it as leaked, in the forked children either. */
static char **kept;
static size_t nkept;

static char *
keep (char *s)
{
  char **k = realloc (kept, (nkept + 1) * sizeof *kept);
  if (!k) fatal ("realloc");
  kept = k;
  kept[nkept++] = s;
  return s;
}

/* A path in the private directory. */
static char *
P (const char *fmt, ...)
{
  char *name, *p;
  va_list ap;
  va_start (ap, fmt);
  if (vasprintf (&name, fmt, ap) == -1) fatal ("vasprintf");
  va_end (ap);
  p = path_in_dir (name);
  free (name);
  return keep (p);
}




/* nbdkit on a Unix socket DIR/TAG.sock (port 0) or on 127.0.0.1:PORT;
 * args: options, plugin and its parameters, NULL-terminated.  Returns the
 * socket path (NULL for TCP). */
static char *
start_nbdkit (const char *tag, int port, ...)
{
  char *sock = NULL, *pidfile = P ("%s.pid", tag), *argv[40], portstr[16];
  const char *a;
  int n = 0;
  va_list ap;
  argv[n++] = "nbdkit"; argv[n++] = "-f"; argv[n++] = "--exit-with-parent";
  argv[n++] = "-P"; argv[n++] = pidfile;
  if (port == 0) {
    sock = P ("%s.sock", tag);
    argv[n++] = "-U"; argv[n++] = sock;
  } else {
    snprintf (portstr, sizeof portstr, "%d", port);
    argv[n++] = "-p"; argv[n++] = portstr; argv[n++] = "-i"; argv[n++] = "127.0.0.1";
  }
  va_start (ap, port);
  while ((a = va_arg (ap, const char *)) != NULL && n < 39)
    argv[n++] = (char *) a;
  va_end (ap);
  argv[n] = NULL;
  wait_ready (tag, spawn (argv, -1, -1), pidfile, sock, 0, false);
  return sock;
}

static void
make_image (const char *path, off_t size)
{
  int fd = open (path, O_CREAT | O_RDWR | O_TRUNC, 0644);
  if (fd == -1 || ftruncate (fd, size) == -1) fatal ("%s: %m", path);
  close (fd);
}

/* The certificates and PSK files, in the private directory's "certs". */
static void
make_certs (void)
{
  keep (make_tls_certs ());
}

#define CERTS(name) P ("certs/%s", name)

/* ---------------------------------------------------------------------- */
/* Helpers. */

static void
note (const char *what)
{
  if (verbose)
    fprintf (stderr, "tls-test: note: %s: errno %d: %s\n", what, nbd_get_errno (),
             nbd_get_error () ? nbd_get_error () : "(no message)");
}

static struct nbd_handle *
new_handle (void)
{
  struct nbd_handle *h = nbd_create ();
  if (h == NULL) fatal ("nbd_create: %s", nbd_get_error ());
  return h;
}

/* A handle for PSK (file may be NULL for none, user NULL for the default). */
static struct nbd_handle *
psk_handle (int tls, const char *file, const char *user)
{
  struct nbd_handle *h = new_handle ();
  CHECK (nbd_set_tls (h, tls) == 0, "set_tls %d", tls);
  if (file) CHECK (nbd_set_tls_psk_file (h, file) == 0, "set_tls_psk_file");
  if (user) CHECK (nbd_set_tls_username (h, user) == 0, "set_tls_username");
  return h;
}

/* A handle for X.509 (certdir may be NULL for the default). */
static struct nbd_handle *
x509_handle (int tls, const char *certdir, bool verify)
{
  struct nbd_handle *h = new_handle ();
  CHECK (nbd_set_tls (h, tls) == 0, "set_tls %d", tls);
  if (certdir) CHECK (nbd_set_tls_certificates (h, certdir) == 0, "set_tls_certificates");
  CHECK (nbd_set_tls_verify_peer (h, verify) == 0, "set_tls_verify_peer");
  return h;
}

/* A formatted string, kept until exit. */
static char *
uri_of (const char *fmt, ...)
{
  char *s;
  va_list ap;
  va_start (ap, fmt);
  if (vasprintf (&s, fmt, ap) == -1) fatal ("vasprintf");
  va_end (ap);
  return keep (s);
}

static bool
state_starts (struct nbd_handle *h, const char *prefix)
{
  const char *s = nbd_connection_state (h);
  return s && strncmp (s, prefix, strlen (prefix)) == 0;
}

static void
fill (char *buf, size_t len, uint64_t seed)
{
  uint64_t x = seed * 0x9e3779b97f4a7c15ULL + 1;
  for (size_t i = 0; i < len; i++) {
    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
    buf[i] = (char) x;
  }
}

/* Write 64 KiB at off, read them back. */
static void
roundtrip (struct nbd_handle *h, const char *tag, uint64_t off, uint64_t seed)
{
  static char wbuf[65536], rbuf[65536];
  fill (wbuf, sizeof wbuf, seed);
  memset (rbuf, 0, sizeof rbuf);
  CHECK (nbd_pwrite (h, wbuf, sizeof wbuf, off, 0) == 0, "%s: pwrite", tag);
  CHECK (nbd_pread (h, rbuf, sizeof rbuf, off, 0) == 0, "%s: pread", tag);
  CHECK (memcmp (wbuf, rbuf, sizeof wbuf) == 0, "%s: data read back differs", tag);
}

/* A connected TLS handle: negotiated, and the flags say so. */
static void
check_tls_up (struct nbd_handle *h, const char *tag)
{
  CHECK (nbd_aio_is_ready (h) == 1, "%s: ready", tag);
  CHECK (nbd_get_tls_negotiated (h) == 1, "%s: tls negotiated", tag);
  CHECK (nbd_supports_tls (h) == 1, "%s: supports_tls", tag);
}

/* Disconnect cleanly and close. */
static void
finish (struct nbd_handle *h, const char *tag)
{
  CHECK (nbd_shutdown (h, 0) == 0, "%s: shutdown", tag);
  for (int i = 0; i < 50 && !nbd_aio_is_closed (h) && !nbd_aio_is_dead (h); i++)
    if (nbd_poll (h, 100) == -1) break;
  CHECK (nbd_aio_is_closed (h) == 1, "%s: closed after shutdown (%s)", tag,
         nbd_connection_state (h));
  nbd_close (h);
}

/* A failed connect: -1, errno err, the message names fn, and the handle
 * is dead. */
/* Where libnbd 1.22 and ours are stricter than Debian's 1.14 (an
 * untrusted certificate fails the connection; system trust is the
 * fallback; tls-verify-peer= in URIs is honoured), each library's own
 * behaviour is checked. tests/c-compare.sh says which one is loaded. */
static int strict_tls;

#define CHECK_CONNECT_FAILS(r, h, fn, err, tag) do {                     \
    long rr_ = (long) (r);                                               \
    note (tag);                                                          \
    CHECK_ERR (rr_, fn, err);                                            \
    CHECK (nbd_aio_is_dead (h) == 1, "%s: dead after the failed connect (%s)", \
           tag, nbd_connection_state (h));                               \
  } while (0)

/* ---------------------------------------------------------------------- */
/* Large transfers: 16 commands of 1 MiB in flight. */

enum { NBIG = 16, BIGSZ = 1 << 20 };

/* Runs until every cookie completes or 15 s pass; own_loop drives the
 * handle with poll(2) on aio_get_fd/aio_get_direction and aio_notify_*
 * instead of nbd_poll. */
static bool
wait_cookies (struct nbd_handle *h, int64_t *cookies, int n, bool own_loop,
              const char *tag)
{
  struct timespec start, now;
  bool done[64] = { false };
  int left = n;
  clock_gettime (CLOCK_MONOTONIC, &start);
  for (;;) {
    for (int i = 0; i < n; i++) {
      if (done[i] || cookies[i] <= 0) {
        if (!done[i]) { done[i] = true; left--; }
        continue;
      }
      int r = nbd_aio_command_completed (h, cookies[i]);
      if (r == 0) continue;
      CHECK (r == 1, "%s: command %d completed with an error", tag, i);
      done[i] = true;
      left--;
    }
    if (left == 0) return true;
    clock_gettime (CLOCK_MONOTONIC, &now);
    if (now.tv_sec - start.tv_sec > 15) {
      CHECK (false, "%s: %d of %d commands still in flight after 15 s (state %s, direction %u)",
             tag, left, n, nbd_connection_state (h), nbd_aio_get_direction (h));
      return false;
    }
    if (!own_loop) {
      if (nbd_poll (h, 1000) == -1) {
        CHECK (false, "%s: nbd_poll failed", tag);
        return false;
      }
      continue;
    }
    int fd = nbd_aio_get_fd (h);
    unsigned dir = nbd_aio_get_direction (h);
    if (fd < 0) {
      CHECK (false, "%s: aio_get_fd failed", tag);
      return false;
    }
    struct pollfd pfd = { .fd = fd };
    if (dir & LIBNBD_AIO_DIRECTION_READ) pfd.events |= POLLIN;
    if (dir & LIBNBD_AIO_DIRECTION_WRITE) pfd.events |= POLLOUT;
    if (poll (&pfd, 1, 1000) == -1) {
      CHECK (false, "%s: poll: %s", tag, strerror (errno));
      return false;
    }
    if ((pfd.revents & (POLLIN | POLLHUP | POLLERR)) && (dir & LIBNBD_AIO_DIRECTION_READ))
      nbd_aio_notify_read (h);
    else if ((pfd.revents & (POLLOUT | POLLERR)) && (dir & LIBNBD_AIO_DIRECTION_WRITE))
      nbd_aio_notify_write (h);
  }
}

static void
big_transfers (struct nbd_handle *h, const char *tag, bool own_loop, uint64_t seed)
{
  static char *wbuf[NBIG], *rbuf[NBIG];
  int64_t cookies[NBIG];
  char what[200];
  for (int i = 0; i < NBIG; i++) {
    if (!wbuf[i]) wbuf[i] = keep (malloc (BIGSZ));
    if (!rbuf[i]) rbuf[i] = keep (malloc (BIGSZ));
    if (!wbuf[i] || !rbuf[i]) fatal ("malloc");
    fill (wbuf[i], BIGSZ, seed * 100 + i);
    memset (rbuf[i], 0, BIGSZ);
  }

  snprintf (what, sizeof what, "%s: 16 x 1 MiB aio_pwrite%s", tag, own_loop ? " (own poll loop)" : "");
  for (int i = 0; i < NBIG; i++) {
    cookies[i] = nbd_aio_pwrite (h, wbuf[i], BIGSZ, (uint64_t) i * BIGSZ, NBD_NULL_COMPLETION, 0);
    CHECK (cookies[i] > 0, "%s: submit %d", what, i);
  }
  CHECK (nbd_aio_in_flight (h) > 1, "%s: several in flight (%d)", what, nbd_aio_in_flight (h));
  if (!wait_cookies (h, cookies, NBIG, own_loop, what)) return;
  CHECK (nbd_aio_in_flight (h) == 0, "%s: none left in flight", what);

  snprintf (what, sizeof what, "%s: 16 x 1 MiB aio_pread%s", tag, own_loop ? " (own poll loop)" : "");
  for (int i = 0; i < NBIG; i++) {
    cookies[i] = nbd_aio_pread (h, rbuf[i], BIGSZ, (uint64_t) i * BIGSZ, NBD_NULL_COMPLETION, 0);
    CHECK (cookies[i] > 0, "%s: submit %d", what, i);
  }
  if (!wait_cookies (h, cookies, NBIG, own_loop, what)) return;
  int bad = 0;
  for (int i = 0; i < NBIG; i++)
    if (memcmp (wbuf[i], rbuf[i], BIGSZ) != 0) bad++;
  CHECK (bad == 0, "%s: %d of 16 MiB blocks read back differ", what, bad);

  /* Writes and reads in flight together: the second half is rewritten
   * while the first half is read. */
  snprintf (what, sizeof what, "%s: 8 writes + 8 reads in flight%s", tag, own_loop ? " (own poll loop)" : "");
  for (int i = 0; i < NBIG; i++) {
    if (i >= NBIG / 2) fill (wbuf[i], BIGSZ, seed * 100 + 50 + i);
    memset (rbuf[i], 0, BIGSZ);
  }
  for (int i = 0; i < NBIG; i++) {
    if (i < NBIG / 2)
      cookies[i] = nbd_aio_pread (h, rbuf[i], BIGSZ, (uint64_t) i * BIGSZ, NBD_NULL_COMPLETION, 0);
    else
      cookies[i] = nbd_aio_pwrite (h, wbuf[i], BIGSZ, (uint64_t) i * BIGSZ, NBD_NULL_COMPLETION, 0);
    CHECK (cookies[i] > 0, "%s: submit %d", what, i);
  }
  if (!wait_cookies (h, cookies, NBIG, own_loop, what)) return;
  bad = 0;
  for (int i = 0; i < NBIG / 2; i++)
    if (memcmp (wbuf[i], rbuf[i], BIGSZ) != 0) bad++;
  for (int i = NBIG / 2; i < NBIG; i++) {
    CHECK (nbd_pread (h, rbuf[i], BIGSZ, (uint64_t) i * BIGSZ, 0) == 0, "%s: pread %d", what, i);
    if (memcmp (wbuf[i], rbuf[i], BIGSZ) != 0) bad++;
  }
  CHECK (bad == 0, "%s: %d blocks read back differ", what, bad);
}

/* Many small replies: 256 reads of 512 bytes in flight, so that several
 * replies share a TLS record or a receive, and decrypted bytes wait in
 * the TLS layer while the socket has nothing more to read. */
static void
small_transfers (struct nbd_handle *h, const char *tag, bool own_loop, uint64_t seed)
{
  enum { NSMALL = 256, SMALL = 512 };
  static char wbuf[NSMALL * SMALL], rbuf[NSMALL * SMALL];
  int64_t cookies[64];
  char what[200];
  fill (wbuf, sizeof wbuf, seed);
  memset (rbuf, 0, sizeof rbuf);
  CHECK (nbd_pwrite (h, wbuf, sizeof wbuf, 0, 0) == 0, "%s: small: pwrite", tag);
  snprintf (what, sizeof what, "%s: 256 x 512 B aio_pread%s", tag, own_loop ? " (own poll loop)" : "");
  /* In batches of 64 (wait_cookies' limit), all submitted first. */
  int64_t all[NSMALL];
  for (int i = 0; i < NSMALL; i++)
    all[i] = nbd_aio_pread (h, rbuf + i * SMALL, SMALL, (uint64_t) i * SMALL, NBD_NULL_COMPLETION, 0);
  bool ok = true;
  for (int b = 0; b < NSMALL / 64 && ok; b++) {
    memcpy (cookies, all + b * 64, sizeof cookies);
    ok = wait_cookies (h, cookies, 64, own_loop, what);
  }
  int bad = 0;
  for (int i = 0; i < NSMALL; i++) {
    if (all[i] <= 0) bad++;
    else if (memcmp (wbuf + i * SMALL, rbuf + i * SMALL, SMALL) != 0) bad++;
  }
  CHECK (ok && bad == 0, "%s: %d of 256 small reads failed or differ", what, bad);
}

/* LOGNAME and USER set (NULL: unset) for a while, then put back. */
static char *saved_logname, *saved_user;
static bool env_saved;
static void
set_or_unset (const char *name, const char *value)
{
  if (value) setenv (name, value, 1); else unsetenv (name);
}
static void
with_env (const char *logname, const char *user)
{
  if (!env_saved) {
    saved_logname = getenv ("LOGNAME") ? strdup (getenv ("LOGNAME")) : NULL;
    saved_user = getenv ("USER") ? strdup (getenv ("USER")) : NULL;
    env_saved = true;
  }
  set_or_unset ("LOGNAME", logname);
  set_or_unset ("USER", user);
}
static void
restore_env (void)
{
  set_or_unset ("LOGNAME", saved_logname);
  set_or_unset ("USER", saved_user);
  free (saved_logname); free (saved_user);
  saved_logname = saved_user = NULL;
  env_saved = false;
}

/* ---------------------------------------------------------------------- */
/* 0. Settings, no server. */

static void
test_settings (void)
{
  struct nbd_handle *h = new_handle ();
  CHECK (nbd_supports_tls (h) == 1, "supports_tls");
  CHECK (nbd_get_tls (h) == LIBNBD_TLS_DISABLE, "tls defaults to DISABLE");
  CHECK (nbd_get_tls_verify_peer (h) == 1, "verify_peer defaults to true");
  CHECK_ERR (nbd_set_tls (h, 3), "nbd_set_tls", EINVAL);
  CHECK (nbd_get_tls (h) == LIBNBD_TLS_DISABLE, "a refused set_tls changes nothing");
  CHECK (nbd_set_tls (h, LIBNBD_TLS_ALLOW) == 0 && nbd_get_tls (h) == LIBNBD_TLS_ALLOW, "set ALLOW");
  CHECK (nbd_set_tls (h, LIBNBD_TLS_REQUIRE) == 0 && nbd_get_tls (h) == LIBNBD_TLS_REQUIRE, "set REQUIRE");
  CHECK (nbd_set_tls_verify_peer (h, false) == 0 && nbd_get_tls_verify_peer (h) == 0, "verify_peer off");
  CHECK (nbd_set_tls_username (h, "alice") == 0, "set_tls_username");
  CHECK (str_is (nbd_get_tls_username (h), "alice"), "get_tls_username");
  CHECK_ERR (nbd_set_tls_psk_file (h, NULL), "nbd_set_tls_psk_file", EFAULT);
  CHECK_ERR (nbd_set_tls_certificates (h, NULL), "nbd_set_tls_certificates", EFAULT);
  CHECK_ERR (nbd_set_tls_username (h, NULL), "nbd_set_tls_username", EFAULT);
  CHECK_ERR (nbd_get_tls_negotiated (h), "nbd_get_tls_negotiated", ENOTCONN);
  nbd_close (h);

  /* The default user name: $LOGNAME, else getlogin_r's answer or its
   * error (as without a login session); $USER is never looked at. */
  h = new_handle ();
  with_env ("carol", "dave");
  CHECK (str_is (nbd_get_tls_username (h), "carol"), "default tls username is $LOGNAME");
  with_env (NULL, "dave");
  {
    char login[256];
    int e = getlogin_r (login, sizeof login);
    char *u = nbd_get_tls_username (h);
    note ("default username without LOGNAME");
    if (e == 0)
      CHECK (u && strcmp (u, login) == 0, "default tls username is the login name %s: %s", login, u ? u : "(null)");
    else
      CHECK_ERR (u == NULL ? -1 : 0, "nbd_get_tls_username", e);
    free (u);
  }
  restore_env ();
  nbd_close (h);
}

/* ---------------------------------------------------------------------- */
/* 1. nbdkit with PSK. */

static int
count (void *p, const char *name, const char *desc)
{
  (void) name; (void) desc;
  (*(int *) p)++;
  return 0;
}

static char *psk_sock;          /* nbdkit --tls=require --tls-psk memory 64M */

static void
test_nbdkit_psk (void)
{
  char *keys = CERTS ("psk/keys.psk"), *bad = CERTS ("psk-bad/keys.psk");
  int port = free_port (AF_INET);
  struct nbd_handle *h;

  psk_sock = start_nbdkit ("psk", 0, "--tls=require", "--tls-psk", keys, "memory", "64M", NULL);
  start_nbdkit ("psk-tcp", port, "--tls=require", "--tls-psk", keys, "memory", "1M", NULL);

  /* The right key, Unix socket. */
  h = psk_handle (LIBNBD_TLS_REQUIRE, keys, "alice");
  CHECK (nbd_connect_unix (h, psk_sock) == 0, "psk unix: connect");
  check_tls_up (h, "psk unix");
  CHECK (nbd_get_tls (h) == LIBNBD_TLS_REQUIRE, "psk unix: get_tls");
  CHECK (strcmp (nbd_get_protocol (h), "newstyle-fixed") == 0, "psk unix: protocol");
  CHECK (nbd_get_structured_replies_negotiated (h) == 1, "psk unix: structured replies");
  CHECK (nbd_get_size (h) == 64 << 20, "psk unix: size");
  roundtrip (h, "psk unix", 4096, 1);
  /* A 16 MiB read and write in one command: many TLS records each. */
  {
    char *w = malloc (16 << 20), *r = malloc (16 << 20);
    if (!w || !r) fatal ("malloc");
    fill (w, 16 << 20, 77);
    CHECK (nbd_pwrite (h, w, 16 << 20, 1 << 20, 0) == 0, "psk unix: 16 MiB pwrite");
    CHECK (nbd_pread (h, r, 16 << 20, 1 << 20, 0) == 0 && memcmp (w, r, 16 << 20) == 0,
           "psk unix: 16 MiB pread back");
    free (w); free (r);
  }
  CHECK (nbd_flush (h, 0) == 0, "psk unix: flush");
  CHECK (nbd_zero (h, 65536, 4096, 0) == 0, "psk unix: zero");
  CHECK (str_is (nbd_get_tls_username (h), "alice"), "psk unix: username");
  CHECK (str_is (nbd_get_uri (h), uri_of ("nbds+unix://alice@/?socket=%s&tls-psk-file=%s", psk_sock, keys)),
         "psk unix: get_uri");
  finish (h, "psk unix");

  /* The right key over TCP. */
  h = psk_handle (LIBNBD_TLS_REQUIRE, keys, "alice");
  {
    char portstr[16];
    snprintf (portstr, sizeof portstr, "%d", port);
    CHECK (nbd_connect_tcp (h, "127.0.0.1", portstr) == 0, "psk tcp: connect");
    check_tls_up (h, "psk tcp");
    roundtrip (h, "psk tcp", 0, 2);
    finish (h, "psk tcp");

    /* ALLOW with the right key against --tls=require: TLS. */
    h = psk_handle (LIBNBD_TLS_ALLOW, keys, "alice");
    CHECK (nbd_connect_tcp (h, "localhost", portstr) == 0, "psk tcp allow: connect");
    check_tls_up (h, "psk tcp allow");
    finish (h, "psk tcp allow");

    /* The wrong key over TCP. */
    h = psk_handle (LIBNBD_TLS_REQUIRE, bad, "alice");
    CHECK_CONNECT_FAILS (nbd_connect_tcp (h, "127.0.0.1", portstr), h, "nbd_connect_tcp", 0, "psk tcp: wrong key");
    nbd_close (h);
  }

  /* The wrong key. */
  h = psk_handle (LIBNBD_TLS_REQUIRE, bad, "alice");
  CHECK_CONNECT_FAILS (nbd_connect_unix (h, psk_sock), h, "nbd_connect_unix", 0, "psk: wrong key");
  CHECK_ERR (nbd_get_tls_negotiated (h), "nbd_get_tls_negotiated", EINVAL);
  CHECK_ERR (nbd_pread (h, (char[512]) { 0 }, 512, 0, 0), "nbd_pread", EINVAL);
  nbd_close (h);

  /* ALLOW does not fall back to plaintext once STARTTLS was accepted. */
  h = psk_handle (LIBNBD_TLS_ALLOW, bad, "alice");
  CHECK_CONNECT_FAILS (nbd_connect_unix (h, psk_sock), h, "nbd_connect_unix", 0, "psk allow: wrong key");
  nbd_close (h);

  /* A user name the file does not have. */
  h = psk_handle (LIBNBD_TLS_REQUIRE, keys, "bob");
  CHECK_CONNECT_FAILS (nbd_connect_unix (h, psk_sock), h, "nbd_connect_unix", EINVAL, "psk: unknown user");
  nbd_close (h);

  /* No user name set: $LOGNAME.  Without it libnbd asks getlogin_r,
   * and fails the connect with its errno when there is no login name
   * ($USER=alice does not count). */
  with_env ("alice", "bob");
  h = psk_handle (LIBNBD_TLS_REQUIRE, keys, NULL);
  CHECK (nbd_connect_unix (h, psk_sock) == 0, "psk: user from LOGNAME=alice: connect");
  check_tls_up (h, "psk LOGNAME");
  finish (h, "psk LOGNAME");
  with_env (NULL, "alice");
  {
    char login[256];
    int e = getlogin_r (login, sizeof login);
    h = psk_handle (LIBNBD_TLS_REQUIRE, keys, NULL);
    int r = nbd_connect_unix (h, psk_sock);
    note ("psk: default user name without LOGNAME");
    if (e == 0 && strcmp (login, "alice") == 0)
      CHECK (r == 0, "psk: login name alice: connect");
    else if (e == 0)
      CHECK_CONNECT_FAILS (r, h, "nbd_connect_unix", EINVAL, "psk: login name not in the file");
    else
      CHECK_CONNECT_FAILS (r, h, "nbd_connect_unix", e, "psk: no LOGNAME, no login name, USER=alice");
    nbd_close (h);
  }
  restore_env ();

  /* A PSK file that does not exist. */
  h = psk_handle (LIBNBD_TLS_REQUIRE, P ("no-such.psk"), "alice");
  CHECK_CONNECT_FAILS (nbd_connect_unix (h, psk_sock), h, "nbd_connect_unix", ENOENT, "psk: missing file");
  nbd_close (h);

  /* No TLS from the client: the server insists. */
  h = psk_handle (LIBNBD_TLS_DISABLE, NULL, NULL);
  CHECK_CONNECT_FAILS (nbd_connect_unix (h, psk_sock), h, "nbd_connect_unix", ENOTSUP, "psk: client DISABLE");
  nbd_close (h);

  /* Certificates against a PSK-only server: no common ground. */
  h = x509_handle (LIBNBD_TLS_REQUIRE, CERTS ("client-ca"), true);
  CHECK_CONNECT_FAILS (nbd_connect_unix (h, psk_sock), h, "nbd_connect_unix", 0, "psk server, x509 client");
  nbd_close (h);

  /* Opt mode: TLS comes first, options travel inside it. */
  h = psk_handle (LIBNBD_TLS_REQUIRE, keys, "alice");
  CHECK (nbd_set_opt_mode (h, true) == 0, "psk opt: set_opt_mode");
  CHECK (nbd_connect_unix (h, psk_sock) == 0, "psk opt: connect");
  CHECK (nbd_aio_is_negotiating (h) == 1, "psk opt: negotiating");
  CHECK (nbd_get_tls_negotiated (h) == 1, "psk opt: negotiated before any option");
  {
    int n = 0;
    CHECK (nbd_opt_list (h, (nbd_list_callback) { .callback = count, .user_data = &n }) == 1 && n == 1,
           "psk opt: opt_list over TLS (%d)", n);
  }
  CHECK (nbd_opt_info (h) == 0 && nbd_get_size (h) == 64 << 20, "psk opt: opt_info");
  CHECK (nbd_opt_go (h) == 0, "psk opt: opt_go");
  check_tls_up (h, "psk opt");
  roundtrip (h, "psk opt", 8192, 3);
  finish (h, "psk opt");

  /* State rules: TLS settings only before connecting. */
  h = psk_handle (LIBNBD_TLS_REQUIRE, keys, "alice");
  CHECK (nbd_connect_unix (h, psk_sock) == 0, "psk state: connect");
  CHECK (nbd_set_tls (h, LIBNBD_TLS_DISABLE) == -1, "psk state: set_tls after connect fails");
  note ("set_tls after connect");
  CHECK (nbd_set_tls_psk_file (h, keys) == -1, "psk state: set_tls_psk_file after connect fails");
  CHECK (nbd_get_tls (h) == LIBNBD_TLS_REQUIRE, "psk state: get_tls");
  finish (h, "psk state");
}

/* ---------------------------------------------------------------------- */
/* 2. nbdkit with X.509. */

static int x509_port;

static void
test_nbdkit_x509 (void)
{
  char portstr[16], otherstr[16], verifystr[16];
  int other = free_port (AF_INET), verify;
  struct nbd_handle *h;

  x509_port = free_port (AF_INET);
  start_nbdkit ("x509", x509_port, "--tls=require", "--tls-certificates", CERTS ("server"),
                "memory", "64M", NULL);
  snprintf (portstr, sizeof portstr, "%d", x509_port);
  start_nbdkit ("x509-other", other, "--tls=require", "--tls-certificates", CERTS ("server-other"),
                "memory", "1M", NULL);
  snprintf (otherstr, sizeof otherstr, "%d", other);
  verify = free_port (AF_INET);
  start_nbdkit ("x509-verify", verify, "--tls=require", "--tls-verify-peer",
                "--tls-certificates", CERTS ("server"), "memory", "1M", NULL);
  snprintf (verifystr, sizeof verifystr, "%d", verify);

  /* The right CA, "localhost" in the certificate. */
  h = x509_handle (LIBNBD_TLS_REQUIRE, CERTS ("client-ca"), true);
  CHECK (nbd_connect_tcp (h, "localhost", portstr) == 0, "x509: connect localhost");
  check_tls_up (h, "x509");
  roundtrip (h, "x509", 0, 4);
  CHECK (str_is (nbd_get_uri (h), uri_of ("nbds://localhost:%d/?tls-certificates=%s", x509_port, CERTS ("client-ca"))),
         "x509: get_uri");
  finish (h, "x509");

  /* An address in the certificate's IP SAN. */
  h = x509_handle (LIBNBD_TLS_REQUIRE, CERTS ("client-ca"), true);
  CHECK (nbd_connect_tcp (h, "127.0.0.1", portstr) == 0, "x509: connect 127.0.0.1");
  check_tls_up (h, "x509 ip");
  finish (h, "x509 ip");

  /* The CA plus a client certificate: the server does not ask for it. */
  h = x509_handle (LIBNBD_TLS_REQUIRE, CERTS ("client"), true);
  CHECK (nbd_connect_tcp (h, "localhost", portstr) == 0, "x509 with client cert: connect");
  check_tls_up (h, "x509 with client cert");
  finish (h, "x509 with client cert");

  /* The wrong CA. */
  h = x509_handle (LIBNBD_TLS_REQUIRE, CERTS ("client-ca2"), true);
  CHECK_CONNECT_FAILS (nbd_connect_tcp (h, "localhost", portstr), h, "nbd_connect_tcp", 0, "x509: wrong CA");
  nbd_close (h);

  /* The right CA, whose ca-crl.pem revokes the server's certificate. */
  h = x509_handle (LIBNBD_TLS_REQUIRE, CERTS ("client-crl"), true);
  CHECK_CONNECT_FAILS (nbd_connect_tcp (h, "localhost", portstr), h, "nbd_connect_tcp", 0,
                       "x509: server certificate revoked");
  nbd_close (h);

  /* The wrong CA without verification. */
  h = x509_handle (LIBNBD_TLS_REQUIRE, CERTS ("client-ca2"), false);
  CHECK (nbd_connect_tcp (h, "localhost", portstr) == 0, "x509: wrong CA, verify_peer off");
  check_tls_up (h, "x509 wrong CA, no verify");
  finish (h, "x509 wrong CA, no verify");

  /* A directory without ca-cert.pem, or none set (and no
   * /etc/pki/libnbd): libnbd falls back to the system's CAs and then
   * verifies nothing at all (gnutls_session_set_verify_cert is only
   * called when ca-cert.pem was found), so the connection succeeds
   * although the system does not trust our CA. */
  h = x509_handle (LIBNBD_TLS_REQUIRE, P ("no-such-dir"), true);
  if (strict_tls) {
    /* Ours: the system's CAs do not trust the server: refused. */
    CHECK_CONNECT_FAILS (nbd_connect_tcp (h, "localhost", portstr), h, "nbd_connect_tcp", 0,
                         "x509: missing dir, verify_peer on (strict)");
    nbd_close (h);
  } else {
    CHECK (nbd_connect_tcp (h, "localhost", portstr) == 0, "x509: missing dir, verify_peer on: connect");
    note ("x509: missing dir");
    check_tls_up (h, "x509 missing dir");
    finish (h, "x509 missing dir");
  }
  if (access ("/etc/pki/libnbd/ca-cert.pem", F_OK) == -1 && geteuid () == 0) {
    h = x509_handle (LIBNBD_TLS_REQUIRE, NULL, true);
    if (strict_tls) {
      CHECK_CONNECT_FAILS (nbd_connect_tcp (h, "localhost", otherstr), h, "nbd_connect_tcp", 0,
                           "x509: no certificates dir, wrong host name (strict)");
      nbd_close (h);
    } else {
      CHECK (nbd_connect_tcp (h, "localhost", otherstr) == 0,
             "x509: no certificates dir, wrong host name, verify_peer on: connect");
      note ("x509: no dir");
      check_tls_up (h, "x509 no dir");
      finish (h, "x509 no dir");
    }
  }

  /* A certificate for another host name. */
  h = x509_handle (LIBNBD_TLS_REQUIRE, CERTS ("client-ca"), true);
  CHECK_CONNECT_FAILS (nbd_connect_tcp (h, "localhost", otherstr), h, "nbd_connect_tcp", 0, "x509: host name mismatch");
  nbd_close (h);
  h = x509_handle (LIBNBD_TLS_REQUIRE, CERTS ("client-ca"), true);
  CHECK_CONNECT_FAILS (nbd_connect_tcp (h, "127.0.0.1", otherstr), h, "nbd_connect_tcp", 0, "x509: IP not in SAN");
  nbd_close (h);
  h = x509_handle (LIBNBD_TLS_REQUIRE, CERTS ("client-ca"), false);
  CHECK (nbd_connect_tcp (h, "localhost", otherstr) == 0, "x509: host name mismatch, verify_peer off");
  check_tls_up (h, "x509 mismatch, no verify");
  roundtrip (h, "x509 mismatch, no verify", 0, 5);
  finish (h, "x509 mismatch, no verify");

  /* The server verifies clients: a client certificate is needed. */
  h = x509_handle (LIBNBD_TLS_REQUIRE, CERTS ("client"), true);
  CHECK (nbd_connect_tcp (h, "localhost", verifystr) == 0, "x509 client cert: connect");
  check_tls_up (h, "x509 client cert");
  roundtrip (h, "x509 client cert", 0, 6);
  finish (h, "x509 client cert");
  h = x509_handle (LIBNBD_TLS_REQUIRE, CERTS ("client-ca"), true);
  {
    int r = nbd_connect_tcp (h, "localhost", verifystr);
    note ("x509: no client cert");
    /* Under TLS 1.3 the client learns of the refusal after its side of
     * the handshake ended: the failure surfaces on the first read of the
     * NBD stream.  Depending on timing libnbd sees the server's alert or
     * a reset inside GnuTLS (errno 0, the handle dead), or a clean EOF
     * ("server closed socket unexpectedly", ENOTCONN, and the handle
     * left in the option state, not dead); never the socket's errno. */
    int e = nbd_get_errno ();
    const char *m = nbd_get_error ();
    CHECK (r == -1, "x509 no client cert: connect fails");
    CHECK (e == 0 || e == ENOTCONN, "x509 no client cert: errno %d (%s), want 0 or ENOTCONN", e, strerror (e));
    CHECK (m && strncmp (m, "nbd_connect_tcp", 15) == 0, "x509 no client cert: message names the function");
    CHECK (nbd_aio_is_ready (h) == 0, "x509 no client cert: not ready (%s)", nbd_connection_state (h));
  }
  nbd_close (h);

  /* X.509 over a Unix socket: libnbd has no host name, and without one
   * it verifies nothing, not even the CA. */
  {
    char *sock = start_nbdkit ("x509-other-unix", 0, "--tls=require", "--tls-certificates",
                               CERTS ("server-other"), "memory", "1M", NULL);
    h = x509_handle (LIBNBD_TLS_REQUIRE, CERTS ("client-ca"), true);
    CHECK (nbd_connect_unix (h, sock) == 0, "x509 unix: connect (no host name check)");
    check_tls_up (h, "x509 unix");
    finish (h, "x509 unix");
    h = x509_handle (LIBNBD_TLS_REQUIRE, CERTS ("client-ca2"), true);
    if (strict_tls) {
      /* Ours checks the chain even without a host name to check. */
      CHECK_CONNECT_FAILS (nbd_connect_unix (h, sock), h, "nbd_connect_unix", 0,
                           "x509 unix: wrong CA, verify_peer on (strict)");
      nbd_close (h);
    } else {
      CHECK (nbd_connect_unix (h, sock) == 0, "x509 unix: wrong CA, verify_peer on: connect");
      note ("x509 unix: wrong CA");
      check_tls_up (h, "x509 unix wrong CA");
      roundtrip (h, "x509 unix wrong CA", 0, 24);
      finish (h, "x509 unix wrong CA");
    }
  }
}

/* ---------------------------------------------------------------------- */
/* 3. --tls=on, plaintext-only and oldstyle servers. */

static char *plain_sock;

static void
test_nbdkit_allow (void)
{
  char *keys = CERTS ("psk/keys.psk");
  char *on = start_nbdkit ("tls-on", 0, "--tls=on", "--tls-psk", keys, "memory", "1M", NULL);
  char *old = start_nbdkit ("old", 0, "-o", "memory", "1M", NULL);
  struct nbd_handle *h;
  plain_sock = start_nbdkit ("plain", 0, "memory", "1M", NULL);

  h = psk_handle (LIBNBD_TLS_ALLOW, keys, "alice");
  CHECK (nbd_connect_unix (h, on) == 0, "tls=on, ALLOW: connect");
  check_tls_up (h, "tls=on, ALLOW");
  roundtrip (h, "tls=on, ALLOW", 0, 7);
  CHECK (str_is (nbd_get_uri (h), uri_of ("nbds+unix://alice@/?socket=%s&tls-psk-file=%s", on, keys)),
         "tls=on, ALLOW: get_uri");
  finish (h, "tls=on, ALLOW");

  h = psk_handle (LIBNBD_TLS_REQUIRE, keys, "alice");
  CHECK (nbd_connect_unix (h, on) == 0, "tls=on, REQUIRE: connect");
  check_tls_up (h, "tls=on, REQUIRE");
  finish (h, "tls=on, REQUIRE");

  h = psk_handle (LIBNBD_TLS_DISABLE, keys, "alice");
  CHECK (nbd_connect_unix (h, on) == 0, "tls=on, DISABLE: connect");
  CHECK (nbd_get_tls_negotiated (h) == 0, "tls=on, DISABLE: not negotiated");
  roundtrip (h, "tls=on, DISABLE", 0, 8);
  CHECK (str_is (nbd_get_uri (h), uri_of ("nbd+unix://alice@/?socket=%s&tls-psk-file=%s", on, keys)),
         "tls=on, DISABLE: get_uri");
  finish (h, "tls=on, DISABLE");

  /* A plaintext-only server. */
  h = psk_handle (LIBNBD_TLS_REQUIRE, keys, "alice");
  CHECK_CONNECT_FAILS (nbd_connect_unix (h, plain_sock), h, "nbd_connect_unix", ENOTSUP, "plain server, REQUIRE");
  nbd_close (h);
  h = psk_handle (LIBNBD_TLS_ALLOW, keys, "alice");
  CHECK (nbd_connect_unix (h, plain_sock) == 0, "plain server, ALLOW: connect");
  CHECK (nbd_aio_is_ready (h) == 1 && nbd_get_tls_negotiated (h) == 0, "plain server, ALLOW: plaintext");
  roundtrip (h, "plain server, ALLOW", 0, 9);
  CHECK (str_is (nbd_get_uri (h), uri_of ("nbd+unix://alice@/?socket=%s&tls-psk-file=%s", plain_sock, keys)),
         "plain server, ALLOW: get_uri");
  finish (h, "plain server, ALLOW");
  /* ALLOW in opt mode: STARTTLS refused, options go on in plaintext. */
  h = psk_handle (LIBNBD_TLS_ALLOW, keys, "alice");
  CHECK (nbd_set_opt_mode (h, true) == 0 && nbd_connect_unix (h, plain_sock) == 0,
         "plain server, ALLOW, opt mode: connect");
  CHECK (nbd_aio_is_negotiating (h) == 1 && nbd_get_tls_negotiated (h) == 0,
         "plain server, ALLOW, opt mode: negotiating in plaintext");
  CHECK (nbd_opt_go (h) == 0, "plain server, ALLOW, opt mode: go");
  finish (h, "plain server, ALLOW, opt mode");

  /* Oldstyle has no STARTTLS. */
  h = psk_handle (LIBNBD_TLS_REQUIRE, keys, "alice");
  CHECK_CONNECT_FAILS (nbd_connect_unix (h, old), h, "nbd_connect_unix", ENOTSUP, "oldstyle, REQUIRE");
  nbd_close (h);
  h = psk_handle (LIBNBD_TLS_ALLOW, keys, "alice");
  CHECK (nbd_connect_unix (h, old) == 0, "oldstyle, ALLOW: connect");
  CHECK (strcmp (nbd_get_protocol (h), "oldstyle") == 0 && nbd_get_tls_negotiated (h) == 0,
         "oldstyle, ALLOW: plaintext oldstyle");
  roundtrip (h, "oldstyle, ALLOW", 0, 10);
  finish (h, "oldstyle, ALLOW");
}

/* ---------------------------------------------------------------------- */
/* 4. The tls-fallback filter. */

static void
test_nbdkit_fallback (void)
{
  char *keys = CERTS ("psk/keys.psk");
  const char *readme = "Use TLS for the real data";
  char *tlsreadme, buf[512];
  struct nbd_handle *h;
  if (asprintf (&tlsreadme, "tlsreadme=%s", readme) == -1) fatal ("asprintf");
  keep (tlsreadme);
  char *sock = start_nbdkit ("fallback", 0, "--tls=on", "--tls-psk", keys, "--filter=tls-fallback",
                             "pattern", "1M", tlsreadme, NULL);

  h = psk_handle (LIBNBD_TLS_DISABLE, NULL, NULL);
  CHECK (nbd_set_export_name (h, "anything") == 0, "fallback plain: export name");
  CHECK (nbd_connect_unix (h, sock) == 0, "fallback plain: connect");
  CHECK (nbd_get_tls_negotiated (h) == 0, "fallback plain: not negotiated");
  CHECK (nbd_get_size (h) == 512, "fallback plain: 512 bytes (%" PRId64 ")", nbd_get_size (h));
  CHECK (nbd_is_read_only (h) == 1, "fallback plain: read-only");
  memset (buf, 1, sizeof buf);
  CHECK (nbd_pread (h, buf, 512, 0, 0) == 0, "fallback plain: pread");
  CHECK (strncmp (buf, readme, strlen (readme)) == 0 && buf[511] == 0, "fallback plain: the readme");
  finish (h, "fallback plain");

  h = psk_handle (LIBNBD_TLS_REQUIRE, keys, "alice");
  CHECK (nbd_connect_unix (h, sock) == 0, "fallback tls: connect");
  check_tls_up (h, "fallback tls");
  CHECK (nbd_get_size (h) == 1 << 20, "fallback tls: the plugin's size");
  CHECK (nbd_pread (h, buf, 16, 4096, 0) == 0, "fallback tls: pread");
  {
    uint64_t v0, v1;
    memcpy (&v0, buf, 8); memcpy (&v1, buf + 8, 8);
    CHECK (be64toh (v0) == 4096 && be64toh (v1) == 4104, "fallback tls: the pattern plugin's data");
  }
  finish (h, "fallback tls");

  h = psk_handle (LIBNBD_TLS_ALLOW, keys, "alice");
  CHECK (nbd_connect_unix (h, sock) == 0 && nbd_get_tls_negotiated (h) == 1 &&
         nbd_get_size (h) == 1 << 20, "fallback allow: TLS and the real data");
  finish (h, "fallback allow");
}

/* ---------------------------------------------------------------------- */
/* 5. qemu-nbd. */

struct extent { uint64_t off, len; uint32_t flags; };
struct extents { int n; struct extent e[256]; };
static int
collect_extent (void *p, const char *ctx, uint64_t off, uint32_t *e, size_t n, int *error)
{
  struct extents *x = p;
  (void) ctx; (void) error;
  for (size_t i = 0; i + 1 < n; i += 2) {
    if (x->n < 256) x->e[x->n++] = (struct extent) { off, e[i], e[i + 1] };
    off += e[i];
  }
  return 0;
}
static long
flags_at (struct extents *x, uint64_t off)
{
  for (int i = 0; i < x->n; i++)
    if (x->e[i].off <= off && off < x->e[i].off + x->e[i].len) return x->e[i].flags;
  return -1;
}

static void
block_status_check (struct nbd_handle *h, const char *tag)
{
  struct extents x = { 0 };
  CHECK (nbd_can_meta_context (h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1, "%s: base:allocation", tag);
  CHECK (nbd_block_status (h, 4 << 20, 0, (nbd_extent_callback) {
           .callback = collect_extent, .user_data = &x }, 0) == 0, "%s: block_status", tag);
  CHECK (flags_at (&x, 1 << 20) == 0, "%s: written range is data (%ld)", tag, flags_at (&x, 1 << 20));
  CHECK (flags_at (&x, 3 << 20) == (LIBNBD_STATE_HOLE | LIBNBD_STATE_ZERO),
         "%s: untouched range is a hole (%ld)", tag, flags_at (&x, 3 << 20));
}

static void
test_qemu (void)
{
  char *keys = CERTS ("psk/keys.psk"), *img = P ("qemu-psk.img"), *img2 = P ("qemu-x509.img");
  char *sock = P ("qemu-psk.sock"), *pidfile = P ("qemu-psk.pid"), *pidfile2 = P ("qemu-x509.pid");
  char *pskobj, *x509obj, portstr[16];
  int port = free_port (AF_INET);
  struct nbd_handle *h;

  make_image (img, 32 << 20);
  make_image (img2, 32 << 20);
  if (asprintf (&pskobj, "tls-creds-psk,id=t0,endpoint=server,dir=%s", CERTS ("psk")) == -1 ||
      asprintf (&x509obj, "tls-creds-x509,id=t1,endpoint=server,dir=%s", CERTS ("server")) == -1)
    fatal ("asprintf");
  keep (pskobj);
  keep (x509obj);
  snprintf (portstr, sizeof portstr, "%d", port);
  {
    char *argv[] = { "qemu-nbd", "-k", sock, "--object", pskobj, "--tls-creds", "t0", "-f", "raw",
                     "-t", "--pid-file", pidfile, img, NULL };
    wait_ready ("qemu-nbd (psk)", spawn (argv, -1, -1), pidfile, sock, 0, false);
  }
  {
    char *argv[] = { "qemu-nbd", "-b", "127.0.0.1", "-p", portstr, "--object", x509obj,
                     "--tls-creds", "t1", "-f", "raw", "-t", "--pid-file", pidfile2, img2, NULL };
    wait_ready ("qemu-nbd (x509)", spawn (argv, -1, -1), pidfile2, NULL, port, false);
  }

  /* PSK: read, write, block status, large transfers. */
  h = psk_handle (LIBNBD_TLS_REQUIRE, keys, "alice");
  nbd_add_meta_context (h, LIBNBD_CONTEXT_BASE_ALLOCATION);
  CHECK (nbd_connect_unix (h, sock) == 0, "qemu psk: connect");
  check_tls_up (h, "qemu psk");
  CHECK (nbd_get_size (h) == 32 << 20, "qemu psk: size");
  roundtrip (h, "qemu psk", 1 << 20, 11);
  block_status_check (h, "qemu psk");
  big_transfers (h, "qemu psk", false, 12);
  small_transfers (h, "qemu psk", true, 25);
  finish (h, "qemu psk");

  h = psk_handle (LIBNBD_TLS_REQUIRE, CERTS ("psk-bad/keys.psk"), "alice");
  CHECK_CONNECT_FAILS (nbd_connect_unix (h, sock), h, "nbd_connect_unix", 0, "qemu psk: wrong key");
  nbd_close (h);
  h = psk_handle (LIBNBD_TLS_DISABLE, NULL, NULL);
  CHECK_CONNECT_FAILS (nbd_connect_unix (h, sock), h, "nbd_connect_unix", ENOTSUP, "qemu psk: client DISABLE");
  nbd_close (h);

  /* X.509 over TCP; qemu verifies client certificates by default. */
  h = x509_handle (LIBNBD_TLS_REQUIRE, CERTS ("client"), true);
  nbd_add_meta_context (h, LIBNBD_CONTEXT_BASE_ALLOCATION);
  CHECK (nbd_connect_tcp (h, "localhost", portstr) == 0, "qemu x509: connect");
  check_tls_up (h, "qemu x509");
  roundtrip (h, "qemu x509", 1 << 20, 13);
  block_status_check (h, "qemu x509");
  big_transfers (h, "qemu x509", true, 14);
  finish (h, "qemu x509");

  h = x509_handle (LIBNBD_TLS_REQUIRE, CERTS ("client-ca"), true);
  {
    int r = nbd_connect_tcp (h, "localhost", portstr);
    note ("qemu x509: no client cert");
    CHECK_ERR (r, "nbd_connect_tcp", 0);
    CHECK (nbd_aio_is_dead (h) == 1, "qemu x509 no client cert: dead (%s)", nbd_connection_state (h));
  }
  nbd_close (h);
}

/* ---------------------------------------------------------------------- */
/* 6. nbd-server: X.509 with client certificates; per-export force_tls
 * (its man page's "tlsonly" is not what 3.24 reads). */

static void
test_nbd_server (void)
{
  char *conf = P ("nbd-server.conf"), *img = P ("nbd-server.img"), *pidfile = P ("nbd-server.pid");
  char *argv[] = { "nbd-server", "-C", conf, "-p", pidfile, NULL };
  char portstr[16];
  int port = free_port (AF_INET);
  struct nbd_handle *h;
  FILE *fp;

  make_image (img, 16 << 20);
  snprintf (portstr, sizeof portstr, "%d", port);
  fp = fopen (conf, "w");
  if (fp == NULL) fatal ("%s: %m", conf);
  fprintf (fp, "[generic]\nport = %d\nlistenaddr = 127.0.0.1\nallowlist = true\n"
           "certfile = %s\nkeyfile = %s\ncacertfile = %s\n"
           "[tls]\nexportname = %s\nforce_tls = true\nflush = true\n"
           "[plain]\nexportname = %s\n",
           port, CERTS ("server/server-cert.pem"), CERTS ("server/server-key.pem"),
           CERTS ("ca/ca-cert.pem"), img, img);
  fclose (fp);
  snprintf (daemon_pidfiles[ndaemons++], sizeof daemon_pidfiles[0], "%s", pidfile);
  wait_ready ("nbd-server", spawn (argv, -1, -1), pidfile, NULL, port, true);

  h = x509_handle (LIBNBD_TLS_REQUIRE, CERTS ("client"), true);
  nbd_set_export_name (h, "tls");
  CHECK (nbd_connect_tcp (h, "localhost", portstr) == 0, "nbd-server x509: connect");
  check_tls_up (h, "nbd-server x509");
  CHECK (nbd_get_structured_replies_negotiated (h) == 0, "nbd-server x509: simple replies");
  CHECK (nbd_get_size (h) == 16 << 20, "nbd-server x509: size");
  roundtrip (h, "nbd-server x509", 65536, 15);
  CHECK (nbd_flush (h, 0) == 0, "nbd-server x509: flush");
  big_transfers (h, "nbd-server x509", false, 16);
  small_transfers (h, "nbd-server x509", true, 26);
  finish (h, "nbd-server x509");

  /* Without a client certificate the server hangs up. */
  h = x509_handle (LIBNBD_TLS_REQUIRE, CERTS ("client-ca"), true);
  nbd_set_export_name (h, "tls");
  {
    int r = nbd_connect_tcp (h, "localhost", portstr);
    note ("nbd-server: no client cert");
    /* libnbd: "recv: server disconnected unexpectedly", errno 0. */
    CHECK_ERR (r, "nbd_connect_tcp", 0);
    CHECK (nbd_aio_is_dead (h) == 1, "nbd-server no client cert: dead (%s)", nbd_connection_state (h));
  }
  nbd_close (h);

  /* force_tls: plaintext clients are refused that export only. */
  h = x509_handle (LIBNBD_TLS_DISABLE, NULL, true);
  nbd_set_export_name (h, "tls");
  CHECK_CONNECT_FAILS (nbd_connect_tcp (h, "localhost", portstr), h, "nbd_connect_tcp", ENOTSUP, "nbd-server: plaintext to force_tls");
  nbd_close (h);
  h = x509_handle (LIBNBD_TLS_DISABLE, NULL, true);
  nbd_set_export_name (h, "plain");
  CHECK (nbd_connect_tcp (h, "localhost", portstr) == 0 && nbd_get_tls_negotiated (h) == 0,
         "nbd-server: plaintext to a plain export");
  roundtrip (h, "nbd-server plain", 0, 17);
  finish (h, "nbd-server plain");
  h = x509_handle (LIBNBD_TLS_ALLOW, CERTS ("client"), true);
  nbd_set_export_name (h, "plain");
  CHECK (nbd_connect_tcp (h, "localhost", portstr) == 0, "nbd-server: ALLOW to a plain export");
  check_tls_up (h, "nbd-server ALLOW");
  finish (h, "nbd-server ALLOW");
}

/* ---------------------------------------------------------------------- */
/* 7. URIs. */

static void
test_uris (void)
{
  char *keys = CERTS ("psk/keys.psk"), *uri, *want;
  struct nbd_handle *h;

  if (asprintf (&uri, "nbds+unix://alice@/?socket=%s&tls-psk-file=%s", psk_sock, keys) == -1) fatal ("asprintf");

  /* tls-psk-file reads a local file: refused unless allowed. */
  h = new_handle ();
  note ("");
  CHECK_ERR (nbd_connect_uri (h, uri), "nbd_connect_uri", EPERM);
  note ("uri psk without allow_local_file");
  CHECK (state_starts (h, "START"), "uri psk refused: handle still new (%s)", nbd_connection_state (h));
  CHECK (nbd_set_uri_allow_local_file (h, true) == 0, "set_uri_allow_local_file");
  CHECK (nbd_connect_uri (h, uri) == 0, "uri psk: connect");
  check_tls_up (h, "uri psk");
  CHECK (nbd_get_tls (h) == LIBNBD_TLS_REQUIRE, "uri psk: tls REQUIRE");
  CHECK (str_is (nbd_get_tls_username (h), "alice"), "uri psk: username from the URI");
  roundtrip (h, "uri psk", 0, 18);
  CHECK (str_is (nbd_get_uri (h), uri), "uri psk: get_uri gives the URI back");
  finish (h, "uri psk");

  /* The same URI with the wrong key and an unknown user. */
  free (uri);
  if (asprintf (&uri, "nbds+unix://alice@/?socket=%s&tls-psk-file=%s", psk_sock, CERTS ("psk-bad/keys.psk")) == -1)
    fatal ("asprintf");
  h = new_handle ();
  nbd_set_uri_allow_local_file (h, true);
  CHECK_CONNECT_FAILS (nbd_connect_uri (h, uri), h, "nbd_connect_uri", 0, "uri psk: wrong key");
  nbd_close (h);
  free (uri);
  if (asprintf (&uri, "nbds+unix://bob@/?socket=%s&tls-psk-file=%s", psk_sock, keys) == -1) fatal ("asprintf");
  h = new_handle ();
  nbd_set_uri_allow_local_file (h, true);
  CHECK_CONNECT_FAILS (nbd_connect_uri (h, uri), h, "nbd_connect_uri", EINVAL, "uri psk: unknown user");
  nbd_close (h);

  /* uri_allow_tls DISABLE refuses nbds; REQUIRE refuses nbd. */
  h = new_handle ();
  nbd_set_uri_allow_local_file (h, true);
  CHECK (nbd_set_uri_allow_tls (h, LIBNBD_TLS_DISABLE) == 0, "set_uri_allow_tls DISABLE");
  CHECK_ERR (nbd_connect_uri (h, uri), "nbd_connect_uri", EPERM);
  note ("uri_allow_tls DISABLE + nbds");
  CHECK (state_starts (h, "START"), "uri_allow_tls DISABLE: handle still new");
  nbd_close (h);
  free (uri);
  if (asprintf (&uri, "nbd+unix:///?socket=%s", plain_sock) == -1) fatal ("asprintf");
  h = new_handle ();
  CHECK (nbd_set_uri_allow_tls (h, LIBNBD_TLS_REQUIRE) == 0, "set_uri_allow_tls REQUIRE");
  CHECK_ERR (nbd_connect_uri (h, uri), "nbd_connect_uri", EPERM);
  note ("uri_allow_tls REQUIRE + nbd");
  nbd_close (h);

  /* A plain nbd URI leaves set_tls alone: REQUIRE stays, and the
   * plaintext server refuses STARTTLS. */
  h = new_handle ();
  nbd_set_tls (h, LIBNBD_TLS_REQUIRE);
  CHECK_CONNECT_FAILS (nbd_connect_uri (h, uri), h, "nbd_connect_uri", ENOTSUP, "nbd uri after set_tls REQUIRE");
  CHECK (nbd_get_tls (h) == LIBNBD_TLS_REQUIRE, "nbd uri after set_tls REQUIRE: tls %d", nbd_get_tls (h));
  nbd_close (h);
  h = new_handle ();
  nbd_set_tls (h, LIBNBD_TLS_ALLOW);
  CHECK (nbd_connect_uri (h, uri) == 0 && nbd_get_tls (h) == LIBNBD_TLS_ALLOW &&
         nbd_get_tls_negotiated (h) == 0, "nbd uri after set_tls ALLOW: plaintext, tls %d", nbd_get_tls (h));
  finish (h, "nbd uri after set_tls ALLOW");

  /* nbds over TCP with a certificates directory. */
  free (uri);
  if (asprintf (&uri, "nbds://localhost:%d/?tls-certificates=%s", x509_port, CERTS ("client-ca")) == -1)
    fatal ("asprintf");
  h = new_handle ();
  CHECK_ERR (nbd_connect_uri (h, uri), "nbd_connect_uri", EPERM);
  note ("uri tls-certificates without allow_local_file");
  nbd_close (h);
  h = new_handle ();
  nbd_set_uri_allow_local_file (h, true);
  CHECK (nbd_connect_uri (h, uri) == 0, "uri x509: connect");
  check_tls_up (h, "uri x509");
  roundtrip (h, "uri x509", 0, 19);
  if (asprintf (&want, "nbds://localhost:%d/?tls-certificates=%s", x509_port, CERTS ("client-ca")) == -1)
    fatal ("asprintf");
  CHECK (str_is (nbd_get_uri (h), want), "uri x509: get_uri");
  free (want);
  finish (h, "uri x509");

  /* The wrong CA: refused.  libnbd 1.14 has no tls-verify-peer query
   * parameter (1.16 added it): it is ignored, verification stays on and
   * get_uri does not mention it. */
  free (uri);
  if (asprintf (&uri, "nbds://localhost:%d/?tls-certificates=%s", x509_port, CERTS ("client-ca2")) == -1)
    fatal ("asprintf");
  h = new_handle ();
  nbd_set_uri_allow_local_file (h, true);
  CHECK_CONNECT_FAILS (nbd_connect_uri (h, uri), h, "nbd_connect_uri", 0, "uri x509: wrong CA");
  nbd_close (h);
  free (uri);
  if (asprintf (&uri, "nbds://localhost:%d/?tls-certificates=%s&tls-verify-peer=false", x509_port,
                CERTS ("client-ca2")) == -1)
    fatal ("asprintf");
  h = new_handle ();
  nbd_set_uri_allow_local_file (h, true);
  if (strict_tls) {
    /* Ours honours tls-verify-peer=, as 1.22 does; libnbd 1.14 ignores it. */
    CHECK (nbd_connect_uri (h, uri) == 0, "uri x509 tls-verify-peer=false: connects (strict)");
    CHECK (nbd_get_tls_verify_peer (h) == 0, "uri x509 tls-verify-peer=false: verify_peer off");
  } else {
    CHECK_CONNECT_FAILS (nbd_connect_uri (h, uri), h, "nbd_connect_uri", 0, "uri x509 tls-verify-peer=false");
    CHECK (nbd_get_tls_verify_peer (h) == 1, "uri x509 tls-verify-peer=false: ignored, verify_peer still on");
  }
  /* libnbd 1.22 writes verify-peer off back into the URI; 1.14 never has it off. */
  if (asprintf (&want, "nbds://localhost:%d/?tls-certificates=%s%s", x509_port, CERTS ("client-ca2"),
                strict_tls ? "&tls-verify-peer=false" : "") == -1)
    fatal ("asprintf");
  CHECK (str_is (nbd_get_uri (h), want), "uri x509 tls-verify-peer=false: get_uri");
  free (want);
  nbd_close (h);

  /* No certificates directory: the system's CAs, and no verification. */
  free (uri);
  if (asprintf (&uri, "nbds://127.0.0.1:%d/", x509_port) == -1) fatal ("asprintf");
  h = new_handle ();
  if (strict_tls) {
    CHECK_CONNECT_FAILS (nbd_connect_uri (h, uri), h, "nbd_connect_uri", 0, "uri x509 system CAs (strict)");
    nbd_close (h);
  } else {
    CHECK (nbd_connect_uri (h, uri) == 0, "uri x509 system CAs: connect");
    check_tls_up (h, "uri x509 system CAs");
    CHECK (str_is (nbd_get_uri (h), uri), "uri x509 system CAs: get_uri");
    finish (h, "uri x509 system CAs");
  }
  free (uri);
}

/* ---------------------------------------------------------------------- */
/* 8. Large transfers through TLS against nbdkit. */

static void
test_big (void)
{
  char *keys = CERTS ("psk/keys.psk");
  struct nbd_handle *h = psk_handle (LIBNBD_TLS_REQUIRE, keys, "alice");
  CHECK (nbd_connect_unix (h, psk_sock) == 0, "big psk: connect");
  check_tls_up (h, "big psk");
  big_transfers (h, "nbdkit psk", false, 20);
  big_transfers (h, "nbdkit psk", true, 21);
  small_transfers (h, "nbdkit psk", true, 27);
  small_transfers (h, "nbdkit psk", false, 28);
  finish (h, "big psk");

  char portstr[16];
  snprintf (portstr, sizeof portstr, "%d", x509_port);
  h = x509_handle (LIBNBD_TLS_REQUIRE, CERTS ("client-ca"), true);
  CHECK (nbd_connect_tcp (h, "localhost", portstr) == 0, "big x509: connect");
  check_tls_up (h, "big x509");
  big_transfers (h, "nbdkit x509 tcp", true, 22);
  big_transfers (h, "nbdkit x509 tcp", false, 23);
  small_transfers (h, "nbdkit x509 tcp", true, 29);
  finish (h, "big x509");
}

/* ---------------------------------------------------------------------- */
/* 9. Asynchronous connects through the TLS handshake, and a server over
 * a socketpair (connect_command). */

/* Drives an aio_connect with poll(2) on the handle's fd and direction. */
static bool
own_connect_loop (struct nbd_handle *h, const char *tag)
{
  for (int i = 0; i < 1000 && nbd_aio_is_connecting (h) == 1; i++) {
    int fd = nbd_aio_get_fd (h);
    unsigned dir = nbd_aio_get_direction (h);
    struct pollfd pfd = { .fd = fd };
    if (fd < 0 || (dir & LIBNBD_AIO_DIRECTION_BOTH) == 0) {
      CHECK (false, "%s: connecting with fd %d, direction %u (%s)", tag, fd, dir, nbd_connection_state (h));
      return false;
    }
    if (dir & LIBNBD_AIO_DIRECTION_READ) pfd.events |= POLLIN;
    if (dir & LIBNBD_AIO_DIRECTION_WRITE) pfd.events |= POLLOUT;
    if (poll (&pfd, 1, 100) == -1) fatal ("poll: %m");
    if ((pfd.revents & (POLLIN | POLLHUP | POLLERR)) && (dir & LIBNBD_AIO_DIRECTION_READ))
      nbd_aio_notify_read (h);
    else if ((pfd.revents & (POLLOUT | POLLERR)) && (dir & LIBNBD_AIO_DIRECTION_WRITE))
      nbd_aio_notify_write (h);
  }
  return nbd_aio_is_connecting (h) == 0;
}

static void
test_async (void)
{
  char *keys = CERTS ("psk/keys.psk"), portstr[16];
  struct nbd_handle *h;
  snprintf (portstr, sizeof portstr, "%d", x509_port);

  h = psk_handle (LIBNBD_TLS_REQUIRE, keys, "alice");
  {
    struct sockaddr_un sun = { .sun_family = AF_UNIX };
    snprintf (sun.sun_path, sizeof sun.sun_path, "%s", psk_sock);
    CHECK (nbd_aio_connect (h, (struct sockaddr *) &sun, sizeof sun) == 0, "aio psk: aio_connect");
  }
  CHECK (own_connect_loop (h, "aio psk"), "aio psk: handshake finished");
  check_tls_up (h, "aio psk");
  roundtrip (h, "aio psk", 0, 30);
  finish (h, "aio psk");

  h = x509_handle (LIBNBD_TLS_REQUIRE, CERTS ("client-ca"), true);
  CHECK (nbd_aio_connect_tcp (h, "localhost", portstr) == 0, "aio x509: aio_connect_tcp");
  CHECK (own_connect_loop (h, "aio x509"), "aio x509: handshake finished");
  check_tls_up (h, "aio x509");
  roundtrip (h, "aio x509", 0, 31);
  finish (h, "aio x509");

  /* A failing handshake under aio: the loop ends with the handle dead. */
  h = psk_handle (LIBNBD_TLS_REQUIRE, CERTS ("psk-bad/keys.psk"), "alice");
  {
    struct sockaddr_un sun = { .sun_family = AF_UNIX };
    snprintf (sun.sun_path, sizeof sun.sun_path, "%s", psk_sock);
    CHECK (nbd_aio_connect (h, (struct sockaddr *) &sun, sizeof sun) == 0, "aio psk wrong key: aio_connect");
  }
  own_connect_loop (h, "aio psk wrong key");
  CHECK (nbd_aio_is_dead (h) == 1, "aio psk wrong key: dead (%s)", nbd_connection_state (h));
  nbd_close (h);

  /* nbdkit on a socketpair, with PSK. */
  h = psk_handle (LIBNBD_TLS_REQUIRE, keys, "alice");
  {
    char *pskopt = uri_of ("--tls-psk=%s", keys);
    char *argv[] = { "nbdkit", "-s", "--exit-with-parent", "--tls=require", pskopt, "memory", "1M", NULL };
    CHECK (nbd_connect_command (h, argv) == 0, "connect_command psk: connect");
  }
  check_tls_up (h, "connect_command psk");
  roundtrip (h, "connect_command psk", 0, 32);
  finish (h, "connect_command psk");
}

/* ---------------------------------------------------------------------- */
/* 10. The default certificates directories of a non-root user:
 * $HOME/.pki/libnbd, then $HOME/.config/pki/libnbd.  When one has
 * ca-cert.pem, libnbd trusts it (and then verifies the peer); a client
 * certificate there is used too.  As root we test this in a child that
 * becomes nobody (root's default, /etc/pki/libnbd, is the system's and
 * is left alone). */

static void
copy_file (const char *from, const char *to)
{
  char buf[65536];
  int in = open (from, O_RDONLY), out = open (to, O_CREAT | O_WRONLY | O_TRUNC, 0644);
  ssize_t n;
  if (in == -1 || out == -1) fatal ("copy %s %s: %m", from, to);
  while ((n = read (in, buf, sizeof buf)) > 0)
    if (write (out, buf, n) != n) fatal ("write %s: %m", to);
  close (in); close (out);
}

/* Connects to localhost:port with X.509, no certificates directory set,
 * HOME=home, as a non-root user.  Returns 0 if TLS came up, 1 if the
 * connect failed, 2 if the child could not run. */
static int
connect_with_home (const char *home, int port, const char *tag)
{
  char portstr[16];
  int status;
  snprintf (portstr, sizeof portstr, "%d", port);
  fflush (NULL);
  pid_t pid = fork ();
  if (pid == -1) fatal ("fork: %m");
  if (pid == 0) {
    alarm (20);
    if (geteuid () == 0 && (setgroups (0, NULL) == -1 || setgid (65534) == -1 || setuid (65534) == -1)) {
      fprintf (stderr, "tls-test: %s: cannot become nobody: %m\n", tag);
      _exit (2);
    }
    setenv ("HOME", home, 1);
    struct nbd_handle *h = nbd_create ();
    if (!h) _exit (2);
    nbd_set_tls (h, LIBNBD_TLS_REQUIRE);
    int r = nbd_connect_tcp (h, "localhost", portstr);
    if (r == -1) note (tag);
    r = r == 0 && nbd_get_tls_negotiated (h) == 1 ? 0 : 1;
    nbd_close (h);
    _exit (r);
  }
  if (waitpid (pid, &status, 0) != pid || !WIFEXITED (status)) return 2;
  return WEXITSTATUS (status);
}

static void
test_default_dirs (void)
{
  char *home1 = P ("home1"), *home2 = P ("home2"), *home3 = P ("home3");
  int other = free_port (AF_INET), verify = free_port (AF_INET);
  start_nbdkit ("x509-other-2", other, "--tls=require", "--tls-certificates", CERTS ("server-other"),
                "memory", "1M", NULL);
  start_nbdkit ("x509-verify-2", verify, "--tls=require", "--tls-verify-peer",
                "--tls-certificates", CERTS ("server"), "memory", "1M", NULL);
  /* Readable by nobody: our directory (not listable) and the homes. */
  if (chmod (dir, 0711) == -1) fatal ("chmod %s: %m", dir);
  mkdir (home1, 0755); mkdir (P ("home1/.pki"), 0755); mkdir (P ("home1/.pki/libnbd"), 0755);
  copy_file (CERTS ("ca/ca-cert.pem"), P ("home1/.pki/libnbd/ca-cert.pem"));
  copy_file (CERTS ("client/client-cert.pem"), P ("home1/.pki/libnbd/client-cert.pem"));
  copy_file (CERTS ("client/client-key.pem"), P ("home1/.pki/libnbd/client-key.pem"));
  mkdir (home2, 0755); mkdir (P ("home2/.config"), 0755); mkdir (P ("home2/.config/pki"), 0755);
  mkdir (P ("home2/.config/pki/libnbd"), 0755);
  copy_file (CERTS ("ca/ca-cert.pem"), P ("home2/.config/pki/libnbd/ca-cert.pem"));
  mkdir (home3, 0755);          /* nothing: the system's CAs, no verification */

  CHECK (connect_with_home (home1, x509_port, "home .pki, localhost") == 0,
         "default dir $HOME/.pki/libnbd: trusted CA, right host: connects");
  CHECK (connect_with_home (home1, other, "home .pki, otherhost") == 1,
         "default dir $HOME/.pki/libnbd: host name mismatch is refused");
  CHECK (connect_with_home (home1, verify, "home .pki, client cert") == 0,
         "default dir $HOME/.pki/libnbd: its client certificate is sent");
  CHECK (connect_with_home (home2, x509_port, "home .config/pki, localhost") == 0,
         "default dir $HOME/.config/pki/libnbd: trusted CA: connects");
  CHECK (connect_with_home (home2, other, "home .config/pki, otherhost") == 1,
         "default dir $HOME/.config/pki/libnbd: host name mismatch is refused");
  CHECK (connect_with_home (home3, other, "empty home, otherhost") == (strict_tls ? 1 : 0),
         "no default dir: system CAs, %s", strict_tls ? "which do not trust the server (strict)" : "no verification: connects");
  chmod (dir, 0700);
}

int
main (void)
{
  const char *needs[] = { "nbdkit", "qemu-nbd", "nbd-server", "openssl", NULL };

  verbose = getenv ("TLS_TEST_VERBOSE") != NULL;
  {
    const char *lib = getenv ("NBD_TEST_LIBRARY");
    if (lib == NULL || (strcmp (lib, "ours") != 0 && strcmp (lib, "debian") != 0 &&
                        strcmp (lib, "reference") != 0)) {
      fprintf (stderr, "tls-test: set NBD_TEST_LIBRARY=ours, debian or reference (tests/c-compare.sh does)\n");
      exit (2);
    }
    /* libnbd 1.22 verifies as ours does; 1.14 did not (see strict_tls). */
    strict_tls = strcmp (lib, "debian") != 0;
  }
  servers_init ("tls-test", needs, 50);

  make_certs ();
  test_settings ();
  test_nbdkit_psk ();
  test_nbdkit_x509 ();
  test_nbdkit_allow ();
  test_nbdkit_fallback ();
  test_qemu ();
  test_nbd_server ();
  test_uris ();
  test_big ();
  test_async ();
  test_default_dirs ();

  cleanup ();
  for (size_t i = 0; i < nkept; i++) free (kept[i]);
  free (kept);
  printf ("tls-test: %d checks, %d failures\n", checks, failures);
  return failures != 0;
}
