/* The subscribers of bench/latency.py: N sockets read by one epoll loop, in C, so that
 * the reader is not what sets the latency.
 *
 *   latency_reader PROTO PORT N SECONDS SKIP
 *
 * PROTO is "statecast" (sends {"op":"subscribe"}, reads change lines) or "redis"
 * (SUBSCRIBE quotes, reads RESP messages). Once every socket is subscribed it prints
 * "ready" and reads for SECONDS. Each delivered value carries its send time as
 * "t":<CLOCK_MONOTONIC ns> (Python's time.monotonic_ns() is the same clock); every
 * delivery whose send time is at least SKIP seconds after "ready" counts, as receipt
 * (taken once per recv()) minus send, in a histogram of 1 us buckets. At the end it
 * prints one line of key=value pairs: the percentiles and its own CPU time.
 *
 * Built by bench/latency.py with `cc -O2` into a temporary directory.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BUCKETS (1 << 22)  /* 1 us each: up to 4.2 s, beyond lands in the last */
#define CARRY 4096         /* a partial frame kept between two recv()s */
#define RBUF (1 << 20)

static uint32_t hist[BUCKETS];

typedef struct {
    char buf[CARRY];
    int len;
} carry_t;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static double cpu_s(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec +
           (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static int connect_to(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) die("socket");
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) die("connect");
    return fd;
}

/* Blocking read until `marker` has been seen: the subscription is confirmed. */
static void await_marker(int fd, const char *marker) {
    char b[4096];
    int len = 0;
    while (!memmem(b, len, marker, strlen(marker))) {
        if (len == sizeof b) len = 0;
        ssize_t r = read(fd, b + len, sizeof b - len);
        if (r <= 0) die("subscribe");
        len += r;
    }
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s statecast|redis PORT N SECONDS SKIP\n", argv[0]);
        return 2;
    }
    int redis = strcmp(argv[1], "redis") == 0;
    int port = atoi(argv[2]), n = atoi(argv[3]);
    double seconds = atof(argv[4]), skip = atof(argv[5]);

    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);

    const char *sub = redis ? "*2\r\n$9\r\nSUBSCRIBE\r\n$6\r\nquotes\r\n" : "{\"op\":\"subscribe\"}\n";
    const char *confirmed = redis ? ":1\r\n" : "\"subscribed\"";
    int ep = epoll_create1(0);
    carry_t *carry = calloc(n, sizeof *carry);
    int *fds = malloc(n * sizeof *fds);
    for (int i = 0; i < n; i++) {
        fds[i] = connect_to(port);
        if (write(fds[i], sub, strlen(sub)) < 0) die("write");
    }
    for (int i = 0; i < n; i++) {
        await_marker(fds[i], confirmed);
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = i};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev) < 0) die("epoll_ctl");
    }
    int64_t ready = now_ns();
    printf("ready\n");
    fflush(stdout);

    int64_t from = ready + (int64_t)(skip * 1e9), until = ready + (int64_t)(seconds * 1e9);
    uint64_t samples = 0, early = 0, recvs = 0, waits = 0, bytes = 0;
    int64_t max = 0, min = INT64_MAX;
    int closed = 0;
    char *rbuf = malloc(CARRY + RBUF);
    struct epoll_event evs[1024];
    double cpu0 = cpu_s();
    int64_t t = ready;
    while (t < until && closed < n) {
        int k = epoll_wait(ep, evs, 1024, 10);
        waits++;
        if (k < 0 && errno != EINTR) die("epoll_wait");
        for (int e = 0; e < k; e++) {
            int i = evs[e].data.u32;
            carry_t *c = &carry[i];
            memcpy(rbuf, c->buf, c->len);
            ssize_t r = recv(fds[i], rbuf + c->len, RBUF, 0);
            recvs++;
            if (r <= 0) {
                if (r < 0 && errno == EAGAIN) continue;
                epoll_ctl(ep, EPOLL_CTL_DEL, fds[i], NULL);
                closed++;
                continue;
            }
            int64_t received = now_ns();
            bytes += r;
            char *p = rbuf, *end = rbuf + c->len + r;
            char *last = memrchr(p, '\n', end - p); /* frames up to here are whole */
            char *stop = last ? last + 1 : p;
            while ((p = memmem(p, stop - p, "\"t\":", 4)) != NULL) {
                p += 4;
                int64_t sent = 0;
                while (*p >= '0' && *p <= '9') sent = sent * 10 + (*p++ - '0');
                if (sent < from) {
                    early++;
                    continue;
                }
                int64_t lat = received - sent;
                if (lat > max) max = lat;
                if (lat < min) min = lat;
                int64_t us = lat / 1000;
                hist[us < 0 ? 0 : us >= BUCKETS ? BUCKETS - 1 : us]++;
                samples++;
            }
            c->len = end - stop <= CARRY ? (int)(end - stop) : 0;
            memcpy(c->buf, stop, c->len);
        }
        t = now_ns();
    }
    double cpu = cpu_s() - cpu0, wall = (t - ready) / 1e9;

    static const double ps[] = {0.50, 0.90, 0.99, 0.999};
    static const char *names[] = {"p50", "p90", "p99", "p99.9"};
    printf("samples=%llu early=%llu closed=%d recvs=%llu epoll_waits=%llu bytes=%llu "
           "cpu_cores=%.3f",
           (unsigned long long)samples, (unsigned long long)early, closed,
           (unsigned long long)recvs, (unsigned long long)waits, (unsigned long long)bytes,
           cpu / wall);
    for (int j = 0; j < 4; j++) {
        uint64_t want = (uint64_t)(ps[j] * samples), seen = 0;
        int b = 0;
        while (b < BUCKETS - 1 && seen + hist[b] <= want) seen += hist[b++];
        printf(" %s_ms=%.3f", names[j], samples ? (b + 0.5) / 1000.0 : -1.0);
    }
    printf(" min_ms=%.3f max_ms=%.3f\n", samples ? min / 1e6 : -1.0, samples ? max / 1e6 : -1.0);
    return 0;
}
