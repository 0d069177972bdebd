/* udpseq: numbered UDP datagrams for the vDPA test guest (built static into the initramfs).
 *
 *   udpseq send HOST PORT COUNT SIZE [RATE [CPU]]
 *       COUNT datagrams of SIZE bytes to HOST:PORT (IPv4). RATE packets/s (0 = as fast as
 *       possible), CPU pins the sender (-1 = no pinning; pinning picks the virtio-net TX
 *       queue through XPS). Transmit-queue drops come back as ENOBUFS (IP_RECVERR) and are
 *       retried, so what leaves the guest is exactly COUNT datagrams, then the end-of-stream
 *       sentinel (not counted in sent=).
 *       Prints: udpseq send: sent=N bytes=B retries=R errors=E elapsed_us=T
 *   udpseq recv PORT COUNT TIMEOUT
 *       Receives until the end-of-stream sentinel arrived (or TIMEOUT seconds passed): every
 *       datagram before it is counted, duplicates included, so "no duplicate" rests on the
 *       sentinel, not on a quiet spell after the last datagram.
 *       Prints "udpseq recv: listening port=P count=N" once bound, then
 *       udpseq recv: received=N unique=U dups=D ooo=O corrupt=C lost=L bytes=B elapsed_us=T end=E
 *       (end=1: the sentinel arrived). Exit status 0 only if the sentinel arrived and nothing
 *       was lost, duplicated or corrupted.
 *
 * Payload (SIZE >= 8): u64 sequence number, big-endian, then p[i] = (uint8_t)(seq * 31 + i)
 * for 8 <= i < SIZE. The sentinel is exactly 8 bytes, the sequence number 2^64 - 1 (no stream
 * datagram has it: COUNT < 2^32). guest_images/udpseq.py is the Python side of this layout.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define HDR 8
#define END_SEQ UINT64_MAX /* the end-of-stream sentinel's sequence number (HDR bytes long) */
#define MAX_PAYLOAD 65507
#define STUCK_NS (10ULL * 1000000000ULL) /* give up when ENOBUFS persists this long */

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void sleep_until(uint64_t t)
{
	struct timespec ts = { .tv_sec = (time_t)(t / 1000000000ULL),
			       .tv_nsec = (long)(t % 1000000000ULL) };
	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
		;
}

static int parse_u64(const char *s, uint64_t max, uint64_t *out)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno || end == s || *end || v > max)
		return -1;
	*out = v;
	return 0;
}

static void fill(uint8_t *buf, uint64_t seq, size_t size)
{
	for (int i = 0; i < HDR; i++)
		buf[i] = (uint8_t)(seq >> (8 * (HDR - 1 - i)));
	uint8_t b = (uint8_t)(seq * 31 + HDR);
	for (size_t i = HDR; i < size; i++)
		buf[i] = b++;
}

static int usage(void)
{
	fprintf(stderr, "usage: udpseq send HOST PORT COUNT SIZE [RATE [CPU]]\n"
			"       udpseq recv PORT COUNT TIMEOUT\n");
	return 2;
}

/* Send one datagram, retrying transmit-queue drops (ENOBUFS); 0 when sent, -1 on error. */
static int send_one(int fd, const uint8_t *buf, size_t size, uint64_t *retries)
{
	uint64_t stuck_since = 0;
	for (;;) {
		ssize_t n = send(fd, buf, size, 0);
		if (n == (ssize_t)size)
			return 0;
		if (n < 0 && (errno == ENOBUFS || errno == EAGAIN || errno == EINTR ||
			      errno == ECONNREFUSED)) {
			/* ECONNREFUSED reports an earlier ICMP error; the datagram was not sent */
			uint64_t t = now_ns();
			if (!stuck_since)
				stuck_since = t;
			if (t - stuck_since > STUCK_NS) {
				fprintf(stderr, "udpseq: send stuck: %s\n", strerror(errno));
				return -1;
			}
			(*retries)++;
			sleep_until(t + 200000);
			continue;
		}
		perror("udpseq: send");
		return -1;
	}
}

