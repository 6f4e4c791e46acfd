/* Reconnecting after a server restart (nbd_rs_set_reconnect_delay, the
 * URI's reconnect-delay=S). Runs on nbd-rs only (tests/c-compare.sh's
 * TESTS_OURS). Real servers, killed (SIGKILL, as a crash) and started
 * again on the same socket here:
 *  - the settings, their states, the URI parameters and nbd_get_uri;
 *  - nbdkit on a file: 64 commands in flight at the kill (a delay filter
 *    holds them) all complete after the restart; the data reads back;
 *    the descriptor of aio_get_fd stays the same; the count says 1;
 *  - qemu-nbd on a qcow2 file: a synchronous write made while the server
 *    is down completes when it is back;
 *  - a server that comes back with another size, read-only, or other
 *    block sizes: every held command fails (ESTALE) naming the change,
 *    and the handle is dead;
 *  - a server that never comes back: commands fail (ENOTCONN) once the
 *    delay has passed, new ones at once, nothing hangs;
 *  - the settings off: a kill fails the commands at once, as before;
 *  - transports that cannot be dialed again are refused (EINVAL);
 *  - TLS with PSK and with X.509, every reconnect a new TLS session;
 *  - 20 reconnects leave no descriptor behind.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>
#include <libnbd.h>

#include "servers.h"

#ifndef LIBNBD_HAVE_NBD_RS_SET_RECONNECT_DELAY
#error "reconnect-test needs nbd-rs's header"
#endif

static double
now_s (void)
{
  struct timespec ts;
  clock_gettime (CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* A server this test kills and starts again on the same socket. */
struct server {
  char sock[200], pidfile[256];
  char *args[16];
  pid_t pid;
};

/* The server's socket NAME.sock in the private directory, and its pidfile. */
static void
server_paths (struct server *s, const char *name)
{
  snprintf (s->sock, sizeof s->sock, "%s/%s.sock", dir, name);
  snprintf (s->pidfile, sizeof s->pidfile, "%s.pid", s->sock);
}

static void
server_start (struct server *s)
{
  unlink (s->sock);
  unlink (s->pidfile);
  if (strcmp (s->args[0], "qemu-nbd") == 0) {
    s->pid = spawn (s->args, -1, -1);
    wait_ready ("qemu-nbd", s->pid, NULL, s->sock, 0, false);
  } else {
    s->pid = start_nbdkit_listening (s->sock, 0, s->args);
  }
}

/* Kills the server as a crash would. */
static void
server_kill (struct server *s)
{
  kill (s->pid, SIGKILL);
  waitpid (s->pid, NULL, 0);
  forget_child (s->pid);
  s->pid = 0;
}

/* nbdkit with ARGS (NULL-terminated) on NAME.sock, started. */
static void
nbdkit_server (struct server *s, const char *name, char **args)
{
  server_paths (s, name);
  int n = 0;
  while (args[n] && n < 15) { s->args[n] = args[n]; n++; }
  s->args[n] = NULL;
  server_start (s);
}

static char *
uri_for (const char *sock, int delay)
{
  char *u;
  if (asprintf (&u, "nbd+unix:///?socket=%s&reconnect-delay=%d", sock, delay) == -1) fatal ("asprintf");
  return u;
}

/* Starts the server again AFTER microseconds later, from a thread that
 * lives until `done`: the server dies with the thread that forked it
 * (PR_SET_PDEATHSIG follows the thread, not the process). */
struct restart { struct server *s; useconds_t after; atomic_bool done; };

static void *
restart_later (void *arg)
{
  struct restart *r = arg;
  usleep (r->after);
  server_start (r->s);
  while (!atomic_load (&r->done)) usleep (10000);
  return NULL;
}

/* Debug messages about reconnecting: every loss, attempt, reconnect and
 * identity check is logged. The counts of messages containing each word. */
static struct { const char *word; int n; } logged[] = {
  { "lost (", 0 }, { "reconnecting, attempt", 0 }, { "failed", 0 },
  { "reconnected at attempt", 0 }, { "the export changed", 0 },
};

static int
log_reconnects (void *user_data, const char *context, const char *msg)
{
  (void) user_data; (void) context;
  if (strstr (msg, "connection ") == NULL && strstr (msg, "connect attempt") == NULL) return 0;
  for (size_t i = 0; i < sizeof logged / sizeof logged[0]; i++)
    if (strstr (msg, logged[i].word)) logged[i].n++;
  return 0;
}

