/* A pty pair in canonical mode with bytes queued both ways at the dump:
 * two whole lines and a partial one for the slave's reader, and for the
 * master's reader the slave's output and the echoes. After restore every
 * byte is still queued, once, lines still end where they ended, nothing is
 * echoed again. Also: the slave node's owner and mode; /dev/tty opened by a
 * session leader whose terminal is the pair; and a slave whose master was
 * closed (hung up), which comes back hung up. */
#include "zdtmlib.h"
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <termios.h>

static int open_pair(char *name, size_t len)
{
	int m = posix_openpt(O_RDWR | O_NOCTTY);
	if (m < 0 || grantpt(m) || unlockpt(m))
		fail("posix_openpt");
	snprintf(name, len, "%s", ptsname(m));
	return m;
}

/* Everything the master has to read now. */
static ssize_t drain(int m, char *buf, size_t len)
{
	size_t got = 0;
	struct pollfd p = { m, POLLIN, 0 };
	while (got < len && poll(&p, 1, 200) == 1) {
		ssize_t n = read(m, buf + got, len - got);
		if (n <= 0)
			break;
		got += n;
	}
	return got;
}

int main(void)
{
	test_init();
	char name[64], oname[64];
	int m = open_pair(name, sizeof(name));
	int s = open(name, O_RDWR | O_NOCTTY);
	if (s < 0 || fchown(s, 1234, 5678) || fchmod(s, 0640))
		fail("slave");

	int ready[2];
	if (pipe(ready))
		fail("pipe");
	pid_t child = fork();
	if (child == 0) {
		close(m);
		setsid();
		if (ioctl(s, TIOCSCTTY, 0))
			_exit(9);
		int tty = open("/dev/tty", O_WRONLY);
		if (tty < 0)
			_exit(8);
		if (write(ready[1], "r", 1) != 1)
			_exit(7);
		test_waitsig();
		_exit(write(tty, "via /dev/tty\n", 13) == 13 ? 0 : 4);
	}
	char b;
	if (read(ready[0], &b, 1) != 1)
		fail("the child did not start");

	/* Queued: the slave's output, then input for the slave's reader. */
	if (write(s, "out\n", 4) != 4)
		fail("slave write");
	const char *in = "line one\nline two\npart";
	if (write(m, in, strlen(in)) != (ssize_t)strlen(in))
		fail("master write");
	usleep(100000);

	/* A slave whose master is gone. */
	int om = open_pair(oname, sizeof(oname));
	int orphan = open(oname, O_RDWR | O_NOCTTY);
	if (orphan < 0)
		fail("orphan slave");
	close(om);

	test_ready();
	test_waitsig();

	struct stat st;
	if (fstat(s, &st) || st.st_uid != 1234 || st.st_gid != 5678 || (st.st_mode & 0777) != 0640)
		fail("slave node owner %d:%d mode %o", st.st_uid, st.st_gid, st.st_mode & 0777);
	char buf[256] = { 0 };
	const char *want = "out\r\nline one\r\nline two\r\npart";
	ssize_t n = drain(m, buf, sizeof(buf) - 1);
	if (n != (ssize_t)strlen(want) || memcmp(buf, want, n))
		fail("the master reads %zd bytes: %.*s", n, (int)n, buf);
	memset(buf, 0, sizeof(buf));
	if (read(s, buf, sizeof(buf)) != 9 || strcmp(buf, "line one\n"))
		fail("first line: %s", buf);
	memset(buf, 0, sizeof(buf));
	if (read(s, buf, sizeof(buf)) != 9 || strcmp(buf, "line two\n"))
		fail("second line: %s", buf);
	if (write(m, "ial\n", 4) != 4)
		fail("master write");
	memset(buf, 0, sizeof(buf));
	if (read(s, buf, sizeof(buf)) != 8 || strcmp(buf, "partial\n"))
		fail("the partial line reads %s", buf);
	/* Its echo, and nothing else queued twice. */
	memset(buf, 0, sizeof(buf));
	n = drain(m, buf, sizeof(buf) - 1);
	if (n != 5 || memcmp(buf, "ial\r\n", 5))
		fail("the master reads %zd bytes after: %.*s", n, (int)n, buf);

	kill(child, SIGTERM);
	memset(buf, 0, sizeof(buf));
	n = drain(m, buf, sizeof(buf) - 1);
	if (n != 14 || memcmp(buf, "via /dev/tty\r\n", 14))
		fail("through /dev/tty: %zd bytes %.*s", n, (int)n, buf);
	int cst;
	if (waitpid(child, &cst, 0) != child || !WIFEXITED(cst) || WEXITSTATUS(cst))
		fail("the child: status %x", cst);

	n = read(orphan, buf, 1);
	if (!(n == 0 || (n < 0 && errno == EIO)))
		fail("the slave of a closed master reads %zd", n);
	pass();
}
