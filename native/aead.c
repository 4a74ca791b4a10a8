/*
 * AES-256-GCM over whole pages, through the system's libcrypto (OpenSSL 3,
 * the same implementation the `cryptography` package wraps). It is here, in
 * C, because per-page Python overhead tripled the cost of encrypted faults
 * and write-back: one call seals a whole batch of pages, and the fill path
 * opens a page with no syscall and no Python: its anchor entry, its record
 * and its ciphertext come from mappings of their files (see "Mappings"
 * below), the ciphertext copied into the page it fills and opened there in
 * place. The contexts are keyed once, in up_aead_new: a page only sets its
 * nonce (EVP_DecryptInit_ex with the IV alone: 75 ns here, as cheap as
 * EVP_DecryptInit_ex2; the whole EVP overhead around the 1.2 us of AES-GCM
 * over 4 KiB is under 0.2 us).
 *
 * The few EVP entry points used are declared below rather than taken from
 * <openssl/evp.h>, so that building needs only libcrypto.so.3 (present
 * wherever Python's ssl module is), not the OpenSSL development headers.
 * They are part of OpenSSL 3's stable ABI.
 *
 * What a page's bytes are checked against (catalog.py has the why):
 * - its catalog record (beside the store, as untrusted as the store): two
 *   slots of 40 bytes, each version (u64 LE), nonce (12 random bytes), tag
 *   (16), 4 bytes of padding. A write goes to the slot that does not hold
 *   the page's current bytes, so a write that fails half-way leaves the old
 *   version's slot intact;
 * - its anchor entry (in the pager's state directory, which the attacker
 *   cannot write or roll back): the page's committed version (u64 LE), bit
 *   63 set when the page was discarded (it reads as zero). Only a slot whose
 *   version is at least the committed one may open the page: every older
 *   ciphertext (a rollback of the page, with or without its record) is
 *   refused, and a newer one can only be a write not yet committed.
 */
#define _GNU_SOURCE
#include "uffd_native.h"

#include <endian.h>
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX;
typedef struct evp_cipher_st EVP_CIPHER;
typedef struct engine_st ENGINE;
EVP_CIPHER_CTX *EVP_CIPHER_CTX_new(void);
void EVP_CIPHER_CTX_free(EVP_CIPHER_CTX *ctx);
const EVP_CIPHER *EVP_aes_256_gcm(void);
int EVP_EncryptInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *type, ENGINE *impl, const unsigned char *key,
                       const unsigned char *iv);
int EVP_EncryptUpdate(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl, const unsigned char *in, int inl);
int EVP_EncryptFinal_ex(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl);
int EVP_DecryptInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *type, ENGINE *impl, const unsigned char *key,
                       const unsigned char *iv);
int EVP_DecryptUpdate(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl, const unsigned char *in, int inl);
int EVP_DecryptFinal_ex(EVP_CIPHER_CTX *ctx, unsigned char *outm, int *outl);
int EVP_CIPHER_CTX_ctrl(EVP_CIPHER_CTX *ctx, int type, int arg, void *ptr);
#define EVP_CTRL_GCM_GET_TAG 0x10
#define EVP_CTRL_GCM_SET_TAG 0x11

#define TAG 16
#define NONCE 12
#define SLOT (UP_RECORD_SIZE / 2)
#define HEADER 4096           /* catalog and anchor: a header, then one entry per store page */
#define ENTRY 8               /* an anchor entry */
#define HOLE (1ULL << 63)     /* anchor entry flag: discarded, reads as zero */

/* A read-only mapping of a file, made on first use: map is span bytes
 * long, of which the first len are in the file (fstat said so); pread_only:
 * it cannot be mapped (further), every read is a pread. */
struct mapped_file {
    int fd;                    /* -1: none (see up_aead_new) */
    const uint8_t *map;        /* NULL: none yet */
    size_t span;
    size_t len;
    int pread_only;
};

/* Separate contexts: pages are sealed by write-back threads and opened by
 * the event loop at the same time. Each is used under its caller's lock;
 * the open side (open and the mappings) only by opens and reads. */
struct up_aead {
    EVP_CIPHER_CTX *seal;
    EVP_CIPHER_CTX *open;
    struct mapped_file anchor, catalog, store;
};

static void install_guard(void);
static int guarding; /* our SIGBUS handler is installed: the catalog and the store may be mapped */

