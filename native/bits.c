/*
 * Sparse page sets (struct up_bits): one bit per page of a region, costing
 * what is set rather than what the address space is.
 *
 * Two levels: a directory of leaf pointers, and leaves of 4 KiB (32768 bits,
 * 128 MiB of the region each) allocated on the first set. A directory entry
 * is NULL (every bit of the leaf clear), FULL (every bit set: no memory) or
 * an allocated leaf; a per-leaf count and a whole-set count are kept as bits
 * change. The directory (8 bytes a leaf, plus 4 for its count) lives in
 * MAP_NORESERVE memory, so that the largest region, 2^47 bytes (the x86-64
 * user address space: 2^20 leaves), costs only the directory pages touched.
 * [lo, hi) bounds the entries ever made non-NULL, so walks of a sparse set
 * skip the rest of the directory at once.
 *
 * Every range operation skips NULL and FULL leaves and all-zero or all-ones
 * 64-bit words, so its cost follows the leaves it touches, not the range.
 * set_range and clear_range allocate only the leaves at the two ends of the
 * range (the ones covered partly), and do so before changing anything: they
 * either do all they were asked or nothing.
 *
 * One thread changes a set. A reader on another thread may run concurrently
 * with anything but up_bits_free and sees each bit either before or after a
 * change, because an entry only ever goes NULL -> FULL, NULL -> leaf,
 * FULL -> leaf (a copy made before it is published) or FULL -> NULL: a leaf
 * is fully initialized, then published with a release store, and no
 * allocated leaf is ever unpublished or freed before up_bits_free. A leaf
 * that clear_range empties therefore stays (zeroed, count 0, skipped by every
 * walk) and is reused by the next set: at most 4 KiB per 128 MiB of the
 * region ever touched. The counts are exact on the changing thread only.
 */
#include "uffd_native.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define LEAF_SHIFT 15
#define LEAF_BITS ((uint64_t)1 << LEAF_SHIFT)
#define LEAF_WORDS (LEAF_BITS / 64)
#define MAX_BITS ((uint64_t)1 << 35) /* pages of 4 KiB in 2^47 bytes */

static const uint64_t full_leaf[LEAF_WORDS] = {[0 ... LEAF_WORDS - 1] = ~(uint64_t)0};
#define FULL ((uint64_t *)full_leaf) /* never written through: every writer checks for it first */

struct up_bits {
    uint64_t nbits;
    uint64_t count;       /* bits set */
    uint64_t nleaves;
    uint64_t **leaf;      /* nleaves entries: NULL, FULL or an allocated leaf */
    uint32_t *leaf_count; /* bits set in each leaf */
    uint64_t lo, hi;      /* entries outside [lo, hi) are NULL */
    size_t map_bytes;     /* of the mapping that holds leaf[] and leaf_count[] */
};

static inline uint64_t *load_leaf(const struct up_bits *b, uint64_t l)
{
    return __atomic_load_n(&b->leaf[l], __ATOMIC_ACQUIRE);
}

static inline void publish_leaf(struct up_bits *b, uint64_t l, uint64_t *leaf)
{
    if (l < __atomic_load_n(&b->lo, __ATOMIC_RELAXED))
        __atomic_store_n(&b->lo, l, __ATOMIC_RELAXED);
    if (l + 1 > __atomic_load_n(&b->hi, __ATOMIC_RELAXED))
        __atomic_store_n(&b->hi, l + 1, __ATOMIC_RELAXED);
    __atomic_store_n(&b->leaf[l], leaf, __ATOMIC_RELEASE);
}

static inline uint64_t load_word(const uint64_t *w)
{
    return __atomic_load_n(w, __ATOMIC_RELAXED);
}

static inline void store_word(uint64_t *w, uint64_t v)
{
    __atomic_store_n(w, v, __ATOMIC_RELAXED);
}

/* Bits of leaf l that exist (the last leaf may be short). */
static inline uint64_t leaf_len(const struct up_bits *b, uint64_t l)
{
    uint64_t left = b->nbits - (l << LEAF_SHIFT);
    return left < LEAF_BITS ? left : LEAF_BITS;
}

