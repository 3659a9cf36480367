/* Memory shared copy-on-write between a parent and its children: the
 * parent fills a region and forks 4 children; then the parent changes a
 * page, child 1 changes pages of its own, child 3 drops pages (they read as
 * zeros for it). After restore each process checks every page of its view.
 * The runner compares the tree's RSS/PSS before and after: what was shared
 * must still be shared. argv[1]: region size in MiB. */
#include "zdtmlib.h"
#include <sys/mman.h>
#include <sys/wait.h>

#define NCHILD 4
#define PAGE 4096

static char *region;
static long npages;

static unsigned long base_value(long i) { return 0x9e3779b97f4a7c15UL * (i + 1); }

/* What page i holds for process `who` (-1: parent). */
static unsigned long expected(int who, long i)
{
	if (who == -1 && i == 7)
		return 0xfeed;
	if (who == 1 && i >= 10 && i < 15)
		return 0xc0ffee + i;
	if (who == 3 && i >= 100 && i < 110)
		return 0;
	return base_value(i);
}

static int check(int who)
{
	for (long i = 0; i < npages; i++) {
		unsigned long v = *(unsigned long *)(region + i * PAGE);
		if (v != expected(who, i)) {
			printf("process %d: page %ld holds %#lx, want %#lx\n", who, i, v, expected(who, i));
			return 0;
		}
	}
	return 1;
}

int main(int argc, char **argv)
{
	test_init();
	long mib = argc > 1 ? atol(argv[1]) : 64;
	npages = mib * 256;
	region = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (region == MAP_FAILED)
		fail("mmap: %m");
	for (long i = 0; i < npages; i++)
		*(unsigned long *)(region + i * PAGE) = base_value(i);
	int ready[2];
	if (pipe(ready))
		fail("pipe: %m");
	pid_t child[NCHILD];
	for (int c = 0; c < NCHILD; c++) {
		child[c] = fork();
		if (child[c] == 0) {
			if (c == 1)
				for (long i = 10; i < 15; i++)
					*(unsigned long *)(region + i * PAGE) = 0xc0ffee + i;
			if (c == 3)
				madvise(region + 100 * PAGE, 10 * PAGE, MADV_DONTNEED);
			write(ready[1], "r", 1);
			test_waitsig();
			_exit(check(c) ? 0 : 1);
		}
	}
	for (int c = 0; c < NCHILD; c++) {
		char b;
		if (read(ready[0], &b, 1) != 1)
			fail("a child did not start");
	}
	*(unsigned long *)(region + 7 * PAGE) = 0xfeed;
	test_ready();
	test_waitsig();
	if (!check(-1))
		fail("the parent's memory differs");
	for (int c = 0; c < NCHILD; c++) {
		int st;
		kill(child[c], SIGTERM);
		if (waitpid(child[c], &st, 0) != child[c] || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
			fail("child %d's memory differs (status %#x)", c, st);
	}
	pass();
}
