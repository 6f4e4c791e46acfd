/* Synchronous write, read back and compare, flush, block status, over a
 * Unix socket: the smallest libnbd program.
 *
 * Usage: sync-rw SOCKET
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <inttypes.h>
#include <libnbd.h>

static int
count_extents (void *user_data, const char *context, uint64_t offset,
               uint32_t *entries, size_t nr_entries, int *error)
{
  size_t *n = user_data;
  (void) context; (void) offset; (void) entries; (void) error;
  *n += nr_entries / 2;
  return 0;
}

static void
die (const char *what)
{
  fprintf (stderr, "%s: %s (errno %d)\n", what, nbd_get_error (),
           nbd_get_errno ());
  exit (EXIT_FAILURE);
}

int
main (int argc, char *argv[])
{
  struct nbd_handle *nbd;
  char wbuf[65536], rbuf[65536];
  size_t extents = 0;
  int64_t size;

  if (argc != 2) {
    fprintf (stderr, "usage: %s SOCKET\n", argv[0]);
    return EXIT_FAILURE;
  }
  nbd = nbd_create ();
  if (nbd == NULL) die ("nbd_create");
  if (nbd_add_meta_context (nbd, "base:allocation") == -1)
    die ("nbd_add_meta_context");
  if (nbd_connect_unix (nbd, argv[1]) == -1) die ("nbd_connect_unix");

  size = nbd_get_size (nbd);
  if (size == -1) die ("nbd_get_size");
  printf ("size: %" PRIi64 "\nprotocol: %s\n", size, nbd_get_protocol (nbd));

  memset (wbuf, 0x5a, sizeof wbuf);
  if (nbd_pwrite (nbd, wbuf, sizeof wbuf, 4096, 0) == -1) die ("nbd_pwrite");
  if (nbd_pread (nbd, rbuf, sizeof rbuf, 4096, 0) == -1) die ("nbd_pread");
  if (memcmp (wbuf, rbuf, sizeof wbuf) != 0) {
    fprintf (stderr, "read back differs\n");
    return EXIT_FAILURE;
  }
  if (nbd_can_flush (nbd) == 1 && nbd_flush (nbd, 0) == -1) die ("nbd_flush");
  if (nbd_block_status (nbd, size, 0,
                        (nbd_extent_callback) { .callback = count_extents,
                                                .user_data = &extents },
                        0) == -1)
    die ("nbd_block_status");
  printf ("extents: %zu\n", extents);

  /* A bad request fails locally with libnbd's errno and message. */
  if (nbd_pread (nbd, rbuf, 512, size, 0) != -1) {
    fprintf (stderr, "out-of-bounds read succeeded\n");
    return EXIT_FAILURE;
  }
  printf ("out of bounds: %s\n", nbd_get_error ());

  if (nbd_shutdown (nbd, 0) == -1) die ("nbd_shutdown");
  nbd_close (nbd);
  printf ("ok\n");
  return EXIT_SUCCESS;
}
