/* The concurrent writer (nbd_rs_set_concurrent_writer). Runs on nbd-rs
 * only (tests/c-compare.sh's TESTS_OURS). A writer thread, fed by a
 * queue, sends every request while the test's thread polls only for
 * replies:
 *  - misuse: NULL, twice, error 0, an error with no writer, and the
 *    settings that need more than one socket (multi-conn, a reconnect
 *    delay, an open timeout), in either order and through a URI;
 *  - random reads and writes, 64 in flight, checked against a local copy,
 *    on nbdkit, on qemu-nbd and on nbdkit over TLS (where the writer is
 *    handed ciphertext: a pattern written never appears in its bytes);
 *    aio_get_direction never says WRITE once the writer has the sends;
 *  - a writer set while 64 writes of 64 KiB are still being sent: the
 *    socket's bytes and the writer's keep their order;
 *  - the writer's EPIPE partway: every command not yet answered fails
 *    with EPIPE, each
 *    completion callback is freed once, a synchronous call blocked in
 *    poll wakes and fails with EPIPE, nothing hangs.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <libnbd.h>

#include "servers.h"
#include "test-writer.h"

#ifndef LIBNBD_HAVE_NBD_RS_SET_CONCURRENT_WRITER
#error "writer-test needs nbd-rs's header"
#endif

static int writes_asked;

/* One event-loop round that polls only for reads; counts WRITE asks. */
static void
wait_once (struct nbd_handle *h)
{
  unsigned dir = nbd_aio_get_direction (h);
  if (dir & LIBNBD_AIO_DIRECTION_WRITE) writes_asked++;
  if (dir == 0) return;
  struct pollfd p = { .fd = nbd_aio_get_fd (h), .events = POLLIN };
  if (poll (&p, 1, 5000) == 0) fatal ("no reply in 5 s");
  if (p.revents) nbd_aio_notify_read (h);
}

/* ---- misuse ------------------------------------------------------------- */

