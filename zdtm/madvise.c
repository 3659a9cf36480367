/* madvise and mlock state of mappings: MADV_DONTFORK, MADV_WIPEONFORK,
 * MADV_HUGEPAGE/NOHUGEPAGE, MADV_DONTDUMP, MADV_SEQUENTIAL/RANDOM,
 * MAP_NORESERVE, mlock and mlock2(MLOCK_ONFAULT),
 * and mlockall(MCL_FUTURE) for mappings made after the restore.
 * After restore each region shows its VmFlags again, holds its data, and a
 * child forked then sees no DONTFORK region and a zeroed WIPEONFORK one. */
#include "zdtmlib.h"
#include <sys/mman.h>
#include <sys/wait.h>

#define LEN (4 << 20)

struct region {
	const char *name;
	int advice; /* -1: mlock, -2: mlock2 on fault */
	const char *flag;
	char *p;
	int mflags; /* extra mmap flags */
};

static struct region regions[] = {
	{ "dontfork", MADV_DONTFORK, "dc", 0 },
	{ "wipeonfork", MADV_WIPEONFORK, "wf", 0 },
	{ "hugepage", MADV_HUGEPAGE, "hg", 0 },
	{ "nohugepage", MADV_NOHUGEPAGE, "nh", 0 },
	{ "dontdump", MADV_DONTDUMP, "dd", 0 },
	{ "locked", -1, "lo", 0 },
	{ "lockonfault", -2, "lf", 0 },
	{ "sequential", MADV_SEQUENTIAL, "sr", 0 },
	{ "random", MADV_RANDOM, "rr", 0 },
	{ "noreserve", 0, "nr", 0, MAP_NORESERVE },
	{ "plain", 0, NULL, 0 },
};
#define NR (int)(sizeof(regions) / sizeof(regions[0]))

/* The VmFlags line of the VMA at p, from /proc/self/smaps. */
static int vma_flags(char *p, char *out, size_t n)
{
	FILE *f = fopen("/proc/self/smaps", "r");
	char line[512];
	int in = 0;
	while (f && fgets(line, sizeof(line), f)) {
		unsigned long s, e;
		/* Only a VMA's first line parses as "start-end". */
		if (sscanf(line, "%lx-%lx ", &s, &e) == 2) {
			in = (unsigned long)p >= s && (unsigned long)p < e;
			continue;
		}
		if (in && !strncmp(line, "VmFlags:", 8)) {
			snprintf(out, n, "%s", line + 8);
			fclose(f);
			return 0;
		}
	}
	if (f)
		fclose(f);
	return -1;
}

static int has_flag(const char *flags, const char *f)
{
	char want[8];
	snprintf(want, sizeof(want), " %s", f);
	const char *h = strstr(flags, want);
	return h && (h[3] == ' ' || h[3] == '\n' || h[3] == 0);
}

static int mapped(char *p)
{
	char flags[512];
	return vma_flags(p, flags, sizeof(flags)) == 0;
}

int main(void)
{
	test_init();
	for (int i = 0; i < NR; i++) {
		/* A guard page between regions keeps the kernel from merging them. */
		char *p = mmap(NULL, LEN + 4096, PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS | regions[i].mflags, -1, 0);
		if (p == MAP_FAILED)
			fail("mmap: %m");
		munmap(p + LEN, 4096);
		regions[i].p = p;
		for (int j = 0; j < LEN; j += 4096)
			p[j] = (char)(i * 31 + j / 4096);
		int r = 0;
		if (regions[i].advice > 0)
			r = madvise(p, LEN, regions[i].advice);
		else if (regions[i].advice == -1)
			r = mlock(p, LEN);
		else if (regions[i].advice == -2)
			r = syscall(325 /* mlock2 */, p, LEN, 1 /* MLOCK_ONFAULT */);
		if (r)
			fail("%s: %m", regions[i].name);
	}
	/* Mappings made from now on are locked (mm-wide, shown nowhere in /proc). */
	if (mlockall(MCL_FUTURE))
		fail("mlockall: %m");
	test_ready();
	test_waitsig();

	for (int i = 0; i < NR; i++) {
		char flags[512];
		if (vma_flags(regions[i].p, flags, sizeof(flags)))
			fail("%s: the region is gone", regions[i].name);
		if (regions[i].flag && !has_flag(flags, regions[i].flag))
			fail("%s: VmFlags%s lacks %s", regions[i].name, flags, regions[i].flag);
		if (!regions[i].flag && (has_flag(flags, "dc") || has_flag(flags, "lo")))
			fail("plain region got flags:%s", flags);
		for (int j = 0; j < LEN; j += 4096)
			if (regions[i].p[j] != (char)(i * 31 + j / 4096))
				fail("%s: data differs at page %d", regions[i].name, j / 4096);
	}
	char *later = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	char lf[512];
	if (later == MAP_FAILED || vma_flags(later, lf, sizeof(lf)) || !has_flag(lf, "lo"))
		fail("mlockall(MCL_FUTURE) was lost: a new mapping shows VmFlags%s", lf);
	pid_t c = fork();
	if (c == 0) {
		if (mapped(regions[0].p))
			_exit(2); /* DONTFORK region inherited */
		for (int j = 0; j < LEN; j += 4096)
			if (regions[1].p[j] != 0)
				_exit(3); /* WIPEONFORK region not wiped */
		if (regions[NR - 1].p[4096] != (char)((NR - 1) * 31 + 1))
			_exit(4);
		_exit(0);
	}
	int st;
	waitpid(c, &st, 0);
	if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
		fail("the child forked after restore saw wrong memory (status %#x)", st);
	pass();
}
