/* Inet sockets without connections: TCP listeners (IPv4 with the options
 * servers set, IPv6-only, one bound to an address that is not local with
 * IP_FREEBIND, one bound but not listening), UDP sockets bound and
 * connected (IPv4 and IPv6, one shut down for writing), an ICMP ping
 * socket, a raw ICMP socket with a type filter, and SO_BINDTODEVICE,
 * timeouts, O_NONBLOCK and an O_ASYNC owner. After the restore each socket
 * is checked with its options and used: the listeners accept new clients,
 * the UDP sockets exchange datagrams, the ping socket gets its echo reply. */
#include "zdtmlib.h"
#include <arpa/inet.h>
#include <net/if.h>
#include <netinet/icmp6.h>
#include <netinet/in.h>
#include <netinet/ip_icmp.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <sys/socket.h>

/* linux/icmp.h, which clashes with netinet/ip_icmp.h: a raw ICMP socket's
 * filter is a mask of the ICMP types it drops. */
#define ICMP_FILTER 1

static int sockopt(int fd, int level, int opt)
{
	int v = -1;
	socklen_t l = sizeof(v);
	if (getsockopt(fd, level, opt, &v, &l) < 0)
		fail("getsockopt(%d, %d, %d)", fd, level, opt);
	return v;
}

static void set(int fd, int level, int opt, int v)
{
	if (setsockopt(fd, level, opt, &v, sizeof(v)) < 0)
		fail("setsockopt(%d, %d, %d)", fd, level, opt);
}

static void expect(int fd, int level, int opt, int want, const char *name)
{
	int v = sockopt(fd, level, opt);
	if (v != want)
		fail("%s of fd %d is %d, not %d", name, fd, v, want);
}

static int port_of(int fd)
{
	struct sockaddr_in6 a;
	socklen_t l = sizeof(a);
	if (getsockname(fd, (struct sockaddr *)&a, &l) < 0)
		fail("getsockname");
	return ntohs(a.sin6_port); /* same offset in sockaddr_in */
}

static int connect_to(int family, const char *addr, int port)
{
	int c = socket(family, SOCK_STREAM, 0);
	struct sockaddr_in6 a6 = { .sin6_family = AF_INET6, .sin6_port = htons(port) };
	struct sockaddr_in a4 = { .sin_family = AF_INET, .sin_port = htons(port) };
	int r;
	if (family == AF_INET6) {
		inet_pton(AF_INET6, addr, &a6.sin6_addr);
		r = connect(c, (struct sockaddr *)&a6, sizeof(a6));
	} else {
		inet_pton(AF_INET, addr, &a4.sin_addr);
		r = connect(c, (struct sockaddr *)&a4, sizeof(a4));
	}
	if (r < 0)
		fail("connecting to %s port %d", addr, port);
	return c;
}

static void accept_one(int l, const char *what)
{
	struct pollfd p = { .fd = l, .events = POLLIN };
	if (poll(&p, 1, 5000) != 1)
		fail("%s: no client to accept", what);
	int a = accept(l, NULL, NULL);
	if (a < 0)
		fail("%s: accept", what);
	close(a);
}

static volatile int sigio;
static void on_sigio(int s)
{
	(void)s;
	sigio = 1;
}

