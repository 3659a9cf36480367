/* A periodic ITIMER_REAL that has fired and whose SIGALRM waits, blocked,
 * at the dump: the task then reads 0 time left (the kernel re-arms the
 * timer only when the signal is taken). After restore, with SIGALRM
 * unblocked, the pending alarm arrives and the timer goes on firing at its
 * interval (a python program with setitimer(ITIMER_REAL, 0.002, 0.002)
 * lost its timer this way). */
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
	sigset_t alrm, pending;
	sigemptyset(&alrm);
	sigaddset(&alrm, SIGALRM);
	sigprocmask(SIG_BLOCK, &alrm, NULL);
	struct itimerval real = { { 0, 2000 }, { 0, 2000 } };
	setitimer(ITIMER_REAL, &real, NULL);
	do {
		sigpending(&pending);
	} while (!sigismember(&pending, SIGALRM));
	struct itimerval g;
	getitimer(ITIMER_REAL, &g);
	if (g.it_value.tv_sec || g.it_value.tv_usec)
		fail("the fired timer reads %ld us left before the dump", g.it_value.tv_usec);
	test_ready();
	test_waitsig();
	sigpending(&pending);
	if (!sigismember(&pending, SIGALRM))
		fail("the pending SIGALRM was lost");
	getitimer(ITIMER_REAL, &g);
	if (g.it_interval.tv_sec != 0 || g.it_interval.tv_usec != 2000)
		fail("ITIMER_REAL interval changed: %ld us", g.it_interval.tv_usec);
	sigprocmask(SIG_UNBLOCK, &alrm, NULL);
	struct timespec d = { 0, 200000000 };
	while (nanosleep(&d, &d) && errno == EINTR)
		;
	/* 100 intervals in 200 ms; a slow machine gets far fewer, a lost
	 * timer exactly one (the pending alarm). */
	if (ticks < 5)
		fail("ITIMER_REAL fired %ld times in 200 ms after restore", ticks);
	pass();
}
