/* Our client against our server: nbd-rs-server (target/release, built by
 * `make lib`), driven by this library. Runs on nbd-rs only
 * (tests/c-compare.sh's TESTS_OURS):
 *  - multi-conn=4: the server advertises CAN_MULTI_CONN, the handle makes
 *    4 connections, and 256 writes then reads spread over them check out;
 *  - the same with TLS (PSK), every connection its own session;
 *  - the concurrent writer on a connection to it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <sys/socket.h>
#include <libnbd.h>

#include "servers.h"
#include "test-writer.h"

#ifndef LIBNBD_HAVE_NBD_RS_SET_MULTI_CONN
#error "server-test needs nbd-rs's header"
#endif

/* The server binary: NBD_RS_SERVER, else the repository's release build
 * (tests/c-compare.sh runs the tests from the repository's top). */
static const char *
server_binary (void)
{
  const char *s = getenv ("NBD_RS_SERVER");
  if (s == NULL) s = "target/release/nbd-rs-server";
  if (access (s, X_OK) != 0) fatal ("%s: not built (make lib builds it): %m", s);
  return s;
}

static pid_t
start_server (const char *sock, char **extra)
{
  char *argv[16];
  int n = 0;
  argv[n++] = (char *) server_binary ();
  argv[n++] = "-U";
  argv[n++] = (char *) sock;
  while (*extra && n < 15) argv[n++] = *extra++;
  argv[n] = NULL;
  pid_t pid = spawn (argv, -1, -1);
  wait_ready ("nbd-rs-server", pid, NULL, sock, 0, false);
  return pid;
}

enum { BLOCKS = 256, BLOCK = 16384 };

/* 256 writes of 16 KiB in flight at once, then reads; all checked. */
static void
spread (struct nbd_handle *h, const char *what)
{
  static char out[BLOCKS][BLOCK], in[BLOCKS][BLOCK];
  int64_t cookies[BLOCKS];
  for (int i = 0; i < BLOCKS; i++) {
    memset (out[i], 'a' + i % 26, BLOCK);
    out[i][0] = (char) i;
    cookies[i] = nbd_aio_pwrite (h, out[i], BLOCK, (uint64_t) i * BLOCK, NBD_NULL_COMPLETION, 0);
  }
  int bad = 0;
  for (int i = 0; i < BLOCKS; i++) {
    while (nbd_aio_command_completed (h, cookies[i]) == 0)
      if (nbd_poll (h, 5000) <= 0) { bad++; break; }
  }
  CHECK (bad == 0, "%s: 256 writes complete (%d stuck or failed)", what, bad);
  CHECK (nbd_flush (h, 0) == 0, "%s: flush", what);
  for (int i = 0; i < BLOCKS; i++)
    cookies[i] = nbd_aio_pread (h, in[i], BLOCK, (uint64_t) i * BLOCK, NBD_NULL_COMPLETION, 0);
  int same = 0;
  for (int i = 0; i < BLOCKS; i++) {
    int r;
    while ((r = nbd_aio_command_completed (h, cookies[i])) == 0)
      if (nbd_poll (h, 5000) <= 0) break;
    same += r == 1 && memcmp (in[i], out[i], BLOCK) == 0;
  }
  CHECK (same == BLOCKS, "%s: %d of 256 blocks read back", what, same);
}

static void
test_multi_conn (void)
{
  char *sock = path_in_dir ("mc.sock"), *uri;
  char *args[] = { "memory:64M", NULL };
  pid_t pid = start_server (sock, args);
  if (asprintf (&uri, "nbd+unix:///?socket=%s&multi-conn=4", sock) == -1) fatal ("asprintf");
  struct nbd_handle *h = nbd_create ();
  CHECK (nbd_connect_uri (h, uri) == 0, "multi-conn: connect");
  CHECK (nbd_can_multi_conn (h) == 1, "multi-conn: the server advertises CAN_MULTI_CONN");
  CHECK (nbd_rs_get_multi_conn (h) == 4, "multi-conn: 4 connections (%" PRIi64 ")", nbd_rs_get_multi_conn (h));
  spread (h, "multi-conn");
  CHECK (nbd_shutdown (h, 0) == 0, "multi-conn: shutdown");
  nbd_close (h);
  stop_pid (pid, 1);
  free (uri);
  free (sock);
}

static void
test_tls (void)
{
  char *sock = path_in_dir ("tls.sock"), *psk = path_in_dir ("keys.psk"), *uri;
  FILE *fp = fopen (psk, "w");
  if (fp == NULL) fatal ("%s: %m", psk);
  fprintf (fp, "alice:0123456789abcdef0123456789abcdef\n");
  fclose (fp);
  char *args[] = { "--tls-psk", psk, "--tls", "require", "memory:64M", NULL };
  pid_t pid = start_server (sock, args);
  if (asprintf (&uri, "nbds+unix://alice@/?socket=%s&tls-psk-file=%s&multi-conn=4", sock, psk) == -1)
    fatal ("asprintf");
  struct nbd_handle *h = nbd_create ();
  nbd_set_uri_allow_local_file (h, true);
  CHECK (nbd_connect_uri (h, uri) == 0, "tls: connect");
  CHECK (nbd_get_tls_negotiated (h) == 1, "tls: negotiated");
  CHECK (nbd_rs_get_multi_conn (h) == 4, "tls: 4 connections");
  spread (h, "tls multi-conn");
  CHECK (nbd_shutdown (h, 0) == 0, "tls: shutdown");
  nbd_close (h);
  stop_pid (pid, 1);
  free (uri);
  free (psk);
  free (sock);
}

/* The concurrent writer (test-writer.h): a thread sends from a queue
 * while this one polls only for replies. */
static void
test_writer (void)
{
  char *sock = path_in_dir ("w.sock");
  char *args[] = { "memory:64M", NULL };
  pid_t pid = start_server (sock, args);
  struct nbd_handle *h = nbd_create ();
  struct writer w;
  writer_init (&w, h, 0);
  CHECK (nbd_rs_set_concurrent_writer (h, &w, writer_cb) == 0, "writer: set");
  CHECK (nbd_connect_unix (h, sock) == 0, "writer: connect");
  writer_start (&w);
  spread (h, "concurrent writer");
  CHECK (nbd_shutdown (h, 0) == 0, "writer: shutdown");
  writer_stop (&w);
  nbd_close (h);
  stop_pid (pid, 1);
  free (sock);
}

int
main (void)
{
  const char *needs[] = { NULL };
  servers_init ("server-test", needs, 120);
  test_multi_conn ();
  test_tls ();
  test_writer ();
  printf ("server-test: %d checks, %d failures\n", checks, failures);
  return failures ? 1 : 0;
}
