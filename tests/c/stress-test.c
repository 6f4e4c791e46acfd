/* Dying servers and many threads. Real nbdkit and qemu-nbd are killed
 * with 64 commands in flight; shutdown runs with 64 in flight, with and
 * without ABANDON_PENDING; then 8 threads share one handle, and 8 threads
 * drive 8 handles with their own poll loops, reading and writing at
 * random, every byte read checked against a local copy of the disk.
 * Every completion must arrive exactly once and every callback be freed
 * exactly once; nothing may hang (the alarm) and no descriptor may stay
 * open. It must pass on Debian's libnbd and on ours; tests/helgrind.sh
 * runs it under helgrind with STRESS_OPS set low.
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

/* One command's completion callback: called and freed once each. */
struct cmd {
  atomic_int calls, frees;
  int err;
  int retire;                   /* the callback's return value */
};

/* The callback may run in another thread (whichever one services the
 * handle). A mutex, which helgrind understands, orders its writes before
 * the submitter's reads; C11 atomics alone would be a race in its eyes. */
static pthread_mutex_t cmd_lock = PTHREAD_MUTEX_INITIALIZER;

static int
cmd_done (void *p, int *error)
{
  struct cmd *c = p;
  pthread_mutex_lock (&cmd_lock);
  c->err = *error;
  atomic_fetch_add (&c->calls, 1);
  pthread_mutex_unlock (&cmd_lock);
  return c->retire;
}

/* Whether C's completion callback has run, and then its error in *ERR. */
static bool
cmd_called (struct cmd *c, int *err)
{
  pthread_mutex_lock (&cmd_lock);
  bool called = atomic_load (&c->calls) > 0;
  *err = c->err;
  pthread_mutex_unlock (&cmd_lock);
  return called;
}

static void
cmd_free (void *p)
{
  atomic_fetch_add (&((struct cmd *) p)->frees, 1);
}

static nbd_completion_callback
completion_of (struct cmd *c)
{
  return (nbd_completion_callback) { .callback = cmd_done, .user_data = c, .free = cmd_free };
}

enum { IN_FLIGHT = 64, SLOT = 65536 };

static struct nbd_handle *
connect_unix_or_die (const char *sock)
{
  struct nbd_handle *h = nbd_create ();
  if (h == NULL || nbd_connect_unix (h, sock) == -1)
    fatal ("connect %s: %s", sock, nbd_get_error ());
  return h;
}

/* Reads and writes alternately, 64 KiB each, with completion callbacks. */
static void
submit_flight (struct nbd_handle *h, char (*bufs)[SLOT], struct cmd *cmds, int64_t *cookies)
{
  for (int i = 0; i < IN_FLIGHT; i++) {
    memset (&cmds[i], 0, sizeof cmds[i]);
    cookies[i] = i % 2
      ? nbd_aio_pread (h, bufs[i], SLOT, (uint64_t) i * SLOT, completion_of (&cmds[i]), 0)
      : nbd_aio_pwrite (h, bufs[i], SLOT, (uint64_t) i * SLOT, completion_of (&cmds[i]), 0);
  }
}

/* Every command completed once, its callback freed once after retiring,
 * and nbd_aio_command_completed agrees with the callback. Returns how
 * many failed; *bad_errno counts failures with an errno not in `allowed`
 * (0-terminated; NULL allows any). */