/* The mask of bits [lo, hi) of one word, 0 <= lo < hi <= 64. */
static inline uint64_t word_mask(unsigned lo, unsigned hi)
{
    uint64_t upper = hi == 64 ? ~(uint64_t)0 : ((uint64_t)1 << hi) - 1;
    return upper & ~(((uint64_t)1 << lo) - 1);
}

/* A new leaf with bits [0, len) set if full, else empty; NULL when out of memory. */
static uint64_t *new_leaf(uint64_t len, int full)
{
    uint64_t *leaf = malloc(LEAF_WORDS * sizeof(uint64_t));
    if (!leaf)
        return NULL;
    memset(leaf, 0, LEAF_WORDS * sizeof(uint64_t));
    if (full) {
        memset(leaf, 0xff, (size_t)(len / 64) * sizeof(uint64_t));
        if (len % 64)
            leaf[len / 64] = word_mask(0, (unsigned)(len % 64));
    }
    return leaf;
}

/* Sets (or clears) bits [lo, hi) of an allocated leaf; returns how many changed. */
static uint64_t leaf_change(uint64_t *leaf, uint64_t lo, uint64_t hi, int set)
{
    uint64_t changed = 0;
    while (lo < hi) {
        uint64_t w = lo / 64;
        unsigned from = (unsigned)(lo % 64);
        unsigned to = hi - w * 64 < 64 ? (unsigned)(hi - w * 64) : 64;
        uint64_t mask = word_mask(from, to), old = load_word(&leaf[w]);
        uint64_t new = set ? old | mask : old & ~mask;
        if (new != old) {
            changed += (uint64_t)__builtin_popcountll(old ^ new);
            store_word(&leaf[w], new);
        }
        lo = (w + 1) * 64;
    }
    return changed;
}

