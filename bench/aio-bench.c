/* The AIO workload of `make bench`: N reads of SIZE bytes at random
 * aligned offsets kept in flight for SECONDS, driven by this program's own
 * poll(2) loop (aio_get_fd, aio_get_direction, aio_notify_*), retiring
 * completions with aio_command_completed. Built once against
 * include/libnbd.h; the same binary runs on Debian's libnbd and on ours.
 *
 * Usage: aio-bench URI IN_FLIGHT SIZE SECONDS
 * Prints: "requests N seconds S" on success.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <libnbd.h>

static double
now (void)
{
  struct timespec ts;
  clock_gettime (CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
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

struct slot { int64_t cookie; char *buf; };

static void
die (const char *what)
{
  fprintf (stderr, "aio-bench: %s: %s\n", what, nbd_get_error ());
  exit (1);
}

int
main (int argc, char **argv)
{
  if (argc != 5) {
    fprintf (stderr, "usage: aio-bench URI IN_FLIGHT SIZE SECONDS\n");
    return 2;
  }
  const char *uri = argv[1];
  int depth = atoi (argv[2]);
  size_t size = strtoul (argv[3], NULL, 0);
  double seconds = atof (argv[4]);
  struct nbd_handle *h = nbd_create ();
  if (h == NULL || nbd_connect_uri (h, uri) == -1) die ("connect");
  int64_t disk = nbd_get_size (h);
  uint64_t blocks = (uint64_t) disk / size;
  struct slot *slots = calloc (depth, sizeof *slots);
  uint64_t done = 0;

  for (int i = 0; i < depth; i++) {
    slots[i].buf = malloc (size);
    slots[i].cookie = nbd_aio_pread (h, slots[i].buf, size, (next_random () % blocks) * size,
                                     NBD_NULL_COMPLETION, 0);
    if (slots[i].cookie == -1) die ("aio_pread");
  }
  double start = now (), end = start + seconds;
  int stopping = 0;
  while (nbd_aio_in_flight (h) > 0) {
    struct pollfd pfd = { .fd = nbd_aio_get_fd (h), .events = 0 };
    unsigned dir = nbd_aio_get_direction (h);
    if (dir & LIBNBD_AIO_DIRECTION_READ) pfd.events |= POLLIN;
    if (dir & LIBNBD_AIO_DIRECTION_WRITE) pfd.events |= POLLOUT;
    if (poll (&pfd, 1, -1) == -1) {
      if (errno == EINTR) continue;
      perror ("poll");
      return 1;
    }
    if (pfd.revents & (POLLIN | POLLHUP | POLLERR) && nbd_aio_notify_read (h) == -1) die ("notify_read");
    if (pfd.revents & POLLOUT && nbd_aio_notify_write (h) == -1) die ("notify_write");
    if (!stopping && now () >= end) stopping = 1;
    for (int i = 0; i < depth; i++) {
      if (slots[i].cookie == 0) continue;
      int r = nbd_aio_command_completed (h, slots[i].cookie);
      if (r == 0) continue;
      if (r == -1) die ("read");
      done++;
      slots[i].cookie = 0;
      if (!stopping) {
        slots[i].cookie = nbd_aio_pread (h, slots[i].buf, size, (next_random () % blocks) * size,
                                         NBD_NULL_COMPLETION, 0);
        if (slots[i].cookie == -1) die ("aio_pread");
      }
    }
  }
  double took = now () - start;
  if (nbd_shutdown (h, 0) == -1) die ("shutdown");
  nbd_close (h);
  printf ("requests %" PRIu64 " seconds %.3f\n", done, took);
  return 0;
}