static void
watch_debug (struct nbd_handle *h)
{
  for (size_t i = 0; i < sizeof logged / sizeof logged[0]; i++) logged[i].n = 0;
  nbd_set_debug_callback (h, (nbd_debug_callback) { .callback = log_reconnects });
  nbd_set_debug (h, true);
}

/* Polls H until every command in COOKIES (N) completed or 20 s passed,
 * starting RESTART again after 1 s if it is not NULL, and checking that
 * the handle's descriptor stays FD. Returns how many succeeded; *FAILED
 * says how many failed. */
static int
await_all (struct nbd_handle *h, int64_t *cookies, int n, struct server *restart, int fd, int *failed)
{
  double t0 = now_s ();
  int ok = 0, left = n;
  *failed = 0;
  while (left > 0 && now_s () - t0 < 20) {
    if (restart && now_s () - t0 > 1) { server_start (restart); restart = NULL; }
    CHECK (nbd_aio_get_fd (h) == fd, "the descriptor stays the same");
    if (nbd_poll (h, 100) == -1) { CHECK (0, "poll"); break; }
    for (int i = 0; i < n; i++) {
      if (cookies[i] == 0) continue;
      int r = nbd_aio_command_completed (h, cookies[i]);
      if (r == 0) continue;
      if (r == 1) ok++; else (*failed)++;
      cookies[i] = 0;
      left--;
    }
  }
  return ok;
}

static void
test_api (void)
{
  struct nbd_handle *h = nbd_create ();
  CHECK (nbd_rs_get_reconnect_delay (h) == 0, "reconnecting is off by default");
  CHECK (nbd_rs_get_open_timeout (h) == 0, "no open timeout by default");
  CHECK (nbd_rs_get_reconnect_count (h) == 0, "no reconnects yet");
  CHECK (nbd_rs_set_reconnect_delay (h, 30) == 0 && nbd_rs_get_reconnect_delay (h) == 30, "set 30");
  CHECK (nbd_rs_set_open_timeout (h, 5) == 0 && nbd_rs_get_open_timeout (h) == 5, "set 5");
  CHECK_ERR (nbd_connect_uri (h, "nbd+unix:///?socket=/nonexistent&reconnect-delay=soon"), "nbd_connect_uri", EINVAL);
  CHECK (strstr (nbd_get_error (), "reconnect-delay") != NULL, "the message names the parameter");
  nbd_close (h);

  /* The URI sets them; nbd_get_uri gives them back; set before connecting. */
  static char *nbdkit_args[] = { "memory", "1M", NULL };
  struct server s;
  nbdkit_server (&s, "api", nbdkit_args);
  char *uri;
  if (asprintf (&uri, "nbd+unix:///?socket=%s&reconnect-delay=7&open-timeout=3", s.sock) == -1) fatal ("asprintf");
  h = nbd_create ();
  CHECK (nbd_connect_uri (h, uri) == 0, "connect with reconnect-delay=7");
  CHECK (nbd_rs_get_reconnect_delay (h) == 7, "the URI set the delay");
  CHECK (nbd_rs_get_open_timeout (h) == 3, "the URI set the open timeout");
  char *got = nbd_get_uri (h);
  CHECK (got && strstr (got, "reconnect-delay=7") && strstr (got, "open-timeout=3"),
         "nbd_get_uri keeps both (%s)", got ? got : "");
  free (got);
  CHECK (nbd_rs_set_reconnect_delay (h, 1) == -1 && nbd_get_errno () == EINVAL, "the delay is set before connecting");
  nbd_close (h);
  free (uri);
  server_kill (&s);
}

