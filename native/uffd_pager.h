#ifndef UFFD_PAGER_H
#define UFFD_PAGER_H
/*
 * The C interface of uffd_pager: included by the .c files and read by cffi
 * (build_native.py) as its cdef, so it holds plain C declarations only: no
 * macros, no includes. The constants cffi exposes are in constants.cdef.
 *
 * Conventions: a function returns >= 0 on success and -1 with errno set on
 * failure, so that the Python wrapper can read ffi.errno on the next line.
 */

/* --- userfaultfd ioctls (uffd_ops.c) ----------------------------------- */

/* userfaultfd(2), falling back to /dev/userfaultfd; always O_CLOEXEC|O_NONBLOCK. */
int up_uffd_create(int user_mode_only);
/* UFFDIO_API. *features_out: what the kernel enabled/offers, *ioctls_out: the ioctl mask. */
int up_uffd_api(int fd, uint64_t features, uint64_t *features_out, uint64_t *ioctls_out);
int up_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls_out);
int up_uffd_unregister(int fd, uint64_t start, uint64_t len);
int up_uffd_wake(int fd, uint64_t start, uint64_t len);
int up_uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode);
/* The next four report progress in *done (bytes) even when they fail part way. */
int up_uffd_copy(int fd, uint64_t dst, const void *src, uint64_t len, uint64_t mode, int64_t *done);
int up_uffd_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done);
int up_uffd_continue(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done);
int up_uffd_poison(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done);
int up_uffd_move(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *done);

/* A uffd_msg flattened so that cffi needs no packed unions.
 *   PAGEFAULT: a = flags, b = address, c = thread id
 *   FORK:      a = the child's new uffd (already in the reader's fd table)
 *   REMAP:     a = from, b = to, c = len
 *   REMOVE/UNMAP: a = start, b = end                                      */
struct up_msg {
    uint32_t event;
    int32_t status;      /* up_serve: why a fault was not served (-errno), else 0 */
    uint64_t a;
    uint64_t b;
    uint64_t c;
};
/* read(2) up to max messages; returns the count, 0 when none is pending. */
int up_uffd_read(int fd, struct up_msg *out, int max);

/* --- sparse page sets (bits.c) -------------------------------------------- */

/* A set of page indices [0, nbits) that costs memory for what is set, not
 * for the range (see bits.c): an empty set of 2^35 pages, a 128 TiB region,
 * costs a few pages. Ranges are [first, end); indices at or past nbits are
 * never set. On ENOMEM a change returns -1 and leaves the set as it was
 * (or_into: a subset of what it would have set). */
struct up_bits;
/* NULL with errno: EINVAL past 2^35 bits (2^47 bytes of pages), ENOMEM. */
struct up_bits *up_bits_new(uint64_t nbits);
void up_bits_free(struct up_bits *bits);
uint64_t up_bits_count(const struct up_bits *bits);
int up_bits_test(const struct up_bits *bits, uint64_t i);
/* Both return how many bits changed, or -1 with errno. */
int64_t up_bits_set_range(struct up_bits *bits, uint64_t first, uint64_t end);
int64_t up_bits_clear_range(struct up_bits *bits, uint64_t first, uint64_t end);
/* The first index of [from, end) that is set (clear), or end if none. */
uint64_t up_bits_next_set(const struct up_bits *bits, uint64_t from, uint64_t end);
uint64_t up_bits_next_clear(const struct up_bits *bits, uint64_t from, uint64_t end);
/* Sets in dst every bit set in src; returns how many were new, or -1. */
int64_t up_bits_or_into(struct up_bits *dst, const struct up_bits *src);

/* --- the fault hot path (fill.c) --------------------------------------- */

/* How a range learns which pages its process wrote. */
enum up_tracking {
    UP_TRACK_NONE = 0,
    UP_TRACK_SYNC_WP = 1,   /* pages filled write-protected; the first write is a WP fault */
    UP_TRACK_ASYNC_WP = 2,  /* UFFD_FEATURE_WP_ASYNC: writes cost no fault; PAGEMAP_SCAN lists them */
};

