/* What the library says when something goes wrong, and nbd_get_uri for
 * every way of connecting, against real servers (nbdkit on a Unix socket,
 * on a TCP port and with TLS):
 *
 *  - nbd_get_uri after nbd_aio_connect with AF_INET, AF_INET6 and AF_UNIX
 *    addresses, after socket activation, and its errors after
 *    nbd_connect_socket and nbd_connect_command;
 *  - a server command that cannot be run (missing, not executable), for
 *    nbd_connect_command and socket activation;
 *  - a table of bad URIs: the errno, and on our library which part of
 *    the URI is wrong;
 *  - TLS with a missing certificates directory or CA file: the errno,
 *    and on our library what is missing, where it was looked for and the
 *    way out (tls-verify-peer=false);
 *  - running out of file descriptors while connecting.
 *
 * The errno is libnbd 1.22.2's on every library (Debian's 1.14 where it
 * differs, under NBD_TEST_LIBRARY=debian); every message starts with the
 * function's name; the wording is checked only on ours
 * (NBD_TEST_LIBRARY=ours), where no message may carry Rust's
 * "(os error N)".  MESSAGES_TEST_VERBOSE=1 prints every message.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <libnbd.h>

#include "servers.h"

static bool ours, debian, verbose;

/* The last error's message, "" if none. */
static const char *
msg (void)
{
  const char *m = nbd_get_error ();
  return m ? m : "";
}

/* The failure of fn with errno err (see CHECK_ERR), no "os error" in
 * the message, and on our library every one of the NULL-terminated
 * words in it. */
static void
check_failure (long r, const char *fn, int err, const char *what, ...)
{
  const char *m = msg ();
  const char *word;
  va_list ap;
  if (verbose)
    fprintf (stderr, "messages-test: %s: r=%ld errno=%d: %s\n", what, r, nbd_get_errno (), m);
  CHECK_ERR (r, fn, err);
  CHECK (strstr (m, "os error") == NULL, "%s: the message carries Rust's os error text", what);
  va_start (ap, what);
  while ((word = va_arg (ap, const char *)) != NULL)
    if (ours)
      CHECK (strstr (m, word) != NULL, "%s: the message does not say \"%s\"", what, word);
  va_end (ap);
}

/* nbd_get_uri is want (then freed). */
static void
check_uri (struct nbd_handle *h, const char *want, const char *what)
{
  char *got = nbd_get_uri (h);
  if (verbose)
    fprintf (stderr, "messages-test: %s: get_uri: %s\n", what, got ? got : msg ());
  CHECK (got && strcmp (got, want) == 0, "%s: get_uri is \"%s\", want \"%s\"", what,
         got ? got : "(null)", want);
  free (got);
}

/* nbd_get_uri as a status: -1 if it failed. */
static long
get_uri_status (struct nbd_handle *h)
{
  char *u = nbd_get_uri (h);
  long r = u ? 0 : -1;
  free (u);
  return r;
}

/* Runs the handle until its connect finished; true if it is ready. */
static bool
wait_connected (struct nbd_handle *h)
{
  for (int i = 0; i < 500 && nbd_aio_is_connecting (h) == 1; i++)
    if (nbd_poll (h, 100) == -1) return false;
  return nbd_aio_is_ready (h) == 1;
}

/* ---------------------------------------------------------------------- */
/* nbd_get_uri after every kind of connect. */

static void
aio_connect_uri (const struct sockaddr *sa, socklen_t len, const char *want, const char *what)
{
  struct nbd_handle *h = nbd_create ();
  CHECK (nbd_aio_connect (h, sa, len) == 0, "%s: aio_connect", what);
  check_uri (h, want, what);
  CHECK (wait_connected (h), "%s: connected", what);
  check_uri (h, want, what);
  nbd_close (h);
}

