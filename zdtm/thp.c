/* Transparent huge pages: a region with MADV_HUGEPAGE, filled with a known
 * pattern, is backed by huge pages before the dump; after the restore the
 * same region holds the same bytes and is backed by huge pages again at
 * once (AnonHugePages in /proc/self/smaps), not by 4 KiB pages waiting for
 * khugepaged. Fails before the dump if the kernel gives no huge pages. */
#include "zdtmlib.h"
#include <stdint.h>
#include <sys/mman.h>

#define HUGE (2UL << 20)
#define LEN (16 * HUGE)

/* AnonHugePages (kB) of the VMA holding p. */
static long anon_huge_kb(void *p)
{
	FILE *f = fopen("/proc/self/smaps", "r");
	char line[512];
	int in = 0;
	long kb = -1;
	while (f && fgets(line, sizeof(line), f)) {
		unsigned long s, e;
		if (sscanf(line, "%lx-%lx ", &s, &e) == 2) {
			in = (unsigned long)p >= s && (unsigned long)p < e;
			continue;
		}
		if (in && sscanf(line, "AnonHugePages: %ld kB", &kb) == 1)
			break;
	}
	if (f)
		fclose(f);
	return kb;
}

int main(void)
{
	test_init();
	/* Twice the length, to carve out a huge-page-aligned region. */
	char *raw = mmap(NULL, LEN + HUGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (raw == MAP_FAILED)
		fail("mmap");
	uint64_t *m = (uint64_t *)(((uintptr_t)raw + HUGE - 1) & ~(HUGE - 1));
	if (madvise(m, LEN, MADV_HUGEPAGE))
		fail("MADV_HUGEPAGE");
	for (size_t i = 0; i < LEN / 8; i++)
		m[i] = i * 0x9e3779b97f4a7c15ULL;
	long before = anon_huge_kb(m);
	if (before <= 0)
		fail("no huge pages before the dump (AnonHugePages %ld kB); is THP enabled?", before);
	test_ready();
	test_waitsig();
	long after = anon_huge_kb(m);
	for (size_t i = 0; i < LEN / 8; i++)
		if (m[i] != i * 0x9e3779b97f4a7c15ULL)
			fail("word %zu", i);
	if (after < before / 2)
		fail("AnonHugePages %ld kB after the restore, %ld kB before", after, before);
	pass();
}