static int
retire_flight (const char *what, struct nbd_handle *h, struct cmd *cmds, const int64_t *cookies,
               const int *allowed, int *bad_errno)
{
  int failed = 0, calls = 0, frees = 0, agree = 0;
  *bad_errno = 0;
  for (int i = 0; i < IN_FLIGHT; i++) {
    calls += cmds[i].calls == 1;
    int r = nbd_aio_command_completed (h, cookies[i]);
    int e = r == -1 ? nbd_get_errno () : 0;
    agree += (r == 1 && cmds[i].err == 0) || (r == -1 && e == cmds[i].err && e != 0);
    frees += cmds[i].frees == 1;
    if (cmds[i].err != 0) {
      failed++;
      bool ok = allowed == NULL;
      for (const int *a = allowed; a && *a; a++) ok |= *a == cmds[i].err;
      *bad_errno += !ok;
    }
  }
  CHECK (calls == IN_FLIGHT, "%s: %d of %d completion callbacks ran exactly once", what, calls, IN_FLIGHT);
  CHECK (agree == IN_FLIGHT, "%s: %d of %d commands report the callback's errno", what, agree, IN_FLIGHT);
  CHECK (frees == IN_FLIGHT, "%s: %d of %d callbacks freed exactly once", what, frees, IN_FLIGHT);
  return failed;
}

static void
kill_server (pid_t pid)
{
  kill (pid, SIGKILL);
  waitpid (pid, NULL, 0);
  forget_child (pid);
}

/* The server dies with 64 commands in flight: all fail, none hang, the
 * handle ends dead or closed and leaves no descriptor. `stopped` freezes
 * the server first, so that it has answered nothing. */
static void
killed_in_flight (const char *what, const char *sock, pid_t server, bool stopped)
{
  static char bufs[IN_FLIGHT][SLOT];
  static struct cmd cmds[IN_FLIGHT];
  int64_t cookies[IN_FLIGHT];
  int before = open_fds (), bad, polls = 0;
  struct nbd_handle *h = connect_unix_or_die (sock);

  if (stopped) {
    int status;
    kill (server, SIGSTOP);
    /* Stopped for sure before the first request leaves. */
    CHECK (waitpid (server, &status, WUNTRACED) == server && WIFSTOPPED (status), "%s: server stopped", what);
  }
  submit_flight (h, bufs, cmds, cookies);
  for (int i = 0; i < 5; i++) nbd_poll (h, 10);
  CHECK (nbd_aio_in_flight (h) == IN_FLIGHT, "%s: %d in flight before the kill", what, nbd_aio_in_flight (h));
  kill_server (server);
  while (nbd_aio_in_flight (h) > 0 && polls++ < 1000)
    if (nbd_poll (h, 100) == -1) break;
  CHECK (nbd_aio_in_flight (h) == 0, "%s: %d still in flight after the kill", what, nbd_aio_in_flight (h));
  CHECK (nbd_aio_is_dead (h) == 1 || nbd_aio_is_closed (h) == 1, "%s: state %s", what,
         nbd_connection_state (h));
  int failed = retire_flight (what, h, cmds, cookies, NULL, &bad);
  CHECK (failed == IN_FLIGHT, "%s: %d of %d commands failed", what, failed, IN_FLIGHT);
  CHECK (nbd_pread (h, bufs[0], 512, 0, 0) == -1, "%s: a command after the death fails", what);
  nbd_close (h);
  CHECK (open_fds () == before, "%s: %d descriptors before, %d after close", what, before, open_fds ());
}

/* nbd_shutdown with 64 in flight. Without ABANDON_PENDING every command
 * is sent; with it, those still queued here fail with ENOTCONN. A server
 * may answer what it has at the disconnect with ESHUTDOWN (nbdkit), or
 * close with replies unsent (qemu-nbd, seen with Debian's libnbd): then
 * ENOTCONN. Either way all complete and most succeed. */
