/* The job that glib-loop.c and libev-loop.c run, whatever the event loop:
 * connect, write a pattern over 4 MiB with 48 commands in flight, read it
 * back the same way, checking each block in its completion callback, then
 * disconnect. The loop only watches the handle's fd for what
 * nbd_aio_get_direction asks, and passes what it saw to job_notify.
 *
 *   job_start    creates the handle and starts connecting
 *   job_notify   tells the handle what the fd is ready for, then moves the
 *                job on: 1 means keep watching, 0 done, -1 failed
 *   job_fail     a failure seen by the loop itself (a timeout, say)
 *   job_finish   closes the handle and prints the summary: the exit status
 *
 * Completion callbacks must not call the handle, so they only count and
 * check; new commands are issued by job_notify, after the notification.
 */
#ifndef LOOP_JOB_H
#define LOOP_JOB_H

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <libnbd.h>

#define JOB_BLOCK 8192
#define JOB_BLOCKS 512          /* 4 MiB */
#define JOB_IN_FLIGHT 48
#define JOB_TIMEOUT 120         /* seconds, generous for valgrind */

enum job_phase { JOB_CONNECTING, JOB_WRITING, JOB_READING, JOB_CLOSING, JOB_DONE };

struct job;
struct job_command {
  struct job *job;
  size_t block;
};

struct job {
  const char *name;
  struct nbd_handle *nbd;
  enum job_phase phase;
  int failed;
  size_t issued, completed;     /* commands of this phase */
  size_t peak;                  /* the most in flight */
  size_t verified;              /* bytes read back as written */
  unsigned char *data;          /* what is written, then what is read */
  struct job_command commands[JOB_BLOCKS];
};

/* The byte at OFFSET: a block read from the wrong place cannot pass. */
static unsigned char
job_pattern (uint64_t offset)
{
  return (unsigned char) ((offset * UINT64_C (0x9E3779B97F4A7C15)) >> 56);
}

static int
job_fail (struct job *j, const char *what, const char *why)
{
  fprintf (stderr, "%s: %s: %s\n", j->name, what, why ? why : "(no message)");
  j->failed = 1;
  return -1;
}

/* A failure of the handle: libnbd's message, which names the function
 * that failed, if WHAT is that function. */
static int
job_fail_nbd (struct job *j, const char *what)
{
  const char *err = nbd_get_error ();

  if (err == NULL || strncmp (err, what, strlen (what)) != 0)
    return job_fail (j, what, err);
  fprintf (stderr, "%s: %s\n", j->name, err);
  j->failed = 1;
  return -1;
}

/* A command's completion callback: it returns 1, so the command retires. */
static int
job_completed (void *user_data, int *error)
{
  struct job_command *c = user_data;
  struct job *j = c->job;
  uint64_t offset = (uint64_t) c->block * JOB_BLOCK;
  size_t i;

  j->completed++;
  if (j->failed)                /* what closing the handle cancels, say */
    return 1;
  if (*error != 0) {
    job_fail (j, j->phase == JOB_WRITING ? "write" : "read", strerror (*error));
    return 1;
  }
  if (j->phase == JOB_READING) {
    for (i = 0; i < JOB_BLOCK; i++)
      if (j->data[offset + i] != job_pattern (offset + i)) {
        fprintf (stderr, "%s: block %zu differs at byte %zu\n", j->name, c->block, i);
        j->failed = 1;
        return 1;
      }
    j->verified += JOB_BLOCK;
  }
  return 1;
}

/* Keeps JOB_IN_FLIGHT commands of the phase in flight. */
static int
job_issue (struct job *j)
{
  while (j->issued < JOB_BLOCKS && j->issued - j->completed < JOB_IN_FLIGHT) {
    struct job_command *c = &j->commands[j->issued];
    nbd_completion_callback cb = { .callback = job_completed, .user_data = c };
    uint64_t offset = (uint64_t) c->block * JOB_BLOCK;
    unsigned char *buf = j->data + offset;
    int64_t cookie;

    if (j->phase == JOB_WRITING)
      cookie = nbd_aio_pwrite (j->nbd, buf, JOB_BLOCK, offset, cb, 0);
    else
      cookie = nbd_aio_pread (j->nbd, buf, JOB_BLOCK, offset, cb, 0);
    if (cookie == -1)
      return job_fail_nbd (j, j->phase == JOB_WRITING ? "nbd_aio_pwrite" : "nbd_aio_pread");
    j->issued++;
  }
  if (j->issued - j->completed > j->peak)
    j->peak = j->issued - j->completed;
  /* The handle counts what the callbacks have not retired yet. */
  if (nbd_aio_in_flight (j->nbd) != (int) (j->issued - j->completed)) {
    fprintf (stderr, "%s: nbd_aio_in_flight says %d, %zu are in flight\n", j->name,
             nbd_aio_in_flight (j->nbd), j->issued - j->completed);
    j->failed = 1;
    return -1;
  }
  return 1;
}

