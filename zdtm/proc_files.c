/* Files under /proc of tasks of the tree, and of a task that died:
 *  - the parent holds /proc/self/stat, /proc/self/maps read part way (its
 *    offset kept), /proc/self/fdinfo/N of an eventfd at a higher fd N,
 *    /proc/self/ns/net, and /proc/CHILD/stat of its first child;
 *  - the parent holds /proc/TID/comm of a thread of its first child (made
 *    again only by the child's restorer: the parent waits for it), and the
 *    child its parent's /proc/PID/fdinfo/N of the eventfd;
 *  - the second child's working directory is /proc/G of a grandchild G
 *    that has died since (it reads "/proc/G (deleted)").
 * After restore each file shows its task's state as it is now, the
 * namespace file is the task's network namespace, and the cwd is still an
 * unhashed /proc directory.
 * "shared": a child inherits the parent's /proc/self/stat, which the dump
 * refuses. "thread": a thread holds /proc/thread-self/stat (its own
 * thread's file), which the dump refuses. */
#include "zdtmlib.h"
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>

static volatile pid_t worker_tid;

static void *worker(void *arg)
{
	test_thread_ignores_sigterm();
	pthread_setname_np(pthread_self(), arg);
	worker_tid = (pid_t)syscall(SYS_gettid);
	if (getenv("PROC_FILES_THREAD_SELF") && open("/proc/thread-self/stat", O_RDONLY) < 0)
		worker_tid = -1;
	for (;;)
		pause();
	return NULL;
}

/* The first field of a /proc/PID/stat file, read from its start. */
static int stat_pid(int fd)
{
	char b[64] = { 0 };
	if (pread(fd, b, sizeof(b) - 1, 0) <= 0)
		return -1;
	return atoi(b);
}

