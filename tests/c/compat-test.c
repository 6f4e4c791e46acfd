/* Behaviours where our library once differed from libnbd, each checked
 * against what libnbd does: tests/c-compare.sh runs this program on
 * Debian's libnbd 1.14.2, on libnbd 1.22.2 built from source (the
 * reference) and on ours, with NBD_TEST_LIBRARY naming which. Where 1.14
 * and 1.22 differ, the expectation is 1.22's, and 1.14's is named.
 *
 * SIGPIPE keeps its default disposition here, as in a user's program: a
 * library that raises it kills this test.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <unistd.h>
#include <libnbd.h>

#include "check.h"
#include "servers.h"

static const char *library;

static struct nbd_handle *
connect_argv (char **argv)
{
  struct nbd_handle *h = nbd_create ();
  if (h == NULL || nbd_connect_command (h, argv) == -1)
    fatal ("connect %s: %s", argv[3], nbd_get_error ());
  return h;
}

struct counts { int calls, frees, ret, set_error; };
static int
completion_cb (void *p, int *error)
{
  struct counts *c = p;
  c->calls++;
  if (c->set_error) *error = c->set_error;
  return c->ret;
}
static void count_free (void *p) { ((struct counts *) p)->frees++; }

static void
wait_in_flight (struct nbd_handle *h)
{
  while (nbd_aio_in_flight (h) > 0 && !nbd_aio_is_dead (h) && !nbd_aio_is_closed (h))
    if (nbd_poll (h, 1000) == -1) break;
}

/* 1. A server that dies while large writes are being sent: the library
 * sends with MSG_NOSIGNAL, so the program lives on (a SIGPIPE would end
 * it with status 141 before the checks below), and 5. every command in
 * flight fails with ENOTCONN. */
static void
test_server_dies_mid_send (void)
{
  char *slow[] = { "nbdkit", "-s", "--exit-with-parent", "--filter=delay", "memory", "256M",
                   "wdelay=120", NULL };
  struct nbd_handle *h = connect_argv (slow);
  enum { N = 32, SZ = 4 * 1024 * 1024 };
  char *buf = calloc (1, SZ);
  int64_t c[N];
  int i, enotconn = 0, other = 0;

  for (i = 0; i < N; i++)
    c[i] = nbd_aio_pwrite (h, buf, SZ, (uint64_t) i * SZ, NBD_NULL_COMPLETION, 0);
  for (i = 0; i < 5; i++) nbd_poll (h, 20);
  CHECK (nbd_aio_get_direction (h) & LIBNBD_AIO_DIRECTION_WRITE, "still sending: %u",
         nbd_aio_get_direction (h));
  CHECK (nbd_kill_subprocess (h, SIGKILL) == 0, "kill the server");
  usleep (300000);
  /* A loop that serves POLLOUT first sends to the dead peer. */
  nbd_aio_notify_write (h);
  wait_in_flight (h);
  CHECK (nbd_aio_in_flight (h) == 0, "nothing left in flight: %d", nbd_aio_in_flight (h));
  for (i = 0; i < N; i++) {
    int r = nbd_aio_command_completed (h, c[i]);
    if (r == -1 && nbd_get_errno () == ENOTCONN) enotconn++;
    else { other++; fprintf (stderr, "write %d: %d, errno %d\n", i, r, nbd_get_errno ()); }
  }
  CHECK (enotconn == N && other == 0, "ENOTCONN for %d of %d writes, %d other", enotconn, N, other);
  free (buf);
  nbd_close (h);
}

/* 2. A callback with only .free set is present: .free runs when the
 * command retires, not when it is submitted (Python keeps a buffer
 * pinned this way). */
static void
test_free_only_callback (void)
{
  char *mem[] = { "nbdkit", "-s", "--exit-with-parent", "memory", "1M", NULL };
  struct nbd_handle *h = connect_argv (mem);
  static char buf[512];
  struct counts cb = { 0 };
  int64_t c = nbd_aio_pread (h, buf, sizeof buf, 0, (nbd_completion_callback) {
                               .callback = NULL, .user_data = &cb, .free = count_free }, 0);
  CHECK (c > 0, "aio_pread");
  CHECK (cb.frees == 0, "free ran at submission: %d", cb.frees);
  wait_in_flight (h);
  CHECK (cb.frees == 0, "free ran before the command retired: %d", cb.frees);
  CHECK (nbd_aio_command_completed (h, c) == 1, "retired");
  CHECK (cb.frees == 1, "free ran %d times at retirement", cb.frees);
  nbd_close (h);
  CHECK (cb.frees == 1, "free ran again at close: %d", cb.frees);
}

