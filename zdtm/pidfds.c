/* pidfds of live and dead processes.
 *
 * Live: the parent holds two pidfds of its child L (one PIDFD_NONBLOCK), one
 * of itself, and one of its grandchild G (forked by L, so the restored
 * parent may run before G exists again); L holds a pidfd of its parent.
 * Dead: D1 exited with 7 and D2 was killed by SIGUSR2, both reaped; the
 * parent holds two descriptions of D1 (one PIDFD_NONBLOCK) and a dup of one,
 * which L shares too (inherited), and one of D2.
 *
 * After restore: pidfds of one process share an inode and those of two
 * differ, fdinfo's Pid: is the process (-1 for the dead), flags and shared
 * descriptions are as they were, waitid(P_PIDFD), poll, pidfd_send_signal
 * and PIDFD_GET_INFO's exit status on the dead ones answer as before the
 * dump, and signals sent through the live ones reach their process. */
#define _GNU_SOURCE
#include "zdtmlib.h"
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#ifndef P_PIDFD
#define P_PIDFD 3
#endif
#define PIDFD_NONBLOCK O_NONBLOCK
#define KCMP_FILE 0

/* struct pidfd_info up to exit_code (Linux 6.13), PIDFD_INFO_EXIT (6.15). */
struct pidfd_info {
	unsigned long long mask, cgroupid;
	unsigned int ids[11];
	int exit_code;
};
#define PIDFD_INFO_EXIT (1ULL << 3)
#define PIDFD_GET_INFO _IOWR(0xFF, 11, struct pidfd_info)

static int pidfd_open(pid_t pid, unsigned int flags)
{
	return syscall(SYS_pidfd_open, pid, flags);
}

static int send_sig(int pidfd, int sig)
{
	return syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, 0);
}

static int kcmp_file(pid_t a, int fa, pid_t b, int fb)
{
	return syscall(SYS_kcmp, a, b, KCMP_FILE, fa, fb);
}

static ino_t ino(int fd)
{
	struct stat st;
	if (fstat(fd, &st))
		fail("fstat %d", fd);
	return st.st_ino;
}

/* fdinfo's Pid: of one of our fds. */
static int fdinfo_pid(int fd)
{
	char path[64], line[256];
	snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", fd);
	FILE *f = fopen(path, "r");
	int pid = -2;
	while (f && fgets(line, sizeof(line), f))
		if (sscanf(line, "Pid: %d", &pid) == 1)
			break;
	if (f)
		fclose(f);
	return pid;
}

/* waitid(P_PIDFD) without blocking: 0 or the errno. */
static int waitid_errno(int fd, int options)
{
	siginfo_t si;
	memset(&si, 0, sizeof(si));
	return waitid(P_PIDFD, fd, &si, options) ? errno : 0;
}

/* PIDFD_GET_INFO's exit status, or -1 when the kernel gives none. */
static int exit_info(int fd)
{
	struct pidfd_info info;
	memset(&info, 0, sizeof(info));
	info.mask = PIDFD_INFO_EXIT;
	if (ioctl(fd, PIDFD_GET_INFO, &info) || !(info.mask & PIDFD_INFO_EXIT))
		return -1;
	return info.exit_code;
}

static int readable_now(int fd)
{
	struct pollfd p = { .fd = fd, .events = POLLIN };
	return poll(&p, 1, 0) == 1 && (p.revents & POLLIN);
}

/* What the dead pidfds answer, before and after. */
struct dead_state {
	int wait_d1a, wait_d1b, wait_d2, send_d1a, exit_d1, exit_d2, readable;
};

static struct dead_state dead_state(int d1a, int d1b, int d2)
{
	struct dead_state s;
	s.wait_d1a = waitid_errno(d1a, WEXITED | WNOHANG);
	s.wait_d1b = waitid_errno(d1b, WEXITED);
	s.wait_d2 = waitid_errno(d2, WEXITED | WNOHANG);
	s.send_d1a = send_sig(d1a, 0) ? errno : 0;
	s.exit_d1 = exit_info(d1a);
	s.exit_d2 = exit_info(d2);
	s.readable = readable_now(d1a) && readable_now(d2);
	return s;
}