struct up_aead *up_aead_new(const uint8_t *key, int anchor_fd, int catalog_fd, int store_fd)
{
    struct up_aead *a = calloc(1, sizeof(*a));
    if (!a)
        return NULL;
    a->anchor.fd = anchor_fd;
    a->catalog.fd = catalog_fd;
    a->store.fd = store_fd;
    a->seal = EVP_CIPHER_CTX_new();
    a->open = EVP_CIPHER_CTX_new();
    if (!a->seal || !a->open || EVP_EncryptInit_ex(a->seal, EVP_aes_256_gcm(), NULL, key, NULL) != 1 ||
        EVP_DecryptInit_ex(a->open, EVP_aes_256_gcm(), NULL, key, NULL) != 1) {
        up_aead_free(a);
        return NULL;
    }
    install_guard();
    a->catalog.pread_only = a->store.pread_only = !guarding; /* the attacker's files: mapped only under the guard */
    return a;
}

static void unmap_file(struct mapped_file *m)
{
    if (m->map)
        munmap((void *)m->map, m->span);
}

void up_aead_free(struct up_aead *a)
{
    if (!a)
        return;
    EVP_CIPHER_CTX_free(a->seal);
    EVP_CIPHER_CTX_free(a->open);
    unmap_file(&a->anchor);
    unmap_file(&a->catalog);
    unmap_file(&a->store);
    free(a);
}

static uint64_t le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int b = 0; b < 8; b++)
        v |= (uint64_t)p[b] << (8 * b);
    return v;
}

static void put_le64(uint8_t *p, uint64_t v)
{
    for (int b = 0; b < 8; b++)
        p[b] = (uint8_t)(v >> (8 * b));
}

static uint64_t slot_version(const uint8_t *record, int slot)
{
    return le64(record + slot * SLOT);
}

/* May this slot hold the page's bytes, given its anchor entry? */
static int slot_usable(const uint8_t *record, int slot, uint64_t entry)
{
    uint64_t version = slot_version(record, slot);
    return version != 0 && version >= (entry & ~HOLE);
}

/* Pages whose anchor entry is 0 (never committed) or a hole read as zero
 * when no usable slot opens them: that is their last committed version. */
static int zero_is_committed(uint64_t entry)
{
    return entry == 0 || (entry & HOLE);
}

/* store id (16 bytes) || page (u64 LE) || version (u64 LE): see crypto.py. */
static void associated_data(const uint8_t *store_id, uint64_t page, uint64_t version, uint8_t *ad)
{
    memcpy(ad, store_id, 16);
    put_le64(ad + 16, page);
    put_le64(ad + 24, version);
}

/* Random nonces, NONCE bytes each. getrandom(2) never fails for 256 bytes
 * or fewer once the pool is ready; more may come back short on a signal. */
static int random_bytes(uint8_t *out, size_t n)
{
    while (n) {
        ssize_t got = getrandom(out, n, 0);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        out += got;
        n -= (size_t)got;
    }
    return 0;
}

int up_record_choose_slots(const uint8_t *records, const uint8_t *entries, int n, uint8_t *slots, int *keeps)
{
    int ambiguous = 0;
    *keeps = 0;
    for (int i = 0; i < n; i++) {
        const uint8_t *record = records + (size_t)i * UP_RECORD_SIZE;
        uint64_t entry = le64(entries + (size_t)i * ENTRY);
        int usable0 = slot_usable(record, 0, entry), usable1 = slot_usable(record, 1, entry);
        if (usable0 && usable1) {
            slots[i] = 2; /* a write since the last commit: which one the bytes are, only opening tells */
            ambiguous++;
        } else if (usable0 || usable1) {
            slots[i] = usable0 ? 1 : 0;
            (*keeps)++;
        } else {
            slots[i] = 0; /* nothing to keep: the page reads as zero, or is lost already */
        }
    }
    return ambiguous;
}

int up_aead_seal_pages(struct up_aead *a, const uint8_t *store_id, const uint64_t *pages, uint64_t version,
                       const uint8_t *in, uint8_t *out, uint8_t *records, const uint8_t *slots, int n)
{
    uint8_t ad[32], nonces[20 * NONCE];
    int len;
    for (int i = 0; i < n; i++) {
        if (i % 20 == 0 && random_bytes(nonces, sizeof(nonces)) < 0)
            return -1;
        uint8_t *slot = records + (size_t)i * UP_RECORD_SIZE + (slots[i] ? SLOT : 0);
        memset(slot, 0, SLOT);
        put_le64(slot, version);
        uint8_t *nonce = slot + 8, *tag = slot + 8 + NONCE;
        memcpy(nonce, nonces + (i % 20) * NONCE, NONCE);
        associated_data(store_id, pages[i], version, ad);
        const uint8_t *src = in + (size_t)i * UP_PAGE_SIZE;
        uint8_t *dst = out + (size_t)i * UP_PAGE_SIZE;
        if (EVP_EncryptInit_ex(a->seal, NULL, NULL, NULL, nonce) != 1 ||
            EVP_EncryptUpdate(a->seal, NULL, &len, ad, sizeof(ad)) != 1 ||
            EVP_EncryptUpdate(a->seal, dst, &len, src, UP_PAGE_SIZE) != 1 ||
            EVP_EncryptFinal_ex(a->seal, dst + len, &len) != 1 ||
            EVP_CIPHER_CTX_ctrl(a->seal, EVP_CTRL_GCM_GET_TAG, TAG, tag) != 1)
            return -1;
    }
    return 0;
}

