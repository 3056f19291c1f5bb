/*
 * libcodex.h - the C ABI of a Codex storage node.
 *
 * Declares the same functions, with the same signatures, as the reference libcodex
 * (Codex 1.0.0-prototype.1), so a program built against this header links either the
 * in-tree Rust implementation or a Nim-built libcodex.
 *
 * Callback contract (see ABI.md):
 *  - every accepted request (function returned RET_OK) gets zero or more RET_PROGRESS
 *    callbacks, then exactly one terminal RET_OK or RET_ERR callback;
 *  - a function that returns RET_ERR has already called the callback with RET_ERR on the
 *    caller's thread: that was the terminal callback;
 *  - a NULL callback gives RET_MISSING_CALLBACK and no work;
 *  - callbacks run on the node's worker threads, must be quick and must not call back into
 *    the library; `msg` is valid only during the callback and `len` is authoritative.
 */
#ifndef __libcodex__
#define __libcodex__

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define RET_OK 0
#define RET_ERR 1
#define RET_MISSING_CALLBACK 2
#define RET_PROGRESS 3

#ifdef __cplusplus
extern "C" {
#endif

typedef void (*CodexCallback)(int callerRet, const char* msg, size_t len, void* userData);

/* The reference's runtime initialiser; a no-op here, exported for drop-in compatibility. */
void libcodexNimMain(void);

/* Lifecycle */
void* codex_new(const char* configJson, CodexCallback callback, void* userData);
int codex_start(void* ctx, CodexCallback callback, void* userData);
int codex_stop(void* ctx, CodexCallback callback, void* userData);
int codex_close(void* ctx, CodexCallback callback, void* userData);
/* Synchronous: returns RET_OK or RET_ERR and never calls the callback. */
int codex_destroy(void* ctx, CodexCallback callback, void* userData);

/* Information */
int codex_version(void* ctx, CodexCallback callback, void* userData);
int codex_revision(void* ctx, CodexCallback callback, void* userData);
int codex_repo(void* ctx, CodexCallback callback, void* userData);
int codex_debug(void* ctx, CodexCallback callback, void* userData);
int codex_spr(void* ctx, CodexCallback callback, void* userData);
int codex_peer_id(void* ctx, CodexCallback callback, void* userData);
int codex_log_level(void* ctx, const char* logLevel, CodexCallback callback, void* userData);

/* Peers */
int codex_connect(void* ctx, const char* peerId, const char** peerAddresses,
                  size_t peerAddressesSize, CodexCallback callback, void* userData);
int codex_peer_debug(void* ctx, const char* peerId, CodexCallback callback, void* userData);

/* Uploads */
int codex_upload_init(void* ctx, const char* filepath, size_t chunkSize,
                      CodexCallback callback, void* userData);
int codex_upload_chunk(void* ctx, const char* sessionId, const uint8_t* chunk, size_t len,
                       CodexCallback callback, void* userData);
int codex_upload_finalize(void* ctx, const char* sessionId, CodexCallback callback,
                          void* userData);
int codex_upload_cancel(void* ctx, const char* sessionId, CodexCallback callback,
                        void* userData);
int codex_upload_file(void* ctx, const char* sessionId, CodexCallback callback,
                      void* userData);

/* Downloads */
int codex_download_init(void* ctx, const char* cid, size_t chunkSize, bool local,
                        CodexCallback callback, void* userData);
int codex_download_chunk(void* ctx, const char* cid, CodexCallback callback, void* userData);
int codex_download_stream(void* ctx, const char* cid, size_t chunkSize, bool local,
                          const char* filepath, CodexCallback callback, void* userData);
int codex_download_cancel(void* ctx, const char* cid, CodexCallback callback, void* userData);
int codex_download_manifest(void* ctx, const char* cid, CodexCallback callback,
                            void* userData);

/* Storage */
int codex_storage_list(void* ctx, CodexCallback callback, void* userData);
int codex_storage_space(void* ctx, CodexCallback callback, void* userData);
int codex_storage_delete(void* ctx, const char* cid, CodexCallback callback, void* userData);
int codex_storage_fetch(void* ctx, const char* cid, CodexCallback callback, void* userData);
int codex_storage_exists(void* ctx, const char* cid, CodexCallback callback, void* userData);

/* Events: the callback receives RET_OK with a JSON event object for each event. */
void codex_set_event_callback(void* ctx, CodexCallback callback, void* userData);

#ifdef __cplusplus
}
#endif

#endif /* __libcodex__ */