/* L: holds a pidfd of its parent and, inherited, one of dead D1; forks G.
 * On SIGUSR1 it reaps G and checks its pidfds; its exit code says what
 * was wrong. */
static int child_l(int d1a, int gpipe)
{
	sigset_t usr1;
	sigemptyset(&usr1);
	sigaddset(&usr1, SIGUSR1);
	sigprocmask(SIG_BLOCK, &usr1, NULL);
	int parent = pidfd_open(getppid(), 0);
	if (parent < 0)
		return 10;
	pid_t g = fork();
	if (g == 0) {
		close(parent); /* a live pidfd held by one process only */
		for (;;)
			pause();
	}
	if (write(gpipe, &g, sizeof(g)) != sizeof(g))
		return 11;
	close(gpipe);
	int sig;
	while (sigwait(&usr1, &sig))
		;
	int st;
	if (waitpid(g, &st, 0) != g || !WIFSIGNALED(st) || WTERMSIG(st) != SIGKILL)
		return 2;
	if (kcmp_file(getppid(), d1a, getpid(), d1a) != 0)
		return 3;
	if (fdinfo_pid(parent) != getppid())
		return 4;
	if (send_sig(parent, 0))
		return 5;
	if (fdinfo_pid(d1a) != -1)
		return 6;
	return 0;
}

