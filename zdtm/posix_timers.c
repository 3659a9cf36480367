/* POSIX timers on several clocks and notify modes, with sparse ids; one
 * signals a thread of its own, one has its signal pending (blocked) at the
 * dump, and one runs a function in glibc's timer thread every millisecond
 * (SIGEV_THREAD: glibc's own signal 32, which it never lets a program
 * block; it fires while the restore runs). After restore every timer_t handle still names its timer, with its
 * clock, interval and remaining time, and the signals keep coming, with
 * their sigev_value, to the thread they target. */
#include "zdtmlib.h"
#include <pthread.h>
#include <sys/syscall.h>
#include <time.h>

#define SIG_PERIODIC (SIGRTMIN + 1)
#define SIG_PENDING (SIGRTMIN + 2)

static volatile sig_atomic_t periodic_hits, periodic_bad, thread_hits, thread_bad, pending_hits,
	pending_bad;
static volatile pid_t worker_tid;

static void on_periodic(int sig, siginfo_t *si, void *uc)
{
	(void)sig, (void)uc;
	if (si->si_code != SI_TIMER || si->si_value.sival_int != 0xA)
		periodic_bad = 1;
	periodic_hits++;
}

static void on_thread(int sig, siginfo_t *si, void *uc)
{
	(void)sig, (void)uc;
	if (syscall(SYS_gettid) != worker_tid || si->si_value.sival_int != 0xB)
		thread_bad = 1;
	thread_hits++;
}

static void on_pending(int sig, siginfo_t *si, void *uc)
{
	(void)sig, (void)uc;
	if (si->si_value.sival_int != 0xF)
		pending_bad = 1;
	pending_hits++;
}

static volatile int glibc_hits, glibc_bad;

static void on_glibc_timer(union sigval v)
{
	if (v.sival_int != 0xC)
		glibc_bad = 1;
	__atomic_add_fetch(&glibc_hits, 1, __ATOMIC_RELAXED);
}

static void *worker(void *arg)
{
	(void)arg;
	test_thread_ignores_sigterm();
	sigset_t usr1;
	sigemptyset(&usr1);
	sigaddset(&usr1, SIGUSR1);
	pthread_sigmask(SIG_UNBLOCK, &usr1, NULL);
	worker_tid = syscall(SYS_gettid);
	for (;;)
		pause();
	return NULL;
}

static timer_t make(clockid_t clock, int notify, int sig, int value, pid_t tid)
{
	struct sigevent sev;
	memset(&sev, 0, sizeof(sev));
	sev.sigev_notify = notify;
	sev.sigev_signo = sig;
	sev.sigev_value.sival_int = value;
	sev._sigev_un._tid = tid;
	timer_t t;
	if (timer_create(clock, &sev, &t))
		fail("timer_create(%d): %m", clock);
	return t;
}

static void arm(timer_t t, long value_ms, long interval_ms)
{
	struct itimerspec its = {
		{ interval_ms / 1000, (interval_ms % 1000) * 1000000 },
		{ value_ms / 1000, (value_ms % 1000) * 1000000 },
	};
	if (timer_settime(t, 0, &its, NULL))
		fail("timer_settime: %m");
}

static double secs(struct timespec ts) { return ts.tv_sec + ts.tv_nsec / 1e9; }

static void expect(const char *name, timer_t t, double value_min, double value_max, double interval)
{
	struct itimerspec its;
	if (timer_gettime(t, &its))
		fail("%s: timer_gettime: %m (the id is gone)", name);
	double v = secs(its.it_value), iv = secs(its.it_interval);
	if (v < value_min || v > value_max || iv < interval - 1e-9 || iv > interval + 1e-9)
		fail("%s: value %.3f (want %.3f..%.3f), interval %.3f (want %.3f)", name, v, value_min,
		     value_max, iv, interval);
}

static void handle(int sig, void (*fn)(int, siginfo_t *, void *))
{
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = fn;
	sa.sa_flags = SA_SIGINFO | SA_RESTART;
	sigaction(sig, &sa, NULL);
}

