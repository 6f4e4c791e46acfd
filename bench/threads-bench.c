/* The threaded workload of `make bench`: THREADS threads share one handle
 * and each makes synchronous nbd_pread calls of SIZE bytes at random
 * aligned offsets for SECONDS. On libnbd, and on one connection, the calls
 * take turns on the handle's one socket; a handle with several
 * connections can serve them at once. Built once against
 * include/libnbd.h; the same binary runs on Debian's libnbd and on ours.
 *
 * Usage: threads-bench URI THREADS SIZE SECONDS
 * Prints: "requests N seconds S" on success.
 */
#define _GNU_SOURCE
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <libnbd.h>

static struct nbd_handle *h;
static int64_t disk;
static size_t size;
static double deadline;

static double
now (void)
{
  struct timespec ts;
  clock_gettime (CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

struct worker {
  pthread_t tid;
  uint64_t rng;                 /* each thread its own sequence */
  uint64_t requests;
  int failed;
};

static void *
work (void *arg)
{
  struct worker *w = arg;
  char *buf = malloc (size);
  uint64_t blocks = (uint64_t) disk / size;
  if (buf == NULL) {
    w->failed = 1;
    return NULL;
  }
  while (now () < deadline) {
    w->rng ^= w->rng << 13;
    w->rng ^= w->rng >> 7;
    w->rng ^= w->rng << 17;
    if (nbd_pread (h, buf, size, (w->rng % blocks) * size, 0) == -1) {
      fprintf (stderr, "threads-bench: pread: %s\n", nbd_get_error ());
      w->failed = 1;
      break;
    }
    w->requests++;
  }
  free (buf);
  return NULL;
}

int
main (int argc, char **argv)
{
  if (argc != 5) {
    fprintf (stderr, "usage: threads-bench URI THREADS SIZE SECONDS\n");
    return 2;
  }
  int threads = atoi (argv[2]);
  size = strtoul (argv[3], NULL, 0);
  double seconds = atof (argv[4]);
  if (threads < 1 || size == 0 || seconds <= 0) {
    fprintf (stderr, "threads-bench: THREADS, SIZE and SECONDS must be positive\n");
    return 2;
  }
  h = nbd_create ();
  if (h == NULL || nbd_connect_uri (h, argv[1]) == -1) {
    fprintf (stderr, "threads-bench: connect: %s\n", nbd_get_error ());
    return 1;
  }
  disk = nbd_get_size (h);
  if (disk < (int64_t) size) {
    fprintf (stderr, "threads-bench: the export is smaller than one request\n");
    return 1;
  }
  struct worker *w = calloc (threads, sizeof *w);
  if (w == NULL) return 1;
  double start = now ();
  deadline = start + seconds;
  for (int i = 0; i < threads; i++) {
    w[i].rng = 0x9e3779b97f4a7c15 * (i + 1);
    if (pthread_create (&w[i].tid, NULL, work, &w[i]) != 0) {
      fprintf (stderr, "threads-bench: pthread_create failed\n");
      return 1;
    }
  }
  uint64_t requests = 0;
  int failed = 0;
  for (int i = 0; i < threads; i++) {
    pthread_join (w[i].tid, NULL);
    requests += w[i].requests;
    failed |= w[i].failed;
  }
  double took = now () - start;
  if (nbd_shutdown (h, 0) == -1) {
    fprintf (stderr, "threads-bench: shutdown: %s\n", nbd_get_error ());
    failed = 1;
  }
  nbd_close (h);
  free (w);
  if (failed) return 1;
  printf ("requests %" PRIu64 " seconds %.3f\n", requests, took);
  return 0;
}