int main(void)
{
	test_init();
	/* An IPv4 listener with what servers set. */
	int l4 = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
	set(l4, SOL_SOCKET, SO_REUSEADDR, 1);
	set(l4, SOL_SOCKET, SO_KEEPALIVE, 1);
	set(l4, IPPROTO_TCP, TCP_KEEPIDLE, 33);
	set(l4, IPPROTO_TCP, TCP_KEEPINTVL, 7);
	set(l4, IPPROTO_TCP, TCP_KEEPCNT, 4);
	set(l4, IPPROTO_TCP, TCP_NODELAY, 1);
	set(l4, IPPROTO_TCP, TCP_DEFER_ACCEPT, 2);
	set(l4, SOL_SOCKET, SO_RCVBUF, 40000);
	set(l4, IPPROTO_IP, IP_TOS, IPTOS_LOWDELAY);
	struct linger lg = { 1, 9 };
	setsockopt(l4, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
	struct timeval tv = { 3, 250000 };
	setsockopt(l4, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	/* The kernel keeps it in jiffies: what it reads back is the value. */
	socklen_t tl = sizeof(tv);
	getsockopt(l4, SOL_SOCKET, SO_RCVTIMEO, &tv, &tl);
	struct sockaddr_in a4 = { .sin_family = AF_INET };
	inet_pton(AF_INET, "127.0.0.1", &a4.sin_addr);
	if (bind(l4, (struct sockaddr *)&a4, sizeof(a4)) < 0 || listen(l4, 17) < 0)
		fail("IPv4 listener");
	int rcvbuf = sockopt(l4, SOL_SOCKET, SO_RCVBUF);
	/* Its O_ASYNC owner: us, with SIGIO on a new client. */
	signal(SIGIO, on_sigio);
	fcntl(l4, F_SETOWN, getpid());
	fcntl(l4, F_SETFL, fcntl(l4, F_GETFL) | O_ASYNC);

	/* An IPv6-only listener on the wildcard, with SO_REUSEPORT and cork. */
	int l6 = socket(AF_INET6, SOCK_STREAM, 0);
	set(l6, IPPROTO_IPV6, IPV6_V6ONLY, 1);
	set(l6, SOL_SOCKET, SO_REUSEPORT, 1);
	set(l6, IPPROTO_TCP, TCP_CORK, 1);
	struct sockaddr_in6 a6 = { .sin6_family = AF_INET6, .sin6_addr = in6addr_any };
	if (bind(l6, (struct sockaddr *)&a6, sizeof(a6)) < 0 || listen(l6, 5) < 0)
		fail("IPv6 listener");

	/* A listener on an address that is not local (IP_FREEBIND), on lo. */
	int fb = socket(AF_INET, SOCK_STREAM, 0);
	set(fb, IPPROTO_IP, IP_FREEBIND, 1);
	if (setsockopt(fb, SOL_SOCKET, SO_BINDTODEVICE, "lo", 3) < 0)
		fail("SO_BINDTODEVICE");
	struct sockaddr_in fa = { .sin_family = AF_INET };
	inet_pton(AF_INET, "192.0.2.77", &fa.sin_addr);
	if (bind(fb, (struct sockaddr *)&fa, sizeof(fa)) < 0 || listen(fb, 3) < 0)
		fail("free-bound listener");

	/* Bound, never listening nor connected. */
	int bound = socket(AF_INET, SOCK_STREAM, 0);
	a4.sin_port = 0;
	if (bind(bound, (struct sockaddr *)&a4, sizeof(a4)) < 0)
		fail("bind");
	int bound_port = port_of(bound);

	/* UDP: bound, and connected to it; IPv6 likewise, shut down for writing. */
	int u1 = socket(AF_INET, SOCK_DGRAM, 0), u2 = socket(AF_INET, SOCK_DGRAM, 0);
	struct sockaddr_in ua = { .sin_family = AF_INET };
	inet_pton(AF_INET, "127.0.0.1", &ua.sin_addr);
	if (bind(u1, (struct sockaddr *)&ua, sizeof(ua)) < 0)
		fail("bind udp");
	ua.sin_port = htons(port_of(u1));
	if (connect(u2, (struct sockaddr *)&ua, sizeof(ua)) < 0)
		fail("connect udp");
	set(u2, IPPROTO_IP, IP_TTL, 13);
	int v6a = socket(AF_INET6, SOCK_DGRAM, 0), v6b = socket(AF_INET6, SOCK_DGRAM, 0);
	struct sockaddr_in6 ua6 = { .sin6_family = AF_INET6, .sin6_addr = in6addr_loopback };
	if (bind(v6a, (struct sockaddr *)&ua6, sizeof(ua6)) < 0)
		fail("bind udp6");
	ua6.sin6_port = htons(port_of(v6a));
	if (connect(v6b, (struct sockaddr *)&ua6, sizeof(ua6)) < 0)
		fail("connect udp6");
	set(v6b, IPPROTO_IPV6, IPV6_RECVPKTINFO, 1);
	shutdown(v6b, SHUT_WR);

	/* An ICMP ping socket (the test runner opens ping_group_range). */
	int ping = socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP);
	if (ping < 0)
		fail("ping socket");
	/* A raw ICMP socket that only sees echo replies. */
	int raw = socket(AF_INET, SOCK_RAW, IPPROTO_ICMP);
	if (raw < 0)
		fail("raw socket");
	uint32_t flt = ~(1U << ICMP_ECHOREPLY);
	if (setsockopt(raw, SOL_RAW, ICMP_FILTER, &flt, sizeof(flt)) < 0)
		fail("ICMP_FILTER");

	test_ready();
	test_waitsig();

	/* The listeners, with their options, accept new clients. */
	expect(l4, SOL_SOCKET, SO_REUSEADDR, 1, "SO_REUSEADDR");
	expect(l4, SOL_SOCKET, SO_KEEPALIVE, 1, "SO_KEEPALIVE");
	expect(l4, IPPROTO_TCP, TCP_KEEPIDLE, 33, "TCP_KEEPIDLE");
	expect(l4, IPPROTO_TCP, TCP_KEEPINTVL, 7, "TCP_KEEPINTVL");
	expect(l4, IPPROTO_TCP, TCP_KEEPCNT, 4, "TCP_KEEPCNT");
	expect(l4, IPPROTO_TCP, TCP_NODELAY, 1, "TCP_NODELAY");
	expect(l4, SOL_SOCKET, SO_RCVBUF, rcvbuf, "SO_RCVBUF");
	expect(l4, IPPROTO_IP, IP_TOS, IPTOS_LOWDELAY, "IP_TOS");
	if (!(fcntl(l4, F_GETFL) & O_NONBLOCK) || !(fcntl(l4, F_GETFL) & O_ASYNC))
		fail("the listener lost O_NONBLOCK or O_ASYNC");
	if (fcntl(l4, F_GETOWN) != getpid())
		fail("the listener's owner is %d", fcntl(l4, F_GETOWN));
	struct linger lg2;
	socklen_t ll = sizeof(lg2);
	getsockopt(l4, SOL_SOCKET, SO_LINGER, &lg2, &ll);
	if (lg2.l_onoff != 1 || lg2.l_linger != 9)
		fail("SO_LINGER %d %d", lg2.l_onoff, lg2.l_linger);
	struct timeval tv2;
	tl = sizeof(tv2);
	getsockopt(l4, SOL_SOCKET, SO_RCVTIMEO, &tv2, &tl);
	if (tv2.tv_sec != tv.tv_sec || tv2.tv_usec != tv.tv_usec)
		fail("SO_RCVTIMEO %ld.%06ld", (long)tv2.tv_sec, (long)tv2.tv_usec);
	if (sockopt(l4, SOL_SOCKET, SO_ACCEPTCONN) != 1)
		fail("the IPv4 listener does not listen");
	int c = connect_to(AF_INET, "127.0.0.1", port_of(l4));
	accept_one(l4, "IPv4 listener");
	close(c);
	for (int i = 0; i < 100 && !sigio; i++)
		usleep(10000);
	if (!sigio)
		fail("no SIGIO for the new client of the O_ASYNC listener");

	expect(l6, IPPROTO_IPV6, IPV6_V6ONLY, 1, "IPV6_V6ONLY");
	expect(l6, SOL_SOCKET, SO_REUSEPORT, 1, "SO_REUSEPORT");
	expect(l6, IPPROTO_TCP, TCP_CORK, 1, "TCP_CORK");
	c = connect_to(AF_INET6, "::1", port_of(l6));
	accept_one(l6, "IPv6 listener");
	close(c);

	expect(fb, IPPROTO_IP, IP_FREEBIND, 1, "IP_FREEBIND");
	char dev[IFNAMSIZ] = "";
	socklen_t dl = sizeof(dev);
	getsockopt(fb, SOL_SOCKET, SO_BINDTODEVICE, dev, &dl);
	if (strcmp(dev, "lo"))
		fail("SO_BINDTODEVICE is '%s'", dev);
	struct sockaddr_in got;
	socklen_t gl = sizeof(got);
	getsockname(fb, (struct sockaddr *)&got, &gl);
	if (got.sin_addr.s_addr != fa.sin_addr.s_addr)
		fail("the free-bound listener is bound elsewhere");

	if (port_of(bound) != bound_port || sockopt(bound, SOL_SOCKET, SO_ACCEPTCONN))
		fail("the bound socket moved to port %d, or listens", port_of(bound));

	/* UDP both ways, with the peer's address. */
	if (send(u2, "ping4", 5, 0) != 5)
		fail("udp send");
	char buf[64];
	struct sockaddr_in from;
	socklen_t fl = sizeof(from);
	struct pollfd pu = { .fd = u1, .events = POLLIN };
	if (poll(&pu, 1, 3000) != 1 || recvfrom(u1, buf, sizeof(buf), 0, (struct sockaddr *)&from, &fl) != 5 ||
	    memcmp(buf, "ping4", 5))
		fail("udp datagram lost");
	if (sendto(u1, "pong", 4, 0, (struct sockaddr *)&from, fl) != 4)
		fail("udp reply");
	pu.fd = u2;
	if (poll(&pu, 1, 3000) != 1 || recv(u2, buf, sizeof(buf), 0) != 4)
		fail("udp reply lost: the connected socket is not connected to the same port");
	expect(u2, IPPROTO_IP, IP_TTL, 13, "IP_TTL");
	if (send(v6b, "x", 1, 0) != -1 || errno != EPIPE)
		fail("the IPv6 UDP socket is not shut down for writing");
	expect(v6b, IPPROTO_IPV6, IPV6_RECVPKTINFO, 1, "IPV6_RECVPKTINFO");
	struct sockaddr_in6 f6;
	socklen_t f6l = sizeof(f6);
	if (getpeername(v6b, (struct sockaddr *)&f6, &f6l) < 0 || ntohs(f6.sin6_port) != port_of(v6a))
		fail("the IPv6 UDP socket lost its peer");

	/* The ping socket pings, and the raw socket sees the reply. */
	struct icmphdr ih = { .type = ICMP_ECHO, .un.echo.sequence = htons(7) };
	struct sockaddr_in lo = { .sin_family = AF_INET };
	inet_pton(AF_INET, "127.0.0.1", &lo.sin_addr);
	if (sendto(ping, &ih, sizeof(ih), 0, (struct sockaddr *)&lo, sizeof(lo)) < 0)
		fail("ping");
	struct pollfd pp = { .fd = ping, .events = POLLIN };
	if (poll(&pp, 1, 3000) != 1 || recv(ping, buf, sizeof(buf), 0) < (ssize_t)sizeof(ih) ||
	    ((struct icmphdr *)buf)->type != ICMP_ECHOREPLY)
		fail("no echo reply on the ping socket");
	uint32_t flt2;
	socklen_t fl2 = sizeof(flt2);
	if (getsockopt(raw, SOL_RAW, ICMP_FILTER, &flt2, &fl2) < 0 || flt2 != flt)
		fail("ICMP_FILTER %x", flt2);
	pp.fd = raw;
	int seen_reply = 0;
	while (poll(&pp, 1, 1000) == 1) {
		ssize_t n = recv(raw, buf, sizeof(buf), 0);
		if (n < 28)
			break;
		struct icmphdr *r = (struct icmphdr *)(buf + 20);
		if (r->type != ICMP_ECHOREPLY)
			fail("the raw socket's filter let ICMP type %d through", r->type);
		seen_reply = 1;
	}
	if (!seen_reply)
		fail("the raw ICMP socket saw no echo reply");
	pass();
}
