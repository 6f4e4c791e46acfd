/* Multi-conn: one handle, several connections to the same export
 * (nbd_rs_set_multi_conn, the URI's multi-conn=N). Runs on nbd-rs only
 * (tests/c-compare.sh's TESTS_OURS). Real servers, started and torn down
 * here:
 *  - the setting's range and states, the URI parameter and nbd_get_uri;
 *  - nbdkit memory with its log filter: 4 connections made (the log),
 *    commands spread over them (data written on one read back on the
 *    others), FLUSH, the one epoll descriptor of an AIO loop, shutdown;
 *  - downgrade to one connection: nbdkit's noparallel filter
 *    (serialize=connections) and qemu-nbd without -e; qemu-nbd -e 4 gives 4;
 *  - a server giving the second connection another size: connect fails
 *    (EPROTO) naming the size;
 *  - transports of one channel refused (EINVAL);
 *  - a connection refused mid-connect (nbdkit's limit filter);
 *  - 64 commands in flight over 4 connections when the server is killed:
 *    every one completes with an error, nothing hangs;
 *  - opt mode (NBD_OPT_GO brings the others), TLS with PSK on every
 *    connection, shutdown with ABANDON_PENDING;
 *  - 8 threads on one handle, every byte read checked.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <libnbd.h>

#include "servers.h"

#ifndef LIBNBD_HAVE_NBD_RS_SET_MULTI_CONN
#error "multiconn-test needs nbd-rs's header"
#endif

static char *
uri_of (const char *sock, int n)
{
  char *u;
  if (asprintf (&u, "nbd+unix:///?socket=%s&multi-conn=%d", sock, n) == -1) fatal ("asprintf");
  return u;
}

/* Lines of FILE that contain every one of the NULL-terminated words. */
static int
count_lines (const char *file, const char *w1, const char *w2)
{
  FILE *fp = fopen (file, "r");
  char line[4096];
  int n = 0;
  if (fp == NULL) return -1;
  while (fgets (line, sizeof line, fp))
    if (strstr (line, w1) && (w2 == NULL || strstr (line, w2))) n++;
  fclose (fp);
  return n;
}

/* How many distinct "connection=N" carry a line with WORD in the log. */
static int
connections_with (const char *file, const char *word)
{
  FILE *fp = fopen (file, "r");
  char line[4096];
  bool seen[64] = { false };
  int n = 0;
  if (fp == NULL) return -1;
  while (fgets (line, sizeof line, fp)) {
    char *c = strstr (line, "connection=");
    if (c == NULL || strstr (line, word) == NULL) continue;
    int id = atoi (c + strlen ("connection="));
    if (id > 0 && id < 64 && !seen[id]) { seen[id] = true; n++; }
  }
  fclose (fp);
  return n;
}

/* A memory disk of SIZE on NAME.sock behind nbdkit's log filter, which
 * writes every connection and command to NAME.log: *sock, *log and the
 * multi-conn=4 *uri are allocated. */
static pid_t
serve_logged (const char *name, const char *size, char **sock, char **log, char **uri)
{
  char *logarg, *sockname;
  if (asprintf (&sockname, "%s.sock", name) == -1 || asprintf (&logarg, "logfile=%s/%s.log", dir, name) == -1)
    fatal ("asprintf");
  char *args[] = { "--filter=log", "memory", (char *) size, logarg, NULL };
  pid_t pid = start_nbdkit_unix (sockname, args);
  *sock = path_in_dir (sockname);
  *log = strdup (logarg + strlen ("logfile="));
  *uri = uri_of (*sock, 4);
  free (sockname); free (logarg);
  return pid;
}

static void
test_api (void)
{
  struct nbd_handle *h = nbd_create ();
  CHECK (nbd_rs_get_multi_conn (h) == 1, "default is one connection");
  CHECK_ERR (nbd_rs_set_multi_conn (h, 0), "nbd_rs_set_multi_conn", EINVAL);
  CHECK (strstr (nbd_get_error (), "1 to 16") != NULL, "the message gives the range");
  CHECK_ERR (nbd_rs_set_multi_conn (h, 17), "nbd_rs_set_multi_conn", EINVAL);
  CHECK (nbd_rs_set_multi_conn (h, 16) == 0 && nbd_rs_get_multi_conn (h) == 16, "16 is allowed");
  CHECK (nbd_rs_set_multi_conn (h, 4) == 0 && nbd_rs_get_multi_conn (h) == 4, "set 4");
  /* A bad URI parameter is refused; libnbd ignores the parameter. */
  CHECK_ERR (nbd_connect_uri (h, "nbd+unix:///?socket=/nonexistent&multi-conn=99"), "nbd_connect_uri", EINVAL);
  nbd_close (h);
}