static void
test_api (void)
{
  struct nbd_handle *h = nbd_create ();
  struct writer w;
  writer_init (&w, h, 0);
  CHECK_ERR (nbd_rs_concurrent_writer_error (h, EPIPE), "nbd_rs_concurrent_writer_error", EINVAL);
  CHECK (strstr (nbd_get_error (), "no concurrent writer") != NULL, "api: the message says no writer is set");
  CHECK_ERR (nbd_rs_set_concurrent_writer (h, &w, NULL), "nbd_rs_set_concurrent_writer", EFAULT);

  CHECK (nbd_rs_set_multi_conn (h, 2) == 0, "api: multi-conn 2");
  CHECK_ERR (nbd_rs_set_concurrent_writer (h, &w, writer_cb), "nbd_rs_set_concurrent_writer", EINVAL);
  CHECK (strstr (nbd_get_error (), "multi-conn is 2") != NULL, "api: the message names multi-conn");
  CHECK (nbd_rs_set_multi_conn (h, 1) == 0 && nbd_rs_set_reconnect_delay (h, 5) == 0, "api: a reconnect delay");
  CHECK_ERR (nbd_rs_set_concurrent_writer (h, &w, writer_cb), "nbd_rs_set_concurrent_writer", EINVAL);
  CHECK (nbd_rs_set_reconnect_delay (h, 0) == 0 && nbd_rs_set_open_timeout (h, 5) == 0, "api: an open timeout");
  CHECK_ERR (nbd_rs_set_concurrent_writer (h, &w, writer_cb), "nbd_rs_set_concurrent_writer", EINVAL);
  CHECK (nbd_rs_set_open_timeout (h, 0) == 0, "api: no open timeout");

  CHECK (nbd_rs_set_concurrent_writer (h, &w, writer_cb) == 0, "api: set");
  CHECK_ERR (nbd_rs_set_concurrent_writer (h, &w, writer_cb), "nbd_rs_set_concurrent_writer", EINVAL);
  CHECK (strstr (nbd_get_error (), "already set") != NULL, "api: twice says already set");
  CHECK_ERR (nbd_rs_set_multi_conn (h, 4), "nbd_rs_set_multi_conn", EINVAL);
  CHECK (nbd_rs_get_multi_conn (h) == 1, "api: multi-conn stays 1");
  CHECK_ERR (nbd_rs_set_reconnect_delay (h, 30), "nbd_rs_set_reconnect_delay", EINVAL);
  CHECK (nbd_rs_get_reconnect_delay (h) == 0, "api: the delay stays 0");
  CHECK_ERR (nbd_rs_set_open_timeout (h, 30), "nbd_rs_set_open_timeout", EINVAL);
  CHECK_ERR (nbd_rs_concurrent_writer_error (h, 0), "nbd_rs_concurrent_writer_error", EINVAL);
  CHECK_ERR (nbd_rs_concurrent_writer_error (h, -5), "nbd_rs_concurrent_writer_error", EINVAL);
  CHECK_ERR (nbd_rs_concurrent_writer_error (NULL, EPIPE), "nbd_rs_concurrent_writer_error", EFAULT);

  /* A URI that asks for more connections is refused before dialing. */
  char *sock = path_in_dir ("api.sock");
  char *args[] = { "memory", "1M", NULL };
  pid_t pid = start_nbdkit_listening (sock, 0, args);
  char *uri;
  if (asprintf (&uri, "nbd+unix:///?socket=%s&multi-conn=2", sock) == -1) fatal ("asprintf");
  CHECK_ERR (nbd_connect_uri (h, uri), "nbd_connect_uri", EINVAL);
  CHECK (nbd_rs_get_multi_conn (h) == 1, "api: the refused URI left multi-conn at 1");
  free (uri);
  if (asprintf (&uri, "nbd+unix:///?socket=%s", sock) == -1) fatal ("asprintf");
  CHECK (nbd_connect_uri (h, uri) == 0, "api: a URI without it then connects");
  /* The socket stays open until nbd_close, even when the server goes
   * before the writer was handed anything: the writer thread may hold
   * its number. */
  int fd = nbd_aio_get_fd (h);
  stop_pid (pid, 1);
  for (int k = 0; k < 100 && !nbd_aio_is_dead (h) && !nbd_aio_is_closed (h); k++) wait_once (h);
  CHECK (nbd_aio_is_dead (h) || nbd_aio_is_closed (h), "api: over once the server went");
  CHECK (fcntl (fd, F_GETFD) != -1, "api: the ended connection's socket is still open");
  nbd_close (h);
  CHECK (fcntl (fd, F_GETFD) == -1, "api: nbd_close closed it");
  writer_stop (&w);
  free (sock);
  sock = path_in_dir ("api2.sock");
  pid = start_nbdkit_listening (sock, 0, args);

  /* A closed handle takes no writer. */
  h = nbd_create ();
  CHECK (nbd_connect_unix (h, sock) == 0 && nbd_shutdown (h, 0) == 0, "api: connect and shut down");
  writer_init (&w, h, 0);
  CHECK_ERR (nbd_rs_set_concurrent_writer (h, &w, writer_cb), "nbd_rs_set_concurrent_writer", EINVAL);
  nbd_close (h);
  writer_stop (&w);
  stop_pid (pid, 1);
  free (uri);
  free (sock);
}

/* ---- data through the writer ----------------------------------------------- */

#define DISK (8 << 20)
#define N_CMDS 2000
#define DEPTH 64

struct op { int64_t cookie; int write; uint64_t off; size_t len; char *buf; };

static uint64_t rng = 88172645463325252ull;
static uint64_t
rnd (void)
{
  rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
  return rng;
}

/* The pattern the TLS check looks for in the writer's bytes. */
static const char marker[] = "nbd-rs concurrent writer marker: plaintext must not reach the writer under TLS";

/* Random reads and writes against the local copy, through the writer of
 * a handle connected to URI (or to SOCK). */