static void
test_get_uri (const char *sock, int port)
{
  char want[600];
  struct sockaddr_in sin = { .sin_family = AF_INET, .sin_port = htons (port),
                             .sin_addr.s_addr = htonl (INADDR_LOOPBACK) };
  struct sockaddr_in6 sin6 = { .sin6_family = AF_INET6, .sin6_port = htons (port),
                               .sin6_addr = IN6ADDR_LOOPBACK_INIT };
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  struct nbd_handle *h;

  snprintf (sun.sun_path, sizeof sun.sun_path, "%s", sock);
  snprintf (want, sizeof want, "nbd://127.0.0.1:%d/", port);
  aio_connect_uri ((struct sockaddr *) &sin, sizeof sin, want, "aio_connect AF_INET");
  snprintf (want, sizeof want, "nbd://[::1]:%d/", port);
  aio_connect_uri ((struct sockaddr *) &sin6, sizeof sin6, want, "aio_connect AF_INET6");
  snprintf (want, sizeof want, "nbd+unix:///?socket=%s", sock);
  aio_connect_uri ((struct sockaddr *) &sun, sizeof sun, want, "aio_connect AF_UNIX");

  /* The named connects, for comparison. */
  h = nbd_create ();
  CHECK (nbd_connect_unix (h, sock) == 0, "connect_unix");
  check_uri (h, want, "connect_unix");
  nbd_close (h);
  h = nbd_create ();
  snprintf (want, sizeof want, "%d", port);
  CHECK (nbd_connect_tcp (h, "127.0.0.1", want) == 0, "connect_tcp");
  snprintf (want, sizeof want, "nbd://127.0.0.1:%d/", port);
  check_uri (h, want, "connect_tcp");
  nbd_close (h);

  /* Not verifying the server is part of the URI since libnbd 1.22. */
  h = nbd_create ();
  CHECK (nbd_set_tls_verify_peer (h, false) == 0, "set_tls_verify_peer");
  CHECK (nbd_connect_unix (h, sock) == 0, "connect_unix, no verification");
  snprintf (want, sizeof want, "nbd+unix:///?socket=%s%s", sock,
            debian ? "" : "&tls-verify-peer=false");
  check_uri (h, want, "connect_unix, no verification");
  nbd_close (h);

  /* Socket activation: the socket the library made. */
  h = nbd_create ();
  char *sa[] = { "nbdkit", "--exit-with-parent", "memory", "1M", NULL };
  CHECK (nbd_connect_systemd_socket_activation (h, sa) == 0, "socket activation");
  char *got = nbd_get_uri (h);
  CHECK (got && strncmp (got, "nbd+unix:///?socket=/", 21) == 0 && strstr (got, "/sock"),
         "socket activation: get_uri is \"%s\"", got ? got : "(null)");
  free (got);
  nbd_close (h);

  /* No address to write: EINVAL. */
  h = nbd_create ();
  int fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd == -1 || connect (fd, (struct sockaddr *) &sun, sizeof sun) == -1)
    fatal ("connect %s: %m", sock);
  CHECK (nbd_connect_socket (h, fd) == 0, "connect_socket");
  check_failure (get_uri_status (h), "nbd_get_uri", EINVAL,
                 "get_uri after connect_socket", "connection", NULL);
  nbd_close (h);
  h = nbd_create ();
  char *cmd[] = { "nbdkit", "-s", "--exit-with-parent", "memory", "1M", NULL };
  CHECK (nbd_connect_command (h, cmd) == 0, "connect_command");
  check_failure (get_uri_status (h), "nbd_get_uri", EINVAL,
                 "get_uri after connect_command", "connection", NULL);
  nbd_close (h);
}

/* ---------------------------------------------------------------------- */
/* A server that cannot be run. */

static void
test_exec_errors (void)
{
  char *missing = path_in_dir ("no-such-server");
  char *noexec = path_in_dir ("not-executable");
  FILE *fp = fopen (noexec, "w");
  if (fp == NULL || fputs ("#!/bin/sh\nexit 0\n", fp) < 0 || fclose (fp) != 0)
    fatal ("%s: %m", noexec);
  struct { char *prog; const char *why; } cases[] = {
    { missing, "No such file or directory" },
    { "no-such-server-anywhere-on-path", "No such file or directory" },
    { noexec, "Permission denied" },
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    char *argv[] = { cases[i].prog, NULL };
    struct nbd_handle *h = nbd_create ();
    /* libnbd's child reports the exec error on stderr and exits; the
     * library sees the socket close (no errno) or reset. */
    check_failure (nbd_connect_command (h, argv), "nbd_connect_command", 0,
                   "connect_command of a server that cannot run", cases[i].prog, cases[i].why, NULL);
    CHECK (nbd_aio_is_dead (h) == 1, "connect_command: the handle is dead");
    nbd_close (h);
    h = nbd_create ();
    /* 1.14 connects after forking, so the child may already be gone
     * (refused) or not yet (reset); 1.22 and ours always see the reset. */
    int r = nbd_connect_systemd_socket_activation (h, argv);
    int want = debian && nbd_get_errno () == ECONNREFUSED ? ECONNREFUSED : ECONNRESET;
    check_failure (r, "nbd_connect_systemd_socket_activation", want,
                   "socket activation of a server that cannot run", cases[i].prog, cases[i].why, NULL);
    nbd_close (h);
  }
  free (missing);
  free (noexec);
}

/* ---------------------------------------------------------------------- */
/* Bad URIs: what libnbd 1.22.2 refuses, with its errno, and on ours the
 * words that say which part is wrong. */

