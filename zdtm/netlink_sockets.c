/* Netlink sockets, checked after restore:
 *  - A: a usersock socket bound to a port id of its choosing and to groups
 *    3 and 17, with NETLINK_PKTINFO, NETLINK_NO_ENOBUFS,
 *    NETLINK_BROADCAST_ERROR and SO_RCVBUF set;
 *  - B: a usersock socket bound with a port id the kernel chose, connected
 *    to A's port id and group 3: what it sends reaches A (read with B's
 *    port id as sender and group 3 in NETLINK_PKTINFO) and D;
 *  - C: a usersock socket never bound, with NETLINK_CAP_ACK and
 *    NETLINK_EXT_ACK, owned by uid 4242 (fchown): its first send gives it
 *    a port id, A reads it;
 *  - D: a usersock socket never bound but in group 3;
 *  - R: a route socket in RTNLGRP_IPV4_IFADDR (bind) and in groups 33
 *    and 35 (NETLINK_ADD_MEMBERSHIP), with NETLINK_EXT_ACK,
 *    NETLINK_GET_STRICT_CHK, NETLINK_CAP_ACK and NETLINK_LISTEN_ALL_NSID:
 *    an address added to lo after the restore reaches it as RTM_NEWADDR;
 *    its groups read back with NETLINK_LIST_MEMBERSHIPS, the flags
 *    getsockopt cannot read from sock_diag.
 * Messages sent after the restore to group 17 reach A, with the group in
 * NETLINK_PKTINFO.
 *
 * With "queued": only A and B, with a message from B left unread in A (a
 * dump must refuse, and leave it there to be read). */
#include "zdtmlib.h"
#include <arpa/inet.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/sock_diag.h>
#include <linux/netlink_diag.h>
#include <net/if.h>
#include <sys/socket.h>
#include <sys/stat.h>

#ifndef NETLINK_EXT_ACK
#define NETLINK_EXT_ACK 11
#endif
#ifndef NETLINK_GET_STRICT_CHK
#define NETLINK_GET_STRICT_CHK 12
#endif

static int nl_socket(int proto)
{
	int sk = socket(AF_NETLINK, SOCK_RAW, proto);
	if (sk < 0)
		fail("netlink socket of protocol %d", proto);
	return sk;
}

static void nl_bind(int sk, unsigned pid, unsigned groups)
{
	struct sockaddr_nl a = { .nl_family = AF_NETLINK, .nl_pid = pid, .nl_groups = groups };
	if (bind(sk, (void *)&a, sizeof(a)))
		fail("bind to port id %u groups %#x", pid, groups);
}

static struct sockaddr_nl name_of(int sk, int peer)
{
	struct sockaddr_nl a;
	socklen_t len = sizeof(a);
	if ((peer ? getpeername : getsockname)(sk, (void *)&a, &len))
		fail("get%sname", peer ? "peer" : "sock");
	return a;
}

static void setint(int sk, int level, int opt, int v, const char *what)
{
	if (setsockopt(sk, level, opt, &v, sizeof(v)))
		fail("setsockopt %s", what);
}

static int getint(int sk, int level, int opt, const char *what)
{
	int v = -1;
	socklen_t len = sizeof(v);
	if (getsockopt(sk, level, opt, &v, &len))
		fail("getsockopt %s", what);
	return v;
}

static void expect_on(int sk, int opt, const char *what)
{
	if (getint(sk, SOL_NETLINK, opt, what) != 1)
		fail("%s is off", what);
}

/* Sends one message of type 0x1234 carrying `text`: to `to`, or where the
 * socket is connected (to == NULL). */
static void nl_send(int sk, const struct sockaddr_nl *to, const char *text)
{
	struct {
		struct nlmsghdr h;
		char text[64];
	} m = { 0 };
	m.h.nlmsg_len = NLMSG_LENGTH(strlen(text) + 1);
	m.h.nlmsg_type = 0x1234;
	strcpy(m.text, text);
	ssize_t n = sendto(sk, &m, m.h.nlmsg_len, 0, (void *)to, to ? sizeof(*to) : 0);
	/* To a group only: the copy for port id 0 finds no kernel socket of
	 * usersock (ECONNREFUSED) after the group's copies went out. */
	if (n < 0 && errno == ECONNREFUSED && to && !to->nl_pid && to->nl_groups)
		return;
	if (n != (ssize_t)m.h.nlmsg_len)
		fail("sending \"%s\"", text);
}

