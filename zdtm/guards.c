/* Guard regions (MADV_GUARD_INSTALL, Linux 6.13) in private anonymous
 * memory and a MAP_DROPPABLE mapping. After restore the guarded pages
 * still fault and the pages around them keep their data; the droppable
 * mapping is still droppable (smaps "dp") and usable. A kernel without
 * guard regions skips that part (and says so). */
#include "zdtmlib.h"
#include <setjmp.h>
#include <sys/mman.h>

#ifndef MADV_GUARD_INSTALL
#define MADV_GUARD_INSTALL 102
#endif
#ifndef MAP_DROPPABLE
#define MAP_DROPPABLE 0x08
#endif

static sigjmp_buf jb;
static void on_segv(int s) { (void)s; siglongjmp(jb, 1); }

static int faults(volatile char *p)
{
	if (sigsetjmp(jb, 1))
		return 1;
	*p = 1;
	return 0;
}

static int vma_has_flag(void *addr, const char *flag)
{
	FILE *f = fopen("/proc/self/smaps", "r");
	char line[512];
	int in = 0, found = 0;
	while (f && fgets(line, sizeof(line), f)) {
		unsigned long s, e;
		if (sscanf(line, "%lx-%lx ", &s, &e) == 2 && strchr(line, '-') < strchr(line, ' '))
			in = (unsigned long)addr >= s && (unsigned long)addr < e;
		else if (in && !strncmp(line, "VmFlags:", 8))
			found = strstr(line, flag) != NULL;
	}
	if (f)
		fclose(f);
	return found;
}

int main(void)
{
	test_init();
	long pg = sysconf(_SC_PAGESIZE);
	char *m = mmap(NULL, 6 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (m == MAP_FAILED)
		fail("mmap");
	for (int i = 0; i < 6; i++)
		memset(m + i * pg, 'a' + i, pg);
	int guards = madvise(m + pg, pg, MADV_GUARD_INSTALL) == 0 &&
		     madvise(m + 4 * pg, pg, MADV_GUARD_INSTALL) == 0;
	if (!guards)
		printf("skipped: no guard regions on this kernel\n");
	char *d = mmap(NULL, pg, PROT_READ | PROT_WRITE, MAP_DROPPABLE | MAP_ANONYMOUS, -1, 0);
	if (d == MAP_FAILED)
		fail("MAP_DROPPABLE");
	strcpy(d, "droppable");
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_segv;
	sa.sa_flags = SA_NODEFER;
	sigaction(SIGSEGV, &sa, NULL);
	test_ready();
	test_waitsig();

	for (int i = 0; i < 6; i++) {
		if (guards && (i == 1 || i == 4)) {
			if (!faults(m + i * pg))
				fail("page %d is no guard any more", i);
			continue;
		}
		for (long j = 0; j < pg; j++)
			if (m[i * pg + j] != 'a' + i)
				fail("page %d byte %ld: %c", i, j, m[i * pg + j]);
		if (faults(m + i * pg))
			fail("page %d faults", i);
	}
	if (!vma_has_flag(d, "dp"))
		fail("the droppable mapping is not droppable any more");
	/* Its contents may be dropped (crust does not store them): it must
	 * only read as what was written or as zeros. */
	if (d[0] && strcmp(d, "droppable"))
		fail("droppable memory holds %.16s", d);
	strcpy(d, "still usable");
	pass();
}