static void
exercise (const char *what, const char *uri, int expect_plaintext)
{
  struct nbd_handle *h = nbd_create ();
  struct writer w;
  char *copy = calloc (1, DISK);
  struct op ops[DEPTH] = { { 0 } };
  int submitted = 0, done = 0, bad = 0, ok = 0;

  writer_init (&w, h, 0);
  CHECK (nbd_rs_set_concurrent_writer (h, &w, writer_cb) == 0, "%s: set the writer", what);
  nbd_set_uri_allow_local_file (h, true);
  CHECK (nbd_connect_uri (h, uri) == 0, "%s: connect", what);
  writer_start (&w);
  writes_asked = 0;
  /* The server's data starts as zeroes (qemu-nbd's file too). */
  char *marked = malloc (4096);
  for (int i = 0; i < 4096; i++) marked[i] = marker[i % (sizeof marker - 1)];
  CHECK (nbd_pwrite (h, marked, 4096, 0, 0) == 0, "%s: a synchronous write through the writer", what);
  memcpy (copy, marked, 4096);
  while (done < N_CMDS) {
    for (int s = 0; s < DEPTH && submitted < N_CMDS; s++) {
      if (ops[s].cookie) continue;
      struct op *o = &ops[s];
      o->write = rnd () % 2;
      o->len = 512 << (rnd () % 10);           /* 512 B to 256 KiB */
      o->off = (rnd () % ((DISK - o->len) / 512)) * 512;
      o->buf = malloc (o->len);
      if (o->write) {
        for (size_t i = 0; i < o->len; i++) o->buf[i] = (char) rnd ();
        /* Overlapping commands in flight: the copy is updated when one
         * is sent, so ranges in flight never overlap. */
        int clash = 0;
        for (int t = 0; t < DEPTH; t++)
          if (t != s && ops[t].cookie && ops[t].off < o->off + o->len && o->off < ops[t].off + ops[t].len) clash = 1;
        if (clash) { free (o->buf); continue; }
        memcpy (copy + o->off, o->buf, o->len);
        o->cookie = nbd_aio_pwrite (h, o->buf, o->len, o->off, NBD_NULL_COMPLETION, 0);
      } else {
        int clash = 0;
        for (int t = 0; t < DEPTH; t++)
          if (t != s && ops[t].cookie && ops[t].write && ops[t].off < o->off + o->len && o->off < ops[t].off + ops[t].len) clash = 1;
        if (clash) { free (o->buf); continue; }
        o->cookie = nbd_aio_pread (h, o->buf, o->len, o->off, NBD_NULL_COMPLETION, 0);
      }
      if (o->cookie == -1) { CHECK (0, "%s: submit", what); o->cookie = 0; free (o->buf); goto out; }
      submitted++;
    }
    wait_once (h);
    for (int s = 0; s < DEPTH; s++) {
      if (!ops[s].cookie) continue;
      int r = nbd_aio_command_completed (h, ops[s].cookie);
      if (r == 0) continue;
      if (r == -1) bad++;
      else if (!ops[s].write && memcmp (ops[s].buf, copy + ops[s].off, ops[s].len) != 0) bad++;
      else ok++;
      free (ops[s].buf);
      ops[s].cookie = 0;
      done++;
    }
    if (nbd_aio_is_dead (h)) break;
  }
 out:
  CHECK (done == N_CMDS && bad == 0, "%s: %d of %d commands right (%d wrong)", what, ok, N_CMDS, bad);
  CHECK (writes_asked == 0, "%s: aio_get_direction asked for writability %d times", what, writes_asked);
  char *back = malloc (DISK);
  CHECK (nbd_pread (h, back, DISK, 0, 0) == 0 && memcmp (back, copy, DISK) == 0,
         "%s: the whole disk reads back as the copy", what);
  CHECK (nbd_shutdown (h, 0) == 0, "%s: shutdown", what);
  pthread_mutex_lock (&w.lock);
  size_t handed = w.handed;
  int plain = memmem (w.seen, w.seen_len, marker, sizeof marker - 1) != NULL;
  pthread_mutex_unlock (&w.lock);
  CHECK (handed > (size_t) DISK / 2, "%s: the writer was handed %zu bytes", what, handed);
  CHECK (plain == expect_plaintext, "%s: the marker %s in the writer's bytes", what,
         plain ? "appears" : "does not appear");
  writer_stop (&w);
  nbd_close (h);
  free (back);
  free (marked);
  free (copy);
}

