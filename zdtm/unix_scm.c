/* Files in flight (sent with SCM_RIGHTS, not received yet), checked after
 * restore:
 *  - the read end of a pipe with bytes in it, sent over a datagram pair and
 *    closed by the sender;
 *  - a regular file at offset 5, sent over a stream pair, and bytes after it
 *    that carry no file (they read apart from it);
 *  - one end of another stream pair, with a message queued in it, and a
 *    memfd, both in one message over a seqpacket pair whose sender closed. */
#include "zdtmlib.h"
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>

static void send_fds(int via, const char *data, size_t len, const int *fds, int n)
{
	char ctl[CMSG_SPACE(sizeof(int) * 4)];
	struct iovec iov = { (void *)data, len };
	struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl,
			    .msg_controllen = CMSG_SPACE(sizeof(int) * n) };
	struct cmsghdr *h = CMSG_FIRSTHDR(&m);
	h->cmsg_level = SOL_SOCKET;
	h->cmsg_type = SCM_RIGHTS;
	h->cmsg_len = CMSG_LEN(sizeof(int) * n);
	memcpy(CMSG_DATA(h), fds, sizeof(int) * n);
	if (sendmsg(via, &m, 0) != (ssize_t)len)
		fail("sendmsg");
}

/* Reads up to `len` bytes and the fds that come with them; the count of
 * fds. */
static int recv_fds(int via, char *buf, size_t len, ssize_t *got, int *fds)
{
	char ctl[CMSG_SPACE(sizeof(int) * 4)];
	struct iovec iov = { buf, len };
	struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl, .msg_controllen = sizeof(ctl) };
	*got = recvmsg(via, &m, MSG_DONTWAIT);
	struct cmsghdr *h = CMSG_FIRSTHDR(&m);
	if (*got < 0 || !h)
		return 0;
	int n = (h->cmsg_len - CMSG_LEN(0)) / sizeof(int);
	memcpy(fds, CMSG_DATA(h), sizeof(int) * n);
	return n;
}

int main(void)
{
	test_init();
	const char *dir = getenv("ZDTM_DIR");
	if (!dir)
		dir = ".";

	int p[2], d[2];
	if (pipe(p) || socketpair(AF_UNIX, SOCK_DGRAM, 0, d))
		fail("pipe/socketpair");
	if (write(p[1], "in the pipe", 11) != 11)
		fail("write pipe");
	send_fds(d[0], "P", 1, &p[0], 1);
	close(p[0]);

	char path[512];
	snprintf(path, sizeof(path), "%s/carried.txt", dir);
	int f = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
	if (f < 0 || write(f, "0123456789", 10) != 10 || lseek(f, 5, SEEK_SET) != 5)
		fail("the file");
	int s[2];
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, s))
		fail("stream pair");
	send_fds(s[0], "file-fd", 7, &f, 1);
	if (write(s[0], "tail", 4) != 4)
		fail("write tail");
	close(f);

	int inner[2], q[2];
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, inner) || socketpair(AF_UNIX, SOCK_SEQPACKET, 0, q))
		fail("inner/seqpacket pair");
	if (write(inner[0], "inner", 5) != 5)
		fail("write inner");
	int mfd = memfd_create("carried", 0);
	if (mfd < 0 || write(mfd, "memfd data", 10) != 10)
		fail("memfd");
	int two[2] = { inner[1], mfd };
	send_fds(q[0], "two", 3, two, 2);
	close(inner[1]);
	close(mfd);
	close(q[0]);

	test_ready();
	test_waitsig();

	char buf[64] = { 0 };
	ssize_t n;
	int fds[4];
	if (recv_fds(d[1], buf, sizeof(buf), &n, fds) != 1 || n != 1 || buf[0] != 'P')
		fail("no pipe in the datagram");
	char pb[32] = { 0 };
	if (read(fds[0], pb, sizeof(pb)) != 11 || strcmp(pb, "in the pipe"))
		fail("the pipe in flight reads \"%s\"", pb);
	if (write(p[1], "more", 4) != 4 || read(fds[0], pb, 4) != 4 || memcmp(pb, "more", 4))
		fail("the pipe in flight is not the pipe");

	memset(buf, 0, sizeof(buf));
	if (recv_fds(s[1], buf, sizeof(buf), &n, fds) != 1 || n != 7 || memcmp(buf, "file-fd", 7))
		fail("no file with its bytes (\"%s\")", buf);
	int file = fds[0];
	memset(buf, 0, sizeof(buf));
	if (recv_fds(s[1], buf, sizeof(buf), &n, fds) != 0 || n != 4 || memcmp(buf, "tail", 4))
		fail("the bytes after the file came with one (\"%s\")", buf);
	fds[0] = file;
	if (lseek(fds[0], 0, SEEK_CUR) != 5)
		fail("the file in flight is at %ld", (long)lseek(fds[0], 0, SEEK_CUR));
	memset(pb, 0, sizeof(pb));
	if (read(fds[0], pb, sizeof(pb)) != 5 || strcmp(pb, "56789"))
		fail("the file in flight reads \"%s\"", pb);

	memset(buf, 0, sizeof(buf));
	if (recv_fds(q[1], buf, sizeof(buf), &n, fds) != 2 || n != 3 || strcmp(buf, "two"))
		fail("not two files in the record (\"%s\")", buf);
	memset(pb, 0, sizeof(pb));
	if (read(fds[0], pb, sizeof(pb)) != 5 || strcmp(pb, "inner"))
		fail("the socket in flight reads \"%s\"", pb);
	if (write(fds[0], "reply", 5) != 5 || read(inner[0], pb, 5) != 5 || memcmp(pb, "reply", 5))
		fail("the socket in flight is not connected to its pair");
	memset(pb, 0, sizeof(pb));
	if (pread(fds[1], pb, sizeof(pb), 0) != 10 || strcmp(pb, "memfd data"))
		fail("the memfd in flight reads \"%s\"", pb);
	if (read(q[1], buf, sizeof(buf)) != 0)
		fail("the seqpacket socket whose peer closed does not read the end");
	pass();
}
