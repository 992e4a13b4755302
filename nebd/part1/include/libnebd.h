/*
 * libnebd: NEBD part1, the thin client of nebd-server (part2) of Curve-rs.
 *
 * Link with -lnebd (target/<profile>/libnebd.so). Every call returns 0 (or a byte count, an fd,
 * a size) on success and -errno on failure. Requests have no timeout: while part2 restarts they
 * wait, and they are resent when it is back; errors that part2 answers are returned at once.
 */
#ifndef LIBNEBD_H
#define LIBNEBD_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum LIBAIO_OP {
    LIBAIO_OP_READ = 0,
    LIBAIO_OP_WRITE = 1,
    LIBAIO_OP_DISCARD = 2,
    LIBAIO_OP_FLUSH = 3,
} LIBAIO_OP;

struct NebdClientAioContext;
typedef void (*LibAioCallBack)(struct NebdClientAioContext *context);

/* Owned by the caller until cb runs (once, on a library thread). The callback must not wait
 * for another libnebd call to complete: that answer would be delivered by the thread it blocks. */
struct NebdClientAioContext {
    off_t offset;
    size_t length;
    int ret;               /* set before cb: 0 or -errno */
    LIBAIO_OP op;          /* set by the call that submits it */
    LibAioCallBack cb;
    void *buf;
    unsigned int retryCount;
};

/* socket_path: part2's part1 socket, <run-dir>/nebd.sock. */
int nebd_lib_init(const char *socket_path);
void nebd_lib_uninit(void);

int nebd_lib_open(const char *filename); /* e.g. "file:/var/lib/vol.img"; returns an fd */
int nebd_lib_close(int fd);

ssize_t nebd_lib_pread(int fd, void *buf, off_t offset, size_t length);
ssize_t nebd_lib_pwrite(int fd, const void *buf, off_t offset, size_t length);

int nebd_lib_aio_pread(int fd, struct NebdClientAioContext *context);
int nebd_lib_aio_pwrite(int fd, struct NebdClientAioContext *context);
int nebd_lib_discard(int fd, struct NebdClientAioContext *context);
int nebd_lib_flush(int fd, struct NebdClientAioContext *context);

int64_t nebd_lib_filesize(int fd);
int64_t nebd_lib_blocksize(int fd);
int nebd_lib_resize(int fd, int64_t size);

#ifdef __cplusplus
}
#endif

#endif /* LIBNEBD_H */