/* A portion of a backing file: where one process's pages of a region live.
 * A forked child's portion holds only the pages materialized in it; the
 * others are still its parent's (as of the fork) and are read through
 * parent. A root portion (parent NULL) holds every page of the region.
 *
 * up_portion_init makes it live; up_portion_release frees its page set.
 * Every entry that takes a portion refuses one that is not live, or whose
 * parent chain holds one that is not: -1 with errno EBADF (query functions:
 * 0, or "nothing held"), never a read of freed memory. */
struct up_portion {
    int live;
    int placed;                 /* 0: not allocated yet (a child's, chosen lazily) */
    int fd;                     /* -1: no local descriptor (a remote store: pages come through Python) */
    uint64_t offset;            /* byte offset of the region's page 0 in fd */
    uint64_t npages;
    struct up_bits *materialized; /* children only: the pages held here */
    uint64_t materialized_pages; /* its count */
    struct up_portion *parent;
    /* An encrypted store's pages are sealed with aead, which also reads the
     * store's anchor, catalog and file (see aead.c); pages counted from the
     * store's start. */
    struct up_aead *aead;       /* NULL: pages are stored as they are */
    uint8_t store_id[16];
    /* Read-ahead's source (readahead.c): a read-only mapping of fd over the
     * portion, made on first use; map_fd is the fd it maps (a portion
     * placed again on another fd is mapped again). */
    const uint8_t *map;
    int map_fd;
    /* A remote store whose faults C asks for itself (remote.c); NULL: its
     * pages come through Python (fetch.py). */
    struct up_remote *remote;
};

/* One registered range of one uffd. Missing pages are filled by C from the
 * portion chain (pread from a file descriptor); with defer_missing set, or
 * when the chain ends in no descriptor, they are handed to Python.
 *
 * up_fill_init makes it live; up_fill_release frees its page sets. Every
 * entry that takes a fill refuses one that is not live, or whose portion
 * chain is not: -1 with errno EBADF (up_fill_fault: -EBADF; queries: 0). */
struct up_fill {
    int live;
    uint64_t base;
    uint64_t len;
    struct up_portion *portion;
    int defer_missing;          /* policy work before each fill (fork: on-access) */
    int tracking;               /* enum up_tracking */
    struct up_bits *resident;   /* pages filled and not removed since */
    struct up_bits *dirty;      /* UP_TRACK_SYNC_WP only: pages written since their write-back */
    uint64_t faults;            /* fault messages read */
    uint64_t write_faults;      /* ... of which a write to a missing page */
    uint64_t wp_faults;         /* ... of which a first write to a filled page */
    uint64_t copies;            /* pages filled with UFFDIO_COPY */
    uint64_t zero_fills;        /* holes filled with the zero page (or zeros) */
    uint64_t duplicates;        /* faults on a page already filled: woken only */
    uint64_t resident_pages;    /* the count of resident */
    uint64_t dirty_pages;       /* the count of dirty */
    uint64_t resident_peak;     /* the most resident_pages has been */
    /* Read-ahead (readahead.c). Settings: */
    uint32_t ra_max;            /* pages of the largest window; 0: no read-ahead */
    int ra_fixed;               /* 1: every missing fault reads ra_max pages ahead; 0: adaptive */
    /* what the adaptive detector has seen: */
    int ra_seen;                /* a missing fault was seen */
    uint64_t ra_last;           /* ... at this page */
    int64_t ra_delta;           /* the distance from the one before */
    uint32_t ra_window;         /* pages of the current window (0: random access) */
    int64_t ra_step;            /* +1 forward, -1 backward, else a stride */
    uint64_t ra_edge;           /* the page just past the last window: a reader going on faults there */
    uint64_t read_ahead_pages;  /* pages filled ahead of a fault */
    uint64_t read_ahead_hits;   /* faults at the edge of a window: the reader went through it */
    /* Page-out (fill.c): pages the client's agent is dropping; their faults
     * are handed to Python (-EBUSY) until the drop is done. NULL until the
     * first eviction. */
    struct up_bits *evicting;
    struct up_bits *dropped;    /* pages page-out dropped, not filled again since (NULL until then) */
    uint64_t evict_hand;        /* where the next search for victims starts: a clock over the range */
    uint64_t resident_limit;    /* 0, or resident pages past which a missing fault waits (-EBUSY) for page-out */
    uint64_t evictions;         /* pages dropped to stay under the region's cap */
    /* Fault latency (metrics.py), kept only while time_faults is set: from
     * the pager reading a fault to its page filled. Bucket 0: under 1 us;
     * bucket k: [2^(k-1), 2^k) us; the last: all slower. */
    int time_faults;
    int64_t woken_at;           /* CLOCK_MONOTONIC ns: the faulting thread's page filled, before read-ahead */
    uint64_t latency_buckets[24];
    uint64_t latency_ns_sum;
    uint64_t owner;             /* the pager's id of the region: remote.c hands pages back by it */
    uint64_t fetched;           /* pages remote.c placed from a remote store */
};

