/* Zombies of every kind: one killed by SIGSEGV, one that led a process
 * group of its own when it died. After restore each is still a zombie, in
 * its group, with its wait status; no core file appears. */
#include "zdtmlib.h"
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>

int main(void)
{
	test_init();
	const char *dir = getenv("ZDTM_DIR");
	if (!dir || chdir(dir))
		fail("chdir");
	pid_t leader = fork();
	if (leader == 0) {
		setpgid(0, 0);
		_exit(3);
	}
	setpgid(leader, leader);
	pid_t segv = fork();
	if (segv == 0) {
		struct rlimit no = { 0, 0 };
		setrlimit(RLIMIT_CORE, &no);
		signal(SIGSEGV, SIG_DFL);
		raise(SIGSEGV);
		_exit(9);
	}
	siginfo_t si;
	for (pid_t *p = (pid_t[]){ leader, segv, 0 }; *p; p++)
		if (waitid(P_PID, *p, &si, WEXITED | WNOWAIT))
			fail("waitid %d", *p);
	test_ready();
	test_waitsig();

	if (getpgid(leader) != leader)
		fail("zombie %d is in group %d, not its own", leader, getpgid(leader));
	int st;
	if (waitpid(leader, &st, 0) != leader || !WIFEXITED(st) || WEXITSTATUS(st) != 3)
		fail("group-leader zombie status %x", st);
	if (waitpid(segv, &st, 0) != segv || !WIFSIGNALED(st) || WTERMSIG(st) != SIGSEGV)
		fail("SIGSEGV zombie status %x", st);
	struct stat sb;
	if (stat("core", &sb) == 0)
		fail("a core file appeared");
	pass();
}
