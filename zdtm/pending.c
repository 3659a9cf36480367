/* Pending signals, with their siginfo: blocked signals queued to the
 * process (sigqueue with values, two instances of one RT signal) and to one
 * thread (pthread_sigqueue), still pending after restore, in order, with
 * their values, and delivered to the right thread. */
#define _GNU_SOURCE
#include "zdtmlib.h"
#include <pthread.h>
#include <time.h>

static pthread_barrier_t b1, b2;
static char err[128];

static void *worker(void *arg)
{
	(void)arg;
	test_thread_ignores_sigterm();
	pthread_barrier_wait(&b1); /* main queues our signal now */
	pthread_barrier_wait(&b2); /* after restore */
	sigset_t s;
	sigemptyset(&s);
	sigaddset(&s, SIGRTMIN + 5);
	siginfo_t si;
	struct timespec t = { 0, 0 };
	if (sigtimedwait(&s, &si, &t) != SIGRTMIN + 5 || si.si_value.sival_int != 555)
		snprintf(err, sizeof(err), "thread signal lost");
	return NULL;
}

int main(void)
{
	test_init();
	sigset_t blk;
	sigemptyset(&blk);
	sigaddset(&blk, SIGUSR1);
	sigaddset(&blk, SIGRTMIN + 2);
	sigaddset(&blk, SIGRTMIN + 5);
	pthread_sigmask(SIG_BLOCK, &blk, NULL);
	pthread_barrier_init(&b1, NULL, 2);
	pthread_barrier_init(&b2, NULL, 2);
	pthread_t th;
	pthread_create(&th, NULL, worker, NULL);
	union sigval v;
	v.sival_int = 111;
	sigqueue(getpid(), SIGRTMIN + 2, v);
	v.sival_int = 222;
	sigqueue(getpid(), SIGRTMIN + 2, v);
	kill(getpid(), SIGUSR1);
	v.sival_int = 555;
	pthread_sigqueue(th, SIGRTMIN + 5, v);
	pthread_barrier_wait(&b1);
	test_ready();
	/* Wait for SIGTERM with the other signals still blocked. */
	test_waitsig_mask(&blk);
	pthread_barrier_wait(&b2);
	pthread_join(th, NULL);
	if (err[0])
		fail("%s", err);
	sigset_t pend;
	sigpending(&pend);
	if (!sigismember(&pend, SIGUSR1) || !sigismember(&pend, SIGRTMIN + 2))
		fail("pending set lost");
	siginfo_t si;
	struct timespec t = { 0, 0 };
	sigset_t w;
	sigemptyset(&w);
	sigaddset(&w, SIGRTMIN + 2);
	if (sigtimedwait(&w, &si, &t) != SIGRTMIN + 2 || si.si_value.sival_int != 111 || si.si_pid != getpid())
		fail("first queued RT signal: value %d", si.si_value.sival_int);
	if (sigtimedwait(&w, &si, &t) != SIGRTMIN + 2 || si.si_value.sival_int != 222)
		fail("second queued RT signal");
	sigemptyset(&w);
	sigaddset(&w, SIGUSR1);
	if (sigtimedwait(&w, &si, &t) != SIGUSR1 || si.si_code != SI_USER)
		fail("SIGUSR1 lost its siginfo");
	pass();
}