static int do_send(int argc, char **argv)
{
	uint64_t port, count, size, rate = 0;
	struct sockaddr_in dst = { .sin_family = AF_INET };

	if (argc < 4 || argc > 6 || inet_pton(AF_INET, argv[0], &dst.sin_addr) != 1 ||
	    parse_u64(argv[1], 65535, &port) || parse_u64(argv[2], UINT32_MAX, &count) ||
	    parse_u64(argv[3], MAX_PAYLOAD, &size) || size < HDR ||
	    (argc > 4 && parse_u64(argv[4], 10000000, &rate)))
		return usage();
	if (argc > 5 && strcmp(argv[5], "-1") != 0) {
		uint64_t cpu;
		if (parse_u64(argv[5], CPU_SETSIZE - 1, &cpu))
			return usage();
		cpu_set_t set;
		CPU_ZERO(&set);
		CPU_SET((int)cpu, &set);
		if (sched_setaffinity(0, sizeof(set), &set) != 0) {
			perror("udpseq: sched_setaffinity");
			return 1;
		}
	}
	dst.sin_port = htons((uint16_t)port);

	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	int one = 1, sndbuf = 1 << 20;
	if (fd < 0 || setsockopt(fd, SOL_IP, IP_RECVERR, &one, sizeof(one)) ||
	    connect(fd, (struct sockaddr *)&dst, sizeof(dst))) {
		perror("udpseq: socket");
		return 1;
	}
	setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));

	static uint8_t buf[MAX_PAYLOAD];
	uint64_t sent = 0, bytes = 0, retries = 0, errors = 0;
	uint64_t interval = rate ? 1000000000ULL / rate : 0;
	uint64_t start = now_ns(), next = start;

	while (sent < count) {
		if (interval) {
			sleep_until(next);
			next += interval;
		}
		fill(buf, sent, size);
		if (send_one(fd, buf, size, &retries)) {
			errors++;
			break;
		}
		sent++;
		bytes += size;
	}
	if (sent == count) { /* the end of the stream: the receiver counts up to here */
		fill(buf, END_SEQ, HDR);
		if (send_one(fd, buf, HDR, &retries))
			errors++;
	}
	printf("udpseq send: sent=%llu bytes=%llu retries=%llu errors=%llu elapsed_us=%llu\n",
	       (unsigned long long)sent, (unsigned long long)bytes, (unsigned long long)retries,
	       (unsigned long long)errors, (unsigned long long)((now_ns() - start) / 1000));
	close(fd);
	return sent == count && !errors ? 0 : 1;
}

static int do_recv(int argc, char **argv)
{
	uint64_t port, count, timeout;

	if (argc != 3 || parse_u64(argv[0], 65535, &port) ||
	    parse_u64(argv[1], UINT32_MAX, &count) || parse_u64(argv[2], 86400, &timeout))
		return usage();

	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	int rcvbuf = 4 << 20;
	struct sockaddr_in me = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port),
				  .sin_addr.s_addr = htonl(INADDR_ANY) };
	if (fd < 0) {
		perror("udpseq: socket");
		return 1;
	}
	if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof(rcvbuf)))
		setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf));
	if (bind(fd, (struct sockaddr *)&me, sizeof(me))) {
		perror("udpseq: bind");
		return 1;
	}
	uint8_t *seen = calloc(count / 8 + 1, 1);
	static uint8_t buf[65536];
	if (!seen) {
		perror("udpseq: calloc");
		return 1;
	}
	printf("udpseq recv: listening port=%llu count=%llu\n", (unsigned long long)port,
	       (unsigned long long)count);
	fflush(stdout);

	uint64_t received = 0, unique = 0, dups = 0, ooo = 0, corrupt = 0, bytes = 0;
	uint64_t max_seq = 0, first = 0, last = 0;
	int have_max = 0, ended = 0;
	uint64_t deadline = now_ns() + timeout * 1000000000ULL;

	while (!ended) {
		uint64_t t = now_ns(), end = deadline;
		if (t >= end)
			break;
		struct pollfd pfd = { .fd = fd, .events = POLLIN };
		int ms = (int)((end - t) / 1000000ULL) + 1;
		int r = poll(&pfd, 1, ms);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			continue;
		ssize_t n = recv(fd, buf, sizeof(buf), 0);
		if (n < 0)
			continue;
		if (n == HDR) {
			uint64_t seq = 0;
			for (int i = 0; i < HDR; i++)
				seq = (seq << 8) | buf[i];
			if (seq == END_SEQ) {
				ended = 1;
				continue;
			}
		}
		last = now_ns();
		if (!received)
			first = last;
		received++;
		bytes += (uint64_t)n;
		if (n < HDR) {
			corrupt++;
			continue;
		}
		uint64_t seq = 0;
		for (int i = 0; i < HDR; i++)
			seq = (seq << 8) | buf[i];
		int ok = seq < count;
		uint8_t b = (uint8_t)(seq * 31 + HDR);
		for (ssize_t i = HDR; ok && i < n; i++, b++)
			ok = buf[i] == b;
		if (!ok) {
			corrupt++;
			continue;
		}
		if (seen[seq / 8] & (1u << (seq % 8))) {
			dups++;
			continue;
		}
		seen[seq / 8] |= (uint8_t)(1u << (seq % 8));
		unique++;
		if (have_max && seq < max_seq)
			ooo++;
		if (!have_max || seq > max_seq)
			max_seq = seq;
		have_max = 1;
	}
	printf("udpseq recv: received=%llu unique=%llu dups=%llu ooo=%llu corrupt=%llu lost=%llu "
	       "bytes=%llu elapsed_us=%llu end=%d\n",
	       (unsigned long long)received, (unsigned long long)unique, (unsigned long long)dups,
	       (unsigned long long)ooo, (unsigned long long)corrupt,
	       (unsigned long long)(count - unique), (unsigned long long)bytes,
	       (unsigned long long)((last - first) / 1000), ended);
	free(seen);
	close(fd);
	return ended && unique == count && !dups && !corrupt ? 0 : 1;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc >= 2 && !strcmp(argv[1], "send"))
		return do_send(argc - 2, argv + 2);
	if (argc >= 2 && !strcmp(argv[1], "recv"))
		return do_recv(argc - 2, argv + 2);
	return usage();
}
