/* Threads: 16 threads spinning with distinct values in their registers,
 * one blocked on a mutex, one waiting on a condition variable, each with
 * its own name, TID and signal mask. After restore every thread checks its
 * registers, TID, name and mask, the blocked ones wake up, and the main
 * thread joins them all (which needs each thread's clear-child-tid). */
#include "zdtmlib.h"
#include <pthread.h>
#include <stdint.h>
#include <sys/syscall.h>

#define SPINNERS 16

static volatile int stop_all;
static pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t cm = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int pred;
static volatile int started;
static char errors[SPINNERS + 2][128];

static pid_t gettid_(void) { return (pid_t)syscall(SYS_gettid); }

static void check_self(int id, pid_t tid, const char *name)
{
	char now[16];
	pthread_getname_np(pthread_self(), now, sizeof(now));
	if (gettid_() != tid)
		snprintf(errors[id], sizeof(errors[id]), "thread %d: TID %d became %d", id, tid, gettid_());
	else if (strcmp(now, name))
		snprintf(errors[id], sizeof(errors[id]), "thread %d: name %s became %s", id, name, now);
	sigset_t cur;
	pthread_sigmask(SIG_BLOCK, NULL, &cur);
	if (!sigismember(&cur, SIGTERM) || sigismember(&cur, SIGUSR2) != (id < SPINNERS && id % 2))
		snprintf(errors[id], sizeof(errors[id]), "thread %d: signal mask changed", id);
}

static void *spinner(void *arg)
{
	int id = (int)(long)arg;
	char name[16];
	snprintf(name, sizeof(name), "spin-%d", id);
	pthread_setname_np(pthread_self(), name);
	if (id % 2) {
		sigset_t s;
		sigemptyset(&s);
		sigaddset(&s, SIGUSR2);
		pthread_sigmask(SIG_BLOCK, &s, NULL);
	}
	pid_t tid = gettid_();
	uint64_t base = 0x0101010101010101ULL * (uint64_t)(id + 1);
	uint64_t out[4], xin[2] = { base ^ 0xdead, base ^ 0xbeef }, xout[2];
	__sync_fetch_and_add(&started, 1);
	asm volatile("mov %[b], %%r12\n\t"
		     "lea 1(%[b]), %%r13\n\t"
		     "lea 2(%[b]), %%r14\n\t"
		     "lea 3(%[b]), %%r15\n\t"
		     "movdqu %[xi], %%xmm7\n\t"
		     "1: pause\n\t"
		     "cmpl $0, %[flag]\n\t"
		     "je 1b\n\t"
		     "mov %%r12, 0(%[o])\n\t"
		     "mov %%r13, 8(%[o])\n\t"
		     "mov %%r14, 16(%[o])\n\t"
		     "mov %%r15, 24(%[o])\n\t"
		     "movdqu %%xmm7, %[xo]\n\t"
		     : [xo] "=m"(xout)
		     : [b] "r"(base), [o] "r"(out), [flag] "m"(stop_all), [xi] "m"(xin)
		     : "r12", "r13", "r14", "r15", "xmm7", "memory");
	for (int k = 0; k < 4; k++)
		if (out[k] != base + k)
			snprintf(errors[id], sizeof(errors[id]), "thread %d: r%d %llx", id, 12 + k,
				 (unsigned long long)out[k]);
	if (xout[0] != xin[0] || xout[1] != xin[1])
		snprintf(errors[id], sizeof(errors[id]), "thread %d: xmm7", id);
	check_self(id, tid, name);
	return NULL;
}

static void *mutex_waiter(void *arg)
{
	(void)arg;
	pthread_setname_np(pthread_self(), "mutex-wait");
	pid_t tid = gettid_();
	__sync_fetch_and_add(&started, 1);
	pthread_mutex_lock(&m);
	pthread_mutex_unlock(&m);
	check_self(SPINNERS, tid, "mutex-wait");
	return NULL;
}

static void *cond_waiter(void *arg)
{
	(void)arg;
	pthread_setname_np(pthread_self(), "cond-wait");
	pid_t tid = gettid_();
	pthread_mutex_lock(&cm);
	__sync_fetch_and_add(&started, 1);
	while (!pred)
		pthread_cond_wait(&cv, &cm);
	pthread_mutex_unlock(&cm);
	check_self(SPINNERS + 1, tid, "cond-wait");
	return NULL;
}

int main(void)
{
	test_init();
	/* Only the main thread takes SIGTERM; the others keep it blocked. */
	sigset_t term;
	sigemptyset(&term);
	sigaddset(&term, SIGTERM);
	pthread_sigmask(SIG_BLOCK, &term, NULL);
	pthread_t th[SPINNERS + 2];
	pthread_mutex_lock(&m);
	for (long i = 0; i < SPINNERS; i++)
		pthread_create(&th[i], NULL, spinner, (void *)i);
	pthread_create(&th[SPINNERS], NULL, mutex_waiter, NULL);
	pthread_create(&th[SPINNERS + 1], NULL, cond_waiter, NULL);
	while (started < SPINNERS + 2)
		usleep(1000);
	usleep(50000); /* let the waiters block in the kernel */
	test_ready();
	test_waitsig();
	stop_all = 1;
	pthread_mutex_unlock(&m);
	pthread_mutex_lock(&cm);
	pred = 1;
	pthread_cond_signal(&cv);
	pthread_mutex_unlock(&cm);
	for (int i = 0; i < SPINNERS + 2; i++)
		pthread_join(th[i], NULL);
	for (int i = 0; i < SPINNERS + 2; i++)
		if (errors[i][0])
			fail("%s", errors[i]);
	pass();
}
