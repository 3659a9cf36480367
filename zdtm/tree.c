/* A 3-level tree of 31 processes talking through shared anonymous memory:
 * root, 5 children, 25 grandchildren. One child leads its own session, one
 * grandchild leads a process group that a sibling joins, and one child is a
 * zombie that the root reaps only after restore. After restore every task
 * checks its PID, parent, session and group, and answers the root through
 * the shared memory; then the tree winds down and the root collects every
 * exit status. */
#include "zdtmlib.h"
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>

#define KIDS 5
#define N (1 + KIDS + KIDS * KIDS)

struct shm {
	volatile int phase;
	volatile int ack[N];
	volatile long beat[N];
	pid_t pid[N], ppid[N], pgid[N], sid[N];
};

static struct shm *shm;

static void fail_child(int i, const char *what)
{
	(void)what;
	_exit(10 + (i % 100));
}

static void live(int i)
{
	shm->pid[i] = getpid();
	shm->ppid[i] = getppid();
	shm->pgid[i] = getpgrp();
	shm->sid[i] = getsid(0);
	while (shm->phase == 0) {
		shm->beat[i]++;
		usleep(2000);
	}
	if (getpid() != shm->pid[i] || getppid() != shm->ppid[i])
		fail_child(i, "pid");
	if (getpgrp() != shm->pgid[i] || getsid(0) != shm->sid[i])
		fail_child(i, "group");
	shm->ack[i] = 1;
	while (shm->phase == 1)
		usleep(1000);
}

static int reap_all(void)
{
	int st, bad = 0;
	pid_t p;
	while ((p = wait(&st)) > 0)
		if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
			bad = WIFEXITED(st) ? WEXITSTATUS(st) : 100 + WTERMSIG(st);
	return bad;
}

int main(void)
{
	test_init();
	shm = mmap(NULL, sizeof(*shm), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (shm == MAP_FAILED)
		fail("mmap");
	for (int c = 0; c < KIDS; c++) {
		int ci = 1 + c;
		if (fork() == 0) {
			signal(SIGTERM, SIG_DFL);
			if (c == 1 && setsid() < 0)
				_exit(2);
			for (int g = 0; g < KIDS; g++) {
				int gi = 1 + KIDS + c * KIDS + g;
				if (fork() == 0) {
					if (c == 2 && g == 0)
						setpgid(0, 0);
					if (c == 2 && g == 1) {
						/* join the group of the first grandchild */
						while (!shm->pgid[1 + KIDS + c * KIDS])
							usleep(1000);
						setpgid(0, shm->pid[1 + KIDS + c * KIDS]);
					}
					live(gi);
					_exit(0);
				}
			}
			live(ci);
			_exit(reap_all());
		}
	}
	pid_t zombie = fork();
	if (zombie == 0)
		_exit(7);
	/* Wait until everyone has reported in (and the zombie is dead). */
	for (int i = 1; i < N; i++)
		while (!shm->pid[i] || (i == 1 + KIDS + 2 * KIDS + 1 && shm->pgid[i] != shm->pid[1 + KIDS + 2 * KIDS]))
			usleep(1000);
	for (;;) {
		char path[64], st[512];
		snprintf(path, sizeof(path), "/proc/%d/stat", zombie);
		int fd = open(path, O_RDONLY);
		ssize_t n = fd >= 0 ? read(fd, st, sizeof(st) - 1) : -1;
		if (fd >= 0)
			close(fd);
		if (n > 0) {
			st[n] = 0;
			if (strstr(st, ") Z "))
				break;
		}
		usleep(1000);
	}
	shm->pid[0] = getpid();
	test_ready();
	test_waitsig();

	shm->phase = 1;
	struct timespec t0, t;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (int i = 1; i < N; i++) {
		while (!shm->ack[i]) {
			clock_gettime(CLOCK_MONOTONIC, &t);
			if (t.tv_sec - t0.tv_sec > 20)
				fail("task %d (PID %d) did not answer through shared memory", i, shm->pid[i]);
			usleep(1000);
		}
	}
	int st;
	if (waitpid(zombie, &st, 0) != zombie || !WIFEXITED(st) || WEXITSTATUS(st) != 7)
		fail("the zombie's status is lost");
	shm->phase = 2;
	int bad = reap_all();
	if (bad)
		fail("a task of the tree failed its check (code %d)", bad);
	pass();
}