int up_aead_open_slot(struct up_aead *a, const uint8_t *store_id, uint64_t page, const uint8_t *record, int slot,
                      const uint8_t *in, uint8_t *out)
{
    const uint8_t *s = record + (slot ? SLOT : 0);
    uint8_t ad[32], tag_copy[TAG];
    int len;
    associated_data(store_id, page, le64(s), ad);
    memcpy(tag_copy, s + 8 + NONCE, TAG);
    if (EVP_DecryptInit_ex(a->open, NULL, NULL, NULL, s + 8) != 1 ||
        EVP_DecryptUpdate(a->open, NULL, &len, ad, sizeof(ad)) != 1 ||
        EVP_DecryptUpdate(a->open, out, &len, in, UP_PAGE_SIZE) != 1 ||
        EVP_CIPHER_CTX_ctrl(a->open, EVP_CTRL_GCM_SET_TAG, TAG, tag_copy) != 1 ||
        EVP_DecryptFinal_ex(a->open, out + len, &len) != 1) {
        memset(out, 0, UP_PAGE_SIZE); /* never leave unauthenticated bytes behind */
        return -1;
    }
    return 0;
}

/* Mappings. A page's anchor entry, record and ciphertext are read from
 * read-only MAP_SHARED mappings of their files: a load or a copy instead of
 * a pread each (here 0.6 us for a record, 0.8 us for a page, 0.2 us of it
 * the syscall itself). Within the size fstat last gave (len) from the
 * mapping; past it by pread, and when that finds the bytes in the file, the
 * file has grown: fstat says how far, and the mapping reaches further than
 * the file (span, room to grow into without mapping again) or is made anew.
 * Mapping past the end of a file is allowed; only loads there fault.
 *
 * A load from a page of a mapping that lies wholly past its file's end
 * raises SIGBUS (BUS_ADRERR, si_addr the address) in the loading thread.
 * The anchor is in the state directory, which the attacker cannot write,
 * and the pager only ever grows it (catalog.Anchor neither truncates it nor
 * punches holes in it): its loads within len cannot fault. The catalog and
 * the store are the attacker's to cut short under the mapping, so their
 * bytes are copied out under a guard (guarded_copy): a SIGBUS on the
 * copying thread at an address inside the copy jumps back out of it, and
 * that file is read by pread from then on. Any other SIGBUS goes to the
 * handler that was there before ours (Python's faulthandler, or the default
 * action: the process dies, as it would without us); a handler installed
 * after ours that does not pass SIGBUS on would leave a cut file fatal.
 * The copy is private: no ciphertext is opened where someone else could
 * change it between the tag's check and the decryption. */
#define MAP_ROOM (1u << 20) /* bytes mapped past a file's end at least: 131072 more anchor entries */

struct guard {
    sigjmp_buf back;
    const uint8_t *from, *to;
};

/* Set only around a copy, by the thread making it. The handler reads it
 * only for a fault on a file mapping (BUS_ADRERR): the TLS of a thread that
 * never made a copy may be allocated on its first read, which is no work
 * for a signal handler inside malloc, where no such fault is taken. */
static __thread struct guard *volatile guard;
static struct sigaction guard_before; /* SIGBUS's disposition before ours */

static void on_sigbus(int sig, siginfo_t *info, void *context)
{
    const uint8_t *at = info->si_addr;
    struct guard *g = info->si_code == BUS_ADRERR ? guard : NULL;
    if (g && at >= g->from && at < g->to)
        siglongjmp(g->back, 1);
    if (guard_before.sa_flags & SA_SIGINFO) {
        guard_before.sa_sigaction(sig, info, context);
    } else if (guard_before.sa_handler != SIG_DFL && guard_before.sa_handler != SIG_IGN) {
        guard_before.sa_handler(sig);
    } else {
        /* As if ours were not there: a fault retried on return raises it
         * again, a signal sent (si_code <= 0) is sent again. */
        sigaction(SIGBUS, &guard_before, NULL);
        if (info->si_code <= 0)
            raise(sig);
    }
}