static void
shutdown_in_flight (const char *what, const char *sock, uint32_t flags)
{
  static char bufs[IN_FLIGHT][SLOT];
  static struct cmd cmds[IN_FLIGHT];
  int64_t cookies[IN_FLIGHT];
  const int allowed[] = { ENOTCONN, ESHUTDOWN, 0 };
  int before = open_fds (), bad;
  struct nbd_handle *h = connect_unix_or_die (sock);

  submit_flight (h, bufs, cmds, cookies);
  CHECK (nbd_shutdown (h, flags) == 0, "%s: shutdown", what);
  CHECK (nbd_aio_in_flight (h) == 0, "%s: %d in flight after shutdown", what, nbd_aio_in_flight (h));
  CHECK (nbd_aio_is_closed (h) == 1, "%s: closed after shutdown, state %s", what, nbd_connection_state (h));
  int failed = retire_flight (what, h, cmds, cookies, allowed, &bad);
  CHECK (bad == 0, "%s: %d commands failed with an unexpected errno", what, bad);
  if (flags == 0)
    CHECK (failed < IN_FLIGHT / 2, "%s: %d of %d commands failed", what, failed, IN_FLIGHT);
  nbd_close (h);
  CHECK (open_fds () == before, "%s: %d descriptors before, %d after close", what, before, open_fds ());
}

static pid_t
start_qemu_nbd (const char *img_name, const char *sock_name, uint64_t size)
{
  char *img = path_in_dir (img_name), *sock = path_in_dir (sock_name), *pidfile;
  if (asprintf (&pidfile, "%s.pid", sock) == -1) fatal ("asprintf");
  char *argv[] = { "qemu-nbd", "-k", sock, "-f", "raw", "-t", "--pid-file", pidfile, img, NULL };
  int fd = open (img, O_CREAT | O_RDWR | O_TRUNC, 0644);
  if (fd == -1 || ftruncate (fd, (off_t) size) == -1) fatal ("%s: %m", img);
  close (fd);
  pid_t pid = spawn (argv, -1, -1);
  wait_ready ("qemu-nbd", pid, pidfile, sock, 0, false);
  free (img); free (sock); free (pidfile);
  return pid;
}

static void
test_server_death_and_shutdown (void)
{
  char *delayed[] = { "--filter=delay", "memory", "64M", "rdelay=10", "wdelay=10", NULL };
  char *memory[] = { "memory", "64M", NULL };
  char *sock;

  sock = path_in_dir ("delayed.sock");
  killed_in_flight ("nbdkit killed mid-command", sock, start_nbdkit_unix ("delayed.sock", delayed), false);
  free (sock);
  sock = path_in_dir ("stopped.sock");
  killed_in_flight ("nbdkit killed while stopped", sock, start_nbdkit_unix ("stopped.sock", memory), true);
  free (sock);
  sock = path_in_dir ("qemu.sock");
  killed_in_flight ("qemu-nbd killed while stopped", sock, start_qemu_nbd ("qemu.img", "qemu.sock", 64 << 20),
                    true);
  free (sock);

  sock = path_in_dir ("shutdown.sock");
  pid_t pid = start_nbdkit_unix ("shutdown.sock", memory);
  shutdown_in_flight ("nbdkit shutdown", sock, 0);
  shutdown_in_flight ("nbdkit shutdown abandon", sock, LIBNBD_SHUTDOWN_ABANDON_PENDING);
  kill_server (pid);
  free (sock);
  sock = path_in_dir ("qemu2.sock");
  pid = start_qemu_nbd ("qemu2.img", "qemu2.sock", 64 << 20);
  shutdown_in_flight ("qemu-nbd shutdown", sock, 0);
  shutdown_in_flight ("qemu-nbd shutdown abandon", sock, LIBNBD_SHUTDOWN_ABANDON_PENDING);
  kill_server (pid);
  free (sock);
}

/* ---- threads ------------------------------------------------------------ */

enum { THREADS = 8, REGION = 1 << 20, DISK = THREADS * REGION, BATCH = 8, PIECE = REGION / BATCH };

static unsigned char *model;    /* what the disk holds: thread i owns region i */
static int ops_per_thread = 300;
static bool injecting;          /* the server fails commands at random (EIO) */
static atomic_long failed_commands;

struct worker {
  int id;
  struct nbd_handle *h;
  bool own_loop;                /* drive the handle with poll(2), not nbd_poll */
  uint64_t rng;
  long commands, bytes_checked, mismatches, errors, wrong_errno, lost;
};