/* 3. A completion callback's *error counts only when it returns -1. */
static void
test_completion_error (void)
{
  char *mem[] = { "nbdkit", "-s", "--exit-with-parent", "memory", "1M", NULL };
  struct nbd_handle *h = connect_argv (mem);
  static char buf[512];
  struct counts keep = { .ret = 0, .set_error = EIO }, fail = { .ret = -1, .set_error = EIO };
  int64_t a, b;

  a = nbd_aio_pread (h, buf, sizeof buf, 0, (nbd_completion_callback) {
                       .callback = completion_cb, .user_data = &keep }, 0);
  b = nbd_aio_pread (h, buf, sizeof buf, 512, (nbd_completion_callback) {
                       .callback = completion_cb, .user_data = &fail }, 0);
  wait_in_flight (h);
  CHECK (keep.calls == 1 && fail.calls == 1, "callbacks ran %d, %d times", keep.calls, fail.calls);
  CHECK (nbd_aio_command_completed (h, a) == 1, "*error set, 0 returned: the command succeeds");
  CHECK_ERR (nbd_aio_command_completed (h, b), "nbd_aio_command_completed", EIO);
  nbd_close (h);
}

/* 4. Misuse that libnbd refuses. */
static void
test_misuse (void)
{
  char *mem[] = { "nbdkit", "-s", "--exit-with-parent", "memory", "1M", NULL };
  struct nbd_handle *h = connect_argv (mem);
  CHECK (nbd_aio_get_direction (h) == LIBNBD_AIO_DIRECTION_READ, "idle: read only: %u",
         nbd_aio_get_direction (h));
  CHECK_ERR (nbd_aio_notify_write (h), "nbd_aio_notify_write", EINVAL);
  CHECK (nbd_aio_is_ready (h) == 1, "still ready after a refused notify_write");
  CHECK_ERR (nbd_aio_command_completed (h, 0), "nbd_aio_command_completed", EINVAL);
  nbd_close (h);
}

/* 5. Errnos of refused requests: past the end, a write, zero or trim is
 * ENOSPC and a read or cache EINVAL; the bounds are checked before the
 * size limit, which alone is ERANGE. */
static void
test_request_errnos (void)
{
  char *mem[] = { "nbdkit", "-s", "--exit-with-parent", "memory", "1M", NULL };
  struct nbd_handle *h = connect_argv (mem);
  size_t big = 64 * 1024 * 1024 + 1;
  char *buf = calloc (1, big);

  CHECK_ERR (nbd_pwrite (h, buf, 512, 1048576, 0), "nbd_pwrite", ENOSPC);
  CHECK_ERR (nbd_zero (h, 512, 1048576 - 256, 0), "nbd_zero", ENOSPC);
  CHECK_ERR (nbd_trim (h, 4096, 1048576, 0), "nbd_trim", ENOSPC);
  CHECK_ERR (nbd_pread (h, buf, 512, 1048576, 0), "nbd_pread", EINVAL);
  CHECK_ERR (nbd_cache (h, 512, 1048576, 0), "nbd_cache", EINVAL);
  CHECK_ERR (nbd_pread (h, buf, big, 0, 0), "nbd_pread", EINVAL);
  CHECK_ERR (nbd_pwrite (h, buf, big, 0, 0), "nbd_pwrite", ENOSPC);
  CHECK_ERR (nbd_pwrite (h, buf, 512, UINT64_MAX - 100, 0), "nbd_pwrite", ENOSPC);
  CHECK (nbd_set_strict_mode (h, nbd_get_strict_mode (h) & ~LIBNBD_STRICT_BOUNDS) == 0, "bounds off");
  CHECK_ERR (nbd_pread (h, buf, big, 0, 0), "nbd_pread", ERANGE);
  CHECK_ERR (nbd_pwrite (h, buf, big, 0, 0), "nbd_pwrite", ERANGE);
  /* A range past 2^64: libnbd sends it and nbdkit refuses it, we refuse
   * it before sending; EINVAL either way. */
  CHECK_ERR (nbd_pread (h, buf, 4096, UINT64_MAX, 0), "nbd_pread", EINVAL);
  CHECK (nbd_aio_is_ready (h) == 1, "still ready");
  free (buf);
  nbd_close (h);
}

/* 6. Opt mode against a server without the fixed newstyle handshake:
 * the handle negotiates (nothing can be asked but the export itself),
 * listing and info are ENOTSUP, opt_go connects and opt_abort ends it. */
static int
list_cb (void *p, const char *name, const char *desc)
{
  (void) p; (void) name; (void) desc;
  return 0;
}