static void
test_nbdkit (void)
{
  char *sock = path_in_dir ("nbdkit.sock"), *uri;
  char *args[] = { "memory", "8M", NULL };
  pid_t pid = start_nbdkit_listening (sock, 0, args);
  if (asprintf (&uri, "nbd+unix:///?socket=%s", sock) == -1) fatal ("asprintf");
  exercise ("nbdkit", uri, 1);
  stop_pid (pid, 1);
  free (uri);
  free (sock);
}

static void
test_qemu (void)
{
  char *img = path_in_dir ("disk.raw"), *sock = path_in_dir ("qemu.sock"), *uri;
  FILE *f = fopen (img, "w");
  if (f == NULL || ftruncate (fileno (f), DISK) == -1) fatal ("%s: %m", img);
  fclose (f);
  char *args[] = { "qemu-nbd", "-f", "raw", "-t", "-k", sock, img, NULL };
  pid_t pid = spawn (args, -1, -1);
  wait_ready ("qemu-nbd", pid, NULL, sock, 0, false);
  if (asprintf (&uri, "nbd+unix:///?socket=%s", sock) == -1) fatal ("asprintf");
  exercise ("qemu-nbd", uri, 1);
  stop_pid (pid, 1);
  free (uri);
  free (sock);
  free (img);
}

static void
test_tls (void)
{
  char *psk = path_in_dir ("keys.psk"), *pskarg, *sock = path_in_dir ("tls.sock"), *uri;
  FILE *fp = fopen (psk, "w");
  if (fp == NULL) fatal ("%s: %m", psk);
  fprintf (fp, "alice:0123456789abcdef0123456789abcdef\n");
  fclose (fp);
  if (asprintf (&pskarg, "--tls-psk=%s", psk) == -1) fatal ("asprintf");
  char *args[] = { "--tls=require", pskarg, "memory", "8M", NULL };
  pid_t pid = start_nbdkit_listening (sock, 0, args);
  if (asprintf (&uri, "nbds+unix://alice@/?socket=%s&tls-psk-file=%s", sock, psk) == -1) fatal ("asprintf");
  exercise ("tls", uri, 0);
  stop_pid (pid, 1);
  free (uri);
  free (sock);
  free (pskarg);
  free (psk);
}

/* ---- handing over mid-stream ------------------------------------------------- */

