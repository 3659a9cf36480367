/* Unix sockets of every shape, checked after restore:
 *  - a stream socketpair with bytes queued both ways, one end shut down for
 *    writing (its peer reads the bytes, then end of file), made by a child
 *    with another uid: SO_PEERCRED still names that child and uid;
 *  - a seqpacket pair with three records queued (boundaries kept) and
 *    SO_PASSCRED on;
 *  - a listener bound to a path (mode 0604), with a connection accepted
 *    (made by a child, which SO_PEERCRED of the accepted end names) that
 *    holds unread bytes, and one not accepted yet;
 *  - a datagram socket bound to an abstract name with datagrams queued
 *    from two senders bound to abstract names, one closed since: recvfrom
 *    reads each with its sender's name;
 *  - a datagram socket bound to a path that was unlinked, with a client
 *    connected to it: the path stays gone, the client still reaches it. */
#include "zdtmlib.h"
#include <stddef.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>

static socklen_t abstract_addr(struct sockaddr_un *a, const char *name)
{
	memset(a, 0, sizeof(*a));
	a->sun_family = AF_UNIX;
	size_t n = strlen(name);
	memcpy(a->sun_path + 1, name, n);
	return offsetof(struct sockaddr_un, sun_path) + 1 + n;
}

static socklen_t path_addr(struct sockaddr_un *a, const char *path)
{
	memset(a, 0, sizeof(*a));
	a->sun_family = AF_UNIX;
	strncpy(a->sun_path, path, sizeof(a->sun_path) - 1);
	return sizeof(*a);
}

static void expect_read(int fd, const char *want, const char *what)
{
	char buf[64] = { 0 };
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	if (n != (ssize_t)strlen(want) || memcmp(buf, want, n))
		fail("%s: read %zd bytes \"%s\", wanted \"%s\"", what, n, buf, want);
}

static struct ucred peer_cred(int fd)
{
	struct ucred c;
	socklen_t len = sizeof(c);
	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &c, &len))
		fail("SO_PEERCRED");
	return c;
}

/* Receives an fd over `via`. */
static int recv_fd(int via)
{
	char c, ctl[CMSG_SPACE(sizeof(int))];
	struct iovec iov = { &c, 1 };
	struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl, .msg_controllen = sizeof(ctl) };
	if (recvmsg(via, &m, 0) != 1 || !CMSG_FIRSTHDR(&m))
		return -1;
	int fd;
	memcpy(&fd, CMSG_DATA(CMSG_FIRSTHDR(&m)), sizeof(int));
	return fd;
}

static void send_fd(int via, int fd)
{
	char c = 0, ctl[CMSG_SPACE(sizeof(int))];
	struct iovec iov = { &c, 1 };
	struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl, .msg_controllen = sizeof(ctl) };
	struct cmsghdr *h = CMSG_FIRSTHDR(&m);
	h->cmsg_level = SOL_SOCKET;
	h->cmsg_type = SCM_RIGHTS;
	h->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(h), &fd, sizeof(int));
	if (sendmsg(via, &m, 0) != 1)
		fail("sending an fd");
}

