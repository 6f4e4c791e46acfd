/* Writes a few scattered blocks, then prints the allocation map that
 * block status reports ("base:allocation"), as a sparse map.
 *
 * Usage: sparse-map SOCKET
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <inttypes.h>
#include <libnbd.h>

static int
print_extents (void *user_data, const char *context, uint64_t offset,
               uint32_t *entries, size_t nr_entries, int *error)
{
  size_t i;
  uint64_t *next = user_data;
  (void) error;
  for (i = 0; i < nr_entries; i += 2) {
    printf ("%s %10" PRIu64 " %10" PRIu32 " %s%s\n", context, offset,
            entries[i],
            entries[i + 1] & LIBNBD_STATE_HOLE ? "hole" : "data",
            entries[i + 1] & LIBNBD_STATE_ZERO ? ",zero" : "");
    offset += entries[i];
  }
  *next = offset;
  return 0;
}

int
main (int argc, char *argv[])
{
  struct nbd_handle *nbd;
  static char block[65536];
  uint64_t offset = 0, next;
  int64_t size;

  if (argc != 2) { fprintf (stderr, "usage: %s SOCKET\n", argv[0]); return 1; }
  nbd = nbd_create ();
  if (nbd == NULL ||
      nbd_add_meta_context (nbd, LIBNBD_CONTEXT_BASE_ALLOCATION) == -1 ||
      nbd_connect_unix (nbd, argv[1]) == -1) {
    fprintf (stderr, "%s\n", nbd_get_error ());
    return EXIT_FAILURE;
  }
  printf ("can_meta_context: %d\n",
          nbd_can_meta_context (nbd, LIBNBD_CONTEXT_BASE_ALLOCATION));
  memset (block, 'x', sizeof block);
  if (nbd_pwrite (nbd, block, sizeof block, 1 << 20, LIBNBD_CMD_FLAG_FUA) == -1 ||
      nbd_pwrite (nbd, block, sizeof block, 5 << 20, 0) == -1) {
    fprintf (stderr, "%s\n", nbd_get_error ());
    return EXIT_FAILURE;
  }
  size = nbd_get_size (nbd);
  while (offset < (uint64_t) size) {
    next = offset;
    if (nbd_block_status (nbd, size - offset, offset,
                          (nbd_extent_callback) { .callback = print_extents,
                                                  .user_data = &next },
                          0) == -1) {
      fprintf (stderr, "%s\n", nbd_get_error ());
      return EXIT_FAILURE;
    }
    if (next <= offset) break;
    offset = next;
  }
  nbd_shutdown (nbd, 0);
  nbd_close (nbd);
  return EXIT_SUCCESS;
}