static void
test_hand_over (void)
{
  char *sock = path_in_dir ("handover.sock");
  char *args[] = { "memory", "32M", NULL };
  pid_t pid = start_nbdkit_listening (sock, 0, args);
  struct nbd_handle *h = nbd_create ();
  struct writer w;
  enum { N = 64, LEN = 64 << 10, BIG = 16 << 20 };
  static char bufs[N][LEN];
  int64_t cookies[N];
  char *big = malloc (BIG);
  memset (big, 'z', BIG);

  CHECK (nbd_connect_unix (h, sock) == 0, "hand-over: connect");
  /* First one write far larger than the socket takes: no reply can come
   * before the writer has sent the rest of it. */
  int64_t big_cookie = nbd_aio_pwrite (h, big, BIG, 8 << 20, NBD_NULL_COMPLETION, 0);
  for (int i = 0; i < N; i++) {
    memset (bufs[i], 'a' + i % 26, LEN);
    bufs[i][0] = (char) i;
    cookies[i] = nbd_aio_pwrite (h, bufs[i], LEN, (uint64_t) i * LEN, NBD_NULL_COMPLETION, 0);
  }
  /* 4 MiB is more than the socket takes at once: the rest goes to the
   * writer, after what the socket took, at once: a loop that only ever
   * polls for replies (never asking aio_get_direction) gets them all. */
  writer_init (&w, h, 0);
  writer_start (&w);
  CHECK (nbd_rs_set_concurrent_writer (h, &w, writer_cb) == 0, "hand-over: set while connected");
  int done = 0, bad = 0, big_done = 0;
  while ((done < N || !big_done) && !nbd_aio_is_dead (h)) {
    struct pollfd p = { .fd = nbd_aio_get_fd (h), .events = POLLIN };
    if (poll (&p, 1, 5000) == 0) { CHECK (0, "hand-over: no reply in 5 s"); break; }
    nbd_aio_notify_read (h);
    for (int i = 0; i < N; i++) {
      if (cookies[i] <= 0) continue;
      int r = nbd_aio_command_completed (h, cookies[i]);
      if (r == 0) continue;
      bad += r == -1;
      done++;
      cookies[i] = 0;
    }
    if (!big_done && (big_done = nbd_aio_command_completed (h, big_cookie)) == -1) bad++;
  }
  CHECK (bad == 0 && !nbd_aio_is_dead (h), "hand-over: the 64 writes complete (%d failed)", bad);
  CHECK (big_done == 1, "hand-over: the 16 MiB write completes");
  CHECK (w.handed > 0, "hand-over: the writer took over (%zu bytes)", w.handed);
  static char back[LEN];
  int same = 0;
  for (int i = 0; i < N; i++)
    same += nbd_pread (h, back, LEN, (uint64_t) i * LEN, 0) == 0 && memcmp (back, bufs[i], LEN) == 0;
  CHECK (same == N, "hand-over: %d of %d writes read back", same, N);
  char *back_big = malloc (BIG);
  CHECK (nbd_pread (h, back_big, BIG, 8 << 20, 0) == 0 && memcmp (back_big, big, BIG) == 0,
         "hand-over: the 16 MiB write reads back");
  free (back_big);
  free (big);
  CHECK (nbd_shutdown (h, 0) == 0, "hand-over: shutdown");
  writer_stop (&w);
  nbd_close (h);
  stop_pid (pid, 1);
  free (sock);
}

/* ---- the writer fails ------------------------------------------------------- */

static atomic_int freed, completed, epipe;

static int
on_complete (void *data, int *error)
{
  (void) data;
  atomic_fetch_add (&completed, 1);
  if (*error == EPIPE) atomic_fetch_add (&epipe, 1);
  return 0;                     /* retired by aio_command_completed */
}

static void
on_free (void *data)
{
  (void) data;
  atomic_fetch_add (&freed, 1);
}

/* A synchronous write that the writer fails while this thread waits. */
struct sync_call { struct nbd_handle *h; char *buf; int r, err; };

static void *
sync_write (void *arg)
{
  struct sync_call *c = arg;
  c->r = nbd_pwrite (c->h, c->buf, 8 << 20, 0, 0);
  c->err = nbd_get_errno ();
  return NULL;
}