int main(void)
{
	test_init();
	signal(SIGPIPE, SIG_IGN);
	const char *dir = getenv("ZDTM_DIR");
	if (!dir)
		dir = ".";
	char tag[32];
	snprintf(tag, sizeof(tag), "crust-zdtm-%d", getpid());

	/* The stream pair, made by a child with uid 4242 and handed back. */
	int chan[2];
	if (socketpair(AF_UNIX, SOCK_DGRAM, 0, chan))
		fail("socketpair");
	pid_t maker = fork();
	if (maker == 0) {
		if (setgid(4343) || setuid(4242))
			_exit(2);
		int sp[2];
		if (socketpair(AF_UNIX, SOCK_STREAM, 0, sp))
			_exit(3);
		send_fd(chan[0], sp[0]);
		send_fd(chan[0], sp[1]);
		_exit(0);
	}
	int sp[2] = { recv_fd(chan[1]), recv_fd(chan[1]) };
	if (sp[0] < 0 || sp[1] < 0 || waitpid(maker, NULL, 0) != maker)
		fail("the child's socketpair");
	if (write(sp[0], "to-one", 6) != 6 || write(sp[1], "to-zero", 7) != 7)
		fail("write pair");
	if (shutdown(sp[0], SHUT_WR))
		fail("shutdown");

	int sq[2];
	if (socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sq))
		fail("seqpacket pair");
	if (setsockopt(sq[1], SOL_SOCKET, SO_PASSCRED, &(int){ 1 }, sizeof(int)))
		fail("SO_PASSCRED");
	if (write(sq[0], "r1", 2) != 2 || write(sq[0], "rec-2", 5) != 5 || write(sq[0], "", 0) != 0 ||
	    write(sq[0], "r4", 2) != 2)
		fail("records");

	/* The listener with one connection accepted, one not. */
	char lpath[512];
	snprintf(lpath, sizeof(lpath), "%s/listen.sock", dir);
	struct sockaddr_un la;
	socklen_t llen = path_addr(&la, lpath);
	int lsk = socket(AF_UNIX, SOCK_STREAM, 0);
	if (lsk < 0 || bind(lsk, (void *)&la, llen) || listen(lsk, 4))
		fail("listener");
	if (chmod(lpath, 0604))
		fail("chmod");
	int ready[2];
	if (pipe(ready))
		fail("pipe");
	pid_t client = fork();
	if (client == 0) {
		signal(SIGTERM, SIG_DFL);
		int c = socket(AF_UNIX, SOCK_STREAM, 0);
		if (connect(c, (void *)&la, llen))
			_exit(2);
		if (write(c, "unread", 6) != 6)
			_exit(3);
		close(ready[0]);
		if (write(ready[1], "x", 1) != 1)
			_exit(4);
		char buf[16] = { 0 };
		if (read(c, buf, sizeof(buf)) != 4 || memcmp(buf, "ping", 4))
			_exit(5);
		if (write(c, "pong", 4) != 4)
			_exit(6);
		pause();
		_exit(0);
	}
	close(ready[1]);
	char x;
	if (read(ready[0], &x, 1) != 1)
		fail("the client did not connect");
	int acc = accept(lsk, NULL, NULL);
	if (acc < 0)
		fail("accept");
	int waiting = socket(AF_UNIX, SOCK_STREAM, 0);
	if (connect(waiting, (void *)&la, llen))
		fail("connect");

	/* The abstract datagram server and its two senders. */
	struct sockaddr_un da, s1a, s2a;
	char n1[64], n2[64];
	snprintf(n1, sizeof(n1), "%s-one", tag);
	snprintf(n2, sizeof(n2), "%s-two", tag);
	socklen_t dlen = abstract_addr(&da, tag), l1 = abstract_addr(&s1a, n1), l2 = abstract_addr(&s2a, n2);
	int dsrv = socket(AF_UNIX, SOCK_DGRAM, 0), s1 = socket(AF_UNIX, SOCK_DGRAM, 0),
	    s2 = socket(AF_UNIX, SOCK_DGRAM, 0);
	if (bind(dsrv, (void *)&da, dlen) || bind(s1, (void *)&s1a, l1) || bind(s2, (void *)&s2a, l2))
		fail("bind abstract");
	if (sendto(s1, "from-one", 8, 0, (void *)&da, dlen) != 8 || sendto(s2, "from-two", 8, 0, (void *)&da, dlen) != 8 ||
	    sendto(s1, "one-again", 9, 0, (void *)&da, dlen) != 9)
		fail("sendto");
	close(s2);

	/* The datagram socket whose path is gone. */
	char gpath[512];
	snprintf(gpath, sizeof(gpath), "%s/gone.sock", dir);
	struct sockaddr_un ga;
	socklen_t glen = path_addr(&ga, gpath);
	int gsrv = socket(AF_UNIX, SOCK_DGRAM, 0), gcli = socket(AF_UNIX, SOCK_DGRAM, 0);
	if (bind(gsrv, (void *)&ga, glen) || connect(gcli, (void *)&ga, glen))
		fail("bind/connect gone.sock");
	if (unlink(gpath))
		fail("unlink");

	struct stat lst_before;
	if (stat(lpath, &lst_before))
		fail("stat");
	test_ready();
	test_waitsig();

	/* The pair. */
	expect_read(sp[1], "to-one", "pair, end 1");
	char b[8];
	if (read(sp[1], b, sizeof(b)) != 0)
		fail("pair: end 1 should read the end of file");
	expect_read(sp[0], "to-zero", "pair, end 0");
	if (write(sp[0], "x", 1) != -1 || errno != EPIPE)
		fail("pair: end 0 writes after SHUT_WR");
	if (write(sp[1], "back", 4) != 4)
		fail("pair: end 1 cannot write");
	expect_read(sp[0], "back", "pair, end 0 after restore");
	struct ucred pc = peer_cred(sp[0]);
	if (pc.pid != maker || pc.uid != 4242 || pc.gid != 4343)
		fail("pair: SO_PEERCRED pid %d uid %d gid %d, made by %d as 4242/4343", pc.pid, pc.uid, pc.gid, maker);

	/* The records. */
	expect_read(sq[1], "r1", "record 1");
	expect_read(sq[1], "rec-2", "record 2");
	if (read(sq[1], b, sizeof(b)) != 0)
		fail("record 3 is not empty");
	expect_read(sq[1], "r4", "record 4");
	int on = 0;
	socklen_t ol = sizeof(on);
	if (getsockopt(sq[1], SOL_SOCKET, SO_PASSCRED, &on, &ol) || !on)
		fail("SO_PASSCRED lost");

	/* The listener. */
	struct stat lst;
	if (stat(lpath, &lst) || !S_ISSOCK(lst.st_mode) || (lst.st_mode & 07777) != 0604)
		fail("the listener's file: mode %o", lst.st_mode);
	struct ucred ac = peer_cred(acc);
	if (ac.pid != client)
		fail("accepted: SO_PEERCRED pid %d, the client is %d", ac.pid, client);
	struct sockaddr_un got;
	socklen_t gl = sizeof(got);
	if (getsockname(acc, (void *)&got, &gl) || strcmp(got.sun_path, lpath))
		fail("accepted: its name is \"%s\"", got.sun_path);
	expect_read(acc, "unread", "accepted");
	if (write(acc, "ping", 4) != 4)
		fail("write ping");
	expect_read(acc, "pong", "the client's answer");
	int late = accept(lsk, NULL, NULL);
	if (late < 0)
		fail("the connection not accepted yet is gone");
	if (write(waiting, "late", 4) != 4)
		fail("write late");
	expect_read(late, "late", "the late connection");
	/* The listener still takes connections by its path. */
	int fresh = socket(AF_UNIX, SOCK_STREAM, 0);
	if (connect(fresh, (void *)&la, llen))
		fail("connecting to the restored listener");

	/* The abstract datagrams, each with its sender. */
	const char *want[3][2] = { { "from-one", n1 }, { "from-two", n2 }, { "one-again", n1 } };
	for (int i = 0; i < 3; i++) {
		char buf[32] = { 0 };
		struct sockaddr_un from;
		socklen_t fl = sizeof(from);
		ssize_t n = recvfrom(dsrv, buf, sizeof(buf), MSG_DONTWAIT, (void *)&from, &fl);
		if (n != (ssize_t)strlen(want[i][0]) || strcmp(buf, want[i][0]))
			fail("datagram %d: \"%s\"", i, buf);
		if (fl != offsetof(struct sockaddr_un, sun_path) + 1 + strlen(want[i][1]) || from.sun_path[0] ||
		    memcmp(from.sun_path + 1, want[i][1], strlen(want[i][1])))
			fail("datagram %d: from the wrong sender (%d bytes of name)", i, fl);
	}

	/* The socket whose path is gone. */
	if (access(gpath, F_OK) == 0)
		fail("%s is back", gpath);
	if (send(gcli, "still", 5, 0) != 5)
		fail("send to the unlinked socket");
	expect_read(gsrv, "still", "the unlinked socket");
	gl = sizeof(got);
	if (getsockname(gsrv, (void *)&got, &gl) || strcmp(got.sun_path, gpath))
		fail("the unlinked socket's name is \"%s\"", got.sun_path);

	kill(client, SIGKILL);
	waitpid(client, NULL, 0);
	pass();
}