/* Receives one message, which must carry `text`; returns the sender's
 * port id, and the group NETLINK_PKTINFO names (-1 without it). */
static unsigned nl_recv(int sk, const char *text, int *group, const char *what)
{
	char buf[256], ctl[64];
	struct sockaddr_nl from;
	struct iovec iov = { buf, sizeof(buf) };
	struct msghdr m = { .msg_name = &from, .msg_namelen = sizeof(from), .msg_iov = &iov, .msg_iovlen = 1,
			    .msg_control = ctl, .msg_controllen = sizeof(ctl) };
	struct timeval tv = { 5, 0 };
	setsockopt(sk, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	ssize_t n = recvmsg(sk, &m, 0);
	struct nlmsghdr *h = (void *)buf;
	if (n < (ssize_t)NLMSG_HDRLEN || h->nlmsg_type != 0x1234 || strcmp(NLMSG_DATA(h), text))
		fail("%s: no \"%s\" (read %zd bytes)", what, text, n);
	if (group) {
		*group = -1;
		for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c))
			if (c->cmsg_level == SOL_NETLINK && c->cmsg_type == NETLINK_PKTINFO)
				*group = ((struct nl_pktinfo *)CMSG_DATA(c))->group;
	}
	return from.nl_pid;
}

/* The sock_diag flags of netlink socket `sk` (NDIAG_FLAG_*), as the kernel
 * reports them. */