/* nbdkit on a file; 64 commands held by a delay filter when it is killed. */
static void
test_in_flight (void)
{
  char *img = path_in_dir ("disk.img"), *fileimg;
  int fd = open (img, O_RDWR | O_CREAT, 0600);
  if (fd == -1 || ftruncate (fd, 16 << 20) == -1) fatal ("%s: %m", img);
  close (fd);
  if (asprintf (&fileimg, "file=%s", img) == -1) fatal ("asprintf");
  char *args[] = { "--filter=delay", "file", fileimg, "wdelay=2", "rdelay=2", NULL };
  struct server s;
  nbdkit_server (&s, "file", args);
  char *uri = uri_for (s.sock, 30);
  struct nbd_handle *h = nbd_create ();
  watch_debug (h);
  CHECK (nbd_connect_uri (h, uri) == 0, "connect with reconnect-delay=30");
  int fd0 = nbd_aio_get_fd (h);
  CHECK (fd0 >= 0, "aio_get_fd");

  enum { N = 64, SZ = 4096 };
  static char wbuf[N][SZ], rbuf[N][SZ];
  int64_t cookies[N];
  for (int i = 0; i < N; i++) {
    memset (wbuf[i], 'a' + i % 26, SZ);
    /* Writes, each followed later by a read of the same block. */
    if (i < N / 2)
      cookies[i] = nbd_aio_pwrite (h, wbuf[i], SZ, (uint64_t) i * SZ, NBD_NULL_COMPLETION, 0);
    else
      cookies[i] = nbd_aio_pread (h, rbuf[i], SZ, (uint64_t) (i - N / 2) * SZ, NBD_NULL_COMPLETION, 0);
    CHECK (cookies[i] > 0, "aio command %d", i);
  }
  /* Let them reach the server, which holds each for 2 s. */
  for (int k = 0; k < 10; k++) nbd_poll (h, 10);
  CHECK (nbd_aio_in_flight (h) == N, "64 in flight at the kill (%d)", nbd_aio_in_flight (h));
  server_kill (&s);
  /* The server is back (without the delay) 1 s later. */
  s.args[0] = "file"; s.args[1] = fileimg; s.args[2] = NULL;
  int failed, ok = await_all (h, cookies, N, &s, fd0, &failed);
  CHECK (ok == N && failed == 0, "every command completes after the restart (%d ok, %d failed)", ok, failed);
  CHECK (nbd_aio_in_flight (h) == 0, "nothing left in flight");
  CHECK (nbd_rs_get_reconnect_count (h) == 1, "one reconnect (%" PRIi64 ")", nbd_rs_get_reconnect_count (h));
  CHECK (nbd_aio_is_ready (h) == 1, "ready again");
  CHECK (logged[0].n == 1, "the loss is logged once (%d)", logged[0].n);
  CHECK (logged[1].n >= 1 && logged[1].n == logged[2].n + 1,
         "every attempt is logged, and every failed one (%d attempts, %d failed)", logged[1].n, logged[2].n);
  CHECK (logged[3].n == 1, "the reconnect and its identity check are logged (%d)", logged[3].n);
  for (int i = 0; i < N / 2; i++) {
    char back[SZ];
    CHECK (nbd_pread (h, back, SZ, (uint64_t) i * SZ, 0) == 0 && memcmp (back, wbuf[i], SZ) == 0,
           "block %d reads back", i);
  }
  nbd_shutdown (h, 0);
  nbd_close (h);
  server_kill (&s);
  free (uri); free (fileimg); free (img);
}

/* qemu-nbd on qcow2: a synchronous write while it is down. */
static void
test_qemu (void)
{
  char *img = path_in_dir ("disk.qcow2");
  char *mk[] = { "qemu-img", "create", "-q", "-f", "qcow2", img, "16M", NULL };
  run (mk);
  struct server s;
  server_paths (&s, "qemu");
  char *args[] = { "qemu-nbd", "-f", "qcow2", "-t", "-k", s.sock, img, NULL };
  memcpy (s.args, args, sizeof args);
  server_start (&s);
  char *uri = uri_for (s.sock, 30);
  struct nbd_handle *h = nbd_create ();
  CHECK (nbd_connect_uri (h, uri) == 0, "qemu-nbd: connect");
  char a[65536], b[65536];
  memset (a, 'q', sizeof a);
  CHECK (nbd_pwrite (h, a, sizeof a, 1 << 20, 0) == 0 && nbd_flush (h, 0) == 0, "qemu-nbd: write, flush");
  server_kill (&s);
  pthread_t t;
  struct restart r = { &s, 1500000 };
  pthread_create (&t, NULL, restart_later, &r);
  memset (a, 'r', sizeof a);
  double t0 = now_s ();
  CHECK (nbd_pwrite (h, a, sizeof a, 2 << 20, 0) == 0, "qemu-nbd: the write made while it is down completes");
  CHECK (now_s () - t0 > 1, "... after the server came back");
  CHECK (nbd_pread (h, b, sizeof b, 2 << 20, 0) == 0 && memcmp (a, b, sizeof a) == 0, "qemu-nbd: it reads back");
  memset (a, 'q', sizeof a);
  CHECK (nbd_pread (h, b, sizeof b, 1 << 20, 0) == 0 && memcmp (a, b, sizeof a) == 0,
         "qemu-nbd: the write flushed before the kill reads back");
  CHECK (nbd_rs_get_reconnect_count (h) == 1, "qemu-nbd: one reconnect");

  /* 64 writes in flight when it is killed: sent again, all complete. */
  enum { N = 64, SZ = 4096 };
  static char wbuf[N][SZ];
  int64_t cookies[N];
  for (int i = 0; i < N; i++) {
    memset (wbuf[i], '0' + i % 64, SZ);
    cookies[i] = nbd_aio_pwrite (h, wbuf[i], SZ, (uint64_t) (4 << 20) + i * SZ, NBD_NULL_COMPLETION, 0);
  }
  CHECK (nbd_aio_in_flight (h) == N, "qemu-nbd: 64 in flight at the kill");
  server_kill (&s);
  int failed, ok = await_all (h, cookies, N, &s, nbd_aio_get_fd (h), &failed);
  CHECK (ok == N, "qemu-nbd: the 64 writes complete after the restart (%d ok, %d failed)", ok, failed);
  for (int i = 0; i < N; i++) {
    char back[SZ];
    if (nbd_pread (h, back, SZ, (uint64_t) (4 << 20) + i * SZ, 0) != 0 || memcmp (back, wbuf[i], SZ) != 0) {
      CHECK (0, "qemu-nbd: write %d reads back", i);
      break;
    }
  }
  CHECK (nbd_rs_get_reconnect_count (h) == 2, "qemu-nbd: two reconnects");
  nbd_shutdown (h, 0);
  nbd_close (h);
  server_kill (&s);
  atomic_store (&r.done, true);
  pthread_join (t, NULL);
  free (uri); free (img);
}

