/* Eight threads share one handle, each writing and reading back its own
 * region with synchronous calls: the handle's lock makes that safe.
 *
 * Usage: threads SOCKET
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <libnbd.h>

#define THREADS 8
#define ROUNDS 64
#define SIZE 8192

static struct nbd_handle *nbd;

static void *
worker (void *arg)
{
  long id = (long) arg;
  char wbuf[SIZE], rbuf[SIZE];
  int i;

  for (i = 0; i < ROUNDS; i++) {
    uint64_t offset = ((uint64_t) id * ROUNDS + i) * SIZE;
    memset (wbuf, (int) (id * 16 + i), sizeof wbuf);
    if (nbd_pwrite (nbd, wbuf, sizeof wbuf, offset, 0) == -1 ||
        nbd_pread (nbd, rbuf, sizeof rbuf, offset, 0) == -1) {
      fprintf (stderr, "thread %ld: %s\n", id, nbd_get_error ());
      return (void *) 1;
    }
    if (memcmp (wbuf, rbuf, sizeof wbuf) != 0) {
      fprintf (stderr, "thread %ld: round %d differs\n", id, i);
      return (void *) 1;
    }
  }
  return NULL;
}

int
main (int argc, char *argv[])
{
  pthread_t t[THREADS];
  long i;
  int failed = 0;
  void *r;

  if (argc != 2) { fprintf (stderr, "usage: %s SOCKET\n", argv[0]); return 1; }
  nbd = nbd_create ();
  if (nbd == NULL || nbd_connect_unix (nbd, argv[1]) == -1) {
    fprintf (stderr, "%s\n", nbd_get_error ());
    return EXIT_FAILURE;
  }
  for (i = 0; i < THREADS; i++)
    pthread_create (&t[i], NULL, worker, (void *) i);
  for (i = 0; i < THREADS; i++) {
    pthread_join (t[i], &r);
    failed |= r != NULL;
  }
  printf ("%d threads x %d rounds: %s\n", THREADS, ROUNDS, failed ? "FAILED" : "ok");
  nbd_shutdown (nbd, 0);
  nbd_close (nbd);
  return failed;
}