/* nbdkit memory, 4 connections, commands spread, data read back on
 * other connections, FLUSH, the AIO loop on one epoll descriptor. */
static void
test_memory (void)
{
  char *sock, *log, *uri;
  pid_t pid = serve_logged ("mem", "4M", &sock, &log, &uri);
  struct nbd_handle *h = nbd_create ();
  CHECK (nbd_connect_uri (h, uri) == 0, "connect with multi-conn=4");
  CHECK (nbd_rs_get_multi_conn (h) == 4, "4 connections (got %" PRIi64 ")", nbd_rs_get_multi_conn (h));
  CHECK (nbd_aio_is_ready (h) == 1, "ready when every connection is");
  CHECK (count_lines (log, "Connect export", NULL) == 4, "the server saw 4 connections (%d)",
         count_lines (log, "Connect export", NULL));
  CHECK (nbd_rs_set_multi_conn (h, 2) == -1, "the count is set before connecting");
  char *got = nbd_get_uri (h);
  CHECK (got && strstr (got, "multi-conn=4"), "nbd_get_uri keeps multi-conn=4 (%s)", got ? got : "");
  free (got);

  /* 16 writes of distinct patterns at once: they spread over the links. */
  enum { N = 16, SZ = 65536 };
  static char wbuf[N][SZ], rbuf[N][SZ];
  int64_t cookies[N];
  for (int i = 0; i < N; i++) {
    memset (wbuf[i], 'A' + i, SZ);
    cookies[i] = nbd_aio_pwrite (h, wbuf[i], SZ, (uint64_t) i * SZ, NBD_NULL_COMPLETION, 0);
    CHECK (cookies[i] > 0, "aio_pwrite %d", i);
  }
  CHECK (nbd_aio_in_flight (h) == N, "16 in flight over every link (%d)", nbd_aio_in_flight (h));
  for (int i = 0; i < N; i++) {
    while (nbd_aio_command_completed (h, cookies[i]) == 0)
      if (nbd_poll (h, -1) == -1) { CHECK (0, "poll"); break; }
  }
  CHECK (nbd_flush (h, 0) == 0, "flush");
  /* Read back in the reverse order, so that reads go elsewhere. */
  for (int i = N - 1; i >= 0; i--)
    cookies[i] = nbd_aio_pread (h, rbuf[i], SZ, (uint64_t) i * SZ, NBD_NULL_COMPLETION, 0);

  /* The caller's own loop over one descriptor: an epoll instance that
   * stays the same, which aio_get_direction says to poll for reading. */
  int fd = nbd_aio_get_fd (h);
  char link[64] = "", proc[64];
  snprintf (proc, sizeof proc, "/proc/self/fd/%d", fd);
  ssize_t ln = readlink (proc, link, sizeof link - 1);
  if (ln > 0) link[ln] = 0;
  CHECK (strstr (link, "eventpoll") != NULL, "the handle's fd is an epoll instance (%s)", link);
  int done = 0, loops = 0;
  while (done < N && loops++ < 100000) {
    unsigned dir = nbd_aio_get_direction (h);
    CHECK (dir == LIBNBD_AIO_DIRECTION_READ, "the direction is READ (%u)", dir);
    CHECK (nbd_aio_get_fd (h) == fd, "the fd never changes");
    struct pollfd p = { .fd = fd, .events = POLLIN };
    if (poll (&p, 1, 5000) < 1) { CHECK (0, "poll timed out"); break; }
    CHECK (nbd_aio_notify_read (h) == 0, "notify_read");
    for (int i = 0; i < N; i++)
      if (cookies[i] && nbd_aio_command_completed (h, cookies[i]) == 1) cookies[i] = 0;
    done = 0;
    for (int i = 0; i < N; i++) done += cookies[i] == 0;
  }
  for (int i = 0; i < N; i++)
    CHECK (memcmp (wbuf[i], rbuf[i], SZ) == 0, "block %d read back", i);
  CHECK (connections_with (log, "Write") >= 3, "writes went over several connections (%d)",
         connections_with (log, "Write"));
  CHECK (connections_with (log, "Read") >= 3, "reads went over several connections (%d)",
         connections_with (log, "Read"));
  CHECK (connections_with (log, "Flush") == 1, "one FLUSH on one connection");

  /* Synchronous calls too, then shutdown closes every link. */
  char small[512];
  CHECK (nbd_pread (h, small, sizeof small, 0, 0) == 0 && small[0] == 'A', "pread");
  CHECK (nbd_shutdown (h, 0) == 0, "shutdown");
  CHECK (nbd_aio_is_closed (h) == 1, "closed when every link is");
  for (int i = 0; i < 200 && count_lines (log, "Disconnect", NULL) < 4; i++)
    usleep (10000);
  CHECK (count_lines (log, "Disconnect", NULL) >= 4, "every connection was ended (%d)",
         count_lines (log, "Disconnect", NULL));
  nbd_close (h);

  /* The AIO connect: connecting until every link is ready. */
  h = nbd_create ();
  CHECK (nbd_aio_connect_uri (h, uri) == 0, "aio_connect_uri");
  int fd0 = nbd_aio_get_fd (h);
  while (nbd_aio_is_connecting (h) == 1) {
    CHECK (nbd_aio_get_fd (h) == fd0, "the fd is the same while connecting");
    unsigned dir = nbd_aio_get_direction (h);
    struct pollfd p = { .fd = fd0, .events = dir ? POLLIN : 0 };
    if (poll (&p, 1, 5000) < 1) { CHECK (0, "poll timed out connecting"); break; }
    nbd_aio_notify_read (h);
  }
  CHECK (nbd_aio_is_ready (h) == 1 && nbd_rs_get_multi_conn (h) == 4, "aio connect made 4");
  nbd_close (h);
  free (uri); free (sock); free (log);
  (void) pid;
}