/* The server comes back as another export: held commands fail, naming it. */
static void
test_identity (void)
{
  static const struct { const char *what; const char *after[6]; } cases[] = {
    { "size 2097152, not 1048576", { "memory", "2M", NULL } },
    { "transmission flags", { "-r", "memory", "1M", NULL } },
    { "block sizes 4096/", { "--filter=blocksize-policy", "memory", "1M", "blocksize-minimum=4096", NULL } },
  };
  for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
    char *before[] = { "memory", "1M", NULL }, name[32];
    struct server s;
    snprintf (name, sizeof name, "id%zu", c);
    nbdkit_server (&s, name, before);
    char *uri = uri_for (s.sock, 30);
    struct nbd_handle *h = nbd_create ();
    watch_debug (h);
    CHECK (nbd_connect_uri (h, uri) == 0, "identity: connect");
    server_kill (&s);
    int n = 0;
    while (cases[c].after[n]) { s.args[n] = (char *) cases[c].after[n]; n++; }
    s.args[n] = NULL;
    server_start (&s);
    char buf[512] = { 0 };
    int r = nbd_pwrite (h, buf, sizeof buf, 0, 0);
    CHECK_ERR (r, "nbd_pwrite", ESTALE);
    CHECK (strstr (nbd_get_error (), cases[c].what) != NULL, "identity: the message names %s", cases[c].what);
    CHECK (nbd_aio_is_dead (h) == 1, "identity: the handle is dead");
    CHECK (logged[4].n == 1, "identity: the failed check is logged (%d)", logged[4].n);
    CHECK (nbd_rs_get_reconnect_count (h) == 0, "identity: no reconnect counted");
    nbd_close (h);
    server_kill (&s);
    free (uri);
  }
}

