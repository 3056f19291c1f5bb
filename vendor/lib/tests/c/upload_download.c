/*
 * upload_download.c - a C99 program using libcodex only through libcodex.h.
 *
 * usage: upload_download <data-dir> <absolute input file> <output file>
 *
 * Creates and starts a node in <data-dir>, uploads the input file with codex_upload_init +
 * codex_upload_file, downloads the dataset back with codex_download_stream (the data of the
 * RET_PROGRESS callbacks is kept in memory, and the library also writes <output file>),
 * checks that both copies equal the input, prints the dataset CID on stdout, then stops,
 * closes and destroys the node. Exits 0 on success; on failure says why on stderr.
 *
 * Each request waits for its terminal callback on a mutex and condition variable, as the
 * callbacks arrive on the library's threads.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "libcodex.h"

/* Seconds a request may take before the program gives up. */
#define TIMEOUT_SECONDS 30

/* Room kept for the message of a terminal callback (longer ones are truncated). */
#define MSG_MAX 1024

/* One request: what its callbacks reported. */
typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int terminals;     /* terminal callbacks seen (must end up exactly 1) */
    int code;          /* code of the terminal callback */
    char msg[MSG_MAX]; /* its message, NUL-terminated (truncated if longer) */
    size_t progress;   /* RET_PROGRESS callbacks */
    size_t bytes;      /* sum of their len */
    int collect;       /* keep the data of the RET_PROGRESS callbacks in data/size */
    unsigned char* data;
    size_t size;
    size_t cap;
    int oom;
} Request;

static void request_init(Request* r, int collect) {
    memset(r, 0, sizeof *r);
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cv, NULL);
    r->collect = collect;
}

static void request_free(Request* r) {
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->cv);
    free(r->data);
}

/* The callback of every request: copies what it needs, as `msg` is valid only now. */
static void on_callback(int ret, const char* msg, size_t len, void* user_data) {
    Request* r = user_data;
    pthread_mutex_lock(&r->mu);
    if (ret == RET_PROGRESS) {
        r->progress++;
        r->bytes += len;
        if (r->collect && msg != NULL && len > 0) {
            if (r->size + len > r->cap) {
                size_t cap = r->cap ? r->cap : 65536;
                while (cap < r->size + len) cap *= 2;
                unsigned char* grown = realloc(r->data, cap);
                if (grown == NULL) {
                    r->oom = 1;
                } else {
                    r->data = grown;
                    r->cap = cap;
                }
            }
            if (!r->oom) {
                memcpy(r->data + r->size, msg, len);
                r->size += len;
            }
        }
    } else {
        size_t n = len < sizeof r->msg - 1 ? len : sizeof r->msg - 1;
        r->terminals++;
        r->code = ret;
        if (msg != NULL && n > 0) memcpy(r->msg, msg, n);
        r->msg[n] = '\0';
        pthread_cond_broadcast(&r->cv);
    }
    pthread_mutex_unlock(&r->mu);
}

/*
 * Waits for the terminal callback of a request whose function returned `ret`. A function
 * returning RET_ERR has already called back. Returns 0 when the request succeeded.
 */
static int wait_for(Request* r, int ret, const char* what) {
    struct timespec deadline;
    int failed = 0;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += TIMEOUT_SECONDS;
    pthread_mutex_lock(&r->mu);
    if (ret != RET_OK && ret != RET_ERR) {
        fprintf(stderr, "%s: unexpected return code %d\n", what, ret);
        failed = 1;
    } else if (ret == RET_ERR && r->terminals != 1) {
        fprintf(stderr, "%s returned RET_ERR without calling back first\n", what);
        failed = 1;
    }
    while (!failed && r->terminals == 0) {
        if (pthread_cond_timedwait(&r->cv, &r->mu, &deadline) == ETIMEDOUT) {
            /* The request may still call back into `r`: leave at once. */
            fprintf(stderr, "%s: no answer after %d s\n", what, TIMEOUT_SECONDS);
            fflush(stderr);
            _Exit(3);
        }
    }
    if (!failed && r->code != RET_OK) {
        fprintf(stderr, "%s failed: %s\n", what, r->msg);
        failed = 1;
    }
    pthread_mutex_unlock(&r->mu);
    return failed;
}

/* Reads a whole file; returns NULL (and says why) on failure. */
static unsigned char* read_file(const char* path, size_t* size) {
    FILE* f = fopen(path, "rb");
    unsigned char* data = NULL;
    long n;
    if (f == NULL) {
        perror(path);
        return NULL;
    }
    if (fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
        perror(path);
        fclose(f);
        return NULL;
    }
    data = malloc(n > 0 ? (size_t)n : 1);
    if (data == NULL || fread(data, 1, (size_t)n, f) != (size_t)n) {
        fprintf(stderr, "%s: cannot read %ld bytes\n", path, n);
        free(data);
        fclose(f);
        return NULL;
    }
    fclose(f);
    *size = (size_t)n;
    return data;
}

