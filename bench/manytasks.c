/* Benchmark target: a process with N-1 children ("procs N") or N-1 extra
 * threads ("threads N"), all idle. SIGTERM ends it (the root reaps). */
#include "../zdtm/zdtmlib.h"
#include <pthread.h>
#include <sys/wait.h>

static void *idle(void *a)
{
	(void)a;
	sigset_t s;
	sigfillset(&s);
	pthread_sigmask(SIG_BLOCK, &s, NULL);
	for (;;)
		pause();
	return NULL;
}

int main(int argc, char **argv)
{
	syscall(436 /* close_range */, 3, ~0U, 0);
	test_init();
	int n = atoi(argv[2]);
	if (!strcmp(argv[1], "procs")) {
		for (int i = 1; i < n; i++)
			if (fork() == 0) {
				signal(SIGTERM, SIG_DFL);
				for (;;)
					pause();
			}
	} else {
		for (int i = 1; i < n; i++) {
			pthread_t t;
			pthread_create(&t, NULL, idle, NULL);
		}
	}
	test_ready();
	test_waitsig();
	if (!strcmp(argv[1], "procs")) {
		kill(0, SIGTERM);
		while (wait(NULL) > 0)
			;
	}
	pass();
}
