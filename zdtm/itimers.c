/* Interval timers: ITIMER_REAL keeps firing at its interval after restore,
 * ITIMER_VIRTUAL and ITIMER_PROF keep their intervals. */
#include "zdtmlib.h"
#include <time.h>
#include <sys/time.h>

static volatile long ticks;
static void on_alrm(int s) { (void)s; ticks++; }

int main(void)
{
	test_init();
	struct sigaction sa = { .sa_handler = on_alrm, .sa_flags = SA_RESTART };
	sigaction(SIGALRM, &sa, NULL);
	struct itimerval real = { { 0, 50000 }, { 0, 50000 } };
	struct itimerval virt = { { 7, 0 }, { 30, 0 } };
	struct itimerval prof = { { 11, 0 }, { 40, 0 } };
	setitimer(ITIMER_REAL, &real, NULL);
	setitimer(ITIMER_VIRTUAL, &virt, NULL);
	setitimer(ITIMER_PROF, &prof, NULL);
	test_ready();
	test_waitsig();
	struct itimerval g;
	getitimer(ITIMER_REAL, &g);
	if (g.it_interval.tv_sec != 0 || g.it_interval.tv_usec != 50000)
		fail("ITIMER_REAL interval changed");
	getitimer(ITIMER_VIRTUAL, &g);
	if (g.it_interval.tv_sec != 7 || g.it_value.tv_sec > 30 || (g.it_value.tv_sec == 0 && g.it_value.tv_usec == 0))
		fail("ITIMER_VIRTUAL changed");
	getitimer(ITIMER_PROF, &g);
	if (g.it_interval.tv_sec != 11 || g.it_value.tv_sec > 40)
		fail("ITIMER_PROF changed");
	long t0 = ticks;
	struct timespec d = { 0, 400000000 };
	while (nanosleep(&d, &d) && errno == EINTR)
		;
	if (ticks - t0 < 3)
		fail("ITIMER_REAL fired %ld times in 400ms", ticks - t0);
	pass();
}
