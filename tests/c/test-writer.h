/* A concurrent writer for the C tests (nbd_rs_set_concurrent_writer):
 * an unbounded queue the callback appends to (it never waits) and a
 * thread that sends it. writer-test and server-test use it.
 */
#ifndef NBD_TESTS_TEST_WRITER_H
#define NBD_TESTS_TEST_WRITER_H

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sys/socket.h>
#include <libnbd.h>

#include "servers.h"

/* The test's writer: an unbounded queue (the callback never waits) and
 * a thread that sends it. fail_after > 0: once that many bytes are sent,
 * the thread reports EPIPE and drops the rest. */
struct writer {
  pthread_mutex_t lock;
  pthread_cond_t cond;
  char *q;
  size_t head, len, cap;
  int stop, failed, fd;
  size_t handed, sent, fail_after;
  /* The first bytes handed, for the ciphertext check. */
  char *seen;
  size_t seen_len, seen_cap;
  struct nbd_handle *h;
  pthread_t thread;
  int running;
};

static void
writer_cb (void *data, const void *buf, size_t len)
{
  struct writer *w = data;
  pthread_mutex_lock (&w->lock);
  if (w->head > 0 && w->head == w->len) w->head = w->len = 0;
  if (w->len + len > w->cap) {
    memmove (w->q, w->q + w->head, w->len - w->head);
    w->len -= w->head;
    w->head = 0;
    while (w->len + len > w->cap) w->cap = w->cap ? w->cap * 2 : 1 << 20;
    w->q = realloc (w->q, w->cap);
    if (w->q == NULL) fatal ("realloc");
  }
  memcpy (w->q + w->len, buf, len);
  w->len += len;
  w->handed += len;
  if (w->seen_len < w->seen_cap) {
    size_t n = len < w->seen_cap - w->seen_len ? len : w->seen_cap - w->seen_len;
    memcpy (w->seen + w->seen_len, buf, n);
    w->seen_len += n;
  }
  pthread_cond_signal (&w->cond);
  pthread_mutex_unlock (&w->lock);
}

static void *
writer_thread (void *arg)
{
  struct writer *w = arg;
  pthread_mutex_lock (&w->lock);
  for (;;) {
    while (w->head == w->len && !w->stop) pthread_cond_wait (&w->cond, &w->lock);
    if (w->head == w->len) break;
    size_t n = w->len - w->head;
    if (n > 65536) n = 65536;
    if (w->fail_after && w->sent + n >= w->fail_after && !w->failed) {
      w->failed = 1;
      nbd_rs_concurrent_writer_error (w->h, EPIPE);
    }
    if (w->failed) {
      w->head += n;
      continue;
    }
    /* The queue may move (realloc) while unlocked: send from a copy. */
    char chunk[65536];
    memcpy (chunk, w->q + w->head, n);
    pthread_mutex_unlock (&w->lock);
    ssize_t r;
    for (;;) {
      r = send (w->fd, chunk, n, MSG_NOSIGNAL);
      if (r >= 0 || (errno != EAGAIN && errno != EINTR)) break;
      struct pollfd p = { .fd = w->fd, .events = POLLOUT };
      poll (&p, 1, 1000);
    }
    int err = errno;
    pthread_mutex_lock (&w->lock);
    if (r < 0) {
      w->failed = 1;
      nbd_rs_concurrent_writer_error (w->h, err);
      continue;
    }
    w->head += r;
    w->sent += r;
  }
  pthread_mutex_unlock (&w->lock);
  return NULL;
}

static void
writer_init (struct writer *w, struct nbd_handle *h, size_t fail_after)
{
  memset (w, 0, sizeof *w);
  pthread_mutex_init (&w->lock, NULL);
  pthread_cond_init (&w->cond, NULL);
  w->h = h;
  w->fail_after = fail_after;
  w->seen_cap = 1 << 20;
  w->seen = malloc (w->seen_cap);
  w->fd = -1;
}

/* The thread starts once the socket is known. */
static void
writer_start (struct writer *w)
{
  w->fd = nbd_aio_get_fd (w->h);
  if (w->fd < 0) fatal ("aio_get_fd: %s", nbd_get_error ());
  if (pthread_create (&w->thread, NULL, writer_thread, w) != 0) fatal ("pthread_create");
  w->running = 1;
}

/* Sends what is queued (NBD_CMD_DISC too) and ends the thread. */
static void
writer_stop (struct writer *w)
{
  pthread_mutex_lock (&w->lock);
  w->stop = 1;
  pthread_cond_signal (&w->cond);
  pthread_mutex_unlock (&w->lock);
  if (w->running) pthread_join (w->thread, NULL);
  free (w->q);
  free (w->seen);
  pthread_cond_destroy (&w->cond);
  pthread_mutex_destroy (&w->lock);
}

#endif