/* A server that does not advertise CAN_MULTI_CONN: one connection. */
static void
expect_downgrade (const char *what, const char *sock)
{
  char *uri = uri_of (sock, 4);
  struct nbd_handle *h = nbd_create ();
  CHECK (nbd_connect_uri (h, uri) == 0, "%s: connect", what);
  CHECK (nbd_rs_get_multi_conn (h) == 1, "%s: downgraded to one connection (%" PRIi64 ")", what,
         nbd_rs_get_multi_conn (h));
  CHECK (nbd_can_multi_conn (h) == 0, "%s: the server does not allow several", what);
  char buf[512];
  CHECK (nbd_pread (h, buf, sizeof buf, 0, 0) == 0, "%s: pread", what);
  CHECK (nbd_aio_get_fd (h) >= 0, "%s: get_fd", what);
  nbd_close (h);
  free (uri);
}

static pid_t
start_qemu_nbd (const char *sock, const char *img, const char *shared)
{
  char *argv[] = { "qemu-nbd", "-f", "raw", "-t", "-k", (char *) sock, "-e", (char *) shared, (char *) img, NULL };
  pid_t pid = spawn (argv, -1, -1);
  wait_ready ("qemu-nbd", pid, NULL, sock, 0, false);
  return pid;
}

static void
test_downgrade (void)
{
  char *sock = path_in_dir ("np.sock");
  char *args[] = { "--filter=noparallel", "memory", "1M", "serialize=connections", NULL };
  pid_t pid = start_nbdkit_unix ("np.sock", args);
  expect_downgrade ("nbdkit noparallel", sock);
  stop_pid (pid, 1); forget_child (pid);
  free (sock);

  char *img = path_in_dir ("disk.img");
  FILE *fp = fopen (img, "w");
  if (fp == NULL || ftruncate (fileno (fp), 1 << 20) == -1) fatal ("disk.img: %m");
  fclose (fp);
  sock = path_in_dir ("q1.sock");
  pid = start_qemu_nbd (sock, img, "1");
  expect_downgrade ("qemu-nbd", sock);
  stop_pid (pid, 1); forget_child (pid);
  free (sock);

  sock = path_in_dir ("q4.sock");
  pid = start_qemu_nbd (sock, img, "4");
  char *uri = uri_of (sock, 4);
  struct nbd_handle *h = nbd_create ();
  CHECK (nbd_connect_uri (h, uri) == 0, "qemu-nbd -e 4: connect");
  CHECK (nbd_rs_get_multi_conn (h) == 4, "qemu-nbd -e 4: 4 connections");
  char buf[4096];
  memset (buf, 7, sizeof buf);
  CHECK (nbd_pwrite (h, buf, sizeof buf, 8192, 0) == 0 && nbd_flush (h, 0) == 0, "qemu-nbd: write, flush");
  memset (buf, 0, sizeof buf);
  CHECK (nbd_pread (h, buf, sizeof buf, 8192, 0) == 0 && buf[4095] == 7, "qemu-nbd: read back");
  CHECK (nbd_shutdown (h, 0) == 0, "qemu-nbd: shutdown");
  nbd_close (h);
  stop_pid (pid, 1); forget_child (pid);
  free (uri); free (sock); free (img);
}

