/* What the .c files share: the public interface, the kernel ABI, and a few
 * internal helpers that cffi does not expose. */
#ifndef UFFD_PAGER_NATIVE_H
#define UFFD_PAGER_NATIVE_H

#include <stdint.h>
#include "uffd_compat.h"

#define UP_PAGE_SIZE 4096

#include "uffd_pager.h"

int up_uffd_read_raw(int fd, struct uffd_msg *msgs, int max);
void up_msg_flatten(const struct uffd_msg *m, struct up_msg *out);

#endif
