/* A parent inside vfork(): its child sleeps (argv[1] ms, 3000 by default)
 * before it exits. crust waits 2 s for a vfork to end, and refuses the tree
 * while it is still in progress; afterwards the parent runs on (and a dump
 * that waited restores it). */
#include "zdtmlib.h"
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>

int main(int argc, char **argv)
{
	long ms = argc > 1 ? atol(argv[1]) : 3000;
	test_init();
	pid_t c = vfork();
	if (c == 0) {
		/* Only system calls here: the parent's memory is ours. */
		const char *r = getenv("ZDTM_READY");
		int fd = syscall(SYS_open, r, O_CREAT | O_WRONLY, 0600);
		syscall(SYS_close, fd);
		struct timespec d = { ms / 1000, ms % 1000 * 1000000 };
		syscall(SYS_nanosleep, &d, NULL);
		syscall(SYS_exit, 0);
	}
	int st;
	waitpid(c, &st, 0);
	test_waitsig();
	pass();
}
