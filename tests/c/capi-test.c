/* The C API's contract, checked from C: transports, handshake variants,
 * export flags, commands, errors (errno and messages) and callback rules.
 * It must pass on Debian's libnbd and on ours: tests/c-compare.sh runs it
 * on both. Servers are nbdkit, started by the library itself
 * (nbd_connect_command, systemd socket activation) or by this program.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <inttypes.h>
#include <signal.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <libnbd.h>

#include "check.h"
#include "servers.h"

static char *memory[] = { "nbdkit", "-s", "--exit-with-parent", "memory", "1M", NULL };

static struct nbd_handle *
connect_with (char **argv, int meta)
{
  struct nbd_handle *h = nbd_create ();
  if (h == NULL) { fprintf (stderr, "nbd_create\n"); exit (1); }
  if (meta) nbd_add_meta_context (h, LIBNBD_CONTEXT_BASE_ALLOCATION);
  if (nbd_connect_command (h, argv) == -1) {
    fprintf (stderr, "connect %s: %s\n", argv[3], nbd_get_error ());
    exit (1);
  }
  return h;
}

/* Callback bookkeeping: how often each was called and freed. */
struct counts { int calls, frees, ret; };
static int count_completion (void *p, int *error) {
  struct counts *c = p; (void) error; c->calls++; return c->ret;
}
static int count_chunk (void *p, const void *buf, size_t n, uint64_t off,
                        unsigned status, int *error) {
  struct counts *c = p; (void) buf; (void) n; (void) off; (void) error;
  if (status == LIBNBD_READ_DATA || status == LIBNBD_READ_HOLE) c->calls++;
  return 0;
}
static int count_extent (void *p, const char *ctx, uint64_t off,
                         uint32_t *e, size_t n, int *error) {
  struct counts *c = p; (void) off; (void) e; (void) error;
  if (strcmp (ctx, LIBNBD_CONTEXT_BASE_ALLOCATION) == 0 && n >= 2) c->calls++;
  return 0;
}
static void count_free (void *p) { ((struct counts *) p)->frees++; }

static void
test_states_and_argument_errors (void)
{
  struct nbd_handle *h = nbd_create ();
  char buf[512];

  CHECK (nbd_aio_is_created (h) == 1, "created");
  CHECK_ERR (nbd_pread (h, buf, sizeof buf, 0, 0), "nbd_pread", ENOTCONN);
  CHECK_ERR (nbd_get_size (h), "nbd_get_size", ENOTCONN);
  CHECK_ERR (nbd_opt_go (h), "nbd_opt_go", ENOTCONN);
  CHECK_ERR (nbd_set_handshake_flags (h, 0x100), "nbd_set_handshake_flags", EINVAL);
  CHECK_ERR (nbd_set_strict_mode (h, 0x100), "nbd_set_strict_mode", EINVAL);
  /* Every bit by default: 1.14 had five, 1.22 has seven (PAYLOAD, AUTO_FLAG). */
  {
    const char *lib = getenv ("NBD_TEST_LIBRARY");
    unsigned want = lib && strcmp (lib, "debian") == 0 ? 0x1f : LIBNBD_STRICT_MASK;
    CHECK (nbd_get_strict_mode (h) == want, "strict default %#x", nbd_get_strict_mode (h));
  }
  CHECK (nbd_get_handshake_flags (h) == LIBNBD_HANDSHAKE_FLAG_MASK, "flags default");
  CHECK (nbd_get_pread_initialize (h) == 1, "pread_initialize default");
  CHECK (nbd_get_request_structured_replies (h) == 1, "sr default");
  CHECK (nbd_get_full_info (h) == 0, "full_info default");
  CHECK (nbd_get_opt_mode (h) == 0, "opt_mode default");
  CHECK (strcmp (nbd_get_package_name (h), "libnbd") == 0, "package");
  CHECK (strncmp (nbd_get_version (h), "1.", 2) == 0, "version");
  CHECK (nbd_set_private_data (h, 42) == 0 && nbd_get_private_data (h) == 42, "private data");
  CHECK (nbd_add_meta_context (h, "base:allocation") == 0, "add meta");
  CHECK (nbd_get_nr_meta_contexts (h) == 1, "nr meta");
  {
    char *name = nbd_get_meta_context (h, 0);
    CHECK (name && strcmp (name, "base:allocation") == 0, "get meta");
    free (name);
  }
  CHECK (nbd_get_meta_context (h, 5) == NULL && nbd_get_errno () == EINVAL, "meta out of range");
  CHECK (nbd_clear_meta_contexts (h) == 0 && nbd_get_nr_meta_contexts (h) == 0, "clear meta");
  {
    char longname[5000];
    memset (longname, 'x', sizeof longname - 1);
    longname[sizeof longname - 1] = 0;
    CHECK_ERR (nbd_set_export_name (h, longname), "nbd_set_export_name", ENAMETOOLONG);
  }
  CHECK_ERR (nbd_connect_uri (h, "http://example.com/"), "nbd_connect_uri", EINVAL);
  CHECK (nbd_aio_is_created (h) == 1, "still created after a bad URI");
  CHECK_ERR (nbd_connect_unix (h, "/nonexistent/socket"), "nbd_connect_unix", ENOENT);
  CHECK (nbd_aio_is_dead (h) == 1, "dead after a failed connect");
  CHECK_ERR (nbd_connect_unix (h, "/nonexistent/socket"), "nbd_connect_unix", EINVAL);
  nbd_close (h);
  nbd_close (NULL);
}