/* A server that never comes back, and the settings off. */
static void
test_give_up (void)
{
  char *args[] = { "memory", "1M", NULL };
  struct server s;
  nbdkit_server (&s, "gone", args);
  char *uri = uri_for (s.sock, 2);
  struct nbd_handle *h = nbd_create ();
  CHECK (nbd_connect_uri (h, uri) == 0, "give up: connect");
  server_kill (&s);
  char buf[512];
  double t0 = now_s ();
  CHECK_ERR (nbd_pread (h, buf, sizeof buf, 0, 0), "nbd_pread", ENOTCONN);
  double took = now_s () - t0;
  CHECK (took > 1.5 && took < 5, "the read failed when the 2 s delay passed (%.2f s)", took);
  t0 = now_s ();
  CHECK_ERR (nbd_pread (h, buf, sizeof buf, 0, 0), "nbd_pread", ENOTCONN);
  CHECK (now_s () - t0 < 0.5, "a new command fails at once (%.2f s)", now_s () - t0);
  CHECK (nbd_aio_is_dead (h) == 0, "the handle is not dead: attempts go on");
  CHECK (nbd_aio_get_direction (h) == LIBNBD_AIO_DIRECTION_READ, "it waits on its descriptor");
  nbd_close (h);
  free (uri);

  /* A shutdown while the server is away closes the handle at once; the
   * command it held fails. */
  server_start (&s);
  uri = uri_for (s.sock, 30);
  h = nbd_create ();
  CHECK (nbd_connect_uri (h, uri) == 0, "shutdown while lost: connect");
  server_kill (&s);
  int64_t c = nbd_aio_pread (h, buf, sizeof buf, 0, NBD_NULL_COMPLETION, 0);
  CHECK (c > 0, "shutdown while lost: a read is held");
  for (int k = 0; k < 5; k++) nbd_poll (h, 10);
  t0 = now_s ();
  CHECK (nbd_shutdown (h, 0) == 0, "shutdown while lost: succeeds");
  CHECK (now_s () - t0 < 0.5, "shutdown while lost: at once (%.2f s)", now_s () - t0);
  int cr = nbd_aio_command_completed (h, c), ce = nbd_get_errno ();
  CHECK (cr == -1 && ce == ENOTCONN, "shutdown while lost: the read fails (%d, errno %d)", cr, ce);
  CHECK (nbd_aio_is_closed (h) == 1, "shutdown while lost: the handle is closed");
  nbd_close (h);
  free (uri);

  /* Off: the commands fail at once. */
  server_start (&s);
  h = nbd_create ();
  char *plain;
  if (asprintf (&plain, "nbd+unix:///?socket=%s", s.sock) == -1) fatal ("asprintf");
  CHECK (nbd_connect_uri (h, plain) == 0, "off: connect");
  int fd0 = nbd_aio_get_fd (h);
  struct stat st;
  CHECK (fstat (fd0, &st) == 0 && S_ISSOCK (st.st_mode), "off: the descriptor is the socket itself");
  server_kill (&s);
  t0 = now_s ();
  CHECK (nbd_pread (h, buf, sizeof buf, 0, 0) == -1, "off: the read fails");
  CHECK (now_s () - t0 < 0.5, "off: at once");
  CHECK (nbd_aio_is_dead (h) == 1 || nbd_aio_is_closed (h) == 1, "off: the handle is over");
  nbd_close (h);
  free (plain);

  /* Transports that cannot be dialed again. */
  h = nbd_create ();
  nbd_rs_set_reconnect_delay (h, 5);
  int sv[2];
  if (socketpair (AF_UNIX, SOCK_STREAM, 0, sv) == -1) fatal ("socketpair: %m");
  CHECK_ERR (nbd_connect_socket (h, sv[0]), "nbd_connect_socket", EINVAL);
  CHECK (strstr (nbd_get_error (), "cannot be dialed again") != NULL, "the message says why");
  CHECK (nbd_aio_is_created (h) == 1, "the handle is still new");
  close (sv[0]); close (sv[1]);
  nbd_close (h);
}

/* TLS: PSK and X.509 on nbdkit; each reconnect makes a new session. */
static void
test_tls (void)
{
  char *psk = path_in_dir ("keys.psk"), *pskarg, *certs = make_tls_certs (), *certarg, *cacerts;
  FILE *fp = fopen (psk, "w");
  if (fp == NULL) fatal ("%s: %m", psk);
  fprintf (fp, "alice:0123456789abcdef0123456789abcdef\n");
  fclose (fp);
  if (asprintf (&pskarg, "--tls-psk=%s", psk) == -1 || asprintf (&certarg, "--tls-certificates=%s/server", certs) == -1 ||
      asprintf (&cacerts, "%s/client-ca", certs) == -1)
    fatal ("asprintf");
  for (int x509 = 0; x509 <= 1; x509++) {
    char *args[] = { "--tls=require", x509 ? certarg : pskarg, "memory", "1M", NULL };
    struct server s;
    nbdkit_server (&s, x509 ? "x509" : "psk", args);
    char *uri;
    if ((x509 ? asprintf (&uri, "nbds+unix:///?socket=%s&tls-certificates=%s&reconnect-delay=30", s.sock, cacerts)
         : asprintf (&uri, "nbds+unix://alice@/?socket=%s&tls-psk-file=%s&reconnect-delay=30", s.sock, psk)) == -1)
      fatal ("asprintf");
    struct nbd_handle *h = nbd_create ();
    nbd_set_uri_allow_local_file (h, true);
    CHECK (nbd_connect_uri (h, uri) == 0, "%s: connect", x509 ? "x509" : "psk");
    enum { N = 16 };
    static char bufs[N][4096];
    int64_t cookies[N];
    /* The memory disk does not survive the restart: only reads of zeroes. */
    for (int i = 0; i < N; i++)
      cookies[i] = nbd_aio_pread (h, bufs[i], 4096, (uint64_t) i * 4096, NBD_NULL_COMPLETION, 0);
    int fd0 = nbd_aio_get_fd (h);
    server_kill (&s);
    int failed, ok = await_all (h, cookies, N, &s, fd0, &failed);
    CHECK (ok == N, "%s: every read completes after the restart (%d of %d)", x509 ? "x509" : "psk", ok, N);
    CHECK (nbd_rs_get_reconnect_count (h) == 1, "%s: one reconnect", x509 ? "x509" : "psk");
    CHECK (nbd_get_tls_negotiated (h) == 1, "%s: still TLS", x509 ? "x509" : "psk");
    nbd_shutdown (h, 0);
    nbd_close (h);
    server_kill (&s);
    free (uri);
  }
  free (psk); free (pskarg); free (certs); free (certarg); free (cacerts);
}

