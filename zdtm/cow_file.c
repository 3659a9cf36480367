/* A private mapping of a file shared copy-on-write by a parent and its
 * child: the parent changes pages 0-7 before the fork (both then hold the
 * same copies), the child changes pages 8-11 after it, the parent page 12,
 * and the child drops its copy of page 3 (MADV_DONTNEED: it reads the
 * file's page again). After restore each checks every page of its view,
 * and the parent checks in both processes' pagemaps that pages 0-2 and 4-7
 * are still one frame shared by both, as before the dump. */
#include "zdtmlib.h"
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/wait.h>

#define PAGE 4096
#define NPAGES 32

static char *map;

static unsigned long file_value(long i) { return 0x5151000UL + i; }

/* What page i holds for `who` (0: parent, 1: child). */
static unsigned long expected(int who, long i)
{
	if (i < 8 && !(who == 1 && i == 3))
		return 0xbef0e00UL + i;
	if (who == 1 && i >= 8 && i < 12)
		return 0xc41d00UL + i;
	if (who == 0 && i == 12)
		return 0xa11e4UL;
	return file_value(i);
}

static int check(int who)
{
	for (long i = 0; i < NPAGES; i++) {
		unsigned long v = *(volatile unsigned long *)(map + i * PAGE);
		if (v != expected(who, i)) {
			printf("process %d: page %ld holds %#lx, want %#lx\n", who, i, v,
			       expected(who, i));
			return 0;
		}
	}
	return 1;
}

/* The frame number of page i of the mapping in process `pid` (0: none). */
static uint64_t frame(pid_t pid, long i)
{
	char path[64];
	snprintf(path, sizeof(path), "/proc/%d/pagemap", pid);
	int fd = open(path, O_RDONLY);
	uint64_t e = 0;
	if (fd < 0 || pread(fd, &e, 8, ((uintptr_t)map / PAGE + i) * 8) != 8)
		fail("reading %s: %m", path);
	close(fd);
	return (e >> 63) ? (e & ((1ULL << 55) - 1)) : 0;
}

static int shared_frames(pid_t child)
{
	for (long i = 0; i < 8; i++) {
		if (i == 3)
			continue;
		uint64_t a = frame(getpid(), i), b = frame(child, i);
		if (!a || a != b) {
			printf("page %ld: frame %#llx in the parent, %#llx in the child\n", i,
			       (unsigned long long)a, (unsigned long long)b);
			return 0;
		}
	}
	return 1;
}

int main(void)
{
	test_init();
	char name[256];
	snprintf(name, sizeof(name), "%s/cow_file", getenv("ZDTM_DIR") ? getenv("ZDTM_DIR") : "/tmp");
	int fd = open(name, O_RDWR | O_CREAT | O_TRUNC, 0600);
	if (fd < 0)
		fail("open %s: %m", name);
	for (long i = 0; i < NPAGES; i++) {
		char page[PAGE] = { 0 };
		*(unsigned long *)page = file_value(i);
		if (write(fd, page, PAGE) != PAGE)
			fail("write: %m");
	}
	map = mmap(NULL, NPAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
	if (map == MAP_FAILED)
		fail("mmap: %m");
	close(fd);
	for (long i = 0; i < 8; i++)
		*(unsigned long *)(map + i * PAGE) = 0xbef0e00UL + i;
	/* Every other page read once: present, the file's. */
	for (long i = 8; i < NPAGES; i += 2)
		(void)*(volatile unsigned long *)(map + i * PAGE);
	int ready[2];
	if (pipe(ready))
		fail("pipe: %m");
	pid_t child = fork();
	if (child == 0) {
		for (long i = 8; i < 12; i++)
			*(unsigned long *)(map + i * PAGE) = 0xc41d00UL + i;
		madvise(map + 3 * PAGE, PAGE, MADV_DONTNEED);
		if (write(ready[1], "r", 1) != 1)
			_exit(2);
		test_waitsig();
		_exit(check(1) ? 0 : 1);
	}
	char b;
	if (read(ready[0], &b, 1) != 1)
		fail("the child did not start");
	*(unsigned long *)(map + 12 * PAGE) = 0xa11e4UL;
	if (!shared_frames(child))
		fail("pages not shared before the dump");
	test_ready();
	test_waitsig();
	int same = shared_frames(child);
	if (!check(0))
		fail("the parent's view differs");
	int st;
	kill(child, SIGTERM);
	if (waitpid(child, &st, 0) != child || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
		fail("the child's view differs (status %#x)", st);
	if (!same)
		fail("pages the parent and child shared copy-on-write are copies after restore");
	unlink(name);
	pass();
}
