/* Benchmark target: a process with N-1 children ("procs N"), N-1 extra
 * threads ("threads N"), or N-1 children each process having T threads in
 * all ("tree N T"), all idle. SIGTERM ends it (the root reaps). */
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

static void spawn_threads(int n)
{
	for (int i = 1; i < n; i++) {
		pthread_t t;
		pthread_create(&t, NULL, idle, NULL);
	}
}

int main(int argc, char **argv)
{
	syscall(436 /* close_range */, 3, ~0U, 0);
	test_init();
	int n = atoi(argv[2]);
	int tree = !strcmp(argv[1], "tree");
	int threads = tree && argc > 3 ? atoi(argv[3]) : 1;
	if (!strcmp(argv[1], "procs") || tree) {
		for (int i = 1; i < n; i++)
			if (fork() == 0) {
				signal(SIGTERM, SIG_DFL);
				spawn_threads(threads);
				for (;;)
					pause();
			}
		/* The root's own threads ignore SIGTERM: test_waitsig() takes it. */
		sigset_t term;
		sigemptyset(&term);
		sigaddset(&term, SIGTERM);
		pthread_sigmask(SIG_BLOCK, &term, NULL);
		spawn_threads(threads);
		pthread_sigmask(SIG_UNBLOCK, &term, NULL);
	} else {
		spawn_threads(n);
	}
	test_ready();
	test_waitsig();
	if (!strcmp(argv[1], "procs") || tree) {
		kill(0, SIGTERM);
		while (wait(NULL) > 0)
			;
	}
	pass();
}