int main(void)
{
	test_init();
	handle(SIG_PERIODIC, on_periodic);
	handle(SIGUSR1, on_thread);
	handle(SIG_PENDING, on_pending);
	sigset_t blk;
	sigemptyset(&blk);
	sigaddset(&blk, SIGUSR1);
	sigaddset(&blk, SIG_PENDING);
	sigprocmask(SIG_BLOCK, &blk, NULL); /* SIGUSR1 is the worker's */
	pthread_t th;
	pthread_create(&th, NULL, worker, NULL);
	while (!worker_tid)
		usleep(1000);

	/* Sparse ids: the holes come from deleted timers. */
	timer_t gap[4];
	for (int i = 0; i < 4; i++)
		gap[i] = make(CLOCK_MONOTONIC, SIGEV_NONE, 0, 0, 0);
	timer_t periodic = make(CLOCK_MONOTONIC, SIGEV_SIGNAL, SIG_PERIODIC, 0xA, 0);
	timer_delete(gap[1]);
	timer_delete(gap[2]);
	timer_t to_thread = make(CLOCK_REALTIME, SIGEV_THREAD_ID, SIGUSR1, 0xB, worker_tid);
	timer_t hour = make(CLOCK_BOOTTIME, SIGEV_SIGNAL, SIGUSR2, 0, 0);
	timer_t idle = make(CLOCK_REALTIME, SIGEV_NONE, 0, 0, 0);
	timer_t cpu = make(CLOCK_PROCESS_CPUTIME_ID, SIGEV_NONE, 0, 0, 0);
	timer_t pending = make(CLOCK_MONOTONIC, SIGEV_SIGNAL, SIG_PENDING, 0xF, 0);
	arm(periodic, 20, 20);
	arm(to_thread, 30, 30);
	arm(hour, 3600 * 1000, 0);
	arm(cpu, 100 * 1000, 7 * 1000);
	arm(pending, 1, 1);
	struct sigevent tev;
	memset(&tev, 0, sizeof(tev));
	tev.sigev_notify = SIGEV_THREAD;
	tev.sigev_notify_function = on_glibc_timer;
	tev.sigev_value.sival_int = 0xC;
	timer_t glibc_timer;
	if (timer_create(CLOCK_MONOTONIC, &tev, &glibc_timer))
		fail("timer_create(SIGEV_THREAD): %m");
	arm(glibc_timer, 1, 1);
	while (periodic_hits < 3 || thread_hits < 3 || glibc_hits < 3)
		usleep(1000);

	test_ready();
	test_waitsig();

	/* Every handle names its timer, as it was. */
	expect("periodic", periodic, 0, 0.020, 0.020);
	expect("to_thread", to_thread, 0, 0.030, 0.030);
	expect("hour", hour, 3000, 3600, 0);
	expect("idle", idle, 0, 0, 0);
	expect("cpu", cpu, 90, 100, 7);
	expect("gap0", gap[0], 0, 0, 0);
	expect("gap3", gap[3], 0, 0, 0);
	struct itimerspec its;
	if (timer_gettime(gap[1], &its) == 0)
		fail("a deleted timer's id came back");
	/* The pending signal is still pending, and is delivered when unblocked. */
	sigset_t pend;
	sigpending(&pend);
	if (!sigismember(&pend, SIG_PENDING))
		fail("the timer signal pending at the dump is gone");
	sigset_t pending_sig;
	sigemptyset(&pending_sig);
	sigaddset(&pending_sig, SIG_PENDING);
	pthread_sigmask(SIG_UNBLOCK, &pending_sig, NULL);
	if (pending_hits < 1)
		fail("the pending timer signal was not delivered");
	/* The timers keep firing, to the right thread. */
	int p0 = periodic_hits, t0 = thread_hits, q0 = pending_hits, g0 = glibc_hits;
	for (int i = 0; i < 2000 && (periodic_hits < p0 + 3 || thread_hits < t0 + 3 ||
				    pending_hits < q0 + 3 || glibc_hits < g0 + 3); i++)
		usleep(1000);
	if (periodic_hits < p0 + 3 || thread_hits < t0 + 3 || pending_hits < q0 + 3 || glibc_hits < g0 + 3)
		fail("timers stopped firing: periodic %d->%d thread %d->%d pending %d->%d glibc %d->%d",
		     p0, periodic_hits, t0, thread_hits, q0, pending_hits, g0, glibc_hits);
	if (periodic_bad || thread_bad || pending_bad || glibc_bad)
		fail("a timer signal came with the wrong value or to the wrong thread (%d %d %d %d)",
		     periodic_bad, thread_bad, pending_bad, glibc_bad);
	pass();
}