/* The pages read-ahead advises to fill after a missing fault: first,
 * first + step, ... (count pages, all inside the range). */
struct up_ra {
    uint64_t first;
    uint64_t count;
    int64_t step;
};

/* -1 with errno: EBADF (portion not live), EINVAL (len not a multiple of the
 * page size, or past 2^47 bytes), ENOMEM. */
int up_fill_init(struct up_fill *fill, uint64_t base, uint64_t len, struct up_portion *portion, int tracking);
/* Idempotent. */
void up_fill_release(struct up_fill *fill);

/* A run of pages: client address, store offset, length in bytes. */
struct up_run {
    uint64_t addr;
    uint64_t store_offset;
    uint64_t len;
};

/* Reads every pending message of uffd and serves the page faults it can.
 * Events, and faults it could not serve (status = -errno, e.g. -EAGAIN while
 * an event is unread), are stored in deferred[]. Stops after the first event
 * so that the caller applies it before any later fault is served.
 * Returns faults served, or -1 with errno set if read(2) failed. */
int up_serve(int uffd, struct up_fill *fill, struct up_msg *deferred, int max_deferred,
             int *n_deferred);
/* Serves one fault (flags as in the message): fills a missing page from
 * fill's source, wakes a page already filled, or records the first write to
 * a write-protected page and unprotects it. Returns 0, or -errno: -EBADMSG
 * for an encrypted page that fails authentication, -EBUSY for a page being
 * dropped (page-out: call again once it is), -EINPROGRESS for a page asked
 * for from a remote store (remote.c places it), -EOPNOTSUPP for a page of
 * a store without a descriptor that Python must fetch. */
int up_fill_fault(int uffd, struct up_fill *fill, uint64_t address, uint64_t flags);
/* Serves a missing-page fault with n bytes of data fetched elsewhere (the
 * rest of the page reads as zero; n 0: a hole), as up_fill_fault would
 * have from a descriptor; a page present meanwhile is only woken. Returns
 * 0 or -errno (-EAGAIN: an event is unread, call again; -EBUSY: the page
 * is being dropped, call again once it is). */
int up_fill_place(int uffd, struct up_fill *fill, uint64_t address, uint64_t flags, const uint8_t *data, uint64_t n);
/* Read-ahead (readahead.c). Feeds the detector with a missing fault at
 * address and stores in *window what to read ahead (count 0: nothing).
 * The C fill path calls it for stores with a descriptor; Python for the
 * others (which it fetches). 0, or -1 with errno (EBADF, EFAULT). */
int up_fill_advise(struct up_fill *fill, uint64_t address, struct up_ra *window);
/* Fills the pages of [first, first + count) (page indices; strided: first,
 * first + step, ...) that are neither resident nor in a portion without a
 * descriptor, from their portions, in runs of up to 256 pages, one
 * UFFDIO_COPY each (read: write-protected when writes are tracked). Best
 * effort: stops at the first page it cannot fill (an event unread, a page
 * that does not authenticate, an error); fills nothing while missing
 * faults are deferred to Python (defer_missing). Returns the pages filled. */
int64_t up_fill_ahead(int uffd, struct up_fill *fill, uint64_t first, uint64_t count, int64_t step);
/* Page-out: takes up to `want` resident pages that are neither dirty
 * (synchronous tracking; asynchronous tracking has no dirty set, the
 * agent's move-out passes over written pages) nor already being dropped,
 * from the clock hand on, as runs (store_offset 0), and marks them
 * evicting: every fault on them returns -EBUSY until up_fill_end_eviction.
 * Returns the runs stored; -1 with errno (EBADF; EINVAL: no tracking). */