/* The open timeout: the first connect waits for a server that is not
 * there yet, and gives up when the time is over. */
static void
test_open_timeout (void)
{
  char *args[] = { "memory", "1M", NULL };
  struct server s;
  server_paths (&s, "late");
  memcpy (s.args, args, sizeof args);
  char *uri;
  if (asprintf (&uri, "nbd+unix:///?socket=%s&open-timeout=10", s.sock) == -1) fatal ("asprintf");
  pthread_t t;
  struct restart r = { &s, 1500000 };
  pthread_create (&t, NULL, restart_later, &r);
  struct nbd_handle *h = nbd_create ();
  double t0 = now_s ();
  CHECK (nbd_connect_uri (h, uri) == 0, "open timeout: connect waits for the server");
  CHECK (now_s () - t0 > 1.4, "open timeout: ... which came after 1.5 s (%.2f s)", now_s () - t0);
  char buf[512];
  CHECK (nbd_pread (h, buf, sizeof buf, 0, 0) == 0, "open timeout: a read");
  nbd_close (h);
  server_kill (&s);
  atomic_store (&r.done, true);
  pthread_join (t, NULL);
  free (uri);

  /* Nobody comes: the connect fails when the 2 s are over, not before. */
  if (asprintf (&uri, "nbd+unix:///?socket=%s&open-timeout=2", s.sock) == -1) fatal ("asprintf");
  unlink (s.sock);
  h = nbd_create ();
  t0 = now_s ();
  CHECK (nbd_connect_uri (h, uri) == -1, "open timeout: no server, the connect fails");
  double took = now_s () - t0;
  CHECK (took > 0.9 && took < 4, "open timeout: after about 2 s (%.2f s)", took);
  CHECK (nbd_aio_is_dead (h) == 1 || nbd_aio_is_created (h) == 1, "open timeout: the handle is not connected");
  nbd_close (h);
  free (uri);

  /* The asynchronous connect stays connecting between attempts, and the
   * descriptor wakes the poll loop for each. */
  if (asprintf (&uri, "nbd+unix:///?socket=%s&open-timeout=10", s.sock) == -1) fatal ("asprintf");
  struct restart r2 = { &s, 1500000 };
  pthread_create (&t, NULL, restart_later, &r2);
  h = nbd_create ();
  CHECK (nbd_aio_connect_uri (h, uri) == 0, "open timeout, aio: connect starts");
  int fd0 = nbd_aio_get_fd (h), wakeups = 0;
  t0 = now_s ();
  while (nbd_aio_is_connecting (h) && now_s () - t0 < 10) {
    CHECK (nbd_aio_get_fd (h) == fd0, "open timeout, aio: the same descriptor");
    unsigned dir = nbd_aio_get_direction (h);
    struct pollfd p = { .fd = fd0, .events = (dir & LIBNBD_AIO_DIRECTION_READ ? POLLIN : 0) |
                                             (dir & LIBNBD_AIO_DIRECTION_WRITE ? POLLOUT : 0) };
    CHECK (dir != 0, "open timeout, aio: something to wait for");
    if (poll (&p, 1, 5000) <= 0) { CHECK (0, "open timeout, aio: the descriptor woke"); break; }
    wakeups++;
    if (p.revents & POLLIN) nbd_aio_notify_read (h);
    if (p.revents & POLLOUT) nbd_aio_notify_write (h);
  }
  CHECK (nbd_aio_is_ready (h) == 1, "open timeout, aio: connected (after %d wakeups, %.2f s)", wakeups, now_s () - t0);
  CHECK (now_s () - t0 > 1.4, "open timeout, aio: when the server came");
  nbd_close (h);
  server_kill (&s);
  atomic_store (&r2.done, true);
  pthread_join (t, NULL);
  free (uri);

  /* Without it, one attempt, at once. */
  h = nbd_create ();
  if (asprintf (&uri, "nbd+unix:///?socket=%s", s.sock) == -1) fatal ("asprintf");
  t0 = now_s ();
  CHECK (nbd_connect_uri (h, uri) == -1 && now_s () - t0 < 0.5, "no open timeout: fails at once");
  nbd_close (h);
  free (uri);
}