static void
job_begin_phase (struct job *j, enum job_phase phase)
{
  j->phase = phase;
  j->issued = j->completed = 0;
}

/* Moves the job on after an event: 1 while it needs the loop, 0 once the
 * handle is closed, -1 on a failure. */
static int
job_step (struct job *j)
{
  if (j->failed)
    return -1;
  if (nbd_aio_is_dead (j->nbd))
    return job_fail_nbd (j, "connection died");
  switch (j->phase) {
  case JOB_CONNECTING:
    if (nbd_aio_is_connecting (j->nbd))
      return 1;
    if (!nbd_aio_is_ready (j->nbd))
      return job_fail_nbd (j, "handshake");
    job_begin_phase (j, JOB_WRITING);
    return job_issue (j);
  case JOB_WRITING:
    if (j->completed < JOB_BLOCKS)
      return job_issue (j);
    memset (j->data, 0, (size_t) JOB_BLOCKS * JOB_BLOCK);
    job_begin_phase (j, JOB_READING);
    return job_issue (j);
  case JOB_READING:
    if (j->completed < JOB_BLOCKS)
      return job_issue (j);
    if (nbd_aio_disconnect (j->nbd, 0) == -1)
      return job_fail_nbd (j, "nbd_aio_disconnect");
    /* It may have been sent already: closing may be over. */
    j->phase = JOB_CLOSING;
    /* fall through */
  case JOB_CLOSING:
    if (!nbd_aio_is_closed (j->nbd))
      return 1;
    j->phase = JOB_DONE;
    return 0;
  case JOB_DONE:
    return 0;
  }
  return job_fail (j, "job", "unknown phase");
}

/* Tells the handle what its fd is ready for. The direction is asked again
 * before each call, as notifying a state that does not wait for that
 * event is an error, and the first call may change what it waits for. */
static int
job_notify (struct job *j, int readable, int writable)
{
  if (readable && (nbd_aio_get_direction (j->nbd) & LIBNBD_AIO_DIRECTION_READ) &&
      nbd_aio_notify_read (j->nbd) == -1)
    return job_fail_nbd (j, "nbd_aio_notify_read");
  if (writable && (nbd_aio_get_direction (j->nbd) & LIBNBD_AIO_DIRECTION_WRITE) &&
      nbd_aio_notify_write (j->nbd) == -1)
    return job_fail_nbd (j, "nbd_aio_notify_write");
  return job_step (j);
}

/* Creates the handle and starts connecting to the Unix socket SOCKET:
 * what job_step says, or -1. */
static int
job_start (struct job *j, const char *name, const char *socket)
{
  uint64_t i;

  memset (j, 0, sizeof *j);
  j->name = name;
  j->data = malloc ((size_t) JOB_BLOCKS * JOB_BLOCK);
  if (j->data == NULL)
    return job_fail (j, "malloc", strerror (errno));
  for (i = 0; i < (uint64_t) JOB_BLOCKS * JOB_BLOCK; i++)
    j->data[i] = job_pattern (i);
  for (i = 0; i < JOB_BLOCKS; i++)
    j->commands[i] = (struct job_command) { .job = j, .block = i };
  j->nbd = nbd_create ();
  if (j->nbd == NULL)
    return job_fail_nbd (j, "nbd_create");
  if (nbd_aio_connect_unix (j->nbd, socket) == -1)
    return job_fail_nbd (j, "nbd_aio_connect_unix");
  return job_step (j);
}

/* Closes the handle; prints the summary if all went well. */
static int
job_finish (struct job *j)
{
  if (!j->failed && j->phase != JOB_DONE)
    job_fail (j, "job", "the loop stopped before the job was done");
  if (j->nbd != NULL)
    nbd_close (j->nbd);
  free (j->data);
  if (j->failed)
    return EXIT_FAILURE;
  printf ("%s: wrote %d blocks of %d bytes, up to %zu in flight; "
          "read back and verified %zu bytes; disconnected\n",
          j->name, JOB_BLOCKS, JOB_BLOCK, j->peak, j->verified);
  return EXIT_SUCCESS;
}

#endif