static void
test_error (void)
{
  char *sock = path_in_dir ("error.sock");
  char *args[] = { "memory", "64M", NULL };
  pid_t pid = start_nbdkit_listening (sock, 0, args);
  enum { N = 64, LEN = 256 << 10 };
  static char buf[LEN];
  int64_t cookies[N];

  /* Asynchronous: 64 writes of 256 KiB, the writer fails after 1 MiB. */
  struct nbd_handle *h = nbd_create ();
  struct writer w;
  writer_init (&w, h, 1 << 20);
  CHECK (nbd_rs_set_concurrent_writer (h, &w, writer_cb) == 0, "error: set");
  CHECK (nbd_connect_unix (h, sock) == 0, "error: connect");
  writer_start (&w);
  atomic_store (&freed, 0); atomic_store (&completed, 0); atomic_store (&epipe, 0);
  for (int i = 0; i < N; i++) {
    nbd_completion_callback cb = { .callback = on_complete, .free = on_free };
    cookies[i] = nbd_aio_pwrite (h, buf, LEN, (uint64_t) i * LEN, cb, 0);
  }
  while (nbd_aio_in_flight (h) > 0 && !nbd_aio_is_dead (h)) wait_once (h);
  CHECK (nbd_aio_is_dead (h), "error: the connection is dead");
  /* The server may have answered the writes whose bytes all left before
   * the failure: at most 3 of 256 KiB fit in 1 MiB. Every other one
   * fails, with the writer's errno. */
  CHECK (atomic_load (&completed) == N && atomic_load (&epipe) >= N - 3,
         "error: %d of %d completion callbacks, %d with EPIPE", atomic_load (&completed), N, atomic_load (&epipe));
  int failed_epipe = 0, succeeded = 0;
  for (int i = 0; i < N; i++) {
    int r = nbd_aio_command_completed (h, cookies[i]);
    failed_epipe += r == -1 && nbd_get_errno () == EPIPE;
    succeeded += r == 1;
  }
  CHECK (failed_epipe >= N - 3 && failed_epipe + succeeded == N,
         "error: %d of %d commands retire with EPIPE, %d succeeded", failed_epipe, N, succeeded);
  CHECK (atomic_load (&freed) == N, "error: %d callbacks freed once retired", atomic_load (&freed));
  CHECK_ERR (nbd_aio_pwrite (h, buf, LEN, 0, NBD_NULL_COMPLETION, 0), "nbd_aio_pwrite", EINVAL);
  writer_stop (&w);
  nbd_close (h);
  CHECK (atomic_load (&freed) == N, "error: no callback freed twice (%d)", atomic_load (&freed));

  /* An error while nothing is in flight: the next aio_get_direction
   * sees it, and the connection is dead. */
  h = nbd_create ();
  writer_init (&w, h, 0);
  CHECK (nbd_rs_set_concurrent_writer (h, &w, writer_cb) == 0 && nbd_connect_unix (h, sock) == 0, "error: idle");
  writer_start (&w);
  CHECK (nbd_rs_concurrent_writer_error (h, ECONNRESET) == 0, "error: report while idle");
  CHECK (nbd_rs_concurrent_writer_error (h, EPIPE) == 0, "error: a second report");
  CHECK (nbd_aio_get_direction (h) == 0 && nbd_aio_is_dead (h), "error: aio_get_direction finds it dead");
  CHECK_ERR (nbd_pread (h, buf, 512, 0, 0), "nbd_pread", EINVAL);
  writer_stop (&w);
  nbd_close (h);

  /* Synchronous: a thread blocked in nbd_pwrite of 8 MiB wakes when the
   * writer fails after 256 KiB, with EPIPE. */
  h = nbd_create ();
  writer_init (&w, h, 256 << 10);
  CHECK (nbd_rs_set_concurrent_writer (h, &w, writer_cb) == 0, "error: set (sync)");
  CHECK (nbd_connect_unix (h, sock) == 0, "error: connect (sync)");
  writer_start (&w);
  struct sync_call c = { .h = h, .buf = malloc (8 << 20) };
  memset (c.buf, 1, 8 << 20);
  pthread_t t;
  pthread_create (&t, NULL, sync_write, &c);
  pthread_join (t, NULL);
  CHECK (c.r == -1 && c.err == EPIPE, "error: the synchronous write fails with EPIPE (r=%d errno=%d)", c.r, c.err);
  writer_stop (&w);
  nbd_close (h);
  free (c.buf);
  stop_pid (pid, 1);
  free (sock);
}

int
main (void)
{
  const char *needs[] = { "nbdkit", "qemu-nbd", NULL };
  servers_init ("writer-test", needs, 240);
  /* WRITER_TEST_ONLY=name runs one part, for debugging. */
  static const struct { const char *name; void (*run) (void); } parts[] = {
    { "api", test_api }, { "nbdkit", test_nbdkit }, { "qemu", test_qemu }, { "tls", test_tls },
    { "hand_over", test_hand_over }, { "error", test_error },
  };
  const char *only = getenv ("WRITER_TEST_ONLY");
  for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++)
    if (only == NULL || strcmp (only, parts[i].name) == 0) parts[i].run ();
  printf ("writer-test: %d checks, %d failures\n", checks, failures);
  return failures ? 1 : 0;
}
