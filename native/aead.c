/*
 * AES-256-GCM over whole pages, through the system's libcrypto (OpenSSL 3,
 * the same implementation the `cryptography` package wraps). It is here, in
 * C, because per-page Python overhead tripled the cost of encrypted faults
 * and write-back: one call seals a whole batch of pages.
 *
 * The few EVP entry points used are declared below rather than taken from
 * <openssl/evp.h>, so that building needs only libcrypto.so.3 (present
 * wherever Python's ssl module is), not the OpenSSL development headers.
 * They are part of OpenSSL 3's stable ABI.
 */
#include "uffd_native.h"

#include <stdlib.h>
#include <string.h>

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

/* Separate contexts: pages are sealed by write-back threads and opened by
 * the event loop at the same time. Each is used under its caller's lock. */
struct up_aead {
    EVP_CIPHER_CTX *seal;
    EVP_CIPHER_CTX *open;
};

struct up_aead *up_aead_new(const uint8_t *key)
{
    struct up_aead *a = calloc(1, sizeof(*a));
    if (!a)
        return NULL;
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
    free(a);
}

static void nonce_of(uint64_t counter, uint8_t *nonce)
{
    memset(nonce, 0, NONCE);
    for (int i = 0; i < 8; i++)
        nonce[NONCE - 1 - i] = (uint8_t)(counter >> (8 * i));
}

/* store id (16 bytes) || page (u64 LE) || version (u64 LE): see crypto.py. */
static void associated_data(const uint8_t *store_id, uint64_t page, uint64_t version, uint8_t *ad)
{
    memcpy(ad, store_id, 16);
    for (int i = 0; i < 8; i++) {
        ad[16 + i] = (uint8_t)(page >> (8 * i));
        ad[24 + i] = (uint8_t)(version >> (8 * i));
    }
}

int up_aead_seal_pages(struct up_aead *a, const uint8_t *store_id, const uint64_t *pages, uint64_t first_nonce,
                       const uint8_t *in, uint8_t *out, uint8_t *records, int n)
{
    uint8_t ad[32];
    int len;
    for (int i = 0; i < n; i++) {
        /* The catalog record: version (u64 LE), nonce, tag, 4 bytes of
         * padding. The version is the nonce's counter: it grows with every
         * write of the page, and needs no look-up of the previous one. */
        uint64_t counter = first_nonce + (uint64_t)i;
        uint8_t *record = records + (size_t)i * UP_RECORD_SIZE;
        memset(record, 0, UP_RECORD_SIZE);
        for (int b = 0; b < 8; b++)
            record[b] = (uint8_t)(counter >> (8 * b));
        uint8_t *nonce = record + 8, *tag = record + 8 + NONCE;
        nonce_of(counter, nonce);
        associated_data(store_id, pages[i], counter, ad);
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

int up_aead_open_page(struct up_aead *a, const uint8_t *store_id, uint64_t page, uint64_t version,
                      const uint8_t *nonce, const uint8_t *tag, const uint8_t *in, uint8_t *out)
{
    uint8_t ad[32], tag_copy[TAG];
    int len;
    associated_data(store_id, page, version, ad);
    memcpy(tag_copy, tag, TAG);
    if (EVP_DecryptInit_ex(a->open, NULL, NULL, NULL, nonce) != 1 ||
        EVP_DecryptUpdate(a->open, NULL, &len, ad, sizeof(ad)) != 1 ||
        EVP_DecryptUpdate(a->open, out, &len, in, UP_PAGE_SIZE) != 1 ||
        EVP_CIPHER_CTX_ctrl(a->open, EVP_CTRL_GCM_SET_TAG, TAG, tag_copy) != 1)
        return -1;
    if (EVP_DecryptFinal_ex(a->open, out + len, &len) != 1) {
        memset(out, 0, UP_PAGE_SIZE); /* never leave unauthenticated bytes behind */
        return -1;
    }
    return 0;
}