int up_fill_take_victims(struct up_fill *fill, uint64_t want, struct up_run *runs, int max_runs);
/* The drop of [address, address + len) is over (done or failed): its
 * pages are no longer evicting; dropped counts them in evictions and
 * clears their resident bits. */
int up_fill_end_eviction(struct up_fill *fill, uint64_t address, uint64_t len, int dropped);

/* Whether the page at address is resident (filled and not removed since). */
int up_fill_is_resident(const struct up_fill *fill, uint64_t address);

/* Counts one fault served in ns nanoseconds in the latency histogram (for
 * faults served outside up_serve: fetched pages); nothing unless
 * time_faults is set. */
void up_fill_time_fault(struct up_fill *fill, int64_t ns);
/* Marks the pages of [start, end) (addresses) neither resident nor dirty
 * (REMOVE/UNMAP events); costs what was set there, not the range. */
int up_fill_forget(struct up_fill *fill, uint64_t start, uint64_t end);
/* At fork: the child's dirty set gets every page dirty in the parent's. */
int up_fill_inherit_dirty(struct up_fill *fill, const struct up_fill *parent);
int up_fill_is_dirty(const struct up_fill *fill, uint64_t addr);
/* Synchronous tracking: marks [first, first + count) (page indices) dirty,
 * pages written that the next take of dirty pages must write back and
 * protect again (a region taken over: found unprotected in its page
 * tables). -1 with errno (EBADF: not live). */
int up_fill_mark_dirty(struct up_fill *fill, uint64_t first, uint64_t count);

/* --- portions (portion.c) ----------------------------------------------- */

/* A root portion if parent is NULL, else a child of parent (which must be
 * live). Not placed yet. -1 with errno (EBADF, EINVAL, ENOMEM). */
int up_portion_init(struct up_portion *p, uint64_t npages, struct up_portion *parent);
/* Idempotent. */
void up_portion_release(struct up_portion *p);
/* Copies pages [first, first+npages) that are not yet materialized in p
 * from where p's parent chain holds them, and marks them materialized.
 * p must be placed, and it and every source must have a descriptor
 * (EOPNOTSUPP otherwise). Only the data the sources hold is copied: p reads as
 * zero wherever nothing was copied (see the invariant in portion.c).
 * Returns 0 or -1 with errno; *copied counts the pages materialized. */
int up_portion_copy_in(struct up_portion *p, uint64_t first, uint64_t npages, uint64_t *copied);
/* Marks pages materialized (after this portion's own write-back). */
int up_portion_mark(struct up_portion *p, uint64_t first, uint64_t npages);
/* Whether page idx is held by p itself (always, for a root portion). */
int up_portion_has(const struct up_portion *p, uint64_t idx);
/* Pages not materialized in p (0 for a root portion). */
uint64_t up_portion_missing(const struct up_portion *p);
/* The first page of [from, end) that p does not hold itself, or end. */
uint64_t up_portion_next_missing(const struct up_portion *p, uint64_t from, uint64_t end);
/* The first page of [from, end) the portion holds itself, or end. */
uint64_t up_portion_next_held(const struct up_portion *p, uint64_t from, uint64_t end);
/* Which portion of p's chain holds page `from` as p sees it, as a depth (0:
 * p itself, 1: its parent, ...), and in *run_end the end of the run of
 * pages from `from` on (before end) that the same portion holds. -1 with
 * errno EBADF or EINVAL (from >= end or past the region). */
int up_portion_source_run(const struct up_portion *p, uint64_t from, uint64_t end, uint64_t *run_end);
/* The first page of [from, end) whose bytes p's store may hold: for an
 * encrypted store the pages with a catalog record, else the pages in a data
 * segment of fd (SEEK_DATA); end if none. On any doubt (an error, no fd):
 * from. */
uint64_t up_portion_next_stored(const struct up_portion *p, uint64_t from, uint64_t end);

/* --- dirty pages and write-back (writeback.c) --------------------------- */

