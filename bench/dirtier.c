/* Benchmark target for pre-dump: SIZE MiB (argv[1]) of pages, each holding
 * its index and a generation in every word; it rewrites PCT percent of its
 * pages per second (argv[2], default 1), the next ones in order, spread
 * over 10 ms steps (steps missed while it was stopped are skipped, not
 * made up). SIGUSR1 writes to $ZDTM_DIR/count how many page writes
 * it made so far (pages in order: no page is written twice within 100/PCT
 * seconds, so the difference of two counts is the pages written between
 * them). SIGTERM after restore: checks every page against the generation
 * it recorded (the page being written at the freeze may hold either). */
#include "../zdtm/zdtmlib.h"
#include <stdint.h>
#include <sys/mman.h>
#include <time.h>

#define PAGE 4096
#define WORDS (PAGE / 8)

static volatile sig_atomic_t usr1;
static void on_usr1(int s) { (void)s; usr1 = 1; }

static inline uint64_t pat(size_t page, uint64_t gen, size_t w)
{
	return (page * 0x9e3779b97f4a7c15ULL) ^ (gen << 40) ^ (w * 0x100000001b3ULL);
}

int main(int argc, char **argv)
{
	size_t pages = (strtoull(argv[1], NULL, 0) << 20) / PAGE;
	double pct = argc > 2 ? atof(argv[2]) : 1;
	test_init();
	syscall(436 /* close_range */, 3, ~0U, 0);
	struct sigaction sa = { .sa_handler = on_usr1 };
	sigaction(SIGUSR1, &sa, NULL);
	uint64_t *mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	uint64_t *gens = mmap(NULL, pages * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED || gens == MAP_FAILED)
		fail("mmap");
	for (size_t p = 0; p < pages; p++)
		for (size_t w = 0; w < WORDS; w++)
			mem[p * WORDS + w] = pat(p, 0, w);
	test_ready();
	/* Pages per 10 ms step, carried over in fractions. */
	double per_step = pages * pct / 100 / 100, owed = 0;
	volatile int64_t busy = -1;
	uint64_t total = 0;
	size_t next = 0;
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	while (!test_done()) {
		if (usr1) {
			usr1 = 0;
			char path[4096], n[32];
			snprintf(path, sizeof(path), "%s/count", getenv("ZDTM_DIR"));
			int fd = open(path, O_CREAT | O_WRONLY | O_TRUNC | O_CLOEXEC, 0600);
			if (fd >= 0) {
				int len = snprintf(n, sizeof(n), "%llu\n", (unsigned long long)total);
				if (write(fd, n, len) != len)
					fail("write count");
				close(fd);
			}
		}
		for (owed += per_step; owed >= 1; owed--) {
			uint64_t g = gens[next] + 1;
			busy = next;
			for (size_t w = 0; w < WORDS; w++)
				mem[next * WORDS + w] = pat(next, g, w);
			gens[next] = g;
			busy = -1;
			next = (next + 1) % pages;
			total++;
		}
		t.tv_nsec += 10 * 1000 * 1000;
		if (t.tv_nsec >= 1000000000) {
			t.tv_nsec -= 1000000000;
			t.tv_sec++;
		}
		clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, NULL);
		/* Behind (frozen by a dump): no catching up on the steps missed,
		 * so that a count right after the restore is about the count at
		 * the freeze. */
		struct timespec n;
		clock_gettime(CLOCK_MONOTONIC, &n);
		if ((n.tv_sec - t.tv_sec) * 1000000000LL + (n.tv_nsec - t.tv_nsec) > 20 * 1000 * 1000)
			t = n;
	}
	for (size_t p = 0; p < pages; p++)
		for (size_t w = 0; w < WORDS; w++) {
			uint64_t v = mem[p * WORDS + w];
			if (v != pat(p, gens[p], w) && !((int64_t)p == busy && v == pat(p, gens[p] + 1, w)))
				fail("page %zu word %zu", p, w);
		}
	pass();
}