/* A command failed with `err`; only EIO, and only when injected, is right. */
static void
failed (struct worker *w, int err)
{
  w->errors++;
  w->wrong_errno += err != EIO;
  atomic_fetch_add (&failed_commands, 1);
}

static uint64_t
next (struct worker *w)
{
  w->rng ^= w->rng << 13;
  w->rng ^= w->rng >> 7;
  w->rng ^= w->rng << 17;
  return w->rng;
}

/* A random extent inside [base, base + span), at most 64 KiB. */
static void
pick (struct worker *w, uint64_t base, uint64_t span, uint64_t *off, size_t *len)
{
  *len = 1 + next (w) % (span < 65536 ? span : 65536);
  *off = base + next (w) % (span - *len + 1);
}

static void
check_read (struct worker *w, const unsigned char *buf, uint64_t off, size_t len)
{
  w->bytes_checked += (long) len;
  w->mismatches += memcmp (buf, model + off, len) != 0;
}

/* Waits for one handle event: nbd_poll with a short timeout (never
 * holding the lock long while another thread waits to submit), or the
 * caller's own poll(2) on the descriptor. */
static void
wait_some (struct worker *w)
{
  if (!w->own_loop) {
    nbd_poll (w->h, 10);
    return;
  }
  unsigned dir = nbd_aio_get_direction (w->h);
  struct pollfd pfd = { .fd = nbd_aio_get_fd (w->h), .events = 0 };
  if (dir & LIBNBD_AIO_DIRECTION_READ) pfd.events |= POLLIN;
  if (dir & LIBNBD_AIO_DIRECTION_WRITE) pfd.events |= POLLOUT;
  if (poll (&pfd, 1, 1000) <= 0) return;
  if (pfd.revents & (POLLIN | POLLHUP | POLLERR)) nbd_aio_notify_read (w->h);
  else if (pfd.revents & POLLOUT) nbd_aio_notify_write (w->h);
}

/* Up to BATCH commands at once on distinct pieces of the region, half
 * retired by their callback, half by nbd_aio_command_completed. */
static void
aio_batch (struct worker *w)
{
  static __thread unsigned char bufs[BATCH][PIECE];
  struct cmd cmds[BATCH];
  int64_t cookies[BATCH];
  uint64_t offs[BATCH];
  size_t lens[BATCH];
  bool writes[BATCH];
  int n = 1 + (int) (next (w) % BATCH), left = n, spins = 0;

  for (int i = 0; i < n; i++) {
    memset (&cmds[i], 0, sizeof cmds[i]);
    cmds[i].retire = i % 2;
    writes[i] = next (w) % 2;
    pick (w, (uint64_t) w->id * REGION + (uint64_t) i * PIECE, PIECE, &offs[i], &lens[i]);
    if (writes[i])
      for (size_t j = 0; j < lens[i]; j++) bufs[i][j] = (unsigned char) next (w);
    cookies[i] = writes[i]
      ? nbd_aio_pwrite (w->h, bufs[i], lens[i], offs[i], completion_of (&cmds[i]), 0)
      : nbd_aio_pread (w->h, bufs[i], lens[i], offs[i], completion_of (&cmds[i]), 0);
    if (cookies[i] == -1) { failed (w, nbd_get_errno ()); cmds[i].calls = 1; cmds[i].frees = 1; left--; continue; }
    w->commands++;
  }
  bool done[BATCH] = { false };
  while (left > 0 && spins++ < 100000) {
    left = 0;
    for (int i = 0; i < n; i++) {
      if (cookies[i] == -1 || done[i]) continue;
      int err;
      done[i] = cmds[i].retire ? cmd_called (&cmds[i], &err)
        : nbd_aio_command_completed (w->h, cookies[i]) != 0;
      left += !done[i];
    }
    if (left > 0) wait_some (w);
  }
  for (int i = 0; i < n; i++) {
    if (cookies[i] == -1) continue;
    int err;
    cmd_called (&cmds[i], &err);
    w->lost += atomic_load (&cmds[i].calls) != 1 || atomic_load (&cmds[i].frees) != 1;
    if (err != 0) { failed (w, err); continue; }
    if (writes[i]) memcpy (model + offs[i], bufs[i], lens[i]);
    else check_read (w, bufs[i], offs[i], lens[i]);
  }
}

