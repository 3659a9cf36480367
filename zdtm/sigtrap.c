/* The SIGTRAP action survives the dump and the restore (both stop the task
 * at points where a trap with SIGTRAP blocked would reset it to the
 * default): a handler in the main process, SIG_IGN in a child. */
#include "zdtmlib.h"
#include <sys/wait.h>

static volatile sig_atomic_t traps;
static void on_trap(int s) { (void)s; traps++; }

int main(void)
{
	test_init();
	pid_t c = fork();
	if (c == 0) {
		signal(SIGTRAP, SIG_IGN);
		while (!test_done())
			usleep(1000);
		raise(SIGTRAP);
		_exit(0);
	}
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_trap;
	sigaction(SIGTRAP, &sa, NULL);
	usleep(20000);
	test_ready();
	test_waitsig();
	struct sigaction now;
	sigaction(SIGTRAP, NULL, &now);
	if (now.sa_handler != on_trap)
		fail("the SIGTRAP handler is gone");
	raise(SIGTRAP);
	if (traps != 1)
		fail("SIGTRAP handled %d times", traps);
	kill(c, SIGTERM);
	int st;
	if (waitpid(c, &st, 0) != c || !WIFEXITED(st) || WEXITSTATUS(st))
		fail("the child with SIGTRAP ignored: status %x", st);
	pass();
}