static void install_guard_once(void)
{
    /* SA_NODEFER: the jump back leaves SIGBUS unblocked, so sigsetjmp need
     * not save the signal mask (a syscall per copy). */
    struct sigaction sa = {.sa_sigaction = on_sigbus, .sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK};
    sigemptyset(&sa.sa_mask);
    guarding = sigaction(SIGBUS, &sa, &guard_before) == 0;
}

static void install_guard(void)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, install_guard_once);
}

/* memcpy from a mapping that may be cut short under it: 0, or -1 if it was. */
static int guarded_copy(uint8_t *dst, const uint8_t *src, size_t n)
{
    struct guard g = {.from = src, .to = src + n};
    if (sigsetjmp(g.back, 0)) {
        guard = NULL;
        return -1;
    }
    guard = &g;
    __atomic_signal_fence(__ATOMIC_SEQ_CST); /* the guard is set before the first load, cleared after the last */
    memcpy(dst, src, n);
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    guard = NULL;
    return 0;
}

static void mapped_grown(struct mapped_file *m)
{
    struct stat st;
    if (fstat(m->fd, &st) < 0 || !S_ISREG(st.st_mode) || (uint64_t)st.st_size < m->len) {
        m->pread_only = 1; /* shrunk (never by the pager: it only grows these files), or not a file */
        m->len = 0;
        return;
    }
    size_t size = (size_t)st.st_size;
    if (size <= m->span) {
        m->len = size;
        return;
    }
    size_t span = (size + size / 2 + MAP_ROOM + UP_PAGE_SIZE - 1) & ~(size_t)(UP_PAGE_SIZE - 1);
    void *p = mmap(NULL, span, PROT_READ, MAP_SHARED, m->fd, 0);
    if (p == MAP_FAILED) {
        m->pread_only = 1; /* the old mapping, if any, still serves what it holds */
        return;
    }
    unmap_file(m);
    m->map = p;
    m->span = span;
    m->len = size;
}

/* n bytes of m from at into buf, zeros past the file's end (a sparse
 * file's: no record, entry 0); 0, or -1 with errno. */
static int mapped_read(struct mapped_file *m, uint8_t *buf, size_t n, uint64_t at)
{
    if (at <= m->len && n <= m->len - at) {
        if (guarded_copy(buf, m->map + at, n) == 0)
            return 0;
        m->pread_only = 1; /* cut short under the mapping */
        m->len = 0;
    }
    ssize_t got = pread(m->fd, buf, n, (off_t)at);
    if (got < 0)
        return -1;
    if ((size_t)got < n)
        memset(buf + got, 0, n - (size_t)got);
    else if (!m->pread_only)
        mapped_grown(m);
    return 0;
}

/* The page's anchor entry (0 where there is no anchor, or the file does not
 * reach it). 0, or -1 with errno. */
static int anchor_entry(struct up_aead *a, uint64_t page, uint64_t *entry)
{
    *entry = 0;
    if (a->anchor.fd < 0)
        return 0;
    uint64_t at = HEADER + page * ENTRY;
    if (page < (UINT64_MAX - HEADER) / ENTRY && at + ENTRY <= a->anchor.len) {
        /* 8-aligned: as whole as a pread of it against a concurrent write. */
        *entry = le64toh(__atomic_load_n((const uint64_t *)(a->anchor.map + at), __ATOMIC_RELAXED));
        return 0;
    }
    uint8_t bytes[ENTRY];
    if (mapped_read(&a->anchor, bytes, ENTRY, at) < 0)
        return -1;
    *entry = le64(bytes);
    return 0;
}

/* up_aead_read_page and up_aead_open_page: the ciphertext is read from
 * the store at offset when a slot may open it (from_store), or given in
 * `given` (NULL: the store holds none), and opened with the slot the page's
 * anchor entry allows. A ciphertext read from the store is copied straight
 * into out and opened there in place; a slot that fails to open it leaves
 * out zeroed, so the next slot reads it again (rare: both slots may open a
 * page only while a write of it is not committed). out never holds
 * ciphertext or unauthenticated bytes when this returns. */
