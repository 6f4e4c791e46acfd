/* Runs an NBD handle inside a libev loop: an ev_io watcher on the handle's
 * fd, whose events an ev_prepare watcher sets from nbd_aio_get_direction
 * before every poll. The job itself (loop-job.h) writes 4 MiB with 48
 * commands in flight, reads it back and checks it, then disconnects; the
 * loop stops when the handle is closed.
 *
 * Usage: libev-loop SOCKET
 * Build: cc libev-loop.c -lev -lnbd
 */
#include <ev.h>
#include "loop-job.h"

struct nbd_watchers {
  struct job job;
  ev_io io;
  ev_prepare prepare;
  ev_timer timer;
};

static void
stop (struct ev_loop *loop, struct nbd_watchers *w)
{
  ev_io_stop (loop, &w->io);
  ev_prepare_stop (loop, &w->prepare);
  ev_timer_stop (loop, &w->timer);
  ev_break (loop, EVBREAK_ALL);
}

/* Before each poll: the io watcher waits for what the handle waits for.
 * An io watcher's events can only change while it is stopped. */
static void
follow_direction (struct ev_loop *loop, ev_prepare *prepare, int revents)
{
  struct nbd_watchers *w = prepare->data;
  unsigned dir = nbd_aio_get_direction (w->job.nbd);
  int events = 0;

  (void) revents;
  if (dir & LIBNBD_AIO_DIRECTION_READ)
    events |= EV_READ;
  if (dir & LIBNBD_AIO_DIRECTION_WRITE)
    events |= EV_WRITE;
  if (ev_is_active (&w->io) && (w->io.events & (EV_READ | EV_WRITE)) == events)
    return;
  ev_io_stop (loop, &w->io);
  ev_io_set (&w->io, w->io.fd, events);
  if (events != 0)
    ev_io_start (loop, &w->io);
}

static void
ready (struct ev_loop *loop, ev_io *io, int revents)
{
  struct nbd_watchers *w = io->data;

  if (revents & EV_ERROR)
    job_fail (&w->job, "libev-loop", "libev reports an error on the fd");
  else if (job_notify (&w->job, revents & EV_READ, revents & EV_WRITE) == 1)
    return;
  stop (loop, w);
}

static void
timed_out (struct ev_loop *loop, ev_timer *timer, int revents)
{
  struct nbd_watchers *w = timer->data;

  (void) revents;
  job_fail (&w->job, "libev-loop", "timed out");
  stop (loop, w);
}

int
main (int argc, char *argv[])
{
  struct nbd_watchers w;
  struct ev_loop *loop;
  int fd;

  if (argc != 2) {
    fprintf (stderr, "usage: %s SOCKET\n", argv[0]);
    return EXIT_FAILURE;
  }
  if (job_start (&w.job, "libev-loop", argv[1]) != 1)
    return job_finish (&w.job);
  fd = nbd_aio_get_fd (w.job.nbd);
  if (fd == -1) {
    job_fail_nbd (&w.job, "nbd_aio_get_fd");
    return job_finish (&w.job);
  }
  loop = ev_loop_new (EVFLAG_AUTO);
  if (loop == NULL) {
    job_fail (&w.job, "ev_loop_new", "no usable backend");
    return job_finish (&w.job);
  }

  ev_io_init (&w.io, ready, fd, 0);
  w.io.data = &w;
  ev_prepare_init (&w.prepare, follow_direction);
  w.prepare.data = &w;
  ev_prepare_start (loop, &w.prepare);
  ev_timer_init (&w.timer, timed_out, JOB_TIMEOUT, 0);
  w.timer.data = &w;
  ev_timer_start (loop, &w.timer);

  ev_run (loop, 0);

  ev_loop_destroy (loop);
  return job_finish (&w.job);
}