/* multi-conn=4 with reconnecting: every connection comes back. */
static void
test_multi_conn (void)
{
  char *img = path_in_dir ("mc.img"), *fileimg;
  int fd = open (img, O_RDWR | O_CREAT, 0600);
  if (fd == -1 || ftruncate (fd, 16 << 20) == -1) fatal ("%s: %m", img);
  close (fd);
  if (asprintf (&fileimg, "file=%s", img) == -1) fatal ("asprintf");
  char *args[] = { "--filter=delay", "file", fileimg, "wdelay=1", NULL };
  struct server s;
  nbdkit_server (&s, "mc", args);
  char *uri;
  if (asprintf (&uri, "nbd+unix:///?socket=%s&reconnect-delay=30&multi-conn=4", s.sock) == -1) fatal ("asprintf");
  struct nbd_handle *h = nbd_create ();
  CHECK (nbd_connect_uri (h, uri) == 0 && nbd_rs_get_multi_conn (h) == 4, "multi-conn: 4 connections");
  int fd0 = nbd_aio_get_fd (h);
  enum { N = 64, SZ = 4096 };
  static char wbuf[N][SZ];
  int64_t cookies[N];
  for (int i = 0; i < N; i++) {
    memset (wbuf[i], 'A' + i % 26, SZ);
    cookies[i] = nbd_aio_pwrite (h, wbuf[i], SZ, (uint64_t) i * SZ, NBD_NULL_COMPLETION, 0);
  }
  for (int k = 0; k < 10; k++) nbd_poll (h, 10);
  server_kill (&s);
  s.args[0] = "file"; s.args[1] = fileimg; s.args[2] = NULL;
  int failed, ok = await_all (h, cookies, N, &s, fd0, &failed);
  CHECK (ok == N, "multi-conn: the 64 writes complete after the restart (%d ok, %d failed)", ok, failed);
  CHECK (nbd_rs_get_reconnect_count (h) == 4, "multi-conn: each of the 4 connections reconnected (%" PRIi64 ")",
         nbd_rs_get_reconnect_count (h));
  for (int i = 0; i < N; i++) {
    char back[SZ];
    if (nbd_pread (h, back, SZ, (uint64_t) i * SZ, 0) != 0 || memcmp (back, wbuf[i], SZ) != 0) {
      CHECK (0, "multi-conn: block %d reads back", i);
      break;
    }
  }
  nbd_shutdown (h, 0);
  nbd_close (h);
  server_kill (&s);
  free (uri); free (fileimg); free (img);
}

/* A server the handle started (connect_command, socket activation) is
 * started again when it dies. */
static void
test_command (void)
{
  for (int activated = 0; activated <= 1; activated++) {
    const char *how = activated ? "socket activation" : "command";
    char *argv_cmd[] = { "nbdkit", "-s", "--exit-with-parent", "memory", "1M", NULL };
    char *argv_act[] = { "nbdkit", "--exit-with-parent", "memory", "1M", NULL };
    struct nbd_handle *h = nbd_create ();
    nbd_rs_set_reconnect_delay (h, 30);
    int r = activated ? nbd_connect_systemd_socket_activation (h, argv_act) : nbd_connect_command (h, argv_cmd);
    CHECK (r == 0, "%s: connect with a reconnect delay", how);
    int64_t pid = nbd_get_subprocess_pid (h);
    CHECK (pid > 0, "%s: the server's pid", how);
    char buf[512];
    memset (buf, 'x', sizeof buf);
    CHECK (nbd_pwrite (h, buf, sizeof buf, 0, 0) == 0, "%s: a write", how);
    kill ((pid_t) pid, SIGKILL);
    /* A new server: its memory disk starts empty, and is the same size. */
    CHECK (nbd_pread (h, buf, sizeof buf, 0, 0) == 0 && buf[0] == 0, "%s: a read from the new server", how);
    CHECK (nbd_rs_get_reconnect_count (h) == 1, "%s: one reconnect", how);
    int64_t again = nbd_get_subprocess_pid (h);
    CHECK (again > 0 && again != pid, "%s: another server (%" PRIi64 ", was %" PRIi64 ")", how, again, pid);
    nbd_shutdown (h, 0);
    nbd_close (h);
    CHECK (kill ((pid_t) again, 0) == -1, "%s: the new server is gone with the handle", how);
  }
}