static void
test_commands_and_flags (void)
{
  struct nbd_handle *h = connect_with (memory, 1);
  static char wbuf[65536], rbuf[65536];
  struct counts ext = { 0 };

  CHECK (nbd_aio_is_ready (h) == 1, "ready");
  CHECK (strcmp (nbd_get_protocol (h), "newstyle-fixed") == 0, "protocol");
  CHECK (nbd_get_structured_replies_negotiated (h) == 1, "sr");
  CHECK (nbd_get_size (h) == 1048576, "size");
  CHECK (nbd_is_read_only (h) == 0 && nbd_can_flush (h) == 1 && nbd_can_trim (h) == 1 &&
         nbd_can_zero (h) == 1 && nbd_can_fua (h) == 1 && nbd_can_multi_conn (h) == 1 &&
         nbd_can_cache (h) == 1 && nbd_can_df (h) == 1 && nbd_can_fast_zero (h) == 1 &&
         nbd_is_rotational (h) == 0, "memory plugin flags");
  CHECK (nbd_can_meta_context (h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1, "base:allocation");
  CHECK (nbd_get_block_size (h, LIBNBD_SIZE_MINIMUM) >= 0, "block size");

  memset (wbuf, 7, sizeof wbuf);
  CHECK (nbd_pwrite (h, wbuf, sizeof wbuf, 4096, LIBNBD_CMD_FLAG_FUA) == 0, "pwrite");
  memset (rbuf, 1, sizeof rbuf);
  CHECK (nbd_pread (h, rbuf, sizeof rbuf, 4096, 0) == 0 &&
         memcmp (rbuf, wbuf, sizeof wbuf) == 0, "pread back");
  CHECK (nbd_flush (h, 0) == 0, "flush");
  CHECK (nbd_trim (h, 4096, 4096, 0) == 0, "trim");
  CHECK (nbd_zero (h, 4096, 8192, LIBNBD_CMD_FLAG_NO_HOLE) == 0, "zero");
  CHECK (nbd_cache (h, 65536, 0, 0) == 0, "cache");
  CHECK (nbd_pread (h, rbuf, 4096, 8192, 0) == 0 && rbuf[0] == 0, "zeroed");
  /* DF belongs to pread_structured only. */
  CHECK_ERR (nbd_pread (h, rbuf, 4096, 8192, LIBNBD_CMD_FLAG_DF), "nbd_pread", EINVAL);
  CHECK (nbd_block_status (h, 1048576, 0, (nbd_extent_callback) {
           .callback = count_extent, .user_data = &ext }, 0) == 0 && ext.calls == 1,
         "block status");

  /* Local refusals: libnbd's errno for each. */
  CHECK_ERR (nbd_pread (h, rbuf, 512, 1048576, 0), "nbd_pread", EINVAL);
  CHECK_ERR (nbd_pread (h, rbuf, 0, 0, 0), "nbd_pread", EINVAL);
  CHECK_ERR (nbd_pread (h, rbuf, 512, 0, LIBNBD_CMD_FLAG_FUA), "nbd_pread", EINVAL);
  CHECK_ERR (nbd_pwrite (h, wbuf, 512, 0, 0x10000), "nbd_pwrite", EINVAL);
  CHECK_ERR (nbd_set_tls (h, LIBNBD_TLS_REQUIRE), "nbd_set_tls", EINVAL);
  CHECK_ERR (nbd_opt_go (h), "nbd_opt_go", EINVAL);

  /* Relaxed strictness lets the server judge (and refuse) instead. */
  CHECK (nbd_set_strict_mode (h, 0) == 0, "strict off");
  CHECK_ERR (nbd_pread (h, rbuf, 512, 1048576, 0), "nbd_pread", EINVAL);
  CHECK (nbd_aio_is_ready (h) == 1, "a server error leaves the handle ready");

  CHECK (nbd_shutdown (h, 0) == 0 && nbd_aio_is_closed (h) == 1, "shutdown");
  CHECK_ERR (nbd_pread (h, rbuf, 512, 0, 0), "nbd_pread", EINVAL);
  nbd_close (h);
}

static void
test_callbacks (void)
{
  struct nbd_handle *h = connect_with (memory, 1);
  static char buf[65536];
  struct counts done = { 0 }, chunks = { 0 }, bad = { 0 }, retire = { .ret = 1 };
  int64_t c;

  /* Completion runs once and free once; the command still needs retiring. */
  c = nbd_aio_pread (h, buf, 4096, 0, (nbd_completion_callback) {
        .callback = count_completion, .user_data = &done, .free = count_free }, 0);
  CHECK (c > 0, "aio_pread");
  while (nbd_aio_command_completed (h, c) == 0)
    nbd_poll (h, -1);
  CHECK (done.calls == 1 && done.frees == 1, "completion %d free %d", done.calls, done.frees);

  /* Returning 1 retires the command automatically. */
  c = nbd_aio_flush (h, (nbd_completion_callback) {
        .callback = count_completion, .user_data = &retire, .free = count_free }, 0);
  while (nbd_aio_in_flight (h) > 0)
    nbd_poll (h, -1);
  CHECK (retire.calls == 1 && retire.frees == 1, "auto-retire callbacks");
  /* libnbd 1.14 answers 0 for a cookie it no longer knows. */
  CHECK (nbd_aio_command_completed (h, c) == 0, "an auto-retired cookie is gone");

  /* A failing call still frees its callbacks, exactly once. */
  c = nbd_aio_pread (h, buf, 4096, 1048576, (nbd_completion_callback) {
        .callback = count_completion, .user_data = &bad, .free = count_free }, 0);
  CHECK (c == -1 && bad.calls == 0 && bad.frees == 1, "free on failure: %d", bad.frees);

  /* Chunk callbacks see the data. */
  CHECK (nbd_pread_structured (h, buf, 65536, 0, (nbd_chunk_callback) {
           .callback = count_chunk, .user_data = &chunks, .free = count_free }, 0) == 0,
         "pread_structured");
  CHECK (chunks.calls >= 1 && chunks.frees == 1, "chunks %d frees %d", chunks.calls, chunks.frees);

  /* Peek and in-flight. */
  CHECK (nbd_aio_peek_command_completed (h) == -1 && nbd_get_errno () == EINVAL, "peek, nothing");
  c = nbd_aio_pread (h, buf, 512, 0, NBD_NULL_COMPLETION, 0);
  CHECK (nbd_aio_in_flight (h) == 1, "one in flight");
  while (nbd_aio_peek_command_completed (h) == 0)
    nbd_poll (h, -1);
  CHECK (nbd_aio_peek_command_completed (h) == c, "peek finds it");
  CHECK (nbd_aio_command_completed (h, c) == 1, "retire");
  nbd_close (h);
}

static int ignore_debug (void *p, const char *ctx, const char *msg) {
  (void) p; (void) ctx; (void) msg; return 0;
}
static int list_export (void *p, const char *name, const char *desc) {
  (void) name; (void) desc; ((struct counts *) p)->calls++; return 0;
}

static void
test_required_callbacks (void)
{
  struct counts dbg = { 0 }, null_dbg = { 0 };
  struct nbd_handle *h = nbd_create ();

  /* A replaced debug callback is freed once, even a NULL one. */
  CHECK (nbd_set_debug_callback (h, (nbd_debug_callback) {
           .callback = NULL, .user_data = &null_dbg, .free = count_free }) == 0, "NULL debug cb");
  CHECK (null_dbg.frees == 0, "not freed while installed");
  CHECK (nbd_set_debug_callback (h, (nbd_debug_callback) {
           .callback = ignore_debug, .user_data = &dbg, .free = count_free }) == 0, "set debug cb");
  CHECK (null_dbg.frees == 1, "replaced callback freed once: %d", null_dbg.frees);
  CHECK (nbd_clear_debug_callback (h) == 0 && dbg.frees == 1, "debug cb freed once");
  nbd_close (h);
  CHECK (dbg.frees == 1, "not freed twice");
}

static void
test_handshake_variants (void)
{
  char *oldstyle[] = { "nbdkit", "-s", "--exit-with-parent", "-o", "memory", "1M", NULL };
  char *nonfixed[] = { "nbdkit", "-s", "--exit-with-parent", "--mask-handshake=0", "memory", "1M", NULL };
  char *nosr[] = { "nbdkit", "-s", "--exit-with-parent", "--no-sr", "memory", "1M", NULL };
  char *ro[] = { "nbdkit", "-s", "--exit-with-parent", "-r", "memory", "1M", NULL };
  struct nbd_handle *h;
  char buf[512] = { 0 };

  h = connect_with (oldstyle, 0);
  CHECK (strcmp (nbd_get_protocol (h), "oldstyle") == 0, "oldstyle");
  nbd_close (h);
  h = connect_with (nonfixed, 0);
  CHECK (strcmp (nbd_get_protocol (h), "newstyle") == 0, "newstyle");
  nbd_close (h);
  h = connect_with (nosr, 1);
  CHECK (nbd_get_structured_replies_negotiated (h) == 0, "no sr");
  CHECK (nbd_can_df (h) == 0, "no DF without sr");
  CHECK (nbd_can_meta_context (h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 0, "no contexts without sr");
  nbd_close (h);
  h = connect_with (ro, 0);
  CHECK (nbd_is_read_only (h) == 1, "read-only");
  CHECK_ERR (nbd_pwrite (h, buf, sizeof buf, 0, 0), "nbd_pwrite", EPERM);
  nbd_close (h);

  /* Opt mode: list, info, go. */
  {
    char *names[] = { "nbdkit", "-s", "--exit-with-parent", "--filter=exportname", "memory", "1M",
                      "exportname-list=explicit", "exportname=a", "exportname=b", NULL };
    h = nbd_create ();
    nbd_set_opt_mode (h, true);
    CHECK (nbd_connect_command (h, names) == 0 && nbd_aio_is_negotiating (h) == 1, "negotiating");
    struct counts listed = { 0 };
    CHECK_ERR (nbd_opt_list (h, (nbd_list_callback) { .callback = NULL }), "nbd_opt_list", EFAULT);
    CHECK (nbd_opt_list (h, (nbd_list_callback) { .callback = list_export, .user_data = &listed,
                                                 .free = count_free }) == 2, "two exports");
    CHECK (listed.calls == 2 && listed.frees == 1, "list callback: %d calls", listed.calls);
    CHECK (nbd_set_export_name (h, "b") == 0 && nbd_opt_info (h) == 0, "opt_info");
    CHECK (nbd_get_size (h) == 1048576, "size after opt_info");
    CHECK (nbd_opt_go (h) == 0 && nbd_aio_is_ready (h) == 1, "opt_go");
    nbd_close (h);
  }
}

static void
test_transports (void)
{
  char dir[] = "/tmp/capi-test.XXXXXX", sock[200], pidfile[200], uri[300];
  char *activated[] = { "nbdkit", "--exit-with-parent", "memory", "1M", NULL };
  struct nbd_handle *h;
  pid_t pid;
  int fd;
  struct sockaddr_un addr = { .sun_family = AF_UNIX };

  /* systemd socket activation */
  h = nbd_create ();
  CHECK (nbd_connect_systemd_socket_activation (h, activated) == 0, "socket activation");
  CHECK (nbd_get_size (h) == 1048576, "size over socket activation");
  nbd_close (h);

  /* connect_command, then kill_subprocess */
  h = connect_with (memory, 0);
  CHECK (nbd_kill_subprocess (h, 0) == 0, "kill_subprocess");
  nbd_close (h);

  /* A Unix socket: by path, by URI, and adopted with connect_socket. */
  if (mkdtemp (dir) == NULL) { perror ("mkdtemp"); exit (1); }
  snprintf (sock, sizeof sock, "%s/sock", dir);
  snprintf (pidfile, sizeof pidfile, "%s/pid", dir);
  pid = fork ();
  if (pid == 0) {
    execlp ("nbdkit", "nbdkit", "-f", "--exit-with-parent", "-U", sock, "-P", pidfile,
            "memory", "1M", (char *) NULL);
    _exit (127);
  }
  for (int i = 0; i < 200 && access (pidfile, F_OK) != 0; i++) usleep (20000);

  h = nbd_create ();
  CHECK (nbd_connect_unix (h, sock) == 0, "connect_unix");
  {
    char *u = nbd_get_uri (h);
    snprintf (uri, sizeof uri, "nbd+unix:///?socket=%s", sock);
    CHECK (u && strcmp (u, uri) == 0, "get_uri %s", u ? u : "(null)");
    free (u);
  }
  nbd_close (h);

  h = nbd_create ();
  CHECK (nbd_connect_uri (h, uri) == 0 && nbd_get_size (h) == 1048576, "connect_uri");
  nbd_close (h);

  h = nbd_create ();
  CHECK (nbd_set_uri_allow_transports (h, LIBNBD_ALLOW_TRANSPORT_TCP) == 0, "allow tcp only");
  CHECK_ERR (nbd_connect_uri (h, uri), "nbd_connect_uri", EPERM);
  nbd_close (h);

  fd = socket (AF_UNIX, SOCK_STREAM, 0);
  strncpy (addr.sun_path, sock, sizeof addr.sun_path - 1);
  CHECK (connect (fd, (struct sockaddr *) &addr, sizeof addr) == 0, "raw connect");
  h = nbd_create ();
  CHECK (nbd_connect_socket (h, fd) == 0 && nbd_get_size (h) == 1048576, "connect_socket");
  nbd_close (h);

  h = nbd_create ();
  CHECK (nbd_aio_connect (h, (struct sockaddr *) &addr, sizeof addr) == 0, "aio_connect");
  while (nbd_aio_is_connecting (h))
    nbd_poll (h, -1);
  CHECK (nbd_aio_is_ready (h) == 1, "ready after aio_connect");
  nbd_close (h);

  kill (pid, SIGTERM);
  waitpid (pid, NULL, 0);
  unlink (sock);
  unlink (pidfile);
  rmdir (dir);
}

static void
test_server_death (void)
{
  char *slow[] = { "nbdkit", "-s", "--exit-with-parent", "--filter=delay", "memory", "1M",
                   "rdelay=10", NULL };
  struct nbd_handle *h = connect_with (slow, 0);
  static char buf[16][512];
  int64_t c[16];
  int i, failed = 0;

  for (i = 0; i < 16; i++)
    c[i] = nbd_aio_pread (h, buf[i], 512, i * 512, NBD_NULL_COMPLETION, 0);
  nbd_poll (h, 100);
  CHECK (nbd_kill_subprocess (h, SIGKILL) == 0, "kill the server");
  while (nbd_aio_in_flight (h) > 0 && !nbd_aio_is_dead (h))
    if (nbd_poll (h, 1000) == -1) break;
  for (i = 0; i < 16; i++)
    failed += nbd_aio_command_completed (h, c[i]) == -1;
  CHECK (failed == 16, "all 16 commands failed: %d", failed);
  /* The server closing at a reply boundary closes the handle (libnbd). */
  CHECK (nbd_aio_is_closed (h) == 1, "closed, state %s", nbd_connection_state (h));
  nbd_close (h);
}

/* The AIO loop calls where no connection is being serviced (created,
 * closed by shutdown, dead after the server was killed): no descriptor,
 * nothing to poll for, socket events refused, all with EINVAL. */
static void
test_aio_loop_without_a_connection (void)
{
  static char buf[512];
  for (int round = 0; round < 3; round++) {
    struct nbd_handle *h = nbd_create ();
    if (round > 0) {
      h = (nbd_close (h), connect_with (memory, 0));
      if (round == 1) nbd_shutdown (h, 0);
      else {
        nbd_kill_subprocess (h, SIGKILL);
        nbd_pread (h, buf, sizeof buf, 0, 0);
      }
    }
    CHECK_ERR (nbd_aio_get_fd (h), "nbd_aio_get_fd", EINVAL);
    CHECK (nbd_aio_get_direction (h) == 0, "round %d: no direction", round);
    CHECK_ERR (nbd_poll (h, 10), "nbd_poll", EINVAL);
    CHECK_ERR (nbd_aio_notify_read (h), "nbd_aio_notify_read", EINVAL);
    CHECK_ERR (nbd_aio_notify_write (h), "nbd_aio_notify_write", EINVAL);
    nbd_close (h);
  }
}

/* A loop that waits only for the socket to become readable, ignoring
 * nbd_aio_get_direction, still completes a burst of commands: a library
 * may hold submissions back to send them together, but never all of them
 * (the first leaves at once, and each reply lets the rest out). */
static void
test_read_only_loop (void)
{
  struct nbd_handle *h = connect_with (memory, 0);
  static char buf[64][4096];
  int i, timeouts = 0, done = 0;

  for (i = 0; i < 64; i++)
    CHECK (nbd_aio_pread (h, buf[i], sizeof buf[i], (uint64_t) i * 4096, NBD_NULL_COMPLETION, 0) > 0,
           "aio_pread %d", i);
  while (nbd_aio_in_flight (h) > 0 && timeouts == 0) {
    struct pollfd pfd = { .fd = nbd_aio_get_fd (h), .events = POLLIN };
    if (poll (&pfd, 1, 5000) == 0) timeouts++;
    else nbd_aio_notify_read (h);
  }
  CHECK (timeouts == 0, "a POLLIN-only loop stalled with %d in flight", nbd_aio_in_flight (h));
  while (nbd_aio_peek_command_completed (h) > 0)
    done += nbd_aio_command_completed (h, nbd_aio_peek_command_completed (h)) == 1;
  CHECK (done == 64, "%d of 64 commands completed", done);
  nbd_close (h);
}

/* Nothing is left behind by a closed handle: no file descriptor, no
 * child (connect_command, socket activation), after a clean shutdown and
 * after the server was killed. */
static void
test_nothing_left_behind (void)
{
  char *activated[] = { "nbdkit", "--exit-with-parent", "memory", "1M", NULL };
  int before = open_fds ();
  for (int round = 0; round < 3; round++) {
    struct nbd_handle *h = connect_with (memory, 0);
    static char buf[512];
    if (round == 1) nbd_shutdown (h, 0);
    if (round == 2) {
      nbd_kill_subprocess (h, SIGKILL);
      nbd_pread (h, buf, sizeof buf, 0, 0);
    }
    nbd_close (h);
  }
  struct nbd_handle *h = nbd_create ();
  CHECK (nbd_connect_systemd_socket_activation (h, activated) == 0, "socket activation");
  nbd_close (h);
  CHECK (open_fds () == before, "file descriptors: %d before, %d after", before, open_fds ());
  CHECK (waitpid (-1, NULL, WNOHANG) == -1 && errno == ECHILD, "every child was reaped");
}

/* set_pread_initialize: a read that fails leaves zeros, not the stale
 * contents of the buffer (on by default); off, the buffer is untouched. */
static void
test_pread_initialize (void)
{
  char *failing[] = { "nbdkit", "-s", "--exit-with-parent", "--filter=error", "memory", "1M",
                      "error-pread=EIO", "error-pread-rate=100%", NULL };
  struct nbd_handle *h = connect_with (failing, 0);
  static char buf[65536];
  size_t i, stale;

  memset (buf, 0xaa, sizeof buf);
  CHECK_ERR (nbd_pread (h, buf, sizeof buf, 0, 0), "nbd_pread", EIO);
  for (i = 0, stale = 0; i < sizeof buf; i++) stale += buf[i] != 0;
  CHECK (stale == 0, "a failed read leaves zeros: %zu stale bytes", stale);
  CHECK (nbd_set_pread_initialize (h, false) == 0, "pread_initialize off");
  memset (buf, 0xaa, sizeof buf);
  CHECK_ERR (nbd_pread (h, buf, sizeof buf, 0, 0), "nbd_pread", EIO);
  for (i = 0, stale = 0; i < sizeof buf; i++) stale += (unsigned char) buf[i] == 0xaa;
  CHECK (stale == sizeof buf, "off: the buffer is left alone: %zu of %zu", stale, sizeof buf);
  nbd_close (h);
}

/* Shutdown with ABANDON_PENDING: requests still queued in the library
 * fail with ENOTCONN, those the server has are answered, none hang. A
 * slow-writing server lets the socket fill so that some stay queued. */
static void
test_shutdown_abandon (void)
{
  /* One server thread, each write half a second: whatever the speed of
   * this process (valgrind, say), most writes are still queued here. */
  char *slow[] = { "nbdkit", "-s", "--exit-with-parent", "-t", "1", "--filter=delay", "memory", "64M",
                   "wdelay=500ms", NULL };
  struct nbd_handle *h = connect_with (slow, 0);
  enum { N = 48, SZ = 1024 * 1024 };
  char *buf = calloc (1, SZ);
  int64_t c[N];
  int i, answered = 0, abandoned = 0, other = 0;

  for (i = 0; i < N; i++)
    c[i] = nbd_aio_pwrite (h, buf, SZ, (uint64_t) i * SZ, NBD_NULL_COMPLETION, 0);
  CHECK (nbd_shutdown (h, LIBNBD_SHUTDOWN_ABANDON_PENDING) == 0, "shutdown abandon");
  CHECK (nbd_aio_in_flight (h) == 0, "nothing in flight: %d", nbd_aio_in_flight (h));
  for (i = 0; i < N; i++) {
    int r = nbd_aio_command_completed (h, c[i]);
    /* nbdkit answers what it has at DISC with ESHUTDOWN. */
    if (r == 1 || (r == -1 && nbd_get_errno () == ESHUTDOWN)) answered++;
    else if (r == -1 && nbd_get_errno () == ENOTCONN) abandoned++;
    else other++;
  }
  CHECK (answered > 0 && abandoned > 0 && other == 0,
         "answered %d, abandoned %d, other %d", answered, abandoned, other);
  CHECK (nbd_aio_is_closed (h) == 1, "closed after shutdown: %s", nbd_connection_state (h));
  CHECK_ERR (nbd_shutdown (h, 0x1), "nbd_shutdown", EINVAL);
  free (buf);
  nbd_close (h);
}

/* Debug messages reach the callback with the calling function as the
 * context, bracketed by "enter:" and "leave: ret=..."; the callback's
 * free runs once when it is replaced. */
struct debug_seen { int enter, leave, frees; };
static int
debug_cb (void *p, const char *context, const char *msg)
{
  struct debug_seen *d = p;
  if (strcmp (context, "nbd_get_size") == 0) {
    if (strncmp (msg, "enter:", 6) == 0) d->enter++;
    if (strcmp (msg, "leave: ret=1048576") == 0) d->leave++;
  }
  return 0;
}
static void debug_free (void *p) { ((struct debug_seen *) p)->frees++; }

static void
test_debug (void)
{
  struct nbd_handle *h = connect_with (memory, 0);
  struct debug_seen d = { 0 };
  nbd_debug_callback cb = { .callback = debug_cb, .user_data = &d, .free = debug_free };
  CHECK (nbd_set_debug_callback (h, cb) == 0, "set_debug_callback");
  CHECK (nbd_set_debug (h, true) == 0 && nbd_get_debug (h) == 1, "set_debug");
  CHECK (nbd_get_size (h) == 1048576, "get_size");
  CHECK (d.enter == 1 && d.leave == 1, "debug enter %d leave %d", d.enter, d.leave);
  CHECK (nbd_set_debug (h, false) == 0, "debug off");
  nbd_get_size (h);
  CHECK (d.enter == 1, "no debug messages when off");
  CHECK (nbd_clear_debug_callback (h) == 0 && d.frees == 1, "debug callback freed once: %d", d.frees);
  nbd_close (h);
  CHECK (d.frees == 1, "not freed again at close");
}

int
main (void)
{
  const char *needs[] = { "nbdkit", NULL };
  servers_init ("capi-test", needs, 300);
  test_states_and_argument_errors ();
  test_commands_and_flags ();
  test_callbacks ();
  test_required_callbacks ();
  test_handshake_variants ();
  test_transports ();
  test_server_death ();
  test_debug ();
  test_shutdown_abandon ();
  test_pread_initialize ();
  test_read_only_loop ();
  test_aio_loop_without_a_connection ();
  test_nothing_left_behind ();
  printf ("capi-test: %d checks, %d failures\n", checks, failures);
  return failures != 0;
}
