/* What the .c files share: the public interface, the kernel ABI, and a few
 * internal helpers that cffi does not expose. */
#ifndef UFFD_PAGER_NATIVE_H
#define UFFD_PAGER_NATIVE_H

#include <stdint.h>
#include "uffd_compat.h"

#define UP_PAGE_SIZE 4096
#define UP_RECORD_SIZE 40 /* a catalog record: see catalog.py */

#include "uffd_pager.h"

int up_uffd_read_raw(int fd, struct uffd_msg *msgs, int max);
/* The portion of p's chain that holds page idx. */
const struct up_portion *up_portion_source(const struct up_portion *p, uint64_t idx);

static inline int bit_test(const uint8_t *bm, uint64_t i)
{
    return (bm[i >> 3] >> (i & 7)) & 1;
}

static inline void bit_set(uint8_t *bm, uint64_t i)
{
    bm[i >> 3] |= (uint8_t)(1u << (i & 7));
}

static inline void bit_clear(uint8_t *bm, uint64_t i)
{
    bm[i >> 3] &= (uint8_t)~(1u << (i & 7));
}
void up_msg_flatten(const struct uffd_msg *m, struct up_msg *out);

#endif
