/* A TCP connection streaming both ways, for dumps of either end.
 *
 *   tcp_stream server ADDR PORTFILE PROGRESS [mptcp]
 *   tcp_stream client ADDR PORTFILE PROGRESS
 *
 * The server listens on ADDR (an ephemeral port, written to PORTFILE) and
 * accepts one client; the client connects to ADDR and the port it reads
 * there. Each end then writes a stream whose byte at offset i is a
 * function of i (and of the end), as fast as the connection takes it, and
 * reads the other's, checking every byte at its offset: a byte lost,
 * repeated or changed shows at once. PROGRESS gets the number of bytes
 * received so far, now and then. The server is ready once both ways
 * carried a megabyte; the client at once (it is started first).
 *
 * SIGTERM (or the peer's end of stream) ends it: it stops writing
 * (shutdown), reads the rest until the peer's end of stream, and prints
 * "sent=N received=M" and PASS. `mptcp`: the server also holds an MPTCP
 * socket, which crust refuses, to show a refused dump leaving the
 * connection working. */
#include "zdtmlib.h"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <sys/socket.h>

static unsigned char gen(uint64_t i, int salt)
{
	uint64_t x = (i + (uint64_t)salt * 0x100000001ULL) * 0x9E3779B97F4A7C15ULL;
	x ^= x >> 29;
	return (unsigned char)(x ^ (x >> 41) ^ (i >> 8));
}

static void write_file(const char *path, const char *text)
{
	char tmp[4096];
	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	FILE *f = fopen(tmp, "w");
	if (!f)
		fail("creating %s", tmp);
	fputs(text, f);
	fclose(f);
	rename(tmp, path);
}

static int parse_addr(const char *addr, int port, struct sockaddr_storage *ss)
{
	struct sockaddr_in *a4 = (struct sockaddr_in *)ss;
	struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)ss;
	memset(ss, 0, sizeof(*ss));
	if (inet_pton(AF_INET, addr, &a4->sin_addr) == 1) {
		a4->sin_family = AF_INET;
		a4->sin_port = htons(port);
		return sizeof(*a4);
	}
	if (inet_pton(AF_INET6, addr, &a6->sin6_addr) == 1) {
		a6->sin6_family = AF_INET6;
		a6->sin6_port = htons(port);
		return sizeof(*a6);
	}
	fail("not an address: %s", addr);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc < 5)
		fail("usage: tcp_stream server|client ADDR PORTFILE PROGRESS [mptcp]");
	int server = !strcmp(argv[1], "server");
	const char *portfile = argv[3], *progress = argv[4];
	test_init();
	signal(SIGPIPE, SIG_IGN);
	struct sockaddr_storage ss;
	int fd;
	if (server) {
		socklen_t len = parse_addr(argv[2], 0, &ss);
		int l = socket(ss.ss_family, SOCK_STREAM, 0);
		int one = 1;
		setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (l < 0 || bind(l, (struct sockaddr *)&ss, len) < 0 || listen(l, 1) < 0)
			fail("listening on %s", argv[2]);
		getsockname(l, (struct sockaddr *)&ss, &len);
		char port[16];
		snprintf(port, sizeof(port), "%d", ntohs(((struct sockaddr_in *)&ss)->sin_port));
		write_file(portfile, port);
		fd = accept(l, NULL, NULL);
		if (fd < 0)
			fail("accept");
		/* The listener stays open beside its connection. */
		if (argc > 5 && !strcmp(argv[5], "mptcp")) {
			int m = socket(AF_INET, SOCK_STREAM, 262 /* IPPROTO_MPTCP */);
			if (m < 0 || dup2(m, 100) < 0)
				fail("an MPTCP socket");
			close(m);
		}
	} else {
		/* Ready at once: the server is started after it, and is ready
		 * once the stream flows. */
		test_ready();
		char port[16] = "";
		for (int i = 0; i < 3000 && !port[0]; i++) {
			FILE *f = fopen(portfile, "r");
			if (f) {
				if (!fgets(port, sizeof(port), f))
					port[0] = 0;
				fclose(f);
			} else
				usleep(10000);
		}
		socklen_t len = parse_addr(argv[2], atoi(port), &ss);
		fd = socket(ss.ss_family, SOCK_STREAM, 0);
		if (fd < 0 || connect(fd, (struct sockaddr *)&ss, len) < 0)
			fail("connecting to %s port %s", argv[2], port);
	}
	fcntl(fd, F_SETFL, O_NONBLOCK);
	int my_salt = server ? 1 : 2, peer_salt = server ? 2 : 1;
	uint64_t sent = 0, received = 0, reported = 0;
	int writing = 1, ready = !server;
	unsigned char buf[65536];
	while (1) {
		if (writing && test_done()) {
			shutdown(fd, SHUT_WR);
			writing = 0;
		}
		struct pollfd p = { .fd = fd, .events = POLLIN | (writing ? POLLOUT : 0) };
		if (poll(&p, 1, 100) < 0 && errno != EINTR)
			fail("poll");
		if (writing && (p.revents & POLLOUT)) {
			for (size_t i = 0; i < sizeof(buf); i++)
				buf[i] = gen(sent + i, my_salt);
			ssize_t n = write(fd, buf, sizeof(buf));
			if (n < 0 && errno != EAGAIN && errno != EINTR)
				fail("write after %llu bytes", (unsigned long long)sent);
			if (n > 0)
				sent += n;
		}
		if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
			/* Less than is written each round: the queues fill up. */
			ssize_t n = read(fd, buf, sizeof(buf) / 4);
			if (n < 0 && errno != EAGAIN && errno != EINTR)
				fail("read after %llu bytes", (unsigned long long)received);
			if (n == 0) {
				if (writing) {
					shutdown(fd, SHUT_WR);
					writing = 0;
				}
				break;
			}
			for (ssize_t i = 0; i < n; i++)
				if (buf[i] != gen(received + i, peer_salt))
					fail("byte %llu of the stream is wrong: lost, repeated or changed",
					     (unsigned long long)(received + i));
			if (n > 0)
				received += n;
		}
		if (received - reported >= (1 << 20)) {
			char text[64];
			snprintf(text, sizeof(text), "%llu", (unsigned long long)received);
			write_file(progress, text);
			reported = received;
		}
		if (!ready && sent >= (1 << 20) && received >= (1 << 20)) {
			ready = 1;
			test_ready();
		}
	}
	printf("sent=%llu received=%llu\n", (unsigned long long)sent, (unsigned long long)received);
	pass();
}
