/* A stopped task (SIGSTOP, job control) stays stopped after restore, and
 * runs on when its parent sends SIGCONT. */
#include "zdtmlib.h"
#include <sys/wait.h>

static int state_of(pid_t p)
{
	char path[64], st[512];
	snprintf(path, sizeof(path), "/proc/%d/stat", p);
	int fd = open(path, O_RDONLY);
	if (fd < 0)
		return '?';
	ssize_t n = read(fd, st, sizeof(st) - 1);
	close(fd);
	if (n <= 0)
		return '?';
	st[n] = 0;
	char *c = strrchr(st, ')');
	return c ? c[2] : '?';
}

int main(void)
{
	test_init();
	pid_t c = fork();
	if (c == 0) {
		signal(SIGTERM, SIG_DFL);
		kill(getpid(), SIGSTOP);
		_exit(42);
	}
	int st;
	if (waitpid(c, &st, WUNTRACED) != c || !WIFSTOPPED(st))
		fail("child did not stop");
	test_ready();
	test_waitsig();
	/* Give a wrongly running child time to exit. */
	usleep(100000);
	if (state_of(c) != 'T')
		fail("child state %c, not stopped", state_of(c));
	kill(c, SIGCONT);
	if (waitpid(c, &st, 0) != c || !WIFEXITED(st) || WEXITSTATUS(st) != 42)
		fail("child did not finish after SIGCONT");
	pass();
}