static void
test_bad_uris (const char *sock)
{
  char *nosock;
  if (asprintf (&nosock, "nbd+unix:///?socket=%s/none&tls-verify-peer=maybe", dir) == -1)
    fatal ("asprintf");
  struct { const char *uri; int err; const char *w1, *w2; } cases[] = {
    { "http://localhost/", EINVAL, "scheme", "http" },
    { "nbd:localhost", EINVAL, "nbd://", NULL },
    { "nbd:/localhost", EINVAL, "nbd://", NULL },
    { "/tmp/socket", EINVAL, "scheme", "nbd+unix://?socket=" },
    { "localhost", EINVAL, "scheme", "nbd://localhost" },
    { "nbd//localhost", EINVAL, "scheme", NULL },
    { "nbd://localhost/a b", EINVAL, "export name", "%20" },
    { "nbd://localhost/%zz", EINVAL, "export name", "%zz" },
    { "nbd://%zz:10/", EINVAL, "host", "%zz" },
    { "nbd://u%zz@localhost/", EINVAL, "user", "%zz" },
    { "nbd://localhost:port/", EINVAL, "port", "\"port\"" },
    { "nbd://localhost:-1/", EINVAL, "port", "\"-1\"" },
    { "nbd://localhost:/", EINVAL, "port", "empty" },
    { "nbd://[::1/", EINVAL, "host", "]" },
    { "nbd://[::1]x/", EINVAL, "host", "x" },
    { "nbd://localhost/?socket=/x", EINVAL, "socket", "nbd+unix" },
    { "nbds://localhost/?socket=/x", EINVAL, "socket", "nbds+unix" },
    { "nbd+unix:///", EINVAL, "socket", NULL },
    { "nbd+vsock://notanumber/", EINVAL, "CID", "notanumber" },
    { "nbd+vsock://2:notaport/", EINVAL, "port", "notaport" },
    { "nbd+unix:///?socket=%zz", EINVAL, "socket", "%zz" },
    { "nbd://localhost/?a=%zz", EINVAL, "query parameter", "%zz" },
    { "nbd://localhost/?%zz=1", EINVAL, "query parameter", "%zz" },
    /* Debian's 1.14 ignores tls-verify-peer's value and connects. */
    { nosock, debian ? ENOENT : EINVAL, "tls-verify-peer", "maybe" },
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    struct nbd_handle *h = nbd_create ();
    CHECK (nbd_set_uri_allow_local_file (h, true) == 0, "set_uri_allow_local_file");
    check_failure (nbd_aio_connect_uri (h, cases[i].uri), "nbd_aio_connect_uri", cases[i].err,
                   cases[i].uri, cases[i].w1, cases[i].w2, NULL);
    nbd_close (h);
  }
  free (nosock);

  /* What 1.22 accepts: the scheme in any case, booleans as nbdkit reads them. */
  struct nbd_handle *h = nbd_create ();
  char *uri;
  if (asprintf (&uri, "NBD+Unix:///?socket=%s&tls-verify-peer=T", sock) == -1) fatal ("asprintf");
  if (debian)
    check_failure (nbd_connect_uri (h, uri), "nbd_connect_uri", EINVAL, uri, NULL);
  else
    CHECK (nbd_connect_uri (h, uri) == 0, "%s connects", uri);
  free (uri);
  nbd_close (h);
}

/* ---------------------------------------------------------------------- */
/* TLS without the CA that would verify the server. */

