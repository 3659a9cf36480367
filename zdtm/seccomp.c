/* Seccomp: the main thread has two filters (one inherited by its thread),
 * the thread one more of its own under no_new_privs, and a child runs in
 * strict mode, blocked in read(). After restore every filter still answers
 * with its errno in the right threads only, and the child is still strict:
 * it answers over a pipe and is killed by its next syscall. */
#include "zdtmlib.h"
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <stddef.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/sysinfo.h>
#include <sys/wait.h>

static void deny(int nr, int err)
{
	struct sock_filter f[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, nr, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | err),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	struct sock_fprog prog = { sizeof(f) / sizeof(f[0]), f };
	if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog))
		fail("seccomp: %m");
}

/* errno a syscall fails with, 0 when it works. */
static int getpriority_errno(void)
{
	errno = 0;
	return syscall(SYS_getpriority, PRIO_PROCESS, 0) < 0 ? errno : 0;
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

static volatile int go, thread_err;
static volatile pid_t thread_tid;
static char thread_msg[256];

static void *worker(void *arg)
{
	(void)arg;
	test_thread_ignores_sigterm();
	prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
	deny(SYS_sysinfo, 79);
	thread_tid = syscall(SYS_gettid);
	while (!go)
		usleep(1000);
	int a = getpriority_errno(), b = sysinfo_errno(), c = umask_errno();
	if (a != 77 || b != 79 || c != 0 || !prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0)) {
		snprintf(thread_msg, sizeof(thread_msg), "thread: getpriority %d sysinfo %d umask %d nnp %d", a, b, c,
			 prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0));
		thread_err = 1;
	}
	return NULL;
}

int main(void)
{
	test_init();
	int p2c[2], c2p[2];
	if (pipe(p2c) || pipe(c2p))
		fail("pipe: %m");
	pid_t child = fork();
	if (child == 0) {
		char b;
		prctl(PR_SET_SECCOMP, SECCOMP_MODE_STRICT);
		if (read(p2c[0], &b, 1) != 1)
			syscall(SYS_exit, 3);
		b++;
		write(c2p[1], &b, 1);
		syscall(SYS_getpid); /* strict mode: SIGKILL here */
		syscall(SYS_exit, 0);
	}
	deny(SYS_getpriority, 77);
	pthread_t th;
	pthread_create(&th, NULL, worker, NULL);
	while (!thread_tid)
		usleep(1000);
	deny(SYS_umask, 78);
	test_ready();
	test_waitsig();

	if (getpriority_errno() != 77 || umask_errno() != 78 || sysinfo_errno() != 0)
		fail("main: getpriority %d umask %d sysinfo %d", getpriority_errno(), umask_errno(),
		     sysinfo_errno());
	if (nr_filters(getpid()) != 2 || nr_filters(thread_tid) != 2)
		fail("filter counts: main %d thread %d", nr_filters(getpid()), nr_filters(thread_tid));
	go = 1;
	pthread_join(th, NULL);
	if (thread_err)
		fail("%s", thread_msg);
	char b = 'x';
	if (write(p2c[1], &b, 1) != 1 || read(c2p[0], &b, 1) != 1 || b != 'y')
		fail("the strict child did not answer");
	int st;
	waitpid(child, &st, 0);
	if (!WIFSIGNALED(st) || WTERMSIG(st) != SIGKILL)
		fail("the child is no longer in strict mode (status %#x)", st);
	pass();
}
