/* A task checkpointed in the middle of a long sleep: after restore the sleep
 * ends (it is restarted, as the kernel restarts it) and the task goes on.
 *
 * With argv[1] "whole", SIGTERM is held back during the sleep, which must
 * then last its whole 3 s and return 0: a dump that lets the task run on
 * (or fails) must leave it sleeping, not end the sleep with EINTR. */
#include "zdtmlib.h"
#include <time.h>

int main(int argc, char **argv)
{
	int whole = argc > 1 && !strcmp(argv[1], "whole");
	sigset_t term;
	sigemptyset(&term);
	sigaddset(&term, SIGTERM);
	test_init();
	if (whole)
		sigprocmask(SIG_BLOCK, &term, NULL);
	test_ready();
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	/* SIGTERM ends the sleep early; a restart of it after restore must not
	 * return an error other than EINTR. */
	struct timespec d = { 3, 0 };
	int r = nanosleep(&d, NULL);
	if (r && errno != EINTR)
		fail("nanosleep returned %d", r);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	if (whole) {
		double slept = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
		if (r)
			fail("the sleep ended early with EINTR after %.2f s", slept);
		if (slept < 2.99)
			fail("the sleep lasted %.2f s of 3", slept);
		sigprocmask(SIG_UNBLOCK, &term, NULL);
	}
	test_waitsig();
	pass();
}