struct up_bits *up_bits_new(uint64_t nbits)
{
    if (nbits > MAX_BITS) {
        errno = EINVAL;
        return NULL;
    }
    struct up_bits *b = calloc(1, sizeof(*b));
    if (!b)
        return NULL;
    b->nbits = nbits;
    b->nleaves = (nbits + LEAF_BITS - 1) >> LEAF_SHIFT;
    size_t bytes = (size_t)b->nleaves * (sizeof(uint64_t *) + sizeof(uint32_t));
    b->map_bytes = bytes ? bytes : 1;
    void *map = mmap(NULL, b->map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (map == MAP_FAILED) {
        free(b);
        return NULL;
    }
    b->leaf = map;
    b->leaf_count = (uint32_t *)(b->leaf + b->nleaves);
    b->lo = b->nleaves;
    b->hi = 0;
    return b;
}

void up_bits_free(struct up_bits *b)
{
    if (!b)
        return;
    for (uint64_t l = b->lo; l < b->hi; l++)
        if (b->leaf[l] != FULL)
            free(b->leaf[l]);
    munmap(b->leaf, b->map_bytes);
    free(b);
}

uint64_t up_bits_count(const struct up_bits *b)
{
    return __atomic_load_n(&b->count, __ATOMIC_RELAXED);
}

int up_bits_test(const struct up_bits *b, uint64_t i)
{
    if (i >= b->nbits)
        return 0;
    const uint64_t *leaf = load_leaf(b, i >> LEAF_SHIFT);
    if (!leaf)
        return 0;
    uint64_t bit = i & (LEAF_BITS - 1);
    return (load_word(&leaf[bit / 64]) >> (bit % 64)) & 1;
}

int up_bits_prepare(struct up_bits *b, uint64_t i)
{
    if (i >= b->nbits) {
        errno = EINVAL;
        return -1;
    }
    uint64_t l = i >> LEAF_SHIFT;
    if (b->leaf[l])
        return 0;
    uint64_t *leaf = new_leaf(0, 0);
    if (!leaf)
        return -1;
    publish_leaf(b, l, leaf);
    return 0;
}

/* Clips [*first, *end) to the set; returns whether anything is left. */
static int clip(const struct up_bits *b, uint64_t *first, uint64_t *end)
{
    if (*end > b->nbits)
        *end = b->nbits;
    return *first < *end;
}

/* Before a range change: allocates what the change needs at the two ends of
 * [first, end), the leaves it covers partly (for a set: a NULL one; for a
 * clear: a FULL one, copied), without publishing anything yet. */
static int prepare_ends(struct up_bits *b, uint64_t first, uint64_t end, int set, uint64_t *ends[2])
{
    uint64_t lf = first >> LEAF_SHIFT, ll = (end - 1) >> LEAF_SHIFT;
    uint64_t leaves[2] = {lf, ll};
    ends[0] = ends[1] = NULL;
    for (int k = 0; k < 2 && !(k == 1 && ll == lf); k++) {
        uint64_t l = leaves[k], base = l << LEAF_SHIFT, len = leaf_len(b, l);
        uint64_t lo = first > base ? first - base : 0, hi = end - base < len ? end - base : len;
        if (lo == 0 && hi == len)
            continue; /* covered whole: NULL or FULL, no leaf needed */
        uint64_t *cur = b->leaf[l];
        if ((set && cur == NULL) || (!set && cur == FULL)) {
            ends[k] = new_leaf(len, !set);
            if (!ends[k]) {
                free(ends[0]);
                return -1;
            }
        }
    }
    return 0;
}

static int64_t change_range(struct up_bits *b, uint64_t first, uint64_t end, int set)
{
    if (!clip(b, &first, &end) || (!set && b->count == 0))
        return 0;
    uint64_t *ends[2];
    if (prepare_ends(b, first, end, set, ends) < 0)
        return -1;
    uint64_t lf = first >> LEAF_SHIFT, ll = (end - 1) >> LEAF_SHIFT, changed = 0;
    if (!set) {
        /* Only the leaves that may hold set bits (count > 0: hi > lo). */
        if (lf < b->lo)
            lf = b->lo;
        if (ll > b->hi - 1)
            ll = b->hi - 1;
    }
    for (uint64_t l = lf; l <= ll; l++) {
        uint64_t base = l << LEAF_SHIFT, len = leaf_len(b, l);
        uint64_t lo = first > base ? first - base : 0, hi = end - base < len ? end - base : len;
        uint64_t *cur = b->leaf[l], n;
        if (set ? (cur == FULL || b->leaf_count[l] == len) : (cur == NULL || b->leaf_count[l] == 0))
            continue;
        if (lo == 0 && hi == len && (set ? cur == NULL : cur == FULL)) {
            /* The whole leaf, without memory either way. */
            n = set ? len : b->leaf_count[l];
            publish_leaf(b, l, set ? FULL : NULL);
        } else {
            if ((set && cur == NULL) || (!set && cur == FULL)) {
                /* A leaf covered partly: one of the two prepare_ends made. */
                int k = l == (first >> LEAF_SHIFT) ? 0 : 1;
                cur = ends[k];
                ends[k] = NULL;
                n = leaf_change(cur, lo, hi, set);
                publish_leaf(b, l, cur);
            } else {
                n = leaf_change(cur, lo, hi, set);
            }
        }
        b->leaf_count[l] = set ? b->leaf_count[l] + (uint32_t)n : b->leaf_count[l] - (uint32_t)n;
        changed += n;
    }
    free(ends[0]);
    free(ends[1]);
    __atomic_store_n(&b->count, set ? b->count + changed : b->count - changed, __ATOMIC_RELAXED);
    return (int64_t)changed;
}

int64_t up_bits_set_range(struct up_bits *b, uint64_t first, uint64_t end)
{
    return change_range(b, first, end, 1);
}

int64_t up_bits_clear_range(struct up_bits *b, uint64_t first, uint64_t end)
{
    return change_range(b, first, end, 0);
}

/* The first bit of [lo, hi) in an allocated leaf equal to want, or hi. */
static uint64_t leaf_find(const uint64_t *leaf, uint64_t lo, uint64_t hi, int want)
{
    while (lo < hi) {
        uint64_t w = lo / 64;
        uint64_t word = load_word(&leaf[w]);
        if (!want)
            word = ~word;
        word &= ~(((uint64_t)1 << (lo % 64)) - 1);
        if (word) {
            uint64_t at = w * 64 + (uint64_t)__builtin_ctzll(word);
            return at < hi ? at : hi;
        }
        lo = (w + 1) * 64;
    }
    return hi;
}

uint64_t up_bits_next_set(const struct up_bits *b, uint64_t from, uint64_t end)
{
    uint64_t stop = end < b->nbits ? end : b->nbits;
    if (up_bits_count(b) == 0)
        return end;
    uint64_t lo = __atomic_load_n(&b->lo, __ATOMIC_RELAXED), hi = __atomic_load_n(&b->hi, __ATOMIC_RELAXED);
    if (from < (lo << LEAF_SHIFT))
        from = lo << LEAF_SHIFT;
    if (stop > (hi << LEAF_SHIFT))
        stop = hi << LEAF_SHIFT;
    while (from < stop) {
        uint64_t l = from >> LEAF_SHIFT, base = l << LEAF_SHIFT;
        uint64_t leaf_end = base + LEAF_BITS < stop ? base + LEAF_BITS : stop;
        const uint64_t *leaf = load_leaf(b, l);
        if (leaf == FULL)
            return from;
        if (leaf && b->leaf_count[l]) {
            uint64_t at = leaf_find(leaf, from - base, leaf_end - base, 1);
            if (at < leaf_end - base)
                return base + at;
        }
        from = leaf_end;
    }
    return end;
}

uint64_t up_bits_next_clear(const struct up_bits *b, uint64_t from, uint64_t end)
{
    uint64_t stop = end < b->nbits ? end : b->nbits;
    uint64_t hi = __atomic_load_n(&b->hi, __ATOMIC_RELAXED);
    while (from < stop && from < (hi << LEAF_SHIFT)) {
        uint64_t l = from >> LEAF_SHIFT, base = l << LEAF_SHIFT;
        uint64_t leaf_end = base + LEAF_BITS < stop ? base + LEAF_BITS : stop;
        const uint64_t *leaf = load_leaf(b, l);
        if (!leaf)
            return from;
        if (leaf != FULL && b->leaf_count[l] != leaf_len(b, l)) {
            uint64_t at = leaf_find(leaf, from - base, leaf_end - base, 0);
            if (at < leaf_end - base)
                return base + at;
        }
        from = leaf_end;
    }
    /* Past the last leaf ever set, and past the set's end, every bit is clear. */
    return from < end ? from : end;
}

int64_t up_bits_or_into(struct up_bits *dst, const struct up_bits *src)
{
    uint64_t changed = 0, hi = src->hi < dst->nleaves ? src->hi : dst->nleaves;
    for (uint64_t l = src->lo; l < hi; l++) {
        const uint64_t *s = load_leaf(src, l);
        uint64_t len = leaf_len(dst, l), *d = dst->leaf[l], n = 0;
        if (!s || src->leaf_count[l] == 0 || d == FULL || dst->leaf_count[l] == len)
            continue;
        if (leaf_len(src, l) < len)
            len = leaf_len(src, l); /* src's short last leaf */
        if (s == FULL) {
            int64_t r = change_range(dst, l << LEAF_SHIFT, (l << LEAF_SHIFT) + len, 1);
            if (r < 0)
                return -1;
            changed += (uint64_t)r;
            continue;
        }
        if (!d) {
            uint64_t *copy = new_leaf(0, 0);
            if (!copy)
                return -1;
            memcpy(copy, s, LEAF_WORDS * sizeof(uint64_t));
            if (len % 64)
                copy[len / 64] &= word_mask(0, (unsigned)(len % 64));
            for (uint64_t w = (len + 63) / 64; w < LEAF_WORDS; w++)
                copy[w] = 0;
            for (uint64_t w = 0; w < LEAF_WORDS; w++)
                n += (uint64_t)__builtin_popcountll(copy[w]);
            publish_leaf(dst, l, copy);
        } else {
            for (uint64_t w = 0; w < (len + 63) / 64; w++) {
                uint64_t add = load_word(&s[w]) & ~load_word(&d[w]);
                if (w == len / 64)
                    add &= word_mask(0, (unsigned)(len % 64));
                if (add) {
                    n += (uint64_t)__builtin_popcountll(add);
                    store_word(&d[w], d[w] | add);
                }
            }
        }
        dst->leaf_count[l] += (uint32_t)n;
        __atomic_store_n(&dst->count, dst->count + n, __ATOMIC_RELAXED);
        changed += n;
    }
    return (int64_t)changed;
}