/* The second connection sees another size. */
static void
test_mismatch (void)
{
  char *sock = path_in_dir ("mm.sock"), *count = path_in_dir ("count"), *args[5];
  size_changing_server (count, args);
  pid_t pid = start_nbdkit_unix ("mm.sock", args);
  char *uri = uri_of (sock, 2);
  struct nbd_handle *h = nbd_create ();
  CHECK_ERR (nbd_connect_uri (h, uri), "nbd_connect_uri", EPROTO);
  CHECK (strstr (nbd_get_error (), "size 2097152") != NULL, "the message names the size");
  CHECK (nbd_aio_is_dead (h) == 1, "the handle is dead");
  nbd_close (h);
  stop_pid (pid, 1); forget_child (pid);
  free (uri); free (sock); free (count); free (args[1]); free (args[2]);
}

static void
test_one_channel (void)
{
  struct nbd_handle *h = nbd_create ();
  nbd_rs_set_multi_conn (h, 2);
  char *argv[] = { "nbdkit", "-s", "memory", "1M", NULL };
  CHECK_ERR (nbd_connect_command (h, argv), "nbd_connect_command", EINVAL);
  CHECK (strstr (nbd_get_error (), "multi-conn") != NULL, "the message says why");
  CHECK_ERR (nbd_connect_systemd_socket_activation (h, argv), "nbd_connect_systemd_socket_activation", EINVAL);
  int sv[2];
  if (socketpair (AF_UNIX, SOCK_STREAM, 0, sv) == -1) fatal ("socketpair");
  CHECK_ERR (nbd_connect_socket (h, sv[0]), "nbd_connect_socket", EINVAL);
  CHECK (nbd_aio_is_created (h) == 1, "the handle can still connect");
  close (sv[0]); close (sv[1]);
  nbd_close (h);
}

/* The server takes one client only: the others are dropped mid-connect. */
static void
test_refused (void)
{
  char *sock = path_in_dir ("lim.sock");
  char *args[] = { "--filter=limit", "memory", "1M", "limit=1", NULL };
  pid_t pid = start_nbdkit_unix ("lim.sock", args);
  char *uri = uri_of (sock, 4);
  struct nbd_handle *h = nbd_create ();
  CHECK (nbd_connect_uri (h, uri) == -1, "a connection dropped mid-connect fails the connect");
  CHECK (strstr (nbd_get_error (), "handshake") != NULL, "the message says where it failed");
  CHECK (nbd_aio_is_dead (h) == 1, "the handle is dead");
  nbd_close (h);
  stop_pid (pid, 1); forget_child (pid);
  free (uri); free (sock);
}

static atomic_int completions;

static int
count_done (void *p, int *error)
{
  int *err = p;
  *err = *error;
  atomic_fetch_add (&completions, 1);
  return 0;
}