static void
test_opt_mode_without_fixed_newstyle (void)
{
  char *nonfixed[] = { "nbdkit", "-s", "--exit-with-parent", "--mask-handshake=0", "memory", "1M", NULL };
  struct nbd_handle *h;

  for (int round = 0; round < 2; round++) {
    h = nbd_create ();
    CHECK (nbd_set_opt_mode (h, true) == 0, "opt mode");
    CHECK (nbd_connect_command (h, nonfixed) == 0, "connect");
    CHECK (nbd_aio_is_negotiating (h) == 1, "negotiating: %s", nbd_connection_state (h));
    CHECK (strcmp (nbd_get_protocol (h), "newstyle") == 0, "protocol newstyle");
    CHECK_ERR (nbd_opt_list (h, (nbd_list_callback) { .callback = list_cb }), "nbd_opt_list", ENOTSUP);
    CHECK_ERR (nbd_opt_info (h), "nbd_opt_info", ENOTSUP);
    CHECK (nbd_aio_is_negotiating (h) == 1, "still negotiating: %s", nbd_connection_state (h));
    if (round == 0) {
      CHECK (nbd_opt_go (h) == 0, "opt_go");
      CHECK (nbd_aio_is_ready (h) == 1 && nbd_get_size (h) == 1048576, "ready");
    } else {
      CHECK (nbd_opt_abort (h) == 0, "opt_abort");
      CHECK (nbd_aio_is_dead (h) == 1 || nbd_aio_is_closed (h) == 1, "ended: %s",
             nbd_connection_state (h));
    }
    nbd_close (h);
  }
}

/* Socket activation's listening socket lives in a directory made by
 * mkdtemp in /tmp, as libnbd makes it: a name no one can guess, mode
 * 0700, a new one each time, gone after nbd_close. (Ours once used a
 * predictable name, and took a directory that already existed.) The
 * "server" writes where its inherited socket (fd 3) is bound, and the
 * mode of the directory around it, then closes the socket (so the
 * connection fails only once the report is written) and exits. */
static void
test_socket_activation_dir (void)
{
  char *report[2], *dirs[2] = { NULL, NULL };
  for (int round = 0; round < 2; round++) {
    report[round] = path_in_dir (round ? "activated-2" : "activated-1");
    char *argv[] = {
      "/usr/bin/python3", "-c",
      "import os, socket, sys\n"
      "listener = socket.socket(fileno=3)\n"
      "path = listener.getsockname()\n"
      "mode = os.stat(os.path.dirname(path)).st_mode & 0o777\n"
      "with open(sys.argv[1], 'w') as f: f.write('%s %o' % (path, mode))\n"
      "listener.close()\n",
      report[round], NULL
    };
    struct nbd_handle *h = nbd_create ();
    if (h == NULL) fatal ("nbd_create");
    /* The "server" exits without a handshake: the connect must fail. */
    CHECK (nbd_connect_systemd_socket_activation (h, argv) == -1, "socket activation of a non-server fails");
    char line[512] = "", dir[512] = "";
    unsigned mode = 0;
    FILE *fp = fopen (report[round], "r");
    if (fp) {
      if (fgets (line, sizeof line, fp) == NULL) line[0] = '\0';
      fclose (fp);
    }
    char *space = strrchr (line, ' ');
    CHECK (space != NULL && sscanf (space + 1, "%o", &mode) == 1, "the activated program reported: %s", line);
    if (space) {
      *space = '\0';
      snprintf (dir, sizeof dir, "%s", line);
      char *slash = strrchr (dir, '/');
      if (slash) *slash = '\0';
    }
    CHECK (strncmp (dir, "/tmp/libnbd", 11) == 0 && strlen (dir) == 17 && strcmp (line + strlen (dir), "/sock") == 0,
           "the socket is /tmp/libnbdXXXXXX/sock: %s", line);
    CHECK (mode == 0700, "the socket's directory has mode 0700, not %o", mode);
    dirs[round] = strdup (dir);
    nbd_close (h);
    CHECK (access (dir, F_OK) == -1 && errno == ENOENT, "nbd_close removes %s", dir);
    free (report[round]);
  }
  CHECK (dirs[0] && dirs[1] && strcmp (dirs[0], dirs[1]) != 0, "each activation has its own directory");
  free (dirs[0]);
  free (dirs[1]);
}

int
main (void)
{
  const char *needs[] = { "nbdkit", NULL };
  struct sigaction sa;
  library = getenv ("NBD_TEST_LIBRARY") ? getenv ("NBD_TEST_LIBRARY") : "ours";
  servers_init ("compat-test", needs, 300);
  sigaction (SIGPIPE, NULL, &sa);
  CHECK (sa.sa_handler == SIG_DFL, "SIGPIPE has its default disposition");
  test_server_dies_mid_send ();
  test_free_only_callback ();
  test_completion_error ();
  test_misuse ();
  test_request_errnos ();
  test_opt_mode_without_fixed_newstyle ();
  test_socket_activation_dir ();
  printf ("compat-test on %s: %d checks, %d failures\n", library, checks, failures);
  return failures != 0;
}
