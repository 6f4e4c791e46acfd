/* One writer thread shared by several handles (the concurrent writer, an
 * extension of nbd-rs). Each handle hands its bytes to its own queue;
 * the writer thread sends from every queue, waiting in poll(2) for an
 * eventfd that says a queue filled, and for the sockets that were full.
 * This thread polls every handle's socket, only for replies. Four
 * handles each write a pattern over their own 2 MiB with 16 commands in
 * flight, read it back and check it.
 *
 * Usage: concurrent-writer-shared SOCKET|URI
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>
#include <libnbd.h>

#define HANDLES 4
#define BLOCK (8 * 1024)
#define BLOCKS 256              /* per handle */
#define IN_FLIGHT 16            /* per handle */
/* The most one send takes from a queue. */
#define SEND_MAX (64 * 1024)
/* Every request in flight, and one send's worth: a reply can come
 * before the send that carried its request has returned. */
#define QUEUE (IN_FLIGHT * (BLOCK + 32) + SEND_MAX)

/* A handle's bytes not yet sent: a ring, touched only under w.lock. */
struct queue {
  char bytes[QUEUE];
  size_t head, used;
  int fd;                       /* the handle's socket */
  int full;                     /* the socket took nothing: wait for POLLOUT */
  int failed;
  struct nbd_handle *nbd;
};

static struct {
  pthread_mutex_t lock;
  int wake;                     /* eventfd: a queue filled, or stop */
  int sleeping;                 /* the writer thread is in poll(2) */
  int stop;
  struct queue q[HANDLES];
} w = { .lock = PTHREAD_MUTEX_INITIALIZER };

static void
die (const char *what)
{
  fprintf (stderr, "%s: %s\n", what, nbd_get_error ());
  exit (EXIT_FAILURE);
}

static void
wake_writer (void)
{
  uint64_t one = 1;
  if (write (w.wake, &one, sizeof one) != sizeof one)
    perror ("write: eventfd");
}

/* The writer of every handle; data says which. Copies and returns. */
static void
writer_cb (void *data, const void *buf, size_t len)
{
  struct queue *q = data;
  size_t tail, first;

  pthread_mutex_lock (&w.lock);
  if (q->failed || QUEUE - q->used < len) {
    if (!q->failed)
      nbd_rs_concurrent_writer_error (q->nbd, ENOBUFS);
    q->failed = 1;
  }
  else {
    tail = (q->head + q->used) % QUEUE;
    first = len < QUEUE - tail ? len : QUEUE - tail;
    memcpy (q->bytes + tail, buf, first);
    memcpy (q->bytes, (const char *) buf + first, len - first);
    q->used += len;
    if (w.sleeping) {
      w.sleeping = 0;
      wake_writer ();
    }
  }
  pthread_mutex_unlock (&w.lock);
}

/* Sends what each queue holds without blocking; returns whether any
 * queue still holds bytes, and sets *ready if one holds bytes its socket
 * may take (they came while the lock was let go). Called with w.lock
 * held, which it lets go around each send. */
