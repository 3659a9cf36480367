/* Lazy restore: private memory of known contents, checked after a restore
 * whose pages may still be arriving through userfaultfd when SIGTERM comes.
 *  A: SIZE MiB (argv[1], default 256), every word written: the bulk.
 *  B: 64 MiB mapped, every other 2 MiB written: the rest reads as zeros.
 *  C: 16 MiB written, its second half dropped (MADV_DONTNEED): zeros.
 *  D: 8 MiB written; after the restore moved with mremap, then checked.
 * After SIGTERM the test forks: the child checks the second half of A and
 * B (its memory comes through the fork's userfaultfd), the parent moves D,
 * checks the first half of A (backwards, against the background copy), C
 * and D, writes over some of A and reads it back, and reaps the child. */
#include "zdtmlib.h"
#include <stdint.h>
#include <sys/mman.h>
#include <sys/wait.h>

#define MiB (1UL << 20)

static uint64_t word(uint64_t region, size_t i)
{
	return (i + 1) * 0x9e3779b97f4a7c15ULL ^ (region << 56);
}

static uint64_t *map(size_t len)
{
	uint64_t *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (m == MAP_FAILED)
		fail("mmap of %zu bytes", len);
	return m;
}

static int check(const char *what, uint64_t region, uint64_t *m, size_t from, size_t to)
{
	for (size_t i = from; i < to; i++)
		if (m[i] != word(region, i)) {
			fprintf(stderr, "%s: word %zu is %#lx, not %#lx\n", what, i, (unsigned long)m[i],
				(unsigned long)word(region, i));
			return 1;
		}
	return 0;
}

static int zeros(const char *what, uint64_t *m, size_t from, size_t to)
{
	for (size_t i = from; i < to; i++)
		if (m[i]) {
			fprintf(stderr, "%s: word %zu is %#lx, not 0\n", what, i, (unsigned long)m[i]);
			return 1;
		}
	return 0;
}

int main(int argc, char **argv)
{
	size_t asz = (argc > 1 ? strtoull(argv[1], NULL, 0) : 256) * MiB;
	size_t bsz = 64 * MiB, csz = 16 * MiB, dsz = 8 * MiB, chunk = 2 * MiB / 8;
	test_init();
	syscall(436 /* close_range */, 3, ~0U, 0);
	uint64_t *a = map(asz), *b = map(bsz), *c = map(csz), *d = map(dsz);
	for (size_t i = 0; i < asz / 8; i++)
		a[i] = word(1, i);
	for (size_t i = 0; i < bsz / 8; i++)
		if ((i / chunk) % 2 == 0)
			b[i] = word(2, i);
	for (size_t i = 0; i < csz / 8; i++)
		c[i] = word(3, i);
	if (madvise((char *)c + csz / 2, csz / 2, MADV_DONTNEED))
		fail("madvise");
	for (size_t i = 0; i < dsz / 8; i++)
		d[i] = word(4, i);
	test_ready();
	test_waitsig();

	pid_t child = fork();
	if (child < 0)
		fail("fork");
	if (child == 0) {
		int bad = check("A, second half", 1, a, asz / 16, asz / 8);
		for (size_t i = 0; i < bsz / 8 && !bad; i += chunk)
			bad = (i / chunk) % 2 == 0 ? check("B", 2, b, i, i + chunk) : zeros("B's holes", b, i, i + chunk);
		_exit(bad);
	}
	/* Moved to a new place: its pages follow it. */
	void *to = mmap(NULL, dsz, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	uint64_t *nd = to == MAP_FAILED ? MAP_FAILED : mremap(d, dsz, dsz, MREMAP_MAYMOVE | MREMAP_FIXED, to);
	if (nd == MAP_FAILED)
		fail("mremap");
	for (size_t i = asz / 16; i-- > 0;)
		if (a[i] != word(1, i))
			fail("A, first half: word %zu is %#lx", i, (unsigned long)a[i]);
	if (check("C", 3, c, 0, csz / 16) || zeros("C's dropped half", c, csz / 16, csz / 8) ||
	    check("D, moved", 4, nd, 0, dsz / 8))
		fail("memory differs after the restore");
	for (size_t i = 0; i < asz / 8; i += 4096 / 8)
		a[i] = ~word(1, i);
	for (size_t i = 0; i < asz / 8; i += 4096 / 8)
		if (a[i] != ~word(1, i))
			fail("A: a write after the restore did not stick at word %zu", i);
	int st;
	if (waitpid(child, &st, 0) != child)
		fail("waitpid");
	if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
		fail("the child found its memory wrong (status %#x)", st);
	pass();
}
