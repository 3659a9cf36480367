/* Restored with --pid-ns beside the running original: the tree sees its
 * original PIDs (the root's and its child's), its memory is intact, and the
 * child is still the root's to reap. Prints nothing before SIGTERM. */
#include "zdtmlib.h"
#include <sys/wait.h>

static char pattern[1 << 20];

int main(void)
{
	test_init();
	pid_t me = getpid();
	for (size_t i = 0; i < sizeof(pattern); i++)
		pattern[i] = (char)(i * 7 + me);
	pid_t child = fork();
	if (child == 0) {
		pid_t self = getpid(), parent = getppid();
		test_waitsig();
		_exit(getpid() == self && getppid() == parent ? 0 : 3);
	}
	test_ready();
	test_waitsig();
	if (getpid() != me)
		fail("getpid() is %d, was %d", getpid(), me);
	for (size_t i = 0; i < sizeof(pattern); i++)
		if (pattern[i] != (char)(i * 7 + me))
			fail("memory differs at %zu", i);
	kill(child, SIGTERM);
	int st;
	pid_t w = waitpid(child, &st, 0);
	if (w != child)
		fail("waitpid(%d) returned %d", child, w);
	if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
		fail("the child saw other PIDs (status %#x)", st);
	pass();
}