/* UP_TRACK_SYNC_WP: from *cursor on, write-protects runs of dirty pages,
 * clears their dirty bits and stores them in runs[]. A write after this
 * faults again and marks the page dirty anew. Returns the runs stored; 0
 * once the whole range is done, or when a write-protect failed (then errno
 * says why and *cursor is at the run it could not take); -1 with EBADF. */
int up_collect_dirty(int uffd, struct up_fill *fill, struct up_run *runs, int max_runs, uint64_t *cursor);
/* UP_TRACK_ASYNC_WP: PAGEMAP_SCAN of the owner's /proc/pid/pagemap over
 * [*cursor, end) for written pages (present, not the zero page); with protect,
 * write-protects them in the same walk. Returns runs stored, or -1. */
int up_scan_written(int pagemap_fd, struct up_fill *fill, int protect, struct up_run *runs, int max_runs,
                    uint64_t *cursor, uint64_t end);
/* A pager taking the region over: marks resident every page of the region
 * present in the owner's page tables (PAGEMAP_SCAN of its /proc/pid/pagemap),
 * which page-out then counts and may drop. Returns the pages marked, or -1. */
int64_t up_scan_resident(int pagemap_fd, struct up_fill *fill);
/* Copies the runs' bytes out of process pid, back to back into buf. */
int64_t up_read_remote(int pid, const struct up_run *runs, int n, uint8_t *buf);
/* Writes the runs' bytes (back to back in buf) to fd at their store offsets. */
int64_t up_pwrite_runs(int fd, const struct up_run *runs, int n, const uint8_t *buf);

/* --- AES-256-GCM over pages (aead.c) ----------------------------------- */

/* Pages of one store under its 32-byte subkey. anchor_fd: the store's
 * anchor in the state directory (its committed version per page), -1 for
 * none (then no page is known to be committed); catalog_fd: its catalog
 * (each page's record, 80 bytes at 4096 + page * 80); store_fd: the store's
 * file, -1 for a store without one (a remote store: its pages are given to
 * up_aead_open_page). The descriptors stay the caller's, open as long as
 * the aead is: it reads them through mappings of its own (see aead.c). */
struct up_aead;
struct up_aead *up_aead_new(const uint8_t *key, int anchor_fd, int catalog_fd, int store_fd);
void up_aead_free(struct up_aead *aead);
/* Which slot of each page's catalog record (n records of 80 bytes, and the
 * pages' anchor entries, n u64 LE) a new version goes to: slots[i] 0 or 1,
 * the slot that does not hold the page's current bytes; 2 where both may
 * (a write not yet committed: the caller opens the page to know). Returns
 * the count of 2s; *keeps counts the pages whose old version a slot holds. */
int up_record_choose_slots(const uint8_t *records, const uint8_t *entries, int n, uint8_t *slots, int *keeps);
/* Seals n pages of in into out (n * 4096 bytes), page i with a random
 * nonce and associated data store_id (16 bytes) || pages[i] || version
 * (little-endian u64s), writing version, nonce and tag into slot slots[i]
 * of records[i]. Returns 0, or -1 if libcrypto (or getrandom) failed. cffi
 * releases the GIL. */
int up_aead_seal_pages(struct up_aead *aead, const uint8_t *store_id, const uint64_t *pages, uint64_t version,
                       const uint8_t *in, uint8_t *out, uint8_t *records, const uint8_t *slots, int n);
/* Opens one page with one slot of its record; 0, or -1 (out zeroed). */
int up_aead_open_slot(struct up_aead *aead, const uint8_t *store_id, uint64_t page, const uint8_t *record, int slot,
                      const uint8_t *in, uint8_t *out);
/* Reads store page `page` (its ciphertext at offset in the store, copied
 * into out and opened there in place) and opens it with the slot its
 * anchor entry allows: 4096, 0 (it reads as zero: never committed, or
 * discarded), or -1 with errno (EBADMSG: it does not authenticate, and out
 * is zeroed). The fill path's and Python's one way to read an encrypted
 * page. Anchor, record and ciphertext come from mappings that aead keeps
 * (a file cut short under them is then read by pread). */
int64_t up_aead_read_page(struct up_aead *aead, const uint8_t *store_id, uint64_t page, uint64_t offset,
                          uint8_t *out);