/* 64 reads in flight over 4 links; the server is killed. */
static void
test_killed (void)
{
  char *sock = path_in_dir ("kill.sock");
  char *args[] = { "--filter=delay", "memory", "4M", "rdelay=2", NULL };
  pid_t pid = start_nbdkit_unix ("kill.sock", args);
  char *uri = uri_of (sock, 4);
  struct nbd_handle *h = nbd_create ();
  CHECK (nbd_connect_uri (h, uri) == 0 && nbd_rs_get_multi_conn (h) == 4, "connect 4");
  enum { N = 64 };
  static char bufs[N][4096];
  int errs[N];
  int64_t cookies[N];
  for (int i = 0; i < N; i++) {
    errs[i] = -1;
    cookies[i] = nbd_aio_pread (h, bufs[i], 4096, (uint64_t) i * 4096,
                                (nbd_completion_callback) { .callback = count_done, .user_data = &errs[i] }, 0);
  }
  CHECK (nbd_aio_in_flight (h) == N, "64 in flight");
  /* Send them all, then kill. */
  for (int i = 0; i < 20 && nbd_aio_get_direction (h) & LIBNBD_AIO_DIRECTION_WRITE; i++)
    nbd_poll (h, 100);
  nbd_poll (h, 200);
  kill (pid, SIGKILL);
  waitpid (pid, NULL, 0); forget_child (pid);
  for (int i = 0; i < 1000 && atomic_load (&completions) < N; i++)
    if (nbd_poll (h, 1000) == -1) break;
  CHECK (atomic_load (&completions) == N, "every command completed (%d)", atomic_load (&completions));
  int bad = 0;
  for (int i = 0; i < N; i++) bad += errs[i] == 0 || errs[i] == -1;
  CHECK (bad == 0, "every command failed with an errno (%d did not)", bad);
  CHECK (nbd_aio_is_dead (h) == 1 || nbd_aio_is_closed (h) == 1, "the handle is over");
  CHECK (nbd_aio_in_flight (h) == 0, "nothing in flight");
  for (int i = 0; i < N; i++)
    CHECK (nbd_aio_command_completed (h, cookies[i]) == -1, "command %d retired with its error", i);
  nbd_close (h);
  free (uri); free (sock);
}

/* nbd_connect_tcp with the count set by the function. */
static void
test_tcp (void)
{
  int port = free_port (AF_INET);
  char portstr[16];
  char *args[] = { "memory", "1M", NULL };
  pid_t pid = start_nbdkit_port (port, args);
  snprintf (portstr, sizeof portstr, "%d", port);
  struct nbd_handle *h = nbd_create ();
  CHECK (nbd_rs_set_multi_conn (h, 3) == 0, "set 3");
  CHECK (nbd_connect_tcp (h, "127.0.0.1", portstr) == 0, "TCP: connect");
  CHECK (nbd_rs_get_multi_conn (h) == 3, "TCP: 3 connections");
  char buf[512] = "tcp";
  CHECK (nbd_pwrite (h, buf, sizeof buf, 0, LIBNBD_CMD_FLAG_FUA) == 0, "TCP: write with FUA");
  CHECK (nbd_pread (h, buf, sizeof buf, 0, 0) == 0 && strcmp (buf, "tcp") == 0, "TCP: read back");
  nbd_close (h);
  stop_pid (pid, 1); forget_child (pid);
}

