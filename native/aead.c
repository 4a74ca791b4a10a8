/*
 * AES-256-GCM over whole pages, through the system's libcrypto (OpenSSL 3,
 * the same implementation the `cryptography` package wraps). It is here, in
 * C, because per-page Python overhead tripled the cost of encrypted faults
 * and write-back: one call seals a whole batch of pages, and the fill path
 * opens a page with two preads (its record, then its ciphertext straight
 * into the page it fills, opened there in place), one load from a mapping
 * of the anchor (see anchor_entry) and no Python. The contexts are keyed
 * once, in up_aead_new: a page only sets its nonce.
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

/* Separate contexts: pages are sealed by write-back threads and opened by
 * the event loop at the same time. Each is used under its caller's lock;
 * the open side (open and the anchor's mapping) only by opens and reads. */
struct up_aead {
    EVP_CIPHER_CTX *seal;
    EVP_CIPHER_CTX *open;
    int anchor_fd;
    const uint8_t *anchor_map; /* a read-only mapping of anchor_fd (NULL: none yet), anchor_span bytes long, */
    size_t anchor_span;
    size_t anchor_len;         /* of which its first anchor_len bytes are in the file (fstat) */
    int anchor_pread_only;     /* it cannot be mapped (further): preads past anchor_len */
};

struct up_aead *up_aead_new(const uint8_t *key, int anchor_fd)
{
    struct up_aead *a = calloc(1, sizeof(*a));
    if (!a)
        return NULL;
    a->anchor_fd = anchor_fd;
    a->seal = EVP_CIPHER_CTX_new();
    a->open = EVP_CIPHER_CTX_new();
    if (!a->seal || !a->open || EVP_EncryptInit_ex(a->seal, EVP_aes_256_gcm(), NULL, key, NULL) != 1 ||
        EVP_DecryptInit_ex(a->open, EVP_aes_256_gcm(), NULL, key, NULL) != 1) {
        up_aead_free(a);
        return NULL;
    }
    return a;
}