/* Multi-conn with a reconnect delay: a further connection that sees
 * another export kills the handle for good (no attempts go on), and a
 * shutdown while every connection is lost closes the handle. */
static void
test_multi_conn_ends (void)
{
  char *count = path_in_dir ("mm-count"), *args[5];
  size_changing_server (count, args);
  struct server s;
  nbdkit_server (&s, "mm", args);
  char *uri;
  if (asprintf (&uri, "nbd+unix:///?socket=%s&reconnect-delay=30&multi-conn=2", s.sock) == -1) fatal ("asprintf");
  struct nbd_handle *h = nbd_create ();
  CHECK_ERR (nbd_connect_uri (h, uri), "nbd_connect_uri", EPROTO);
  CHECK (nbd_aio_is_dead (h) == 1, "mismatch: the handle is dead");
  CHECK (nbd_aio_get_direction (h) == 0, "mismatch: nothing left to wait for (no reconnect goes on)");
  nbd_close (h);
  server_kill (&s);
  free (uri);

  char *args2[] = { "memory", "1M", NULL };
  nbdkit_server (&s, "mc-end", args2);
  if (asprintf (&uri, "nbd+unix:///?socket=%s&reconnect-delay=30&multi-conn=4", s.sock) == -1) fatal ("asprintf");
  h = nbd_create ();
  CHECK (nbd_connect_uri (h, uri) == 0 && nbd_rs_get_multi_conn (h) == 4, "multi-conn shutdown: 4 connections");
  server_kill (&s);
  char buf[512];
  int64_t c = nbd_aio_pread (h, buf, sizeof buf, 0, NBD_NULL_COMPLETION, 0);
  for (int k = 0; k < 5; k++) nbd_poll (h, 10);
  CHECK (nbd_shutdown (h, 0) == 0, "multi-conn shutdown while lost: succeeds");
  int cr = nbd_aio_command_completed (h, c), ce = nbd_get_errno ();
  CHECK (cr == -1 && ce == ENOTCONN, "multi-conn shutdown while lost: the held read fails (%d, errno %d)", cr, ce);
  CHECK (nbd_aio_is_closed (h) == 1, "multi-conn shutdown while lost: closed, not dead");
  nbd_close (h);
  free (uri); free (count); free (args[1]); free (args[2]);
}

/* 20 reconnects: no descriptor left behind. */
static void
test_fds (void)
{
  char *args[] = { "memory", "1M", NULL };
  struct server s;
  nbdkit_server (&s, "fds", args);
  char *uri = uri_for (s.sock, 30);
  struct nbd_handle *h = nbd_create ();
  CHECK (nbd_connect_uri (h, uri) == 0, "fds: connect");
  char buf[512] = { 0 };
  int before = open_fds ();
  int good = 0;
  for (int k = 0; k < 20; k++) {
    server_kill (&s);
    server_start (&s);
    good += nbd_pwrite (h, buf, sizeof buf, 0, 0) == 0;
  }
  CHECK (good == 20, "fds: a write after each of 20 restarts (%d)", good);
  CHECK (nbd_rs_get_reconnect_count (h) == 20, "fds: 20 reconnects (%" PRIi64 ")", nbd_rs_get_reconnect_count (h));
  CHECK (open_fds () == before, "fds: %d descriptors open, %d before", open_fds (), before);
  nbd_close (h);
  server_kill (&s);
  free (uri);
}

int
main (void)
{
  const char *needs[] = { "nbdkit", "qemu-nbd", "qemu-img", "openssl", NULL };
  servers_init ("reconnect-test", needs, 240);
  /* RECONNECT_TEST_ONLY=name runs one part, for debugging. */
  static const struct { const char *name; void (*run) (void); } parts[] = {
    { "api", test_api }, { "in_flight", test_in_flight }, { "qemu", test_qemu },
    { "identity", test_identity }, { "give_up", test_give_up }, { "tls", test_tls },
    { "fds", test_fds }, { "open_timeout", test_open_timeout }, { "multi_conn", test_multi_conn },
    { "command", test_command }, { "multi_conn_ends", test_multi_conn_ends },
  };
  const char *only = getenv ("RECONNECT_TEST_ONLY");
  for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++)
    if (only == NULL || strcmp (only, parts[i].name) == 0) parts[i].run ();
  printf ("reconnect-test: %d checks, %d failures\n", checks, failures);
  return failures ? 1 : 0;
}
