/* Seccomp filters threads share. The main thread installs three filters
 * and starts two threads, which inherit them (one chain, shared); then it
 * adds a fourth of its own. Two of the shared filters fail getpriority,
 * with different errnos: the newest one's tells the filters' order. After restore, a filter the main thread adds with
 * SECCOMP_FILTER_FLAG_TSYNC is accepted (the kernel refuses it, returning
 * a thread's TID, unless every thread's chain is an ancestor of the
 * caller's) and reaches both threads, with the main thread's own third
 * filter. One shared filter denies sched_setscheduler, which the restorer
 * of every thread calls after the shared filters are in place: the restore
 * itself must not be filtered. */
#include "zdtmlib.h"
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <sched.h>
#include <stddef.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/sysinfo.h>

#define THREADS 2
#define AFTER 100 /* the step after the TSYNC filter */

/* Installs a filter failing syscall nr with err; returns seccomp()'s result. */
static long deny(int nr, int err, unsigned flags)
{
	struct sock_filter f[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, nr, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | err),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	struct sock_fprog prog = { sizeof(f) / sizeof(f[0]), f };
	return syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, &prog);
}

/* The errno a syscall fails with, 0 when it works. */
static int getpriority_errno(void)
{
	errno = 0;
	return syscall(SYS_getpriority, PRIO_PROCESS, 0) < 0 ? errno : 0;
}
static int sched_errno(void)
{
	struct sched_param p = { 0 };
	return syscall(SYS_sched_setscheduler, 0, SCHED_OTHER, &p) < 0 ? errno : 0;
}
static int umask_errno(void)
{
	long r = syscall(SYS_umask, 022);
	if (r < 0)
		return errno;
	syscall(SYS_umask, r);
	return 0;
}
static int sysinfo_errno(void)
{
	struct sysinfo si;
	return syscall(SYS_sysinfo, &si) < 0 ? errno : 0;
}

static int nr_filters(pid_t tid)
{
	char path[64], line[256];
	snprintf(path, sizeof(path), "/proc/self/task/%d/status", tid);
	FILE *f = fopen(path, "r");
	int n = -1;
	while (f && fgets(line, sizeof(line), f))
		sscanf(line, "Seccomp_filters: %d", &n);
	if (f)
		fclose(f);
	return n;
}

static volatile int step;
static volatile pid_t tids[THREADS];
static char msg[THREADS][200];

static void *worker(void *arg)
{
	int i = (long)arg;
	test_thread_ignores_sigterm();
	tids[i] = syscall(SYS_gettid);
	while (step < 1)
		usleep(1000);
	/* Before the TSYNC filter: the shared filters only. */
	int a = getpriority_errno(), b = sched_errno(), c = umask_errno(), d = sysinfo_errno();
	if (a != 75 || b != 76 || c != 0 || d != 0) {
		snprintf(msg[i], sizeof(msg[i]), "thread %d before TSYNC: getpriority %d sched %d umask %d sysinfo %d",
			 i, a, b, c, d);
		return NULL;
	}
	__sync_fetch_and_add(&step, 1);
	while (step < AFTER)
		usleep(1000);
	/* After: the main thread's whole chain, its own filter included. */
	a = getpriority_errno(), b = sched_errno(), c = umask_errno(), d = sysinfo_errno();
	if (a != 75 || b != 76 || c != 78 || d != 79)
		snprintf(msg[i], sizeof(msg[i]), "thread %d after TSYNC: getpriority %d sched %d umask %d sysinfo %d",
			 i, a, b, c, d);
	return NULL;
}

int main(void)
{
	test_init();
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
		fail("no_new_privs: %m");
	if (deny(SYS_getpriority, 77, 0) || deny(SYS_sched_setscheduler, 76, 0) || deny(SYS_getpriority, 75, 0))
		fail("seccomp: %m");
	pthread_t th[THREADS];
	for (long i = 0; i < THREADS; i++)
		pthread_create(&th[i], NULL, worker, (void *)i);
	for (int i = 0; i < THREADS; i++)
		while (!tids[i])
			usleep(1000);
	if (deny(SYS_umask, 78, 0))
		fail("seccomp: %m");
	test_ready();
	test_waitsig();

	if (getpriority_errno() != 75 || sched_errno() != 76 || umask_errno() != 78 || sysinfo_errno() != 0)
		fail("main before TSYNC: getpriority %d sched %d umask %d sysinfo %d", getpriority_errno(),
		     sched_errno(), umask_errno(), sysinfo_errno());
	for (int i = 0; i < THREADS; i++)
		if (nr_filters(tids[i]) != 3)
			fail("thread %d has %d filters, not 3", i, nr_filters(tids[i]));
	if (nr_filters(getpid()) != 4)
		fail("the main thread has %d filters, not 4", nr_filters(getpid()));
	step = 1;
	while (step < 1 + THREADS)
		usleep(1000);
	for (int i = 0; i < THREADS; i++)
		if (msg[i][0])
			fail("%s", msg[i]);

	long r = deny(SYS_sysinfo, 79, SECCOMP_FILTER_FLAG_TSYNC);
	if (r > 0)
		fail("TSYNC refused: thread %ld does not share the main thread's filters", r);
	if (r < 0)
		fail("TSYNC filter: %m");
	for (int i = 0; i < THREADS; i++)
		if (nr_filters(tids[i]) != 5)
			fail("thread %d has %d filters after TSYNC, not 5", i, nr_filters(tids[i]));
	step = AFTER;
	for (int i = 0; i < THREADS; i++)
		pthread_join(th[i], NULL);
	for (int i = 0; i < THREADS; i++)
		if (msg[i][0])
			fail("%s", msg[i]);
	if (sysinfo_errno() != 79)
		fail("main after TSYNC: sysinfo %d", sysinfo_errno());
	pass();
}