static void wait_go(int go)
{
	char x;
	if (read(go, &x, 1) != 1)
		_exit(2);
}

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "";
	test_init();
	if (!strcmp(mode, "thread"))
		setenv("PROC_FILES_THREAD_SELF", "1", 1);
	pthread_t th;
	if (pthread_create(&th, NULL, worker, "worker"))
		fail("pthread_create");
	while (!worker_tid)
		usleep(1000);
	if (worker_tid < 0)
		fail("open thread-self");

	int self_stat = open("/proc/self/stat", O_RDONLY);
	int maps = open("/proc/self/maps", O_RDONLY);
	char first[256] = { 0 };
	if (self_stat < 0 || maps < 0 || read(maps, first, 100) != 100)
		fail("opening /proc/self files");
	int ev = eventfd(7, 0);
	int evfd = 80;
	if (ev < 0 || dup2(ev, evfd) != evfd)
		fail("eventfd");
	close(ev);
	char p[64];
	snprintf(p, sizeof(p), "/proc/self/fdinfo/%d", evfd);
	int info = open(p, O_RDONLY);
	int net = open("/proc/self/ns/net", O_RDONLY);
	if (info < 0 || net < 0)
		fail("opening fdinfo, ns/net");

	int go[2], tell[2];
	if (pipe(go) || pipe(tell))
		fail("pipe");
	pid_t parent = getpid();

	/* First child: a thread of its parent's comm. */
	pid_t c1 = fork();
	if (c1 == 0) {
		close(go[1]);
		/* "shared": it keeps the parent's /proc/self/stat. */
		if (strcmp(mode, "shared"))
			close(self_stat);
		close(maps);
		close(info);
		/* A thread of its own, whose comm the parent holds. */
		worker_tid = 0;
		if (pthread_create(&th, NULL, worker, "c1-worker"))
			_exit(9);
		while (!worker_tid)
			usleep(1000);
		pid_t mine = worker_tid;
		if (write(tell[1], &mine, sizeof(mine)) != sizeof(mine))
			_exit(10);
		char path[64], b[512] = { 0 };
		snprintf(path, sizeof(path), "/proc/%d/fdinfo/%d", parent, evfd);
		int pinfo = open(path, O_RDONLY);
		if (pinfo < 0)
			_exit(3);
		wait_go(go[0]);
		if (pread(pinfo, b, sizeof(b) - 1, 0) <= 0 || !strstr(b, "eventfd-count:"))
			_exit(4);
		_exit(0);
	}
	/* Second child: in /proc of its dead child. */
	pid_t c2 = fork();
	if (c2 == 0) {
		close(go[1]);
		close(self_stat);
		close(maps);
		close(info);
		pid_t g = fork();
		if (g == 0) {
			pause();
			_exit(0);
		}
		char dir[64], was[PATH_MAX] = { 0 }, now[PATH_MAX] = { 0 }, cwd[PATH_MAX];
		snprintf(dir, sizeof(dir), "/proc/%d", g);
		if (chdir(dir))
			_exit(5);
		kill(g, SIGKILL);
		waitpid(g, NULL, 0);
		if (readlink("/proc/self/cwd", was, sizeof(was) - 1) < 0)
			_exit(6);
		wait_go(go[0]);
		if (getcwd(cwd, sizeof(cwd)) || errno != ENOENT)
			_exit(7);
		if (readlink("/proc/self/cwd", now, sizeof(now) - 1) < 0 || strcmp(was, now))
			_exit(8);
		_exit(0);
	}
	close(go[0]);
	snprintf(p, sizeof(p), "/proc/%d/stat", c1);
	int child_stat = open(p, O_RDONLY);
	if (child_stat < 0)
		fail("open %s", p);
	pid_t c1_tid;
	if (read(tell[0], &c1_tid, sizeof(c1_tid)) != sizeof(c1_tid))
		fail("the child's thread");
	snprintf(p, sizeof(p), "/proc/%d/comm", c1_tid);
	int child_comm = open(p, O_RDONLY);
	if (child_comm < 0)
		fail("open %s", p);
	struct stat ns_before;
	fstat(net, &ns_before);

	test_ready();
	test_waitsig();

	/* While the child lives. */
	if (stat_pid(child_stat) != c1)
		fail("/proc/%d/stat is not the child's", c1);
	char comm[32] = { 0 };
	if (pread(child_comm, comm, sizeof(comm) - 1, 0) <= 0 || strcmp(comm, "c1-worker\n"))
		fail("/proc/%d/comm reads %s", c1_tid, comm);
	if (write(go[1], "gg", 2) != 2)
		fail("go");
	for (int i = 0; i < 2; i++) {
		pid_t c = i ? c2 : c1;
		int st;
		if (waitpid(c, &st, 0) != c || !WIFEXITED(st) || WEXITSTATUS(st))
			fail("child %d failed its checks (status %x)", c, st);
	}
	if (stat_pid(self_stat) != parent || getpid() != parent)
		fail("/proc/self/stat is not this task's");
	if (lseek(maps, 0, SEEK_CUR) != 100)
		fail("maps offset %ld", (long)lseek(maps, 0, SEEK_CUR));
	char again[256] = { 0 };
	if (pread(maps, again, 100, 0) != 100 || strcmp(first, again))
		fail("maps begins with %s, was %s", again, first);
	uint64_t add = 5;
	if (write(evfd, &add, 8) != 8)
		fail("eventfd write");
	char text[512] = { 0 };
	if (pread(info, text, sizeof(text) - 1, 0) <= 0 || !strstr(text, "eventfd-count:"))
		fail("fdinfo of fd %d reads %s", evfd, text);
	char *cnt = strstr(text, "eventfd-count:") + strlen("eventfd-count:");
	if (strtoull(cnt, NULL, 16) != 12)
		fail("fdinfo of fd %d shows count %s, 12 expected", evfd, cnt);
	struct stat ns_now, ns_self;
	if (fstat(net, &ns_now) || stat("/proc/self/ns/net", &ns_self) || ns_now.st_ino != ns_before.st_ino ||
	    ns_now.st_ino != ns_self.st_ino)
		fail("the ns/net file is another namespace");
	pass();
}
