/* Benchmark target: N established TCP connections over loopback, both ends
 * in this process (2N sockets and their listener), and U unix socketpairs
 * (2U sockets), each connection and pair with a few bytes queued unread
 * both ways. After the restore every one delivers what was queued, and
 * carries one more message each way. Usage: manysockets N [U] (U: N). */
#include "../zdtm/zdtmlib.h"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>

int main(int argc, char **argv)
{
	syscall(436 /* close_range */, 3, ~0U, 0);
	test_init();
	int n = atoi(argv[1]);
	int u = argc > 2 ? atoi(argv[2]) : n;
	struct rlimit r;
	getrlimit(RLIMIT_NOFILE, &r);
	r.rlim_cur = r.rlim_max;
	setrlimit(RLIMIT_NOFILE, &r);
	int l = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in a = { .sin_family = AF_INET };
	inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
	socklen_t len = sizeof(a);
	if (bind(l, (struct sockaddr *)&a, len) < 0 || listen(l, 4096) < 0)
		fail("listen");
	getsockname(l, (struct sockaddr *)&a, &len);
	int *c = calloc(n + u, sizeof(int)), *s = calloc(n + u, sizeof(int));
	for (int i = n; i < n + u; i++) {
		int sv[2];
		if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0)
			fail("socketpair %d", i);
		c[i] = sv[0];
		s[i] = sv[1];
		char msg[32];
		int m = snprintf(msg, sizeof(msg), "to-server-%d", i);
		if (write(c[i], msg, m) != m)
			fail("write");
		m = snprintf(msg, sizeof(msg), "to-client-%d", i);
		if (write(s[i], msg, m) != m)
			fail("write");
	}
	for (int i = 0; i < n; i++) {
		c[i] = socket(AF_INET, SOCK_STREAM, 0);
		if (c[i] < 0 || connect(c[i], (struct sockaddr *)&a, len) < 0)
			fail("connect %d", i);
		s[i] = accept(l, NULL, NULL);
		if (s[i] < 0)
			fail("accept %d", i);
		char msg[32];
		int m = snprintf(msg, sizeof(msg), "to-server-%d", i);
		if (write(c[i], msg, m) != m)
			fail("write");
		m = snprintf(msg, sizeof(msg), "to-client-%d", i);
		if (write(s[i], msg, m) != m)
			fail("write");
	}
	test_ready();
	test_waitsig();
	for (int i = 0; i < n + u; i++) {
		char want[32], got[32];
		for (int side = 0; side < 2; side++) {
			int fd = side ? c[i] : s[i];
			int m = snprintf(want, sizeof(want), side ? "to-client-%d" : "to-server-%d", i);
			if (read(fd, got, m) != m || memcmp(got, want, m))
				fail("connection %d lost its queued bytes", i);
			if (write(side ? s[i] : c[i], "x", 1) != 1 || read(fd, got, 1) != 1 || got[0] != 'x')
				fail("connection %d carries nothing after the restore", i);
		}
	}
	pass();
}