static void
test_tls (const char *certs)
{
  char *tls_sock = path_in_dir ("tls.sock"), *server, *nodir, *uri;
  if (asprintf (&server, "--tls-certificates=%s/server", certs) == -1 ||
      asprintf (&nodir, "%s/no-such-dir", dir) == -1)
    fatal ("asprintf");
  char *args[] = { "--tls=require", server, "memory", "1M", NULL };
  start_nbdkit_listening (tls_sock, 0, args);

  /* A directory that does not exist, and one without ca-cert.pem (the
   * server's own directory has one; an empty one has none). */
  char *empty = path_in_dir ("empty-certs");
  if (mkdir (empty, 0755) == -1) fatal ("mkdir %s: %m", empty);
  const char *dirs[] = { nodir, empty };
  for (int i = 0; i < 2; i++) {
    struct nbd_handle *h = nbd_create ();
    CHECK (nbd_set_tls (h, LIBNBD_TLS_REQUIRE) == 0, "set_tls");
    CHECK (nbd_set_tls_certificates (h, dirs[i]) == 0, "set_tls_certificates");
    int r = nbd_connect_unix (h, tls_sock);
    if (debian) {
      /* 1.14 verifies nothing without a host name to check. */
      CHECK (r == 0, "1.14 connects without verifying (%s)", dirs[i]);
    } else {
      check_failure (r, "nbd_connect_unix", 0, "TLS without a CA", dirs[i], "ca-cert.pem",
                     "tls-verify-peer=false", "nbd_set_tls_verify_peer", NULL);
    }
    nbd_close (h);

    /* The way out the message gives. */
    h = nbd_create ();
    CHECK (nbd_set_tls (h, LIBNBD_TLS_REQUIRE) == 0, "set_tls");
    CHECK (nbd_set_tls_certificates (h, dirs[i]) == 0, "set_tls_certificates");
    CHECK (nbd_set_tls_verify_peer (h, false) == 0, "set_tls_verify_peer");
    CHECK (nbd_connect_unix (h, tls_sock) == 0, "no verification connects (%s)", dirs[i]);
    nbd_close (h);
  }

  /* The same through a URI. */
  if (asprintf (&uri, "nbds+unix:///?socket=%s&tls-certificates=%s", tls_sock, nodir) == -1)
    fatal ("asprintf");
  struct nbd_handle *h = nbd_create ();
  CHECK (nbd_set_uri_allow_local_file (h, true) == 0, "set_uri_allow_local_file");
  int r = nbd_connect_uri (h, uri);
  if (debian)
    CHECK (r == 0, "1.14 connects without verifying (%s)", uri);
  else
    check_failure (r, "nbd_connect_uri", 0, "TLS URI without a CA", nodir, "ca-cert.pem",
                   "tls-verify-peer=false", NULL);
  nbd_close (h);
  free (uri);
  if (asprintf (&uri, "nbds+unix:///?socket=%s&tls-certificates=%s&tls-verify-peer=false",
                tls_sock, nodir) == -1)
    fatal ("asprintf");
  h = nbd_create ();
  CHECK (nbd_set_uri_allow_local_file (h, true) == 0, "set_uri_allow_local_file");
  CHECK (nbd_connect_uri (h, uri) == 0, "%s connects", uri);
  nbd_close (h);
  free (uri);
  free (empty); free (server); free (nodir); free (tls_sock);
}

/* ---------------------------------------------------------------------- */
/* Out of file descriptors: the system's error, as strerror words it. */

static void
test_no_fds (void)
{
  struct rlimit old, low;
  int top = 0, fill[1024], nfill = 0, fd;
  char *cmd[] = { "nbdkit", "-s", "--exit-with-parent", "memory", "1M", NULL };
  struct nbd_handle *h1 = nbd_create (), *h2 = nbd_create ();
  for (fd = 0; fd < 1024; fd++)
    if (fcntl (fd, F_GETFD) != -1) top = fd;
  if (getrlimit (RLIMIT_NOFILE, &old) == -1) fatal ("getrlimit: %m");
  low = old;
  low.rlim_cur = top + 1;
  if (setrlimit (RLIMIT_NOFILE, &low) == -1) fatal ("setrlimit: %m");
  /* Every descriptor below the limit in use. */
  while (nfill < 1024 && (fd = open ("/dev/null", O_RDONLY | O_CLOEXEC)) != -1)
    fill[nfill++] = fd;
  int r1 = nbd_connect_command (h1, cmd);
  int e1 = nbd_get_errno ();
  char *m1 = strdup (msg ());
  int r2 = nbd_connect_systemd_socket_activation (h2, cmd);
  while (nfill > 0) close (fill[--nfill]);
  if (setrlimit (RLIMIT_NOFILE, &old) == -1) fatal ("setrlimit: %m");
  check_failure (r2, "nbd_connect_systemd_socket_activation", EMFILE, "socket activation without fds",
                 "Too many open files", NULL);
  CHECK (r1 == -1 && e1 == EMFILE, "connect_command without fds: %d, errno %d", r1, e1);
  CHECK (m1 && strncmp (m1, "nbd_connect_command", 19) == 0 && !strstr (m1, "os error") &&
         (!ours || strstr (m1, "Too many open files")), "connect_command without fds: %s", m1);
  free (m1);
  nbd_close (h1);
  nbd_close (h2);
}

int
main (void)
{
  const char *needs[] = { "nbdkit", "openssl", NULL };
  const char *lib = getenv ("NBD_TEST_LIBRARY");
  ours = lib && strcmp (lib, "ours") == 0;
  debian = lib && strcmp (lib, "debian") == 0;
  verbose = getenv ("MESSAGES_TEST_VERBOSE") != NULL;

  servers_init ("messages-test", needs, 120);

  char *sock = path_in_dir ("nbd.sock");
  char *memory[] = { "memory", "1M", NULL };
  int port = free_port (AF_INET);
  start_nbdkit_unix ("nbd.sock", memory);
  start_nbdkit_port (port, memory);
  char *certs = make_tls_certs ();

  test_get_uri (sock, port);
  test_exec_errors ();
  test_bad_uris (sock);
  test_tls (certs);
  test_no_fds ();

  free (sock);
  free (certs);
  printf ("messages-test: %d checks, %d failures\n", checks, failures);
  return failures != 0;
}
