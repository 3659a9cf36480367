/* A parent inside vfork(): its child sleeps before it exits. crust refuses
 * the tree while the vfork is in progress; afterwards the parent runs on. */
#include "zdtmlib.h"
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>

int main(void)
{
	test_init();
	pid_t c = vfork();
	if (c == 0) {
		/* Only system calls here: the parent's memory is ours. */
		const char *r = getenv("ZDTM_READY");
		int fd = syscall(SYS_open, r, O_CREAT | O_WRONLY, 0600);
		syscall(SYS_close, fd);
		struct timespec d = { 2, 0 };
		syscall(SYS_nanosleep, &d, NULL);
		syscall(SYS_exit, 0);
	}
	int st;
	waitpid(c, &st, 0);
	test_waitsig();
	pass();
}