/* The library calls of one run; returns 0 on success. `ctx` is set for the caller to
 * destroy, whatever happens. */
static int run(void** ctx, const char* data_dir, const char* input, const char* output) {
    char config[4096];
    char session[MSG_MAX];
    char cid[MSG_MAX];
    unsigned char* original = NULL;
    unsigned char* written = NULL;
    size_t original_size = 0, written_size = 0;
    Request r;
    int failed = 0;

    if (input[0] != '/') {
        fprintf(stderr, "codex_upload_file needs an absolute path, got %s\n", input);
        return 1;
    }
    if (strpbrk(data_dir, "\"\\") != NULL) {
        fprintf(stderr, "the data-dir must not contain quotes or backslashes\n");
        return 1;
    }
    snprintf(config, sizeof config,
             "{\"data-dir\": \"%s\", \"storage-quota\": 67108864, \"log-format\": \"none\"}",
             data_dir);
    original = read_file(input, &original_size);
    if (original == NULL) return 1;

    /* version: answered before the call returns */
    request_init(&r, 0);
    if (codex_version(NULL, on_callback, &r) != RET_OK || r.terminals != 1) {
        fprintf(stderr, "codex_version did not answer before returning\n");
        failed = 1;
    } else {
        fprintf(stderr, "libcodex %s\n", r.msg);
    }
    request_free(&r);
    if (failed) goto out;

    /* new */
    request_init(&r, 0);
    *ctx = codex_new(config, on_callback, &r);
    failed = wait_for(&r, *ctx != NULL ? RET_OK : RET_ERR, "codex_new");
    request_free(&r);
    if (failed) goto out;

    /* start */
    request_init(&r, 0);
    failed = wait_for(&r, codex_start(*ctx, on_callback, &r), "codex_start");
    request_free(&r);
    if (failed) goto out;

    /* upload_init with the absolute path, then upload_file */
    request_init(&r, 0);
    failed = wait_for(&r, codex_upload_init(*ctx, input, 0, on_callback, &r), "upload_init");
    memcpy(session, r.msg, sizeof session);
    request_free(&r);
    if (failed) goto out;

    request_init(&r, 0);
    failed = wait_for(&r, codex_upload_file(*ctx, session, on_callback, &r), "upload_file");
    memcpy(cid, r.msg, sizeof cid);
    if (!failed && r.bytes != original_size) {
        fprintf(stderr, "upload_file reported %zu bytes in %zu progress callbacks, not %zu\n",
                r.bytes, r.progress, original_size);
        failed = 1;
    }
    request_free(&r);
    if (failed) goto out;

    /* download_stream: the data in the callbacks, and the file written by the library */
    request_init(&r, 1);
    failed = wait_for(&r, codex_download_stream(*ctx, cid, 0, true, output, on_callback, &r),
                      "download_stream");
    if (!failed && (r.oom || r.size != original_size ||
                    (original_size > 0 && memcmp(r.data, original, original_size) != 0))) {
        fprintf(stderr, "download_stream gave %zu bytes that differ from the %zu uploaded\n",
                r.size, original_size);
        failed = 1;
    }
    request_free(&r);
    if (failed) goto out;
    written = read_file(output, &written_size);
    if (written == NULL || written_size != original_size ||
        memcmp(written, original, original_size) != 0) {
        fprintf(stderr, "%s differs from %s\n", output, input);
        failed = 1;
        goto out;
    }

    printf("%s\n", cid);
    fflush(stdout);

    /* stop, close */
    request_init(&r, 0);
    failed = wait_for(&r, codex_stop(*ctx, on_callback, &r), "codex_stop");
    request_free(&r);
    if (failed) goto out;
    request_init(&r, 0);
    failed = wait_for(&r, codex_close(*ctx, on_callback, &r), "codex_close");
    request_free(&r);

out:
    free(original);
    free(written);
    return failed;
}

int main(int argc, char** argv) {
    void* ctx = NULL;
    int failed;
    if (argc != 4) {
        fprintf(stderr, "usage: %s <data-dir> <absolute input file> <output file>\n", argv[0]);
        return 2;
    }
    libcodexNimMain();
    failed = run(&ctx, argv[1], argv[2], argv[3]);
    /* Synchronous, never calls back; no callback runs once it has returned. */
    if (ctx != NULL && codex_destroy(ctx, on_callback, NULL) != RET_OK) {
        fprintf(stderr, "codex_destroy failed\n");
        failed = 1;
    }
    return failed ? 1 : 0;
}
