/*
 * nebd_verify: a C consumer of libnebd. Writes a pattern block, reads it back and verifies it,
 * in a loop for SECONDS, with a batch of asynchronous writes every 64 iterations. Prints the
 * I/O count, errors and the longest single I/O (the pause a part2 restart causes).
 *
 *   cc -o nebd_verify nebd_verify.c -I../include -L<target dir> -lnebd -lpthread
 *   ./nebd_verify <run-dir>/nebd.sock file:/path/vol.img 5
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "libnebd.h"

#define BLOCK 4096
#define BLOCKS 256
#define AIO_DEPTH 8

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static void fill(unsigned char *buf, uint64_t seed) {
    for (int i = 0; i < BLOCK; i++) buf[i] = (unsigned char)((i * 31) ^ seed);
}

struct batch {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int remaining;
    int errors;
};

struct aio {
    struct NebdClientAioContext ctx; /* first: the callback gets this pointer */
    struct batch *batch;
    unsigned char buf[BLOCK];
};

static void on_done(struct NebdClientAioContext *ctx) {
    struct aio *a = (struct aio *)ctx;
    pthread_mutex_lock(&a->batch->lock);
    if (ctx->ret != 0) a->batch->errors++;
    if (--a->batch->remaining == 0) pthread_cond_signal(&a->batch->cond);
    pthread_mutex_unlock(&a->batch->lock);
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s SOCKET VOLUME SECONDS\n", argv[0]);
        return 2;
    }
    if (nebd_lib_init(argv[1]) != 0) return 2;
    int fd = nebd_lib_open(argv[2]);
    if (fd < 0) {
        fprintf(stderr, "open %s: %s\n", argv[2], strerror(-fd));
        return 2;
    }
    int64_t size = nebd_lib_filesize(fd);
    if (size < (int64_t)BLOCK * BLOCKS) {
        fprintf(stderr, "volume too small: %lld\n", (long long)size);
        return 2;
    }
    double end = now_us() + atof(argv[3]) * 1e6, longest = 0;
    uint64_t ios = 0, errors = 0;
    unsigned char want[BLOCK], got[BLOCK];
    static struct aio aios[AIO_DEPTH];
    for (uint64_t i = 0; now_us() < end; i++) {
        off_t off = (off_t)(i % BLOCKS) * BLOCK;
        fill(want, i);
        double t = now_us();
        if (nebd_lib_pwrite(fd, want, off, BLOCK) != BLOCK) errors++;
        double t2 = now_us();
        if (nebd_lib_pread(fd, got, off, BLOCK) != BLOCK || memcmp(want, got, BLOCK) != 0) errors++;
        double t3 = now_us();
        if (t2 - t > longest) longest = t2 - t;
        if (t3 - t2 > longest) longest = t3 - t2;
        ios += 2;
        if (i % 64 == 63) {
            struct batch b = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, AIO_DEPTH, 0};
            for (int k = 0; k < AIO_DEPTH; k++) {
                struct aio *a = &aios[k];
                memset(&a->ctx, 0, sizeof a->ctx);
                fill(a->buf, i * 100 + k);
                a->batch = &b;
                a->ctx.offset = (off_t)k * BLOCK;
                a->ctx.length = BLOCK;
                a->ctx.buf = a->buf;
                a->ctx.cb = on_done;
                if (nebd_lib_aio_pwrite(fd, &a->ctx) != 0) {
                    pthread_mutex_lock(&b.lock);
                    b.errors++;
                    b.remaining--;
                    pthread_mutex_unlock(&b.lock);
                }
            }
            pthread_mutex_lock(&b.lock);
            while (b.remaining > 0) pthread_cond_wait(&b.cond, &b.lock);
            pthread_mutex_unlock(&b.lock);
            errors += b.errors;
            for (int k = 0; k < AIO_DEPTH; k++) {
                fill(want, i * 100 + k);
                if (nebd_lib_pread(fd, got, (off_t)k * BLOCK, BLOCK) != BLOCK ||
                    memcmp(want, got, BLOCK) != 0)
                    errors++;
            }
            ios += 2 * AIO_DEPTH;
        }
    }
    printf("ios=%llu errors=%llu longest_us=%.0f\n", (unsigned long long)ios,
           (unsigned long long)errors, longest);
    nebd_lib_close(fd);
    nebd_lib_uninit();
    return errors == 0 ? 0 : 1;
}
