/* Runs an NBD handle inside glib's main loop: a GSource of its own watches
 * the handle's fd, asking nbd_aio_get_direction before every poll what to
 * wait for, and passes what the poll saw to the handle. The job itself
 * (loop-job.h) writes 4 MiB with 48 commands in flight, reads it back and
 * checks it, then disconnects; the loop stops when the handle is closed.
 *
 * Usage: glib-loop SOCKET
 * Build: cc glib-loop.c $(pkg-config --cflags --libs glib-2.0) -lnbd
 */
#include <glib.h>
#include "loop-job.h"

struct nbd_source {
  GSource source;
  struct job *job;
  GMainLoop *loop;
  gpointer fd_tag;
  GIOCondition events;          /* what the fd is watched for */
};

/* Before each poll: wait for what the handle waits for. A change wakes
 * the context up (one more time round), so only a change is made. */
static gboolean
nbd_source_prepare (GSource *source, gint *timeout)
{
  struct nbd_source *s = (struct nbd_source *) source;
  unsigned dir = nbd_aio_get_direction (s->job->nbd);
  GIOCondition events = 0;

  if (dir & LIBNBD_AIO_DIRECTION_READ)
    events |= G_IO_IN;
  if (dir & LIBNBD_AIO_DIRECTION_WRITE)
    events |= G_IO_OUT;
  if (events != s->events) {
    g_source_modify_unix_fd (source, s->fd_tag, events);
    s->events = events;
  }
  *timeout = -1;
  return FALSE;
}

/* No check function: a source with an fd that has events is dispatched. */
static gboolean
nbd_source_dispatch (GSource *source, GSourceFunc callback, gpointer user_data)
{
  struct nbd_source *s = (struct nbd_source *) source;
  GIOCondition revents = g_source_query_unix_fd (source, s->fd_tag);

  (void) callback; (void) user_data;
  if (job_notify (s->job, revents & (G_IO_IN | G_IO_HUP | G_IO_ERR),
                  revents & (G_IO_OUT | G_IO_ERR)) == 1)
    return G_SOURCE_CONTINUE;
  g_main_loop_quit (s->loop);
  return G_SOURCE_REMOVE;
}

static GSourceFuncs nbd_source_funcs = {
  .prepare = nbd_source_prepare,
  .dispatch = nbd_source_dispatch,
};

static gboolean
timed_out (gpointer user_data)
{
  struct nbd_source *s = user_data;

  job_fail (s->job, "glib-loop", "timed out");
  g_main_loop_quit (s->loop);
  return G_SOURCE_REMOVE;
}

static void
destroy_source (GSource *source)
{
  if (!g_source_is_destroyed (source))
    g_source_destroy (source);
  g_source_unref (source);
}

int
main (int argc, char *argv[])
{
  struct job job;
  GMainContext *context;
  GSource *source, *timer;
  struct nbd_source *s;
  int fd;

  if (argc != 2) {
    fprintf (stderr, "usage: %s SOCKET\n", argv[0]);
    return EXIT_FAILURE;
  }
  if (job_start (&job, "glib-loop", argv[1]) != 1)
    return job_finish (&job);
  fd = nbd_aio_get_fd (job.nbd);
  if (fd == -1) {
    job_fail_nbd (&job, "nbd_aio_get_fd");
    return job_finish (&job);
  }

  context = g_main_context_new ();
  source = g_source_new (&nbd_source_funcs, sizeof (struct nbd_source));
  s = (struct nbd_source *) source;
  s->job = &job;
  s->loop = g_main_loop_new (context, FALSE);
  s->fd_tag = g_source_add_unix_fd (source, fd, 0);
  /* Dispatch never runs the loop again, so the source need not be blocked
   * while it runs: blocking and unblocking would wake the context up. */
  g_source_set_can_recurse (source, TRUE);
  g_source_attach (source, context);
  timer = g_timeout_source_new_seconds (JOB_TIMEOUT);
  g_source_set_callback (timer, timed_out, s, NULL);
  g_source_attach (timer, context);

  g_main_loop_run (s->loop);

  g_main_loop_unref (s->loop);
  destroy_source (timer);
  destroy_source (source);
  g_main_context_unref (context);
  return job_finish (&job);
}
