/* A child in its own mount namespace: crust refuses the tree (naming the
 * task and the reason) and the tree runs on unharmed. */
#define _GNU_SOURCE
#include "zdtmlib.h"
#include <sched.h>
#include <sys/wait.h>

int main(void)
{
	test_init();
	int go[2];
	if (pipe(go))
		fail("pipe");
	pid_t c = fork();
	if (c == 0) {
		signal(SIGTERM, SIG_DFL);
		if (unshare(CLONE_NEWNS))
			_exit(2);
		close(go[0]);
		if (write(go[1], "r", 1) != 1)
			_exit(3);
		for (;;)
			pause();
	}
	char b;
	close(go[1]);
	if (read(go[0], &b, 1) != 1)
		fail("child could not unshare");
	test_ready();
	test_waitsig();
	kill(c, SIGTERM);
	int st;
	waitpid(c, &st, 0);
	if (!WIFSIGNALED(st))
		fail("child");
	pass();
}
