/*
 * What reading an encrypted page costs the fill path beside a plain one:
 * up_aead_read_page (native/aead.c: anchor entry, record and ciphertext from
 * mappings, AES-256-GCM open in place) beside the plain fault's pread of
 * 4 KiB, and the pieces around them, over 4096 sealed pages hot in the page
 * cache, in random order. Each figure is the median over 2000 timings of 64
 * reads (clock_gettime, the vDSO's), per read; the rows take turns.
 *
 *     cc -O2 -Inative -o /tmp/aead_read benchmarks/aead_read.c native/aead.c -l:libcrypto.so.3 -lpthread
 *     /tmp/aead_read DIR          # DIR: where its three files go (a tmpfs or a disk, hot either way)
 */
#define _GNU_SOURCE
#include "uffd_native.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define PAGES 4096
#define HEADER 4096 /* catalog and anchor: a header, then one entry per page */
#define TIMINGS 2000
#define READS 64

static uint8_t plain[PAGES * UP_PAGE_SIZE], sealed[PAGES * UP_PAGE_SIZE], records[PAGES * UP_RECORD_SIZE];

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int by_value(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static uint64_t next_page(void)
{
    static uint64_t state = 88172645463325252ULL; /* xorshift64 */
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state % PAGES;
}

static int open_file(const char *dir, const char *name)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) {
        perror(path);
        exit(1);
    }
    return fd;
}

enum row { PLAIN, ENCRYPTED, OPEN, RECORD, ROWS };

static const char *const row_names[ROWS] = {
    [PLAIN] = "plain: pread of 4 KiB (the plain fault's read)",
    [ENCRYPTED] = "encrypted: up_aead_read_page",
    [OPEN] = "  of it, the AES-256-GCM open of 4 KiB (page 0, in cache)",
    [RECORD] = "a pread of one 80-byte record (each fault's, before)",
};

static int64_t timings[ROWS][TIMINGS];

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s DIR\n", argv[0]);
        return 2;
    }
    int anchor = open_file(argv[1], "anchor"), catalog = open_file(argv[1], "catalog");
    int store = open_file(argv[1], "store");
    uint8_t key[32], store_id[16], slots[PAGES] = {0}, entry[8] = {1};
    static uint8_t out[UP_PAGE_SIZE] __attribute__((aligned(UP_PAGE_SIZE)));
    uint64_t pages[PAGES];
    for (size_t i = 0; i < sizeof(plain); i++)
        plain[i] = (uint8_t)random();
    memset(key, 7, sizeof(key));
    memset(store_id, 9, sizeof(store_id));
    for (int p = 0; p < PAGES; p++)
        pages[p] = p;
    struct up_aead *aead = up_aead_new(key, anchor, catalog, store);
    if (!aead || up_aead_seal_pages(aead, store_id, pages, 1, plain, sealed, records, slots, PAGES) < 0) {
        fprintf(stderr, "libcrypto failed\n");
        return 1;
    }
    /* Every page committed at version 1. */
    for (int p = 0; p < PAGES; p++)
        pwrite(anchor, entry, sizeof(entry), HEADER + p * sizeof(entry));
    if (pwrite(store, sealed, sizeof(sealed), 0) != sizeof(sealed) ||
        pwrite(catalog, records, sizeof(records), HEADER) != sizeof(records)) {
        perror("writing the files");
        return 1;
    }
    for (int p = 0; p < PAGES; p++) {
        if (up_aead_read_page(aead, store_id, p, (uint64_t)p * UP_PAGE_SIZE, out) != UP_PAGE_SIZE ||
            memcmp(out, plain + (size_t)p * UP_PAGE_SIZE, UP_PAGE_SIZE) != 0) {
            fprintf(stderr, "page %d does not read back\n", p);
            return 1;
        }
    }
    /* The rows take turns, READS reads at a time, who goes first rotating:
     * this machine's speed drifts within seconds. */
    uint8_t record[UP_RECORD_SIZE];
    for (int i = 0; i < TIMINGS; i++) {
        for (int r = 0; r < ROWS; r++) {
            enum row row = (enum row)((r + i) % ROWS);
            int64_t start = now_ns();
            for (int k = 0; k < READS; k++) {
                uint64_t page = next_page();
                int64_t got = row == PLAIN       ? pread(store, out, UP_PAGE_SIZE, page * UP_PAGE_SIZE)
                              : row == ENCRYPTED ? up_aead_read_page(aead, store_id, page, page * UP_PAGE_SIZE, out)
                              : row == OPEN      ? up_aead_open_slot(aead, store_id, 0, records, 0, sealed, out)
                                                 : pread(catalog, record, sizeof(record), HEADER + page * UP_RECORD_SIZE);
                if (got < 0) {
                    perror(row_names[row]);
                    return 1;
                }
            }
            timings[row][i] = now_ns() - start;
        }
    }
    double p50[ROWS];
    for (int row = 0; row < ROWS; row++) {
        qsort(timings[row], TIMINGS, sizeof(timings[row][0]), by_value);
        p50[row] = (double)timings[row][TIMINGS / 2] / READS;
        printf("%-58s p50 %6.0f ns\n", row_names[row], p50[row]);
    }
    printf("encrypted over plain: %+.0f ns (%.2fx)\n", p50[ENCRYPTED] - p50[PLAIN], p50[ENCRYPTED] / p50[PLAIN]);
    up_aead_free(aead);
    return 0;
}