void up_aead_free(struct up_aead *a)
{
    if (!a)
        return;
    EVP_CIPHER_CTX_free(a->seal);
    EVP_CIPHER_CTX_free(a->open);
    if (a->anchor_map)
        munmap((void *)a->anchor_map, a->anchor_span);
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

/* A short read (past the end of a sparse file) is zeros: no record, entry 0. */
static int pread_full(int fd, uint8_t *buf, size_t n, off_t at)
{
    ssize_t got = pread(fd, buf, n, at);
    if (got < 0)
        return -1;
    if ((size_t)got < n)
        memset(buf + got, 0, n - (size_t)got);
    return 0;
}

/* The anchor's entries are read from a read-only mapping of it: one load
 * instead of a pread per fault. A load past the end of a mapped file is
 * SIGBUS, and no signal handler of ours may turn that into an error, so the
 * mapping is only ever read within anchor_len, the size fstat gave (the
 * anchor is in the state directory, which the attacker cannot write, and
 * the pager only ever grows it: catalog.Anchor neither truncates it nor
 * punches holes in it). An entry past anchor_len is read by pread; when
 * that finds it in the file, the file has grown, and fstat says how far:
 * the mapping reaches further than the file (anchor_span, room to grow
 * into without mapping again) or is made anew. The catalog is beside the
 * store, where the attacker may cut it under a mapping: it is read by
 * pread only. */
#define ANCHOR_ROOM (1u << 20) /* bytes mapped past the file's end at least: 131072 more pages' entries */

static void anchor_grown(struct up_aead *a)
{
    struct stat st;
    if (fstat(a->anchor_fd, &st) < 0 || !S_ISREG(st.st_mode) || (uint64_t)st.st_size < a->anchor_len) {
        a->anchor_pread_only = 1; /* shrunk (never by the pager), or not a file: read it by pread from now on */
        a->anchor_len = 0;
        return;
    }
    size_t size = (size_t)st.st_size;
    if (size <= a->anchor_span) {
        a->anchor_len = size;
        return;
    }
    /* Mapping past the end of a file is allowed; only loads there fault,
     * and none is made past anchor_len. */
    size_t span = (size + size / 2 + ANCHOR_ROOM + UP_PAGE_SIZE - 1) & ~(size_t)(UP_PAGE_SIZE - 1);
    void *p = mmap(NULL, span, PROT_READ, MAP_SHARED, a->anchor_fd, 0);
    if (p == MAP_FAILED) {
        a->anchor_pread_only = 1; /* the old mapping, if any, still serves what it holds */
        return;
    }
    if (a->anchor_map)
        munmap((void *)a->anchor_map, a->anchor_span);
    a->anchor_map = p;
    a->anchor_span = span;
    a->anchor_len = size;
}

/* The page's anchor entry (0 where there is no anchor, or the file does not
 * reach it). 0, or -1 with errno. */
static int anchor_entry(struct up_aead *a, uint64_t page, uint64_t *entry)
{
    *entry = 0;
    if (a->anchor_fd < 0)
        return 0;
    uint64_t at = HEADER + page * ENTRY;
    if (page < (UINT64_MAX - HEADER) / ENTRY && at + ENTRY <= a->anchor_len) {
        /* 8-aligned: as whole as a pread of it against a concurrent write. */
        *entry = le64toh(__atomic_load_n((const uint64_t *)(a->anchor_map + at), __ATOMIC_RELAXED));
        return 0;
    }
    uint8_t bytes[ENTRY];
    ssize_t got = pread(a->anchor_fd, bytes, ENTRY, (off_t)at);
    if (got < 0)
        return -1;
    if (got < ENTRY) {
        memset(bytes + got, 0, ENTRY - (size_t)got);
    } else if (!a->anchor_pread_only) {
        anchor_grown(a);
    }
    *entry = le64(bytes);
    return 0;
}

/* up_aead_read_page and up_aead_open_page: the ciphertext is read from fd
 * at offset when a slot may open it, or given in `given` (NULL: the store
 * holds none), and opened with the slot the page's anchor entry allows. A
 * ciphertext read from fd goes straight into out and is opened there in
 * place; a slot that fails to open it leaves out zeroed, so the next slot
 * reads it again (rare: both slots may open a page only while a write of
 * it is not committed). out never holds ciphertext or unauthenticated
 * bytes when this returns. */
static int64_t open_page(struct up_aead *a, int catalog_fd, int fd, const uint8_t *given, const uint8_t *store_id,
                         uint64_t page, uint64_t offset, uint8_t *out)
{
    uint8_t record[UP_RECORD_SIZE], again[UP_RECORD_SIZE];
    if (pread_full(catalog_fd, record, sizeof(record), (off_t)(HEADER + page * UP_RECORD_SIZE)) < 0)
        return -1;
    for (int tries = 0;; tries++) {
        uint64_t entry;
        if (anchor_entry(a, page, &entry) < 0)
            return -1;
        int usable[2] = {slot_usable(record, 0, entry), slot_usable(record, 1, entry)};
        if ((usable[0] || usable[1]) && (fd >= 0 || given)) {
            /* The newer slot first: after a commit it is the current one. */
            int first = slot_version(record, 1) > slot_version(record, 0);
            int order[2] = {first, !first};
            for (int k = 0; k < 2; k++) {
                if (!usable[order[k]])
                    continue;
                const uint8_t *sealed = given;
                if (fd >= 0) {
                    if (pread_full(fd, out, UP_PAGE_SIZE, (off_t)offset) < 0) {
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
        if (tries > 0 || pread_full(catalog_fd, again, sizeof(again), (off_t)(HEADER + page * UP_RECORD_SIZE)) < 0 ||
            memcmp(again, record, sizeof(record)) == 0) {
            memset(out, 0, UP_PAGE_SIZE); /* what it held before is no answer either */
            errno = EBADMSG;
            return -1;
        }
        memcpy(record, again, sizeof(record));
    }
}

int64_t up_aead_read_page(struct up_aead *a, int catalog_fd, int fd, const uint8_t *store_id, uint64_t page,
                          uint64_t offset, uint8_t *out)
{
    return open_page(a, catalog_fd, fd, NULL, store_id, page, offset, out);
}

int64_t up_aead_open_page(struct up_aead *a, int catalog_fd, const uint8_t *sealed, const uint8_t *store_id,
                          uint64_t page, uint8_t *out)
{
    return open_page(a, catalog_fd, -1, sealed, store_id, page, 0, out);
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

uint64_t up_aead_next_stored(const struct up_aead *a, int catalog_fd, uint64_t first_store_page, uint64_t from,
                             uint64_t end)
{
    /* A page may hold data if the catalog has a record for it, or if the
     * anchor says it was committed (its record may be gone: that page must
     * then fail authentication, never be skipped as a hole). */
    uint64_t next = next_entry(catalog_fd, UP_RECORD_SIZE, record_holds, first_store_page, from, end);
    if (a->anchor_fd >= 0 && next > from) {
        uint64_t committed = next_entry(a->anchor_fd, ENTRY, entry_holds, first_store_page, from, next);
        if (committed < next)
            next = committed;
    }
    return next;
}