static int64_t open_page(struct up_aead *a, int from_store, const uint8_t *given, const uint8_t *store_id,
                         uint64_t page, uint64_t offset, uint8_t *out)
{
    uint8_t record[UP_RECORD_SIZE], again[UP_RECORD_SIZE];
    uint64_t at = HEADER + page * UP_RECORD_SIZE;
    int held = from_store ? a->store.fd >= 0 : given != NULL;
    if (mapped_read(&a->catalog, record, sizeof(record), at) < 0)
        return -1;
    for (int tries = 0;; tries++) {
        uint64_t entry;
        if (anchor_entry(a, page, &entry) < 0)
            return -1;
        int usable[2] = {slot_usable(record, 0, entry), slot_usable(record, 1, entry)};
        if ((usable[0] || usable[1]) && held) {
            /* The newer slot first: after a commit it is the current one. */
            int first = slot_version(record, 1) > slot_version(record, 0);
            int order[2] = {first, !first};
            for (int k = 0; k < 2; k++) {
                if (!usable[order[k]])
                    continue;
                const uint8_t *sealed = given;
                if (from_store) {
                    if (mapped_read(&a->store, out, UP_PAGE_SIZE, offset) < 0) {
                        memset(out, 0, UP_PAGE_SIZE); /* memset leaves errno alone */
                        return -1;
                    }
                    sealed = out;
                }
                if (up_aead_open_slot(a, store_id, page, record, order[k], sealed, out) == 0)
                    return UP_PAGE_SIZE;
            }
        }
        /* A remote store that holds a value where the records know none
         * (another pager's, or planted) does not read as zero. */
        if (zero_is_committed(entry) && !given) {
            memset(out, 0, UP_PAGE_SIZE);
            return 0;
        }
        /* A write of the page under way in another thread or pager may have
         * changed the record between our reads: if so, read it all again. */
        if (tries > 0 || mapped_read(&a->catalog, again, sizeof(again), at) < 0 ||
            memcmp(again, record, sizeof(record)) == 0) {
            memset(out, 0, UP_PAGE_SIZE); /* what it held before is no answer either */
            errno = EBADMSG;
            return -1;
        }
        memcpy(record, again, sizeof(record));
    }
}

int64_t up_aead_read_page(struct up_aead *a, const uint8_t *store_id, uint64_t page, uint64_t offset, uint8_t *out)
{
    return open_page(a, 1, NULL, store_id, page, offset, out);
}

int64_t up_aead_open_page(struct up_aead *a, const uint8_t *sealed, const uint8_t *store_id, uint64_t page,
                          uint8_t *out)
{
    return open_page(a, 0, sealed, store_id, page, 0, out);
}

/* The first page of [from, end) (counted from first_store_page) whose
 * entry in fd (HEADER + store page * stride) passes `holds`: holes of the
 * sparse file are skipped with SEEK_DATA, the rest read a block at a time.
 * On an error: from. */
static uint64_t next_entry(int fd, size_t stride, int (*holds)(const uint8_t *), uint64_t first_store_page,
                           uint64_t from, uint64_t end)
{
    uint8_t entries[UP_PAGE_SIZE / ENTRY * ENTRY];
    uint64_t per_read = sizeof(entries) / stride, page = from;
    while (page < end) {
        off_t at = (off_t)(HEADER + (first_store_page + page) * stride);
        off_t data = lseek(fd, at, SEEK_DATA);
        if (data < 0)
            return errno == ENXIO ? end : page;
        if (data > at) {
            /* The entry that holds the first byte of data. */
            page = ((uint64_t)data - HEADER) / stride - first_store_page;
            if (page >= end)
                return end;
            at = (off_t)(HEADER + (first_store_page + page) * stride);
        }
        uint64_t want = end - page < per_read ? end - page : per_read;
        ssize_t got = pread(fd, entries, (size_t)(want * stride), at);
        if (got < 0)
            return page;
        for (uint64_t k = 0; k < (uint64_t)got / stride; k++) {
            if (holds(entries + k * stride))
                return page + k;
        }
        if ((uint64_t)got < want * stride)
            return end; /* the file ends: no entries past it */
        page += want;
    }
    return end;
}

static int record_holds(const uint8_t *record)
{
    return slot_version(record, 0) != 0 || slot_version(record, 1) != 0;
}

static int entry_holds(const uint8_t *entry)
{
    return !zero_is_committed(le64(entry));
}

uint64_t up_aead_next_stored(const struct up_aead *a, uint64_t first_store_page, uint64_t from, uint64_t end)
{
    /* A page may hold data if the catalog has a record for it, or if the
     * anchor says it was committed (its record may be gone: that page must
     * then fail authentication, never be skipped as a hole). */
    if (a->catalog.fd < 0)
        return from;
    uint64_t next = next_entry(a->catalog.fd, UP_RECORD_SIZE, record_holds, first_store_page, from, end);
    if (a->anchor.fd >= 0 && next > from) {
        uint64_t committed = next_entry(a->anchor.fd, ENTRY, entry_holds, first_store_page, from, next);
        if (committed < next)
            next = committed;
    }
    return next;
}