static void
sync_op (struct worker *w)
{
  static __thread unsigned char buf[65536];
  uint64_t off;
  size_t len;
  pick (w, (uint64_t) w->id * REGION, REGION, &off, &len);
  w->commands++;
  switch (next (w) % 4) {
  case 0:
    if (nbd_pread (w->h, buf, len, off, 0) == -1) failed (w, nbd_get_errno ());
    else check_read (w, buf, off, len);
    break;
  case 1:
    for (size_t j = 0; j < len; j++) buf[j] = (unsigned char) next (w);
    if (nbd_pwrite (w->h, buf, len, off, 0) == -1) failed (w, nbd_get_errno ());
    else memcpy (model + off, buf, len);
    break;
  case 2:
    if (nbd_zero (w->h, len, off, 0) == -1) failed (w, nbd_get_errno ());
    else memset (model + off, 0, len);
    break;
  default:
    if (nbd_flush (w->h, 0) == -1) failed (w, nbd_get_errno ());
  }
}

static void *
work (void *p)
{
  struct worker *w = p;
  for (int i = 0; i < ops_per_thread; i++) {
    if (w->own_loop || next (w) % 2) aio_batch (w);
    else sync_op (w);
  }
  return NULL;
}

/* The whole disk as the model says, read through `h` in 1 MiB pieces,
 * each retried while the server injects errors. */
static void
check_disk (const char *what, struct nbd_handle *h)
{
  unsigned char *disk = malloc (DISK);
  int unread = 0, unexpected = 0;
  for (uint64_t off = 0; off < DISK; off += REGION) {
    int tries = 0;
    while (nbd_pread (h, disk + off, REGION, off, 0) == -1 && tries++ < 100) {
      unexpected += !injecting || nbd_get_errno () != EIO;
      atomic_fetch_add (&failed_commands, 1);
    }
    unread += tries > 100;
  }
  CHECK (unread == 0 && unexpected == 0, "%s: %d pieces of the disk unreadable, %d unexpected failures", what,
         unread, unexpected);
  CHECK (memcmp (disk, model, DISK) == 0, "%s: the disk equals the local copy", what);
  free (disk);
}

static void
run_workers (const char *what, struct worker *ws, struct nbd_handle *check_via)
{
  pthread_t t[THREADS];
  long commands = 0, checked = 0, mismatches = 0, errors = 0, wrong = 0, lost = 0;
  for (int i = 0; i < THREADS; i++)
    if (pthread_create (&t[i], NULL, work, &ws[i]) != 0) fatal ("pthread_create");
  for (int i = 0; i < THREADS; i++) {
    pthread_join (t[i], NULL);
    commands += ws[i].commands; checked += ws[i].bytes_checked;
    mismatches += ws[i].mismatches; errors += ws[i].errors; lost += ws[i].lost; wrong += ws[i].wrong_errno;
  }
  CHECK (mismatches == 0, "%s: %ld reads differ from the local copy", what, mismatches);
  if (injecting)
    CHECK (wrong == 0 && errors > 0, "%s: %ld of %ld failures not EIO", what, wrong, errors);
  else
    CHECK (errors == 0, "%s: %ld commands failed", what, errors);
  CHECK (lost == 0, "%s: %ld completions lost or doubled", what, lost);
  CHECK (commands >= (long) THREADS * ops_per_thread, "%s: only %ld commands", what, commands);
  check_disk (what, check_via);
  printf ("%s: %d threads, %ld commands (%ld failed), %ld bytes read and checked\n", what, THREADS, commands,
          errors, checked);
}

/* 8 threads on one handle, then 8 handles in 8 threads, on the server at
 * `sock`; `what` names the run. */
