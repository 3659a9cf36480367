/* Every kind of mapping an ordinary program has: anonymous private and
 * shared, file-backed private (written: private copies) and shared, heap
 * (brk), a deep stack, PROT_NONE memory holding data, a guard page, and the
 * vDSO. Addresses, protections and contents must be identical after restore. */
#include "zdtmlib.h"
#include <sys/auxv.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <stdint.h>

#define PG 4096
#define NPAGES 64

static void fill(unsigned char *p, size_t len, unsigned seed)
{
	for (size_t i = 0; i < len; i++)
		p[i] = (unsigned char)(i * 31 + seed);
}

static void check(const unsigned char *p, size_t len, unsigned seed, const char *what)
{
	for (size_t i = 0; i < len; i++)
		if (p[i] != (unsigned char)(i * 31 + seed))
			fail("%s: byte %zu differs", what, i);
}

static char maps_before[65536];

static void read_maps(char *buf, size_t size)
{
	int fd = open("/proc/self/maps", O_RDONLY);
	size_t off = 0;
	ssize_t n;
	while ((n = read(fd, buf + off, size - off - 1)) > 0)
		off += n;
	buf[off] = 0;
	close(fd);
}

/* The lines for the mappings this test made, by address. */
static int has_line(const char *maps, void *addr, const char *perms)
{
	char key[64];
	snprintf(key, sizeof(key), "%lx-", (unsigned long)addr);
	const char *l = strstr(maps, key);
	return l && !strncmp(strchr(l, ' ') + 1, perms, 4);
}

static int deep(int n, volatile char *out)
{
	volatile char frame[4096];
	frame[0] = (char)n;
	frame[4095] = (char)(n * 3);
	if (n == 0) {
		*out = 1;
		return frame[0];
	}
	return deep(n - 1, out) + frame[0] + frame[4095];
}

int main(void)
{
	test_init();
	const char *dir = getenv("ZDTM_DIR");
	if (!dir)
		fail("ZDTM_DIR unset");
	char path[4096];
	snprintf(path, sizeof(path), "%s/maps.data", dir);
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	if (fd < 0 || ftruncate(fd, NPAGES * PG))
		fail("data file");
	unsigned char *filebuf = malloc(NPAGES * PG);
	fill(filebuf, NPAGES * PG, 7);
	if (pwrite(fd, filebuf, NPAGES * PG, 0) != NPAGES * PG)
		fail("pwrite");

	unsigned char *anon = mmap(NULL, NPAGES * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	unsigned char *shanon = mmap(NULL, NPAGES * PG, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	unsigned char *fpriv = mmap(NULL, NPAGES * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
	unsigned char *fshared = mmap(NULL, NPAGES * PG, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	unsigned char *none = mmap(NULL, 4 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	unsigned char *ro = mmap(NULL, 4 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	unsigned char *sparse = mmap(NULL, 1024 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (anon == MAP_FAILED || shanon == MAP_FAILED || fpriv == MAP_FAILED || fshared == MAP_FAILED ||
	    none == MAP_FAILED || ro == MAP_FAILED || sparse == MAP_FAILED)
		fail("mmap");
	fill(anon, NPAGES * PG, 1);
	fill(shanon, NPAGES * PG, 2);
	/* Private copies of every other page of the file mapping. */
	for (int i = 0; i < NPAGES; i += 2)
		fill(fpriv + i * PG, PG, 3 + i);
	fill(fshared, 8 * PG, 4);
	fill(none, 4 * PG, 5);
	mprotect(none, 4 * PG, PROT_NONE);
	fill(ro, 4 * PG, 6);
	mprotect(ro, 4 * PG, PROT_READ);
	/* A guard page in the middle of the sparse area, a few touched pages. */
	mprotect(sparse + 512 * PG, PG, PROT_NONE);
	sparse[3 * PG] = 0x33;
	sparse[700 * PG] = 0x77;

	unsigned char *heap0 = sbrk(0);
	/* An unaligned break: /proc only shows the page-aligned heap end. */
	unsigned char *heap = sbrk(16 * PG + 100);
	if (heap == (void *)-1)
		fail("sbrk");
	fill(heap, 16 * PG, 8);
	void *brk_before = sbrk(0);
	/* The kernel's own value (glibc's sbrk(0) answers from a cache). */
	long kbrk_before = syscall(SYS_brk, 0);

	volatile char deep_done = 0;
	int deep_sum = deep(64, &deep_done);

	unsigned long vdso = getauxval(AT_SYSINFO_EHDR);
	read_maps(maps_before, sizeof(maps_before));

	test_ready();
	test_waitsig();

	check(anon, NPAGES * PG, 1, "anonymous private");
	check(shanon, NPAGES * PG, 2, "anonymous shared");
	/* Clean pages of a private file mapping show the file as it is now
	 * (the shared mapping below wrote its first pages). */
	if (pread(fd, filebuf, NPAGES * PG, 0) != NPAGES * PG)
		fail("pread");
	for (int i = 0; i < NPAGES; i++) {
		if (i % 2 == 0)
			check(fpriv + i * PG, PG, 3 + i, "file private, written page");
		else if (memcmp(fpriv + i * PG, filebuf + i * PG, PG))
			fail("file private, clean page %d differs from the file", i);
	}
	check(fshared, 8 * PG, 4, "file shared");
	unsigned char tmp[8 * PG];
	if (pread(fd, tmp, 8 * PG, 0) != 8 * PG)
		fail("pread");
	check(tmp, 8 * PG, 4, "file shared, file contents");
	check(ro, 4 * PG, 6, "read-only");
	if (sparse[3 * PG] != 0x33 || sparse[700 * PG] != 0x77 || sparse[100 * PG] != 0)
		fail("sparse area");
	check(heap, 16 * PG, 8, "heap");
	if (sbrk(0) != brk_before)
		fail("brk moved: %p -> %p", brk_before, sbrk(0));
	if (syscall(SYS_brk, 0) != kbrk_before)
		fail("the kernel's brk moved: %lx -> %lx", kbrk_before, syscall(SYS_brk, 0));
	/* The heap can still grow after restore. */
	unsigned char *more = sbrk(4 * PG);
	if (more == (void *)-1 || more != brk_before)
		fail("brk cannot grow after restore");
	fill(more, 4 * PG, 9);
	check(more, 4 * PG, 9, "grown heap");
	(void)heap0;
	if (deep(64, &deep_done) != deep_sum)
		fail("deep stack");
	if (getauxval(AT_SYSINFO_EHDR) != vdso)
		fail("auxv vDSO address changed");
	struct timespec ts;
	if (clock_gettime(CLOCK_MONOTONIC, &ts))
		fail("clock_gettime through the vDSO");

	char maps_after[65536];
	read_maps(maps_after, sizeof(maps_after));
	struct { void *a; const char *p; const char *what; } want[] = {
		{ anon, "rw-p", "anon" }, { shanon, "rw-s", "shared anon" }, { fpriv, "rw-p", "file private" },
		{ fshared, "rw-s", "file shared" }, { none, "---p", "PROT_NONE" }, { ro, "r--p", "read-only" },
		{ (void *)vdso, "r-xp", "vdso" },
	};
	for (unsigned i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
		if (!has_line(maps_before, want[i].a, want[i].p))
			fail("%s at %p was not in the maps before", want[i].what, want[i].a);
		if (!has_line(maps_after, want[i].a, want[i].p))
			fail("%s at %p (%s) is gone from the maps", want[i].what, want[i].a, want[i].p);
	}
	mprotect(none, 4 * PG, PROT_READ);
	check(none, 4 * PG, 5, "PROT_NONE data");
	pass();
}