static int
send_queues (int *ready)
{
  int pending = 0;

  for (int i = 0; i < HANDLES; i++) {
    struct queue *q = &w.q[i];
    while (q->used > 0 && !q->full) {
      size_t n = q->used < QUEUE - q->head ? q->used : QUEUE - q->head;
      const char *p = q->bytes + q->head;
      ssize_t sent;
      int err;

      if (n > SEND_MAX)
        n = SEND_MAX;
      if (q->failed)
        sent = n;
      else {
        pthread_mutex_unlock (&w.lock);
        sent = send (q->fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
        err = errno;
        pthread_mutex_lock (&w.lock);
        if (sent == -1 && (err == EAGAIN || err == EWOULDBLOCK)) {
          q->full = 1;
          break;
        }
        if (sent == -1 && err != EINTR) {
          nbd_rs_concurrent_writer_error (q->nbd, err);
          q->failed = 1;
          sent = n;
        }
        if (sent == -1)
          continue;
      }
      q->head = (q->head + sent) % QUEUE;
      q->used -= sent;
    }
    pending |= q->used > 0;
  }
  *ready = 0;
  for (int i = 0; i < HANDLES; i++)
    *ready |= w.q[i].used > 0 && !w.q[i].full;
  return pending;
}

static void *
writer_thread (void *arg)
{
  (void) arg;
  pthread_mutex_lock (&w.lock);
  for (;;) {
    struct pollfd fds[HANDLES + 1];
    uint64_t count;
    int ready, pending = send_queues (&ready);

    if (w.stop && !pending)
      break;
    if (ready)
      continue;
    /* Sleep until a queue fills or a full socket drains. */
    fds[0] = (struct pollfd) { .fd = w.wake, .events = POLLIN };
    for (int i = 0; i < HANDLES; i++)
      fds[i + 1] = (struct pollfd) { .fd = w.q[i].full ? w.q[i].fd : -1, .events = POLLOUT };
    w.sleeping = 1;
    pthread_mutex_unlock (&w.lock);
    if (poll (fds, HANDLES + 1, -1) == -1 && errno != EINTR) {
      perror ("poll");
      exit (EXIT_FAILURE);
    }
    if (fds[0].revents & POLLIN && read (w.wake, &count, sizeof count) != sizeof count)
      perror ("read: eventfd");
    pthread_mutex_lock (&w.lock);
    w.sleeping = 0;
    for (int i = 0; i < HANDLES; i++)
      if (fds[i + 1].revents)
        w.q[i].full = 0;
  }
  pthread_mutex_unlock (&w.lock);
  return NULL;
}

/* Runs every handle's commands, writing or reading, IN_FLIGHT each. */
static void
run (struct nbd_handle **nbd, char **data, int writing)
{
  int64_t cookies[HANDLES][BLOCKS];
  size_t next[HANDLES] = { 0 }, done[HANDLES] = { 0 }, finished = 0;

  while (finished < HANDLES) {
    struct pollfd fds[HANDLES];
    int timeout = -1;

    for (int i = 0; i < HANDLES; i++) {
      while (next[i] < BLOCKS && nbd_aio_in_flight (nbd[i]) < IN_FLIGHT) {
        char *p = data[i] + next[i] * BLOCK;
        uint64_t offset = ((uint64_t) i * BLOCKS + next[i]) * BLOCK;
        cookies[i][next[i]] = writing
          ? nbd_aio_pwrite (nbd[i], p, BLOCK, offset, NBD_NULL_COMPLETION, 0)
          : nbd_aio_pread (nbd[i], p, BLOCK, offset, NBD_NULL_COMPLETION, 0);
        if (cookies[i][next[i]] == -1) die ("submit");
        next[i]++;
      }
      unsigned dir = nbd_aio_get_direction (nbd[i]);
      if (dir & LIBNBD_AIO_DIRECTION_WRITE) {
        fprintf (stderr, "handle %d asked to wait for writability\n", i);
        exit (EXIT_FAILURE);
      }
      fds[i] = (struct pollfd) { .fd = nbd_aio_get_fd (nbd[i]),
                                 .events = done[i] < BLOCKS && dir ? POLLIN : 0 };
      /* Dead: nothing to wait for; its commands say why, below. */
      if (done[i] < BLOCKS && dir == 0)
        timeout = 0;
    }
    if (poll (fds, HANDLES, timeout) == -1 && errno != EINTR) {
      perror ("poll");
      exit (EXIT_FAILURE);
    }
    for (int i = 0; i < HANDLES; i++) {
      if (fds[i].revents & (POLLIN | POLLHUP | POLLERR) && nbd_aio_notify_read (nbd[i]) == -1)
        die ("nbd_aio_notify_read");
      while (done[i] < next[i]) {
        int r = nbd_aio_command_completed (nbd[i], cookies[i][done[i]]);
        if (r == -1) die (writing ? "write" : "read");
        if (r == 0) break;
        if (++done[i] == BLOCKS) finished++;
      }
    }
  }
  printf ("%s: %d handles, %d blocks of %d bytes each\n",
          writing ? "write" : "read", HANDLES, BLOCKS, BLOCK);
}

int
main (int argc, char *argv[])
{
  struct nbd_handle *nbd[HANDLES];
  char *data[HANDLES];
  pthread_t thread;

  if (argc != 2) {
    fprintf (stderr, "usage: %s SOCKET|URI\n", argv[0]);
    return EXIT_FAILURE;
  }
  w.wake = eventfd (0, EFD_CLOEXEC);
  if (w.wake == -1) { perror ("eventfd"); return EXIT_FAILURE; }
  for (int i = 0; i < HANDLES; i++) {
    nbd[i] = nbd_create ();
    if (nbd[i] == NULL) die ("nbd_create");
    w.q[i].nbd = nbd[i];
    if (nbd_rs_set_concurrent_writer (nbd[i], &w.q[i], writer_cb) == -1)
      die ("nbd_rs_set_concurrent_writer");
    if ((strstr (argv[1], "://") ? nbd_connect_uri (nbd[i], argv[1])
                                 : nbd_connect_unix (nbd[i], argv[1])) == -1)
      die ("connect");
    w.q[i].fd = nbd_aio_get_fd (nbd[i]);
    data[i] = malloc ((size_t) BLOCKS * BLOCK);
    if (data[i] == NULL) { perror ("malloc"); return EXIT_FAILURE; }
    for (size_t j = 0; j < (size_t) BLOCKS * BLOCK; j++)
      data[i][j] = (char) (j * 7 + i * 13 + j / BLOCK);
  }
  if (pthread_create (&thread, NULL, writer_thread, NULL) != 0) {
    perror ("pthread_create");
    return EXIT_FAILURE;
  }

  run (nbd, data, 1);
  for (int i = 0; i < HANDLES; i++)
    memset (data[i], 0, (size_t) BLOCKS * BLOCK);
  run (nbd, data, 0);
  for (int i = 0; i < HANDLES; i++)
    for (size_t j = 0; j < (size_t) BLOCKS * BLOCK; j++)
      if (data[i][j] != (char) (j * 7 + i * 13 + j / BLOCK)) {
        fprintf (stderr, "handle %d: byte %zu differs\n", i, j);
        return EXIT_FAILURE;
      }
  printf ("verified %d bytes through one writer thread\n", HANDLES * BLOCKS * BLOCK);

  /* Each handle hands its NBD_CMD_DISC to the writer; the thread sends
   * them and exits before the handles close their sockets. */
  for (int i = 0; i < HANDLES; i++)
    if (nbd_shutdown (nbd[i], 0) == -1) die ("nbd_shutdown");
  pthread_mutex_lock (&w.lock);
  w.stop = 1;
  wake_writer ();
  pthread_mutex_unlock (&w.lock);
  pthread_join (thread, NULL);
  for (int i = 0; i < HANDLES; i++) {
    nbd_close (nbd[i]);
    free (data[i]);
  }
  close (w.wake);
  return EXIT_SUCCESS;
}
