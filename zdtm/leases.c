/* Leases (fcntl F_SETLEASE, dumped with --file-locks): a read lease and a
 * write lease held, and two leases being broken at dump time by children
 * blocked opening their files (they inherited the leased fds too): a write
 * lease broken to READ by a reader, a read lease broken to UNLCK by a
 * writer. After restore F_GETLEASE shows the same types, no second break
 * signal arrives, the openers still wait, and each gets its file once the
 * holder gives way; the write lease still stops a reader and tells its
 * holder so, with its signal and fd. */
#include "zdtmlib.h"
#include <sys/wait.h>

#define BREAK_SIG (SIGRTMIN + 3)

static volatile sig_atomic_t breaks, other_sig;
static volatile sig_atomic_t fd_seen; /* bit N: a break signal for fd N */

static void on_break(int sig, siginfo_t *si, void *uc)
{
	(void)uc;
	if (sig != BREAK_SIG)
		other_sig = sig;
	breaks++;
	if (si->si_fd > 0 && si->si_fd < 30)
		fd_seen |= 1 << si->si_fd;
}

/* A child that opens `path` with `flags` (blocking until the lease on it
 * gives way) and reports through `report` whether it got it. */
static pid_t opener(const char *path, int flags, int report)
{
	pid_t p = fork();
	if (p == 0) {
		int f = open(path, flags);
		char c = f >= 0 ? 'k' : 'e';
		write(report, &c, 1);
		_exit(f >= 0 ? 0 : 1);
	}
	if (p < 0)
		fail("fork");
	return p;
}

static void want_lease(int fd, int type, const char *what)
{
	int t = fcntl(fd, F_GETLEASE);
	if (t != type)
		fail("%s: F_GETLEASE gives %d, want %d", what, t, type);
}

static void wait_breaks(int n)
{
	for (int i = 0; i < 10000 && breaks < n; i++)
		usleep(1000);
	if (breaks != n)
		fail("%d break signals, want %d", breaks, n);
}

int main(void)
{
	test_init();
	const char *d = getenv("ZDTM_DIR");
	char pr[4096], pw[4096], pb1[4096], pb2[4096];
	snprintf(pr, sizeof(pr), "%s/lease.r", d);
	snprintf(pw, sizeof(pw), "%s/lease.w", d);
	snprintf(pb1, sizeof(pb1), "%s/lease.b1", d);
	snprintf(pb2, sizeof(pb2), "%s/lease.b2", d);

	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = on_break;
	sa.sa_flags = SA_SIGINFO | SA_RESTART;
	/* SIGIO too: a stray break signal before F_SETSIG is given back. */
	if (sigaction(BREAK_SIG, &sa, NULL) || sigaction(SIGIO, &sa, NULL))
		fail("sigaction");

	int r = open(pr, O_RDONLY | O_CREAT, 0600);
	int w = open(pw, O_RDWR | O_CREAT, 0600);
	/* Read-only: a write lease on it can be downgraded to a read one. */
	int b1 = open(pb1, O_RDONLY | O_CREAT, 0600);
	int b2 = open(pb2, O_RDONLY | O_CREAT, 0600);
	if (r < 0 || w < 0 || b1 < 0 || b2 < 0 || b2 >= 30)
		fail("open");
	if (fcntl(r, F_SETLEASE, F_RDLCK) || fcntl(w, F_SETLEASE, F_WRLCK) ||
	    fcntl(b1, F_SETLEASE, F_WRLCK) || fcntl(b2, F_SETLEASE, F_RDLCK))
		fail("F_SETLEASE");
	if (fcntl(w, F_SETSIG, BREAK_SIG) || fcntl(b1, F_SETSIG, BREAK_SIG) ||
	    fcntl(b2, F_SETSIG, BREAK_SIG))
		fail("F_SETSIG");
	int rep[2];
	if (pipe(rep) || fcntl(rep[0], F_SETFL, O_NONBLOCK))
		fail("pipe");
	pid_t c1 = opener(pb1, O_RDONLY, rep[1]);
	pid_t c2 = opener(pb2, O_WRONLY, rep[1]);
	wait_breaks(2);
	want_lease(b1, F_RDLCK, "write lease broken by a reader");
	want_lease(b2, F_UNLCK, "read lease broken by a writer");
	if (fd_seen != ((1 << b1) | (1 << b2)))
		fail("break signals for fds %#x", fd_seen);

	test_ready();
	test_waitsig();

	/* A break signal made again by the restore would be here by now. */
	usleep(100000);
	if (breaks != 2 || other_sig)
		fail("%d break signals after restore, want 2 (other signal %d)", breaks, other_sig);
	want_lease(r, F_RDLCK, "read lease");
	want_lease(w, F_WRLCK, "write lease");
	want_lease(b1, F_RDLCK, "write lease being broken to READ");
	want_lease(b2, F_UNLCK, "read lease being broken to UNLCK");
	char c;
	if (read(rep[0], &c, 1) != -1 || errno != EAGAIN)
		fail("an opener got its file while the lease was still breaking");

	/* The write lease stops a reader, and its holder hears of it. */
	pid_t p = fork();
	if (p == 0) {
		int f = open(pw, O_RDONLY | O_NONBLOCK);
		_exit(f < 0 && errno == EWOULDBLOCK ? 0 : 1);
	}
	int st;
	if (waitpid(p, &st, 0) != p || !WIFEXITED(st) || WEXITSTATUS(st))
		fail("a reader opened the file under the write lease");
	wait_breaks(3);
	if (!(fd_seen & (1 << w)) || other_sig)
		fail("the write lease's break came for fds %#x (signal %d)", fd_seen, other_sig);
	want_lease(w, F_RDLCK, "write lease being broken by a reader");

	/* Giving way lets the openers blocked since before the dump in. */
	if (fcntl(b1, F_SETLEASE, F_RDLCK) || fcntl(b2, F_SETLEASE, F_UNLCK))
		fail("giving way");
	if (waitpid(c1, &st, 0) != c1 || !WIFEXITED(st) || WEXITSTATUS(st))
		fail("the reader of a write lease did not get its file");
	if (waitpid(c2, &st, 0) != c2 || !WIFEXITED(st) || WEXITSTATUS(st))
		fail("the writer of a read lease did not get its file");
	char got[2];
	if (read(rep[0], got, 2) != 2 || got[0] != 'k' || got[1] != 'k')
		fail("openers' reports");
	want_lease(b1, F_RDLCK, "write lease downgraded");
	pass();
}