/* The same for a ciphertext fetched elsewhere (a remote store): sealed is
 * its 4096 bytes, or NULL where the store holds none. A value where no
 * record allows one is EBADMSG, never a page of zeros. */
int64_t up_aead_open_page(struct up_aead *aead, const uint8_t *sealed, const uint8_t *store_id, uint64_t page,
                          uint8_t *out);

/* --- the client's page-out agent (agent.c) ------------------------------ */

/* What the pager sends on the agent's socket (SOCK_SEQPACKET, one a
 * message), and what the agent answers: err 0, or an errno (EINVAL: not
 * inside a region the library allowed, or a kind it cannot do there).
 * UP_AGENT_DROP: MADV_DONTNEED of the range. UP_AGENT_MOVE_OUT (at most
 * UP_AGENT_MOVE_MAX pages, a region allowed with its uffd): its unwritten
 * pages are dropped without a write being lost (see agent.c); dropped: bit
 * k for page k dropped (the others are where they were). */
enum {
    UP_AGENT_DROP = 0,
    UP_AGENT_MOVE_OUT = 1,
    UP_AGENT_MOVE_MAX = 64,
};
struct up_agent_request {
    uint64_t seq;
    uint64_t kind;
    uint64_t start;
    uint64_t len;
};
struct up_agent_reply {
    uint64_t seq;
    int64_t err;
    uint64_t dropped;
};
/* Starts the agent's thread on fd (this process's end of a socket whose
 * other end the pager holds); the thread owns fd from then on. */
int up_agent_start(int fd);
/* Lets the agent drop pages of [start, start + len) / no longer. uffd: the
 * region's, for move-outs (the agent keeps a duplicate until forgotten), or
 * -1 for drops only. */
int up_agent_allow(uint64_t start, uint64_t len, int uffd);
void up_agent_forget(uint64_t start);

/* --- the private pager's restarter (restart.c) ------------------------ */

enum up_restart_state {
    UP_RESTART_WATCHING = 1, /* a pager runs, or is being started again */
    UP_RESTART_ENDED = 2,    /* the pager exited with status 0 (idle, or SIGTERM): not restarted */
    UP_RESTART_GAVE_UP = 3,  /* it died too often, or could not be spawned: said on stderr */
};
/* The descriptor the spawned pager finds the listening socket at. */
enum { UP_RESTART_LISTEN_FD = 3 };
struct up_restart;
struct up_restart_status {
    int state;    /* enum up_restart_state */
    int pid;      /* the current pager's, 0 once there is none */
    int alive;    /* it has not exited (it may be reaped and replaced soon) */
    int restarts; /* pagers started after the first */
};
/* Spawns the first pager (argv[0] a path; stdin /dev/null; listen_fd at
 * UP_RESTART_LISTEN_FD, every other descriptor closed) and keeps copies of
 * argv and envp for the next ones. Owns listen_fd from then on; NULL with
 * errno (listen_fd still the caller's). At most max_restarts restarts
 * within window_ms, then it gives up. */
struct up_restart *up_restart_spawn(char *const argv[], char *const envp[], int listen_fd, int max_restarts,
                                    int window_ms);
/* Starts the thread that restarts the pager when it dies (max_restarts > 0). */
int up_restart_start(struct up_restart *r);
/* Closes this process's listening socket: nothing will listen there once
 * the pager is gone (no restarter runs). */
void up_restart_unbind(struct up_restart *r);
/* Stops that thread and waits for it (the current pager keeps running). */
void up_restart_stop(struct up_restart *r);
int up_restart_status(struct up_restart *r, struct up_restart_status *out);
/* The current pager's pidfd, the caller's from now on (-1: none); after up_restart_stop. */
int up_restart_take_pidfd(struct up_restart *r);
/* Closes the listening socket and the rest; after up_restart_stop. */
void up_restart_free(struct up_restart *r);
/* In a forked child: drops this process's copy without touching the lock. */
void up_restart_forget(struct up_restart *r);