int main(void)
{
	test_init();

	pid_t d1 = fork();
	if (d1 == 0)
		_exit(7);
	/* D1 is at most a zombie here: not reaped, so pidfd_open works. */
	int d1a = pidfd_open(d1, 0), d1b = pidfd_open(d1, PIDFD_NONBLOCK);
	int d1c = dup(d1a);
	pid_t d2 = fork();
	if (d2 == 0) {
		for (;;)
			pause();
	}
	int d2a = pidfd_open(d2, 0);
	if (d1a < 0 || d1b < 0 || d1c < 0 || d2a < 0)
		fail("pidfd_open of the children to be dead");
	if (send_sig(d2a, SIGUSR2))
		fail("SIGUSR2 to D2");

	int gp[2];
	if (pipe(gp))
		fail("pipe");
	pid_t l = fork();
	if (l == 0) {
		close(d1b), close(d1c), close(d2a), close(gp[0]);
		_exit(child_l(d1a, gp[1]));
	}
	close(gp[1]);
	pid_t g;
	if (read(gp[0], &g, sizeof(g)) != sizeof(g))
		fail("reading G's PID");
	close(gp[0]);
	int gfd = pidfd_open(g, 0);

	int st;
	if (waitpid(d1, &st, 0) != d1 || !WIFEXITED(st) || WEXITSTATUS(st) != 7)
		fail("D1 did not exit with 7 (%#x)", st);
	if (waitpid(d2, &st, 0) != d2 || !WIFSIGNALED(st) || WTERMSIG(st) != SIGUSR2)
		fail("D2 was not killed by SIGUSR2 (%#x)", st);

	int lfd = pidfd_open(l, 0), lnb = pidfd_open(l, PIDFD_NONBLOCK);
	int self = pidfd_open(getpid(), 0);
	if (gfd < 0 || lfd < 0 || lnb < 0 || self < 0)
		fail("pidfd_open of the live ones");

	struct dead_state before = dead_state(d1a, d1b, d2a);
	if (before.wait_d1a != ECHILD || before.send_d1a != ESRCH || !before.readable)
		fail("dead pidfds answer unexpectedly before the dump");

	test_ready();
	test_waitsig();

	/* Dead: inodes, descriptions, flags. */
	if (ino(d1a) != ino(d1b) || ino(d1a) != ino(d1c))
		fail("pidfds of D1 have inodes %lu %lu %lu", ino(d1a), ino(d1b), ino(d1c));
	if (ino(d1a) == ino(d2a))
		fail("D1 and D2 share inode %lu", ino(d1a));
	if (kcmp_file(getpid(), d1a, getpid(), d1c) != 0)
		fail("fd %d is no longer a dup of fd %d", d1c, d1a);
	if (kcmp_file(getpid(), d1a, getpid(), d1b) == 0)
		fail("fds %d and %d became one description", d1a, d1b);
	if (!(fcntl(d1b, F_GETFL) & O_NONBLOCK) || (fcntl(d1a, F_GETFL) & O_NONBLOCK))
		fail("PIDFD_NONBLOCK of the dead pidfds: %#o %#o", fcntl(d1a, F_GETFL),
		     fcntl(d1b, F_GETFL));
	if (fdinfo_pid(d1a) != -1 || fdinfo_pid(d2a) != -1)
		fail("dead pidfds show Pid: %d and %d", fdinfo_pid(d1a), fdinfo_pid(d2a));
	struct dead_state after = dead_state(d1a, d1b, d2a);
	if (memcmp(&before, &after, sizeof(before)))
		fail("dead pidfds: waitid %d/%d/%d kill %d exit %#x/%#x readable %d, were "
		     "%d/%d/%d %d %#x/%#x %d",
		     after.wait_d1a, after.wait_d1b, after.wait_d2, after.send_d1a, after.exit_d1,
		     after.exit_d2, after.readable, before.wait_d1a, before.wait_d1b,
		     before.wait_d2, before.send_d1a, before.exit_d1, before.exit_d2,
		     before.readable);

	/* Self. */
	int again = pidfd_open(getpid(), 0);
	if (fdinfo_pid(self) != getpid() || ino(self) != ino(again) || send_sig(self, 0))
		fail("pidfd of self: Pid: %d, inode %lu vs %lu", fdinfo_pid(self), ino(self),
		     ino(again));
	close(again);

	/* L: still running, so the non-blocking pidfd says EAGAIN. */
	again = pidfd_open(l, 0);
	if (fdinfo_pid(lfd) != l || ino(lfd) != ino(lnb) || ino(lfd) != ino(again))
		fail("pidfds of L: Pid: %d, inodes %lu %lu %lu", fdinfo_pid(lfd), ino(lfd),
		     ino(lnb), ino(again));
	close(again);
	if (!(fcntl(lnb, F_GETFL) & O_NONBLOCK) || (fcntl(lfd, F_GETFL) & O_NONBLOCK))
		fail("PIDFD_NONBLOCK of L's pidfds");
	if (waitid_errno(lnb, WEXITED) != EAGAIN)
		fail("waitid on the non-blocking pidfd of running L: %d", waitid_errno(lnb, WEXITED));

	/* G: killed through its pidfd, which then polls readable. */
	if (fdinfo_pid(gfd) != g)
		fail("pidfd of G shows Pid: %d, not %d", fdinfo_pid(gfd), g);
	if (send_sig(gfd, SIGKILL))
		fail("SIGKILL to G through its pidfd");
	struct pollfd p = { .fd = gfd, .events = POLLIN };
	if (poll(&p, 1, 5000) != 1)
		fail("G's pidfd did not become readable");

	/* L checks its own pidfds, told through one of ours. */
	if (send_sig(lfd, SIGUSR1))
		fail("SIGUSR1 to L through its pidfd");
	siginfo_t si;
	memset(&si, 0, sizeof(si));
	if (waitid(P_PIDFD, lfd, &si, WEXITED))
		fail("waitid(P_PIDFD) for L");
	if (si.si_pid != l || si.si_code != CLD_EXITED || si.si_status != 0)
		fail("L ended with code %d status %d (see child_l)", si.si_code, si.si_status);
	pass();
}
