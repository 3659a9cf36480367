/* Memory that keeps changing across pre-dumps: SIZE MiB (argv[1], default
 * 64) of pages, each holding its index and a generation in every word. A
 * hot sixteenth of them is rewritten all the time (each with its next
 * generation); on SIGUSR1 every 64th page of the whole region gets its
 * next generation too, half by the task's own stores and half by the
 * kernel (read() from a pipe into the page), and the file "usr1-N" in
 * $ZDTM_DIR says that round N is done. After restore, SIGTERM makes it
 * check every page against the generation it recorded. A page being
 * rewritten at the freeze ("busy") may hold either generation per word.
 * A region as large, never touched, must not grow any image.
 *
 * With argv[2] "drops", each SIGUSR1 round also drops pages the last
 * pre-dump stored (MADV_DONTNEED), every 64th page from the 33rd: half
 * are left alone, half read again (the zero page comes in); both must
 * read as zeros after restore. And a private mapping of a file
 * ("drops.file", FILE_PAGES pages, each word its page number plus
 * FILE_SALT), whose pages were all written (copied) before the first
 * dump: each round drops one more of them, and reads it again, which
 * brings back the file's page. The chain holds what all these pages were
 * before; under write tracking the file's dropped pages even stay
 * unwritten (their protection is kept).
 *
 * With argv[2] "droppable", it also holds a MAP_DROPPABLE mapping
 * (DROP_PAGES pages of a pattern), which /proc/PID/maps does not tell
 * from anonymous memory (smaps does): after restore each of its pages
 * must hold the pattern or zeros (the kernel may drop them any time). */
#include "zdtmlib.h"
#include <stdint.h>
#include <sys/mman.h>

#define PAGE 4096
#define WORDS (PAGE / 8)

static volatile sig_atomic_t usr1;
static void on_usr1(int s) { (void)s; usr1++; }

static inline uint64_t pat(size_t page, uint64_t gen, size_t w)
{
	return (page * 0x9e3779b97f4a7c15ULL) ^ (gen << 40) ^ (w * 0x100000001b3ULL);
}

#define ZEROED UINT64_MAX /* gens[p]: the page was dropped, reads as zeros */
#define FILE_PAGES 64
#define DROP_PAGES 64
#ifndef MAP_DROPPABLE
#define MAP_DROPPABLE 0x08
#endif
#define FILE_SALT 0xf11e000000000000ULL

static uint64_t *mem;
static uint64_t *gens;
static uint64_t *fmap;
static int fdropped; /* fmap pages [0, fdropped) hold the file again */
static volatile int64_t busy = -1;
static int pfd[2];

static void write_page(size_t p, int by_kernel)
{
	uint64_t g = gens[p] + 1;
	uint64_t buf[WORDS];
	busy = p;
	if (by_kernel) {
		for (size_t w = 0; w < WORDS; w++)
			buf[w] = pat(p, g, w);
		if (write(pfd[1], buf, PAGE) != PAGE)
			fail("write to pipe");
		size_t got = 0;
		while (got < PAGE) {
			ssize_t n = read(pfd[0], (char *)(mem + p * WORDS) + got, PAGE - got);
			if (n <= 0)
				fail("read into page %zu", p);
			got += n;
		}
	} else {
		for (size_t w = 0; w < WORDS; w++)
			mem[p * WORDS + w] = pat(p, g, w);
	}
	gens[p] = g;
	busy = -1;
}

/* A SIGUSR1 round's drops (see the top). */
static void drop_pages(size_t pages, size_t hot, int round)
{
	volatile uint64_t sink = 0;
	for (size_t p = hot + 33 + (size_t)round * 8; p < pages; p += 64) {
		if (gens[p] == ZEROED)
			continue;
		if (madvise(mem + p * WORDS, PAGE, MADV_DONTNEED))
			fail("madvise page %zu", p);
		gens[p] = ZEROED;
		if ((p / 64) & 1)
			sink += mem[p * WORDS];
	}
	if (fdropped < FILE_PAGES) {
		if (madvise(fmap + fdropped * WORDS, PAGE, MADV_DONTNEED))
			fail("madvise file page %d", fdropped);
		sink += fmap[fdropped * WORDS];
		fdropped++;
	}
	(void)sink;
}

