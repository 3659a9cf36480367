/* File owners: a pipe's read end sends SIGRTMIN+4 (F_SETSIG) to this
 * process (F_SETOWN_EX) with O_ASYNC on; a file's SIGIO goes to the process
 * group. After restore fcntl shows the same owners and signal, and data in
 * the pipe raises the signal with the right si_fd. */
#define _GNU_SOURCE
#include "zdtmlib.h"

static volatile sig_atomic_t got, got_fd;

static void on_io(int sig, siginfo_t *si, void *uc)
{
	(void)sig, (void)uc;
	got++;
	got_fd = si->si_fd;
}

int main(void)
{
	test_init();
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = on_io;
	sa.sa_flags = SA_SIGINFO | SA_RESTART;
	sigaction(SIGRTMIN + 4, &sa, NULL);
	int p[2];
	pipe(p);
	struct f_owner_ex own = { F_OWNER_PID, getpid() };
	if (fcntl(p[0], F_SETOWN_EX, &own) || fcntl(p[0], F_SETSIG, SIGRTMIN + 4) ||
	    fcntl(p[0], F_SETFL, O_ASYNC | O_NONBLOCK))
		fail("fcntl: %m");
	char path[4096];
	snprintf(path, sizeof(path), "%s/owned", getenv("ZDTM_DIR") ? getenv("ZDTM_DIR") : "/tmp");
	int f = open(path, O_RDWR | O_CREAT, 0600);
	if (fcntl(f, F_SETOWN, -getpgrp()))
		fail("F_SETOWN: %m");
	test_ready();
	test_waitsig();

	struct f_owner_ex now;
	fcntl(p[0], F_GETOWN_EX, &now);
	if (now.type != F_OWNER_PID || now.pid != getpid())
		fail("pipe owner %d/%d", now.type, now.pid);
	if (fcntl(p[0], F_GETSIG) != SIGRTMIN + 4)
		fail("pipe signal %d", fcntl(p[0], F_GETSIG));
	if (!(fcntl(p[0], F_GETFL) & O_ASYNC))
		fail("O_ASYNC lost");
	fcntl(f, F_GETOWN_EX, &now);
	if (now.type != F_OWNER_PGRP || now.pid != getpgrp())
		fail("file owner %d/%d, want group %d", now.type, now.pid, getpgrp());
	write(p[1], "x", 1);
	for (int i = 0; i < 1000 && !got; i++)
		usleep(1000);
	if (!got || got_fd != p[0])
		fail("no SIGRTMIN+4 for fd %d (got %d, si_fd %d)", p[0], got, got_fd);
	pass();
}
