/* The concurrent writer, an extension of nbd-rs: this thread polls the
 * socket only for replies, while a writer thread sends every request.
 * The handle hands each buffer it would send to writer_cb (below), which
 * copies it into a ring buffer and returns at once; the writer thread
 * sends from the ring. Writes a pattern over 8 MiB with 64 commands in
 * flight, reads it back and checks it.
 *
 * Usage: concurrent-writer SOCKET|URI
 *
 * With four more arguments it is the benchmark of `make bench`: random
 * writes of SIZE bytes, IN_FLIGHT at a time, for SECONDS, through the
 * writer thread ("writer") or sent by the library itself ("plain"):
 *
 *   concurrent-writer URI SIZE IN_FLIGHT SECONDS writer|plain
 *
 * and prints "requests N seconds S".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <libnbd.h>

#define BLOCK (16 * 1024)
#define BLOCKS 512
#define IN_FLIGHT 64
/* A request's header, at most (extended headers). */
#define HEADER 32
/* What TLS adds to a request, generously: 64 bytes for each record of
 * up to 16 KiB it takes, and for the records its header shares. */
#define TLS_OVERHEAD(size) (((size) / 16384 + 2) * 64)
/* The most the writer thread sends in one call. */
#define SEND_MAX (256 * 1024)
/* A ring for depth requests of size bytes, over TLS or not. */
#define RING_FOR(depth, size) \
  ((size_t) (depth) * ((size) + HEADER + TLS_OVERHEAD (size)) + SEND_MAX)

/* What the handle has handed over and the writer thread has not yet
 * sent. One producer (writer_cb, on the thread that drives the handle)
 * and one consumer (the writer thread): each copies outside the lock,
 * into or out of bytes the other does not touch. The ring is sized for
 * every request that can be in flight, plus one send's worth (a reply
 * can come before the send that carried its request has returned and
 * freed the room), so writer_cb never has to wait for room, which it
 * must not do. */
struct ring {
  pthread_mutex_t lock;
  pthread_cond_t wake;
  char *bytes;
  size_t cap;
  size_t head;                  /* the next byte to send */
  size_t used;                  /* bytes queued from head on */
  int sleeping;                 /* the writer thread waits on wake */
  int stop;                     /* send what is queued, then exit */
  int failed;                   /* a send failed: drop what is queued */
  int fd;                       /* the handle's socket */
  struct nbd_handle *nbd;
};

static void
die (const char *what)
{
  fprintf (stderr, "%s: %s\n", what, nbd_get_error ());
  exit (EXIT_FAILURE);
}

/* Called with the handle locked, on whichever thread drives it: copy
 * and return; buf is valid only until this returns. */
static void
writer_cb (void *data, const void *buf, size_t len)
{
  struct ring *r = data;
  size_t tail, first;

  pthread_mutex_lock (&r->lock);
  if (r->failed || r->cap - r->used < len) {
    /* Never happens while the ring is sized right; the handle fails
     * every command rather than lose a byte. */
    if (!r->failed)
      nbd_rs_concurrent_writer_error (r->nbd, ENOBUFS);
    r->failed = 1;
    pthread_mutex_unlock (&r->lock);
    return;
  }
  tail = (r->head + r->used) % r->cap;
  pthread_mutex_unlock (&r->lock);

  first = len < r->cap - tail ? len : r->cap - tail;
  memcpy (r->bytes + tail, buf, first);
  memcpy (r->bytes, (const char *) buf + first, len - first);

  pthread_mutex_lock (&r->lock);
  r->used += len;
  if (r->sleeping)
    pthread_cond_signal (&r->wake);
  pthread_mutex_unlock (&r->lock);
}

/* Sends some of p[0..n), waiting for room in the socket if need be;
 * -1 with errno on failure. The socket is non-blocking: it is the
 * handle's, shared with the thread that receives. */
static ssize_t
send_some (int fd, const char *p, size_t n)
{
  for (;;) {
    ssize_t sent = send (fd, p, n, MSG_NOSIGNAL);
    if (sent >= 0)
      return sent;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      struct pollfd pfd = { .fd = fd, .events = POLLOUT };
      poll (&pfd, 1, -1);
    }
    else if (errno != EINTR)
      return -1;
  }
}

