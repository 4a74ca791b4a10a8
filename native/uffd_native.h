/* What the .c files share: the public interface, the kernel ABI, and a few
 * internal helpers that cffi does not expose. */
#ifndef UFFD_PAGER_NATIVE_H
#define UFFD_PAGER_NATIVE_H

#include <stdint.h>
#include "uffd_compat.h"

#define UP_PAGE_SIZE 4096
#define UP_RECORD_SIZE 80 /* a catalog record, two slots: see aead.c and catalog.py */

#include "uffd_pager.h"

int up_uffd_read_raw(int fd, struct uffd_msg *msgs, int max);
void up_msg_flatten(const struct uffd_msg *m, struct up_msg *out);

/* Makes room for bit i, so that setting it afterwards cannot fail: done
 * before a page is mapped, whose record must not be lost after. */
int up_bits_prepare(struct up_bits *bits, uint64_t i);

/* fill.c: whether the fill state and its portion chain are live; marks
 * [first, stop) resident (room made for it with up_bits_prepare first). */
int up_fill_live(const struct up_fill *f);
void up_fill_mark_resident(struct up_fill *f, uint64_t first, uint64_t stop);
/* readahead.c: after the missing page idx was filled, fills the window the
 * detector advises (nothing while missing faults are deferred to Python). */
void up_fill_read_ahead(int uffd, struct up_fill *f, uint64_t idx);
/* readahead.c: unmaps the portion's read-ahead mapping, if any. */
void up_portion_unmap(struct up_portion *p);

/* readahead.c: the window the detector would advise for a missing fault at
 * page idx, the detector left as it was (count 0: none would open). */
uint64_t up_fill_peek_window(struct up_fill *f, uint64_t idx);
/* remote.c: asks the remote store for the page at address (source src):
 * -EINPROGRESS, or -EOPNOTSUPP when it cannot (Python fetches it). */
int up_remote_request(struct up_remote *r, int uffd, struct up_fill *f, const struct up_portion *src,
                      uint64_t address, uint64_t flags);
/* remote.c: the fill goes: its requests in flight are dropped when answered. */
void up_remote_forget_fill(const struct up_fill *f);

/* Whether p and every portion of its parent chain are live. */
int up_portion_chain_live(const struct up_portion *p);
/* The portion of p's chain that holds page idx (the chain must be live). */
const struct up_portion *up_portion_source(const struct up_portion *p, uint64_t idx);

/* The first page of [from, end) of a sealed portion that its store may
 * hold: a catalog record or a committed anchor entry (see aead.c); from on
 * any doubt. Pages are counted from first_store_page. */
uint64_t up_aead_next_stored(const struct up_aead *a, uint64_t first_store_page, uint64_t from, uint64_t end);

#endif