/* --- small system calls Python lacks (sys.c) --------------------------- */
int up_mprotect(uint64_t addr, uint64_t len, int prot);
int up_munmap(uint64_t addr, uint64_t len);
/* sync_file_range(SYNC_FILE_RANGE_WRITE): start writing a range to disk now. */
int up_start_writeback(int fd, uint64_t offset, uint64_t len);
/* fallocate(PUNCH_HOLE|KEEP_SIZE): the range reads as zero and frees its blocks. */
int up_punch_hole(int fd, uint64_t offset, uint64_t len);
/* fstatfs(2): the f_type of the filesystem fd is on (linux/magic.h), or -1. */
int64_t up_fs_type(int fd);
/* tgkill(2): sig to thread tid of thread group tgid only (ESRCH if it is not one of its threads). */
int up_tgkill(int tgid, int tid, int sig);
/* pidfd_getfd(2): a descriptor of ours for the file the process holds as targetfd, or -1. */
int up_pidfd_getfd(int pidfd, int targetfd);

/* --- benchmark helpers and the C reference handler (bench_ref.c) ------- */

/* Reads (or writes) one byte of each page base + offsets[i] and stores each
 * access's latency in ns; the timing loop that every benchmark row shares. */
void up_touch_pages(uint64_t base, const uint64_t *offsets, int n, int write, int64_t *latency_ns);

/* The C reference handler: poll + read one message + pread + UFFDIO_COPY,
 * in a thread of this process or in a forked process. */
struct up_ref;
struct up_ref *up_ref_start_thread(int uffd, int file_fd, uint64_t base, uint64_t file_offset);
struct up_ref *up_ref_start_process(int uffd, int file_fd, uint64_t base, uint64_t file_offset);
/* The clustered reference, in a forked process: a fault at page P is
 * served with pages [P, P + cluster) (within len) copied straight from a
 * read-only mapping of the file, one UFFDIO_COPY. */
struct up_ref *up_ref_start_cluster_process(int uffd, int file_fd, uint64_t base, uint64_t file_offset, uint64_t len,
                                            uint64_t cluster);
/* Stops the handler; returns the faults it served, or -1. */
int64_t up_ref_stop(struct up_ref *ref);

/* --- the remote fault path (remote.c) ------------------------------------ */

/* One connection to one Redis server over which C asks for faults' pages
 * (see remote.c for the protocol facts and what is handed back). Python
 * makes the connection and owns its socket; a portion whose `remote` is
 * set has its missing pages asked for here while one is attached. */
struct up_remote;
/* A page handed back to Python: fetch it through the fetch path
 * (rc -EOPNOTSUPP) or settle the fault with rc (placing it failed so). */
struct up_remote_result {
    uint64_t owner;
    uint64_t address;
    uint64_t flags;
    int32_t rc;
};
enum up_remote_state {
    UP_REMOTE_OK = 0,
    UP_REMOTE_MORE = 1,     /* drain again at once: more is ready to hand back */
    UP_REMOTE_DETACH = 2,   /* the connection failed and every request is handed back: detach it */
};
/* prefix: "up:NAME:"; id: the pseudo file's id. NULL with errno (ENOMEM). */
struct up_remote *up_remote_new(const uint8_t *prefix, uint64_t prefix_len, const uint8_t *id, uint64_t id_len);
void up_remote_free(struct up_remote *remote);
/* A connected socket (non-blocking, its AUTH/SELECT done). -1 with errno
 * EBUSY while one is attached or requests are left. */
int up_remote_attach(struct up_remote *remote, int fd);
/* Forgets the socket (the caller closes it). EBUSY while requests are left. */
int up_remote_detach(struct up_remote *remote);
/* A reply is late: the next drain hands every request back. */
void up_remote_fail(struct up_remote *remote);
/* CLOCK_MONOTONIC ns of the oldest request in flight, 0 if none. */
int64_t up_remote_oldest_ns(const struct up_remote *remote);
/* requests sent, pages placed, pages handed back, requests in flight,
 * whether a connection is attached. */
void up_remote_counters(const struct up_remote *remote, uint64_t *out5);
/* The socket is readable: parses the replies there, places their pages,
 * and stores in out[] (up to max) the pages handed back to Python; *state
 * says what to do next (enum up_remote_state). Returns how many it stored. */
int up_remote_drain(struct up_remote *remote, struct up_remote_result *out, int max, int *state);

#endif