/* Scheduling and prctl state, per thread and per process: nice, policy
 * (SCHED_RESET_ON_FORK included) and CPU affinity; timer slack, MCE kill
 * policy, parent-death signal, no_new_privs and securebits per thread;
 * dumpable, child subreaper and THP disable per process; oom_score_adj,
 * the audit login uid and membarrier registrations. */
#include "zdtmlib.h"
#include <pthread.h>
#include <sched.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <linux/securebits.h>
#include <linux/membarrier.h>

#ifndef SCHED_RESET_ON_FORK
#define SCHED_RESET_ON_FORK 0x40000000
#endif
#ifndef MEMBARRIER_CMD_GET_REGISTRATIONS
#define MEMBARRIER_CMD_GET_REGISTRATIONS (1 << 9)
#endif

static int membarrier(int cmd) { return syscall(SYS_membarrier, cmd, 0, 0); }

static volatile int stop_thread;
static char thread_err[128];
static pthread_barrier_t ready;

static int on_cpu_only(int cpu)
{
	cpu_set_t s;
	CPU_ZERO(&s);
	if (sched_getaffinity(0, sizeof(s), &s))
		return 0;
	return CPU_COUNT(&s) == 1 && CPU_ISSET(cpu, &s);
}

static void *worker(void *arg)
{
	(void)arg;
	test_thread_ignores_sigterm();
	struct sched_param p = { 0 };
	if (sched_setscheduler(0, SCHED_BATCH, &p))
		snprintf(thread_err, sizeof(thread_err), "SCHED_BATCH");
	setpriority(PRIO_PROCESS, syscall(SYS_gettid), 7);
	cpu_set_t s;
	CPU_ZERO(&s);
	CPU_SET(1, &s);
	sched_setaffinity(0, sizeof(s), &s);
	prctl(PR_SET_TIMERSLACK, 999);
	prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
	pthread_barrier_wait(&ready);
	while (!stop_thread)
		usleep(1000);
	if (sched_getscheduler(0) != SCHED_BATCH)
		snprintf(thread_err, sizeof(thread_err), "thread policy %d", sched_getscheduler(0));
	else if (getpriority(PRIO_PROCESS, syscall(SYS_gettid)) != 7)
		snprintf(thread_err, sizeof(thread_err), "thread nice");
	else if (!on_cpu_only(1))
		snprintf(thread_err, sizeof(thread_err), "thread affinity");
	else if (prctl(PR_GET_TIMERSLACK) != 999)
		snprintf(thread_err, sizeof(thread_err), "thread timer slack");
	else if (prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1)
		snprintf(thread_err, sizeof(thread_err), "thread no_new_privs");
	return NULL;
}

int main(void)
{
	test_init();
	if (sysconf(_SC_NPROCESSORS_ONLN) < 2)
		fail("needs 2 CPUs");
	pthread_barrier_init(&ready, NULL, 2);
	pthread_t th;
	pthread_create(&th, NULL, worker, NULL);
	pthread_barrier_wait(&ready);
	setpriority(PRIO_PROCESS, syscall(SYS_gettid), 5);
	cpu_set_t s;
	CPU_ZERO(&s);
	CPU_SET(0, &s);
	sched_setaffinity(0, sizeof(s), &s);
	prctl(PR_SET_TIMERSLACK, 12345);
	prctl(PR_SET_PDEATHSIG, SIGUSR1);
	prctl(PR_SET_CHILD_SUBREAPER, 1);
	prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0);
	prctl(PR_MCE_KILL, PR_MCE_KILL_SET, PR_MCE_KILL_EARLY, 0, 0);
	if (prctl(PR_SET_SECUREBITS, SECBIT_NOROOT))
		fail("PR_SET_SECUREBITS");
	/* A real-time task has no timer slack: the RR policy lives in a child. */
	pid_t rt = fork();
	if (rt == 0) {
		struct sched_param rr = { .sched_priority = 3 }, got;
		if (sched_setscheduler(0, SCHED_RR | SCHED_RESET_ON_FORK, &rr))
			_exit(2);
		while (!test_done())
			usleep(1000);
		if (sched_getscheduler(0) != (SCHED_RR | SCHED_RESET_ON_FORK))
			_exit(3);
		if (sched_getparam(0, &got) || got.sched_priority != 3)
			_exit(4);
		_exit(0);
	}
	while (sched_getscheduler(rt) != (SCHED_RR | SCHED_RESET_ON_FORK))
		usleep(1000);
	int mb = MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED | MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED;
	if (membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) ||
	    membarrier(MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED))
		fail("membarrier registration");
	if (membarrier(MEMBARRIER_CMD_GET_REGISTRATIONS) != mb)
		fail("membarrier registrations %x before the dump", membarrier(MEMBARRIER_CMD_GET_REGISTRATIONS));
	FILE *lf = fopen("/proc/self/loginuid", "w");
	if (!lf || fprintf(lf, "4242") < 0 || fclose(lf))
		fail("setting loginuid");
	prctl(PR_SET_DUMPABLE, 0);
	FILE *f = fopen("/proc/self/oom_score_adj", "w");
	if (!f || fprintf(f, "300") < 0 || fclose(f))
		fail("oom_score_adj");
	test_ready();
	test_waitsig();
	stop_thread = 1;
	pthread_join(th, NULL);
	if (thread_err[0])
		fail("%s", thread_err);
	if (getpriority(PRIO_PROCESS, syscall(SYS_gettid)) != 5)
		fail("nice");
	if (!on_cpu_only(0))
		fail("affinity");
	if (prctl(PR_GET_TIMERSLACK) != 12345)
		fail("timer slack %d", prctl(PR_GET_TIMERSLACK));
	int sig = 0;
	prctl(PR_GET_PDEATHSIG, &sig);
	if (sig != SIGUSR1)
		fail("parent-death signal %d", sig);
	int sub = 0;
	prctl(PR_GET_CHILD_SUBREAPER, &sub);
	if (!sub)
		fail("child subreaper");
	if (prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0) != 1)
		fail("THP disable");
	if (prctl(PR_MCE_KILL_GET, 0, 0, 0, 0) != PR_MCE_KILL_EARLY)
		fail("MCE kill policy");
	if (prctl(PR_GET_SECUREBITS) != SECBIT_NOROOT)
		fail("securebits %x", prctl(PR_GET_SECUREBITS));
	if (prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 0)
		fail("no_new_privs leaked to the main thread");
	if (prctl(PR_GET_DUMPABLE) != 0)
		fail("dumpable");
	char buf[16] = { 0 };
	f = fopen("/proc/self/oom_score_adj", "r");
	if (!f || !fgets(buf, sizeof(buf), f) || atoi(buf) != 300)
		fail("oom_score_adj %s", buf);
	fclose(f);
	kill(rt, SIGTERM);
	int st;
	if (waitpid(rt, &st, 0) != rt || !WIFEXITED(st) || WEXITSTATUS(st))
		fail("the SCHED_RR | SCHED_RESET_ON_FORK child: status %x (3: policy, 4: priority)", st);
	if (membarrier(MEMBARRIER_CMD_GET_REGISTRATIONS) != mb)
		fail("membarrier registrations %x", membarrier(MEMBARRIER_CMD_GET_REGISTRATIONS));
	if (membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED))
		fail("membarrier PRIVATE_EXPEDITED after restore");
	memset(buf, 0, sizeof(buf));
	f = fopen("/proc/self/loginuid", "r");
	if (!f || !fgets(buf, sizeof(buf), f) || atoi(buf) != 4242)
		fail("loginuid %s", buf);
	pass();
}