static void *
writer_thread (void *arg)
{
  struct ring *r = arg;

  pthread_mutex_lock (&r->lock);
  for (;;) {
    size_t n;
    ssize_t sent;
    const char *p;

    while (r->used == 0 && !r->stop) {
      r->sleeping = 1;
      pthread_cond_wait (&r->wake, &r->lock);
      r->sleeping = 0;
    }
    if (r->used == 0)
      break;
    n = r->used < r->cap - r->head ? r->used : r->cap - r->head;
    if (n > SEND_MAX)
      n = SEND_MAX;
    p = r->bytes + r->head;
    sent = n;
    if (!r->failed) {
      pthread_mutex_unlock (&r->lock);
      sent = send_some (r->fd, p, n);
      if (sent == -1)
        /* The handle fails every command with this errno. */
        nbd_rs_concurrent_writer_error (r->nbd, errno);
      pthread_mutex_lock (&r->lock);
      if (sent == -1) {
        r->failed = 1;
        sent = n;
      }
    }
    r->head = (r->head + sent) % r->cap;
    r->used -= sent;
  }
  pthread_mutex_unlock (&r->lock);
  return NULL;
}

static double
now (void)
{
  struct timespec ts;
  clock_gettime (CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* One round of the event loop. With the writer, the handle never asks
 * to wait for writability: this thread only receives. */
static void
wait_once (struct nbd_handle *nbd, int writer)
{
  struct pollfd pfd = { .fd = nbd_aio_get_fd (nbd), .events = 0 };
  unsigned dir = nbd_aio_get_direction (nbd);

  if (writer && (dir & LIBNBD_AIO_DIRECTION_WRITE)) {
    fprintf (stderr, "the handle asked to wait for writability\n");
    exit (EXIT_FAILURE);
  }
  if (dir == 0)
    return;             /* dead: the commands say why */
  if (dir & LIBNBD_AIO_DIRECTION_READ) pfd.events |= POLLIN;
  if (dir & LIBNBD_AIO_DIRECTION_WRITE) pfd.events |= POLLOUT;
  if (poll (&pfd, 1, -1) == -1) {
    if (errno == EINTR) return;
    perror ("poll");
    exit (EXIT_FAILURE);
  }
  if ((pfd.revents & (POLLIN | POLLHUP | POLLERR)) && nbd_aio_notify_read (nbd) == -1)
    die ("nbd_aio_notify_read");
  if ((pfd.revents & POLLOUT) && nbd_aio_notify_write (nbd) == -1)
    die ("nbd_aio_notify_write");
}

static void
connect_to (struct nbd_handle *nbd, const char *where)
{
  int r = strstr (where, "://") ? nbd_connect_uri (nbd, where)
                                : nbd_connect_unix (nbd, where);
  if (r == -1) die ("connect");
}


/* Writes (or reads) every block, at most IN_FLIGHT at a time. */
static void
run (struct nbd_handle *nbd, char *data, int writing)
{
  int64_t cookies[BLOCKS];
  size_t next = 0, done = 0, i;

  while (done < BLOCKS) {
    while (next < BLOCKS && nbd_aio_in_flight (nbd) < IN_FLIGHT) {
      char *p = data + next * BLOCK;
      cookies[next] = writing
        ? nbd_aio_pwrite (nbd, p, BLOCK, next * BLOCK, NBD_NULL_COMPLETION, 0)
        : nbd_aio_pread (nbd, p, BLOCK, next * BLOCK, NBD_NULL_COMPLETION, 0);
      if (cookies[next] == -1) die ("submit");
      next++;
    }
    wait_once (nbd, 1);
    for (i = done; i < next; i++) {
      int r = nbd_aio_command_completed (nbd, cookies[i]);
      if (r == -1) die (writing ? "write" : "read");
      if (r == 0) break;
      done++;
    }
  }
  printf ("%s: %d blocks of %d bytes\n", writing ? "write" : "read", BLOCKS, BLOCK);
}

static void
start_writer (struct ring *r, struct nbd_handle *nbd, size_t cap)
{
  memset (r, 0, sizeof *r);
  pthread_mutex_init (&r->lock, NULL);
  pthread_cond_init (&r->wake, NULL);
  r->cap = cap;
  r->bytes = malloc (cap);
  r->nbd = nbd;
  r->fd = -1;
  if (r->bytes == NULL) { perror ("malloc"); exit (EXIT_FAILURE); }
  /* Set before connecting: the writer takes the sends over once the
   * handshake is done, and the thread starts once the socket is known. */
  if (nbd_rs_set_concurrent_writer (nbd, r, writer_cb) == -1)
    die ("nbd_rs_set_concurrent_writer");
}

static void
run_writer_thread (struct ring *r, pthread_t *thread)
{
  r->fd = nbd_aio_get_fd (r->nbd);
  if (r->fd == -1) die ("nbd_aio_get_fd");
  if (pthread_create (thread, NULL, writer_thread, r) != 0) {
    perror ("pthread_create");
    exit (EXIT_FAILURE);
  }
}

/* After the handle has handed over its last bytes (NBD_CMD_DISC too):
 * the writer thread sends them and exits, before the handle closes the
 * socket. */
static void
stop_writer (struct ring *r, pthread_t thread)
{
  pthread_mutex_lock (&r->lock);
  r->stop = 1;
  pthread_cond_signal (&r->wake);
  pthread_mutex_unlock (&r->lock);
  pthread_join (thread, NULL);
  pthread_cond_destroy (&r->wake);
  pthread_mutex_destroy (&r->lock);
  free (r->bytes);
}

static uint64_t rng = 0x9e3779b97f4a7c15;
static uint64_t
next_random (void)
{
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return rng;
}

/* The benchmark: random writes of size bytes for seconds. */
static int
bench (const char *uri, size_t size, int depth, double seconds, int writer)
{
  struct nbd_handle *nbd = nbd_create ();
  struct ring ring;
  pthread_t thread;
  int64_t *cookies = calloc (depth, sizeof *cookies);
  char *buf = malloc (size);
  uint64_t blocks, done = 0;
  double start, end;
  int stopping = 0, i;

  if (nbd == NULL) die ("nbd_create");
  if (cookies == NULL || buf == NULL) { perror ("malloc"); return EXIT_FAILURE; }
  memset (buf, 0xa5, size);
  if (writer)
    start_writer (&ring, nbd, RING_FOR (depth, size));
  connect_to (nbd, uri);
  if (writer)
    run_writer_thread (&ring, &thread);
  blocks = nbd_get_size (nbd) / size;
  for (i = 0; i < depth; i++) {
    cookies[i] = nbd_aio_pwrite (nbd, buf, size, (next_random () % blocks) * size,
                                 NBD_NULL_COMPLETION, 0);
    if (cookies[i] == -1) die ("nbd_aio_pwrite");
  }
  start = now ();
  end = start + seconds;
  while (nbd_aio_in_flight (nbd) > 0) {
    wait_once (nbd, writer);
    if (!stopping && now () >= end)
      stopping = 1;
    for (i = 0; i < depth; i++) {
      int r;
      if (cookies[i] == 0) continue;
      r = nbd_aio_command_completed (nbd, cookies[i]);
      if (r == 0) continue;
      if (r == -1) die ("write");
      done++;
      cookies[i] = 0;
      if (!stopping) {
        cookies[i] = nbd_aio_pwrite (nbd, buf, size, (next_random () % blocks) * size,
                                     NBD_NULL_COMPLETION, 0);
        if (cookies[i] == -1) die ("nbd_aio_pwrite");
      }
    }
  }
  end = now ();
  if (nbd_shutdown (nbd, 0) == -1) die ("nbd_shutdown");
  if (writer)
    stop_writer (&ring, thread);
  nbd_close (nbd);
  free (cookies);
  free (buf);
  printf ("requests %" PRIu64 " seconds %.3f\n", done, end - start);
  return EXIT_SUCCESS;
}

int
main (int argc, char *argv[])
{
  struct nbd_handle *nbd;
  struct ring ring;
  pthread_t thread;
  char *data;
  size_t i;

  if (argc == 6)
    return bench (argv[1], strtoul (argv[2], NULL, 0), atoi (argv[3]), atof (argv[4]),
                  strcmp (argv[5], "writer") == 0);
  if (argc != 2) {
    fprintf (stderr, "usage: %s SOCKET|URI [SIZE IN_FLIGHT SECONDS writer|plain]\n", argv[0]);
    return EXIT_FAILURE;
  }
  nbd = nbd_create ();
  if (nbd == NULL) die ("nbd_create");
  start_writer (&ring, nbd, RING_FOR (IN_FLIGHT, BLOCK));
  connect_to (nbd, argv[1]);
  run_writer_thread (&ring, &thread);

  data = malloc ((size_t) BLOCKS * BLOCK);
  if (data == NULL) { perror ("malloc"); return EXIT_FAILURE; }
  for (i = 0; i < (size_t) BLOCKS * BLOCK; i++)
    data[i] = (char) (i * 31 + i / BLOCK);
  run (nbd, data, 1);
  /* A synchronous call goes through the writer too. */
  if (nbd_flush (nbd, 0) == -1) die ("nbd_flush");
  memset (data, 0, (size_t) BLOCKS * BLOCK);
  run (nbd, data, 0);
  for (i = 0; i < (size_t) BLOCKS * BLOCK; i++)
    if (data[i] != (char) (i * 31 + i / BLOCK)) {
      fprintf (stderr, "byte %zu differs\n", i);
      return EXIT_FAILURE;
    }
  printf ("verified %d bytes\n", BLOCKS * BLOCK);
  if (nbd_shutdown (nbd, 0) == -1) die ("nbd_shutdown");
  stop_writer (&ring, thread);
  nbd_close (nbd);
  free (data);
  return EXIT_SUCCESS;
}