static void
threads (const char *what, const char *sock)
{
  struct worker ws[THREADS];
  struct nbd_handle *hs[THREADS];
  char name[100];
  int before;

  model = calloc (1, DISK);
  before = open_fds ();

  struct nbd_handle *shared = connect_unix_or_die (sock);
  for (int i = 0; i < THREADS; i++)
    ws[i] = (struct worker) { .id = i, .h = shared, .rng = 0x9e3779b97f4a7c15ull * (uint64_t) (i + 1) };
  snprintf (name, sizeof name, "%s: 8 threads on one handle", what);
  run_workers (name, ws, shared);
  CHECK (nbd_aio_in_flight (shared) == 0, "one handle: nothing left in flight");

  for (int i = 0; i < THREADS; i++) {
    hs[i] = connect_unix_or_die (sock);
    ws[i] = (struct worker) { .id = i, .h = hs[i], .own_loop = true,
                              .rng = 0x2545f4914f6cdd1dull * (uint64_t) (i + 1) };
  }
  snprintf (name, sizeof name, "%s: 8 handles in 8 threads", what);
  run_workers (name, ws, shared);
  for (int i = 0; i < THREADS; i++) {
    CHECK (nbd_shutdown (hs[i], 0) == 0, "handle %d: shutdown", i);
    nbd_close (hs[i]);
  }
  nbd_close (shared);
  CHECK (open_fds () == before, "%s: %d descriptors before, %d after", what, before, open_fds ());
  free (model);
}

static void
test_threads (void)
{
  char *memory[] = { "memory", "8M", NULL };
  char *sock = path_in_dir ("threads.sock");
  start_nbdkit_unix ("threads.sock", memory);
  threads ("clean", sock);
  free (sock);
}

/* The same with nbdkit's error filter failing 5% of all commands with
 * EIO: every failure reaches the program as EIO (as many as the filter
 * logged), a failed write leaves the old data (the filter fails it before
 * the plugin sees it), and every successful read matches. */
static void
test_threads_with_injected_errors (void)
{
  char *sock = path_in_dir ("inject.sock"), *log = path_in_dir ("inject.log"), *pidfile, *cmd;
  if (asprintf (&pidfile, "%s.pid", sock) == -1 ||
      asprintf (&cmd, "exec nbdkit -f --exit-with-parent -U %s -P %s --filter=error memory 8M "
                "error=EIO error-rate=5%% 2> %s", sock, pidfile, log) == -1)
    fatal ("asprintf");
  char *argv[] = { "sh", "-c", cmd, NULL };
  wait_ready ("nbdkit (error filter)", spawn (argv, -1, -1), pidfile, sock, 0, false);

  injecting = true;
  atomic_store (&failed_commands, 0);
  threads ("injected errors", sock);
  injecting = false;

  long injected = 0;
  char line[512];
  FILE *fp = fopen (log, "r");
  while (fp && fgets (line, sizeof line, fp))
    injected += strstr (line, "injecting EIO") != NULL;
  if (fp) fclose (fp);
  CHECK (injected > 0 && injected == atomic_load (&failed_commands),
         "injected errors: the server injected %ld, the program saw %ld", injected, atomic_load (&failed_commands));
  printf ("injected errors: %ld injected, %ld reported\n", injected, atomic_load (&failed_commands));
  free (sock); free (log); free (pidfile); free (cmd);
}

int
main (void)
{
  const char *needs[] = { "nbdkit", "qemu-nbd", NULL };
  const char *ops = getenv ("STRESS_OPS");
  bool threads_only = getenv ("STRESS_THREADS_ONLY") != NULL;

  if (ops) ops_per_thread = atoi (ops);
  servers_init ("stress-test", needs, threads_only ? 1200 : 120);
  if (!threads_only) test_server_death_and_shutdown ();
  test_threads ();
  test_threads_with_injected_errors ();
  printf ("stress-test: %d checks, %d failures\n", checks, failures);
  return failures != 0;
}
