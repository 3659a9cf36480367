/* Job-control stops: a child stopped by SIGTSTP (in a group that is not
 * orphaned, so SIGTSTP stops it) is reported stopped by SIGTSTP after the
 * restore, not by SIGSTOP; a child stopped by SIGSTOP that has one more
 * SIGSTOP queued (tkill) and a blocked SIGTSTP pending is dumped (the queued
 * stop cannot be blocked and must not disturb the dump) and comes back
 * stopped with its blocked SIGTSTP still pending. Both run on after SIGCONT
 * (which discards the pending SIGTSTP, as the kernel does). */
#include "zdtmlib.h"
#include <sys/syscall.h>
#include <sys/wait.h>

static pid_t spawn(int own_group, int block_tstp)
{
	pid_t c = fork();
	if (c == 0) {
		if (own_group)
			setpgid(0, 0);
		if (block_tstp) {
			sigset_t s;
			sigemptyset(&s);
			sigaddset(&s, SIGTSTP);
			sigprocmask(SIG_BLOCK, &s, NULL);
		}
		while (!test_done())
			usleep(1000);
		_exit(0);
	}
	if (own_group)
		setpgid(c, c);
	return c;
}

static void wait_stopped(pid_t c, int sig)
{
	siginfo_t si;
	memset(&si, 0, sizeof(si));
	if (waitid(P_PID, c, &si, WSTOPPED))
		fail("waitid %d", c);
	if (si.si_code != CLD_STOPPED || si.si_status != sig)
		fail("child %d: code %d status %d, expected stopped by %d", c, si.si_code, si.si_status, sig);
}

int main(void)
{
	test_init();
	pid_t tstp = spawn(1, 0);
	pid_t stop = spawn(0, 1);
	usleep(10000);
	kill(tstp, SIGTSTP);
	wait_stopped(tstp, SIGTSTP);
	kill(stop, SIGSTOP);
	wait_stopped(stop, SIGSTOP);
	syscall(SYS_tkill, stop, SIGSTOP);
	kill(stop, SIGTSTP);
	test_ready();
	test_waitsig();

	/* The restore stopped them again: a new stop report each. */
	wait_stopped(tstp, SIGTSTP);
	wait_stopped(stop, SIGSTOP);
	char path[64], line[256];
	snprintf(path, sizeof(path), "/proc/%d/status", stop);
	FILE *f = fopen(path, "r");
	unsigned long long shd = 0;
	while (f && fgets(line, sizeof(line), f))
		sscanf(line, "ShdPnd: %llx", &shd);
	if (f)
		fclose(f);
	if (!(shd & (1ULL << (SIGTSTP - 1))))
		fail("the blocked SIGTSTP of the stopped child was lost (ShdPnd %llx)", shd);
	kill(tstp, SIGTERM);
	kill(stop, SIGTERM);
	kill(tstp, SIGCONT);
	kill(stop, SIGCONT);
	int st;
	if (waitpid(tstp, &st, 0) != tstp || !WIFEXITED(st) || WEXITSTATUS(st))
		fail("SIGTSTP child: status %x", st);
	if (waitpid(stop, &st, 0) != stop || !WIFEXITED(st) || WEXITSTATUS(st))
		fail("SIGSTOP child: status %x", st);
	pass();
}
