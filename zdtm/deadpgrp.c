/* A process group whose leader is dead: the root is a child subreaper; its
 * child L makes its own group, forks two members into it, and exits, so the
 * members come to the root. After restore both members are still in group
 * L (and in the root's session), and a signal to the group reaches both. */
#include "zdtmlib.h"
#include <sys/prctl.h>
#include <sys/wait.h>

static volatile sig_atomic_t usr1;
static void on_usr1(int s) { (void)s; usr1 = 1; }

int main(void)
{
	test_init();
	prctl(PR_SET_CHILD_SUBREAPER, 1);
	int ready[2], pids[2];
	pipe(ready);
	pipe(pids);
	pid_t leader = fork();
	if (leader == 0) {
		setpgid(0, 0);
		for (int i = 0; i < 2; i++) {
			pid_t m = fork();
			if (m == 0) {
				signal(SIGUSR1, on_usr1);
				pid_t group = getpgrp(), sid = getsid(0);
				write(ready[1], "r", 1);
				test_waitsig();
				for (int j = 0; j < 1000 && !usr1; j++)
					usleep(1000);
				_exit(getpgrp() == group && getsid(0) == sid && usr1 ? 0 : 1);
			}
			write(pids[1], &m, sizeof(m));
		}
		_exit(0);
	}
	pid_t members[2];
	for (int i = 0; i < 2; i++) {
		char b;
		read(ready[0], &b, 1);
		read(pids[0], &members[i], sizeof(members[i]));
	}
	waitpid(leader, NULL, 0); /* the leader is dead; its group lives on */
	for (int i = 0; i < 2; i++)
		if (getpgid(members[i]) != leader)
			fail("member %d is not in group %d", members[i], leader);
	test_ready();
	test_waitsig();

	for (int i = 0; i < 2; i++)
		if (getpgid(members[i]) != leader)
			fail("member %d is in group %d, not %d", members[i], getpgid(members[i]), leader);
	if (kill(-leader, SIGUSR1))
		fail("signalling group %d: %m", leader);
	for (int i = 0; i < 2; i++) {
		int st;
		kill(members[i], SIGTERM);
		if (waitpid(members[i], &st, 0) != members[i] || !WIFEXITED(st) || WEXITSTATUS(st))
			fail("member %d failed its check (status %#x)", members[i], st);
	}
	/* The stand-in leader was reaped by crust's restore, not left to us. */
	if (waitpid(-1, NULL, WNOHANG) != -1 || errno != ECHILD)
		fail("an unexpected child is left");
	pass();
}