/* Opt mode: the first connection negotiates; NBD_OPT_GO brings the others. */
static void
test_opt_mode (void)
{
  char *sock, *log, *uri;
  pid_t pid = serve_logged ("opt", "1M", &sock, &log, &uri);
  struct nbd_handle *h = nbd_create ();
  nbd_set_opt_mode (h, true);
  nbd_add_meta_context (h, LIBNBD_CONTEXT_BASE_ALLOCATION);
  CHECK (nbd_connect_uri (h, uri) == 0 && nbd_aio_is_negotiating (h) == 1, "opt mode: negotiating");
  CHECK (nbd_rs_get_multi_conn (h) == 4, "opt mode: 4 wanted while negotiating");
  CHECK (nbd_opt_info (h) == 0, "opt mode: opt_info on the first connection");
  CHECK (nbd_opt_go (h) == 0 && nbd_aio_is_ready (h) == 1, "opt_go: ready when all are");
  CHECK (nbd_rs_get_multi_conn (h) == 4, "opt mode: 4 connections after opt_go");
  CHECK (count_lines (log, " Connect ", NULL) >= 4, "opt mode: the server saw the connections (%d)",
         count_lines (log, " Connect ", NULL));
  CHECK (nbd_can_meta_context (h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1, "the meta context carried over");
  CHECK (nbd_shutdown (h, 0) == 0 && nbd_aio_is_closed (h) == 1, "opt mode: shutdown");
  nbd_close (h);
  stop_pid (pid, 1); forget_child (pid);
  free (uri); free (sock); free (log);
}

static int
count_extents (void *p, const char *ctx, uint64_t off, nbd_extent *e, size_t n, int *error)
{
  (void) ctx; (void) off; (void) e; (void) error;
  atomic_fetch_add ((atomic_int *) p, (int) n > 0);
  return 0;
}

/* TLS (PSK) on every connection; block status over every link (the
 * context ids are each connection's own). */
static void
test_tls (void)
{
  char *sock = path_in_dir ("tls.sock"), *psk = path_in_dir ("keys.psk"), *pskarg, *uri;
  FILE *fp = fopen (psk, "w");
  if (fp == NULL) fatal ("%s: %m", psk);
  fprintf (fp, "alice:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\n");
  fclose (fp);
  if (asprintf (&pskarg, "--tls-psk=%s", psk) == -1 ||
      asprintf (&uri, "nbds+unix://alice@/?socket=%s&tls-psk-file=%s&multi-conn=4", sock, psk) == -1)
    fatal ("asprintf");
  char *args[] = { "--tls=require", pskarg, "memory", "1M", NULL };
  pid_t pid = start_nbdkit_unix ("tls.sock", args);
  struct nbd_handle *h = nbd_create ();
  nbd_set_uri_allow_local_file (h, true);
  nbd_add_meta_context (h, LIBNBD_CONTEXT_BASE_ALLOCATION);
  CHECK (nbd_connect_uri (h, uri) == 0, "TLS: connect");
  CHECK (nbd_rs_get_multi_conn (h) == 4 && nbd_get_tls_negotiated (h) == 1, "TLS: 4 connections");
  char buf[4096];
  memset (buf, 9, sizeof buf);
  CHECK (nbd_pwrite (h, buf, sizeof buf, 4096, 0) == 0, "TLS: write");
  atomic_int seen = 0;
  int64_t c[8];
  for (int i = 0; i < 8; i++)
    c[i] = nbd_aio_block_status_64 (h, 65536, 0,
                                    (nbd_extent64_callback) { .callback = count_extents, .user_data = &seen },
                                    NBD_NULL_COMPLETION, 0);
  for (int i = 0; i < 8; i++)
    while (c[i] > 0 && nbd_aio_command_completed (h, c[i]) == 0)
      if (nbd_poll (h, -1) == -1) break;
  CHECK (atomic_load (&seen) == 8, "TLS: block status on every link (%d)", atomic_load (&seen));
  memset (buf, 0, sizeof buf);
  CHECK (nbd_pread (h, buf, sizeof buf, 4096, 0) == 0 && buf[100] == 9, "TLS: read back");
  CHECK (nbd_shutdown (h, 0) == 0, "TLS: shutdown");
  nbd_close (h);
  stop_pid (pid, 1); forget_child (pid);
  free (uri); free (sock); free (psk); free (pskarg);
}

/* shutdown with ABANDON_PENDING: every command completes once. */
static void
test_abandon (void)
{
  char *sock = path_in_dir ("ab.sock");
  char *args[] = { "--filter=delay", "memory", "4M", "rdelay=20ms", NULL };
  pid_t pid = start_nbdkit_unix ("ab.sock", args);
  char *uri = uri_of (sock, 4);
  struct nbd_handle *h = nbd_create ();
  CHECK (nbd_connect_uri (h, uri) == 0, "abandon: connect");
  enum { N = 64 };
  static char bufs[N][4096];
  int errs[N];
  atomic_store (&completions, 0);
  for (int i = 0; i < N; i++) {
    errs[i] = -1;
    nbd_aio_pread (h, bufs[i], 4096, (uint64_t) i * 4096,
                   (nbd_completion_callback) { .callback = count_done, .user_data = &errs[i] }, 0);
  }
  CHECK (nbd_shutdown (h, LIBNBD_SHUTDOWN_ABANDON_PENDING) == 0, "shutdown with ABANDON_PENDING");
  CHECK (atomic_load (&completions) == N, "every command completed (%d)", atomic_load (&completions));
  int abandoned = 0;
  for (int i = 0; i < N; i++) abandoned += errs[i] == ENOTCONN;
  CHECK (nbd_aio_is_closed (h) == 1, "abandon: closed");
  CHECK (nbd_aio_in_flight (h) == 0, "abandon: nothing in flight");
  printf ("shutdown with ABANDON_PENDING: %d of %d abandoned unsent\n", abandoned, N);
  nbd_close (h);
  stop_pid (pid, 1); forget_child (pid);
  free (uri); free (sock);
}

enum { THREADS = 8, TBLOCK = 4096, TBLOCKS = 64 };
struct worker { struct nbd_handle *h; int id; int ops; int bad; int errors; };

static void *
worker (void *p)
{
  struct worker *w = p;
  char wb[TBLOCK], rb[TBLOCK];
  unsigned seed = w->id;
  for (int iter = 0; iter < w->ops; iter++) {
    int blk = rand_r (&seed) % TBLOCKS;
    uint64_t off = ((uint64_t) w->id * TBLOCKS + blk) * TBLOCK;
    memset (wb, (w->id * 31 + iter) & 0xff, TBLOCK);
    snprintf (wb, 32, "t%d i%d b%d", w->id, iter, blk);
    if (nbd_pwrite (w->h, wb, TBLOCK, off, 0) == -1) { w->errors++; continue; }
    if (nbd_pread (w->h, rb, TBLOCK, off, 0) == -1) { w->errors++; continue; }
    if (memcmp (wb, rb, TBLOCK) != 0) w->bad++;
  }
  return NULL;
}

static void
test_threads (void)
{
  char *sock = path_in_dir ("thr.sock");
  char *args[] = { "memory", "8M", NULL };
  pid_t pid = start_nbdkit_unix ("thr.sock", args);
  char *uri = uri_of (sock, 4);
  struct nbd_handle *h = nbd_create ();
  CHECK (nbd_connect_uri (h, uri) == 0, "connect for threads");
  const char *o = getenv ("MULTICONN_OPS");
  int ops = o && atoi (o) > 0 ? atoi (o) : 200;
  pthread_t t[THREADS];
  struct worker w[THREADS];
  for (int i = 0; i < THREADS; i++) {
    w[i] = (struct worker) { .h = h, .id = i, .ops = ops };
    pthread_create (&t[i], NULL, worker, &w[i]);
  }
  for (int i = 0; i < THREADS; i++) {
    pthread_join (t[i], NULL);
    CHECK (w[i].bad == 0 && w[i].errors == 0, "thread %d: %d bad, %d errors", i, w[i].bad, w[i].errors);
  }
  CHECK (nbd_rs_get_multi_conn (h) == 4, "the threads shared 4 connections");
  printf ("8 threads on one handle of 4 connections: %d verified writes and reads each\n", ops);
  CHECK (nbd_shutdown (h, 0) == 0, "shutdown after threads");
  nbd_close (h);
  stop_pid (pid, 1); forget_child (pid);
  free (uri); free (sock);
}

int
main (void)
{
  const char *needs[] = { "nbdkit", "qemu-nbd", NULL };
  servers_init ("multiconn-test", needs, 120);
  const char *only = getenv ("MULTICONN_ONLY");
  if (!only || strstr (only, "api")) test_api ();
  if (!only || strstr (only, "memory")) test_memory ();
  if (!only || strstr (only, "downgrade")) test_downgrade ();
  if (!only || strstr (only, "mismatch")) test_mismatch ();
  if (!only || strstr (only, "one_channel")) test_one_channel ();
  if (!only || strstr (only, "refused")) test_refused ();
  if (!only || strstr (only, "killed")) test_killed ();
  if (!only || strstr (only, "opt_mode")) test_opt_mode ();
  if (!only || strstr (only, "tcp")) test_tcp ();
  if (!only || strstr (only, "tls")) test_tls ();
  if (!only || strstr (only, "abandon")) test_abandon ();
  if (!only || strstr (only, "threads")) test_threads ();
  printf ("multiconn-test: %d checks, %d failures\n", checks, failures);
  return failures != 0;
}
