/* A zombie child the parent has been told about (SIGCHLD handled) but has
 * not reaped. After restore it is still a zombie with its exit status, and
 * the parent gets no second SIGCHLD for it. */
#include "zdtmlib.h"
#include <sys/wait.h>

static volatile sig_atomic_t chld;
static void on_chld(int s) { (void)s; chld++; }

int main(void)
{
	test_init();
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_chld;
	sa.sa_flags = SA_RESTART;
	sigaction(SIGCHLD, &sa, NULL);
	pid_t z = fork();
	if (z == 0)
		_exit(42);
	while (!chld)
		usleep(1000);
	siginfo_t si;
	memset(&si, 0, sizeof(si));
	waitid(P_PID, z, &si, WEXITED | WNOWAIT); /* dead, not reaped */
	test_ready();
	test_waitsig();

	usleep(100000); /* a second SIGCHLD would have come by now */
	if (chld != 1)
		fail("%d SIGCHLDs for one child", chld);
	int st;
	if (waitpid(z, &st, 0) != z || !WIFEXITED(st) || WEXITSTATUS(st) != 42)
		fail("the zombie %d is gone or lost its status (%#x)", z, st);
	pass();
}