static void map_file(void)
{
	char path[4096];
	snprintf(path, sizeof(path), "%s/drops.file", getenv("ZDTM_DIR"));
	int fd = open(path, O_CREAT | O_TRUNC | O_RDWR | O_CLOEXEC, 0600);
	if (fd < 0)
		fail("open %s", path);
	uint64_t buf[WORDS];
	for (int p = 0; p < FILE_PAGES; p++) {
		for (size_t w = 0; w < WORDS; w++)
			buf[w] = FILE_SALT + p;
		if (write(fd, buf, PAGE) != PAGE)
			fail("write %s", path);
	}
	fmap = mmap(NULL, FILE_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
	if (fmap == MAP_FAILED)
		fail("mmap %s", path);
	close(fd);
	/* Copied: every page private, holding something else than the file. */
	for (size_t i = 0; i < FILE_PAGES * WORDS; i++)
		fmap[i] = ~(FILE_SALT + i / WORDS);
}

static void check_file(void)
{
	for (int p = 0; p < FILE_PAGES; p++) {
		uint64_t want = p < fdropped ? FILE_SALT + p : ~(FILE_SALT + p);
		for (size_t w = 0; w < WORDS; w++)
			if (fmap[p * WORDS + w] != want)
				fail("file page %d word %zu: %#llx, wants %#llx (%d dropped)", p, w,
				     (unsigned long long)fmap[p * WORDS + w], (unsigned long long)want,
				     fdropped);
	}
}

static uint64_t *dmap;

static void map_droppable(void)
{
	dmap = mmap(NULL, DROP_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_DROPPABLE | MAP_ANONYMOUS,
		    -1, 0);
	if (dmap == MAP_FAILED)
		fail("MAP_DROPPABLE");
	for (size_t p = 0; p < DROP_PAGES; p++)
		for (size_t w = 0; w < WORDS; w++)
			dmap[p * WORDS + w] = pat(p, 7, w);
}

static void check_droppable(void)
{
	for (size_t p = 0; p < DROP_PAGES; p++) {
		int zeros = dmap[p * WORDS] == 0;
		for (size_t w = 0; w < WORDS; w++) {
			uint64_t v = dmap[p * WORDS + w];
			if (v != (zeros ? 0 : pat(p, 7, w)))
				fail("droppable page %zu word %zu: %#llx", p, w, (unsigned long long)v);
		}
	}
}

int main(int argc, char **argv)
{
	size_t pages = ((argc > 1 ? strtoull(argv[1], NULL, 0) : 64) << 20) / PAGE;
	size_t hot = pages / 16;
	int drops = argc > 2 && !strcmp(argv[2], "drops");
	int droppable = argc > 2 && !strcmp(argv[2], "droppable");
	test_init();
	struct sigaction sa = { .sa_handler = on_usr1 };
	sigaction(SIGUSR1, &sa, NULL);
	if (pipe(pfd))
		fail("pipe");
	fcntl(pfd[1], F_SETPIPE_SZ, 1 << 16);
	mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	gens = mmap(NULL, pages * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	/* Reserved and never touched: no dump should store any of it (under
	 * write tracking its page table entries hold markers). */
	void *reserve = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (mem == MAP_FAILED || gens == MAP_FAILED || reserve == MAP_FAILED)
		fail("mmap");
	for (size_t p = 0; p < pages; p++)
		for (size_t w = 0; w < WORDS; w++)
			mem[p * WORDS + w] = pat(p, 0, w);
	if (drops)
		map_file();
	if (droppable)
		map_droppable();
	test_ready();
	int rounds = 0;
	size_t next = 0;
	while (!test_done()) {
		if (usr1 > rounds) {
			rounds++;
			for (size_t p = hot + 1; p < pages; p += 64)
				write_page(p, (p / 64) & 1);
			if (drops)
				drop_pages(pages, hot, rounds);
			char path[4096];
			snprintf(path, sizeof(path), "%s/usr1-%d", getenv("ZDTM_DIR"), rounds);
			int fd = open(path, O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
			if (fd >= 0)
				close(fd);
		}
		write_page(next, 0);
		next = (next + 1) % hot;
		if (next % 64 == 0)
			usleep(1000);
	}
	if (drops)
		check_file();
	if (droppable)
		check_droppable();
	for (size_t p = 0; p < pages; p++) {
		for (size_t w = 0; w < WORDS; w++) {
			uint64_t v = mem[p * WORDS + w];
			if (gens[p] == ZEROED) {
				if (v)
					fail("dropped page %zu word %zu: %#llx, wants 0", p, w,
					     (unsigned long long)v);
				continue;
			}
			if (v == pat(p, gens[p], w))
				continue;
			if ((int64_t)p == busy && v == pat(p, gens[p] + 1, w))
				continue;
			fail("page %zu word %zu: %#llx, generation %llu wants %#llx", p, w,
			     (unsigned long long)v, (unsigned long long)gens[p],
			     (unsigned long long)pat(p, gens[p], w));
		}
	}
	pass();
}
