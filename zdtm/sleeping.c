/* A task checkpointed in the middle of a long sleep: after restore the sleep
 * ends (it is restarted, as the kernel restarts it) and the task goes on. */
#include "zdtmlib.h"
#include <time.h>

int main(void)
{
	test_init();
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
	test_waitsig();
	pass();
}