static unsigned diag_flags(int sk, int proto)
{
	struct stat st;
	if (fstat(sk, &st))
		fail("fstat");
	int d = nl_socket(NETLINK_SOCK_DIAG);
	struct {
		struct nlmsghdr h;
		struct netlink_diag_req r;
	} req = { { sizeof(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0 },
		  { .sdiag_family = AF_NETLINK, .sdiag_protocol = proto, .ndiag_show = NDIAG_SHOW_FLAGS } };
	if (send(d, &req, sizeof(req), 0) != sizeof(req))
		fail("sock_diag request");
	static char buf[1 << 16];
	for (;;) {
		ssize_t n = recv(d, buf, sizeof(buf), 0);
		if (n <= 0)
			fail("sock_diag answer");
		for (struct nlmsghdr *h = (void *)buf; NLMSG_OK(h, n); h = NLMSG_NEXT(h, n)) {
			if (h->nlmsg_type == NLMSG_DONE || h->nlmsg_type == NLMSG_ERROR)
				fail("sock_diag does not list socket %lu", (unsigned long)st.st_ino);
			struct netlink_diag_msg *m = NLMSG_DATA(h);
			if (m->ndiag_ino != st.st_ino)
				continue;
			int len = h->nlmsg_len - NLMSG_LENGTH(sizeof(*m));
			for (struct rtattr *a = (void *)(m + 1); RTA_OK(a, len); a = RTA_NEXT(a, len))
				if (a->rta_type == NETLINK_DIAG_FLAGS) {
					close(d);
					return *(unsigned *)RTA_DATA(a);
				}
			fail("sock_diag gives no flags");
		}
	}
}

/* Adds or removes 127.77.X.Y/32 on lo through a new route socket. */
static void lo_addr(int add, unsigned addr)
{
	int sk = nl_socket(NETLINK_ROUTE);
	struct {
		struct nlmsghdr h;
		struct ifaddrmsg a;
		char attrs[64];
	} m = { 0 };
	m.h.nlmsg_type = add ? RTM_NEWADDR : RTM_DELADDR;
	m.h.nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK | (add ? NLM_F_CREATE | NLM_F_EXCL : 0);
	m.a.ifa_family = AF_INET;
	m.a.ifa_prefixlen = 32;
	m.a.ifa_index = if_nametoindex("lo");
	int len = NLMSG_LENGTH(sizeof(m.a));
	for (int type = IFA_LOCAL; type >= IFA_ADDRESS; type--) {
		struct rtattr *ra = (void *)((char *)&m + NLMSG_ALIGN(len));
		ra->rta_type = type;
		ra->rta_len = RTA_LENGTH(4);
		memcpy(RTA_DATA(ra), &addr, 4);
		len = NLMSG_ALIGN(len) + RTA_ALIGN(ra->rta_len);
	}
	m.h.nlmsg_len = len;
	if (send(sk, &m, len, 0) != len)
		fail("RTM_%sADDR", add ? "NEW" : "DEL");
	char buf[512];
	struct nlmsghdr *h = (void *)buf;
	if (recv(sk, buf, sizeof(buf), 0) < (ssize_t)NLMSG_HDRLEN || h->nlmsg_type != NLMSG_ERROR ||
	    ((struct nlmsgerr *)NLMSG_DATA(h))->error)
		fail("RTM_%sADDR refused", add ? "NEW" : "DEL");
	close(sk);
}

/* Reads R until RTM_NEWADDR for `addr` comes (other addresses may change
 * meanwhile). */
static void wait_newaddr(int r, unsigned addr)
{
	struct timeval tv = { 5, 0 };
	setsockopt(r, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	static char buf[1 << 16];
	for (;;) {
		ssize_t n = recv(r, buf, sizeof(buf), 0);
		if (n <= 0)
			fail("no RTM_NEWADDR reached the route socket");
		for (struct nlmsghdr *h = (void *)buf; NLMSG_OK(h, n); h = NLMSG_NEXT(h, n)) {
			if (h->nlmsg_type != RTM_NEWADDR)
				continue;
			struct ifaddrmsg *a = NLMSG_DATA(h);
			int len = IFA_PAYLOAD(h);
			for (struct rtattr *ra = IFA_RTA(a); RTA_OK(ra, len); ra = RTA_NEXT(ra, len))
				if (ra->rta_type == IFA_LOCAL && !memcmp(RTA_DATA(ra), &addr, 4))
					return;
		}
	}
}

int main(int argc, char **argv)
{
	test_init();
	int queued = argc == 2 && !strcmp(argv[1], "queued");
	unsigned pa = 0x40000000u | getpid();
	int a = nl_socket(NETLINK_USERSOCK);
	nl_bind(a, pa, (1 << 2) | (1 << 16));
	setint(a, SOL_NETLINK, NETLINK_PKTINFO, 1, "NETLINK_PKTINFO");
	setint(a, SOL_NETLINK, NETLINK_NO_ENOBUFS, 1, "NETLINK_NO_ENOBUFS");
	setint(a, SOL_NETLINK, NETLINK_BROADCAST_ERROR, 1, "NETLINK_BROADCAST_ERROR");
	setint(a, SOL_SOCKET, SO_RCVBUF, 99999, "SO_RCVBUF");
	int a_rcvbuf = getint(a, SOL_SOCKET, SO_RCVBUF, "SO_RCVBUF");

	int b = nl_socket(NETLINK_USERSOCK);
	nl_bind(b, 0, 0);
	struct sockaddr_nl to_a = { .nl_family = AF_NETLINK, .nl_pid = pa, .nl_groups = 1 << 2 };
	if (connect(b, (void *)&to_a, sizeof(to_a)))
		fail("connect");
	unsigned pb = name_of(b, 0).nl_pid;

	if (queued) {
		nl_send(b, NULL, "left unread");
		test_ready();
		test_waitsig();
		/* The refused dump took nothing. */
		if (nl_recv(a, "left unread", NULL, "A") != pb)
			fail("the queued message changed sender");
		pass();
	}

	int c = nl_socket(NETLINK_USERSOCK);
	setint(c, SOL_NETLINK, NETLINK_CAP_ACK, 1, "NETLINK_CAP_ACK");
	setint(c, SOL_NETLINK, NETLINK_EXT_ACK, 1, "NETLINK_EXT_ACK");
	if (fchown(c, 4242, 4343))
		fail("fchown");
	int d = nl_socket(NETLINK_USERSOCK);
	setint(d, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, 3, "group 3 of D");

	int r = nl_socket(NETLINK_ROUTE);
	nl_bind(r, 0, RTMGRP_IPV4_IFADDR);
	setint(r, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, 33, "group 33");
	setint(r, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, 35, "group 35");
	setint(r, SOL_NETLINK, NETLINK_EXT_ACK, 1, "NETLINK_EXT_ACK");
	setint(r, SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1, "NETLINK_GET_STRICT_CHK");
	setint(r, SOL_NETLINK, NETLINK_CAP_ACK, 1, "NETLINK_CAP_ACK");
	setint(r, SOL_NETLINK, NETLINK_LISTEN_ALL_NSID, 1, "NETLINK_LISTEN_ALL_NSID");
	unsigned pr = name_of(r, 0).nl_pid;

	test_ready();
	test_waitsig();

	/* Names and peers. */
	struct sockaddr_nl n = name_of(a, 0);
	if (n.nl_pid != pa || n.nl_groups != ((1 << 2) | (1 << 16)))
		fail("A is port id %u groups %#x, wanted %u %#x", n.nl_pid, n.nl_groups, pa, (1 << 2) | (1 << 16));
	if (name_of(b, 0).nl_pid != pb)
		fail("B changed port id");
	n = name_of(b, 1);
	if (n.nl_pid != pa || n.nl_groups != 1 << 2)
		fail("B is connected to %u group %#x", n.nl_pid, n.nl_groups);
	if (name_of(c, 0).nl_pid != 0)
		fail("C has a port id before it sent anything");
	n = name_of(d, 0);
	if (n.nl_pid != 0 || n.nl_groups != 1 << 2)
		fail("D is port id %u groups %#x", n.nl_pid, n.nl_groups);
	if (name_of(r, 0).nl_pid != pr)
		fail("R changed port id");

	/* Options. */
	expect_on(a, NETLINK_PKTINFO, "NETLINK_PKTINFO");
	expect_on(a, NETLINK_NO_ENOBUFS, "NETLINK_NO_ENOBUFS");
	expect_on(a, NETLINK_BROADCAST_ERROR, "NETLINK_BROADCAST_ERROR");
	if (getint(a, SOL_SOCKET, SO_RCVBUF, "SO_RCVBUF") != a_rcvbuf)
		fail("SO_RCVBUF of A changed");
	expect_on(c, NETLINK_CAP_ACK, "NETLINK_CAP_ACK of C");
	expect_on(c, NETLINK_EXT_ACK, "NETLINK_EXT_ACK of C");
	struct stat st;
	if (fstat(c, &st) || st.st_uid != 4242 || st.st_gid != 4343)
		fail("C is owned by %d:%d", (int)st.st_uid, (int)st.st_gid);
	expect_on(r, NETLINK_EXT_ACK, "NETLINK_EXT_ACK of R");
	expect_on(r, NETLINK_GET_STRICT_CHK, "NETLINK_GET_STRICT_CHK of R");
	expect_on(r, NETLINK_CAP_ACK, "NETLINK_CAP_ACK of R");
	if (!(diag_flags(r, NETLINK_ROUTE) & NDIAG_FLAG_LISTEN_ALL_NSID))
		fail("NETLINK_LISTEN_ALL_NSID of R is off");
	unsigned groups[4] = { 0 };
	socklen_t glen = sizeof(groups);
	if (getsockopt(r, SOL_NETLINK, NETLINK_LIST_MEMBERSHIPS, groups, &glen))
		fail("NETLINK_LIST_MEMBERSHIPS");
	unsigned want0 = RTMGRP_IPV4_IFADDR, want1 = (1 << 0) | (1 << 2);
	if (groups[0] != want0 || groups[1] != want1)
		fail("R is in groups %#x %#x, wanted %#x %#x", groups[0], groups[1], want0, want1);

	/* Traffic: B to A (and group 3: D), C to A, a new socket to group 17. */
	int group;
	nl_send(b, NULL, "from B");
	/* Sent to a port id and a group: the group it was sent to is in
	 * NETLINK_PKTINFO of the unicast copy too. */
	if (nl_recv(a, "from B", &group, "A") != pb || group != 3)
		fail("A read B's message with group %d, wanted 3", group);
	nl_recv(d, "from B", NULL, "D (group 3)");
	nl_send(c, &(struct sockaddr_nl){ .nl_family = AF_NETLINK, .nl_pid = pa }, "from C");
	unsigned pc = name_of(c, 0).nl_pid;
	if (!pc || nl_recv(a, "from C", NULL, "A") != pc)
		fail("C's message did not come from its new port id %u", pc);
	int e = nl_socket(NETLINK_USERSOCK);
	nl_send(e, &(struct sockaddr_nl){ .nl_family = AF_NETLINK, .nl_groups = 1 << 16 }, "to group 17");
	nl_recv(a, "to group 17", &group, "A (group 17)");
	if (group != 17)
		fail("NETLINK_PKTINFO names group %d, wanted 17", group);

	/* A kernel event for R's group. */
	unsigned addr = htonl(0x7f4d0000u | (getpid() & 0xffff));
	lo_addr(1, addr);
	wait_newaddr(r, addr);
	lo_addr(0, addr);
	pass();
	return 0;
}
