/* The limit a dump is compared with: plain write(2) of 1 GiB into a file on
 * tmpfs, in 1 MiB calls. Mode "buffer": from 1 GiB of touched memory, as a
 * process's memory is; mode "hot": the same 1 MiB again and again (cache-hot,
 * what dd from /dev/zero measures). Prints seconds.
 * Usage: write1g FILE MIB [buffer|hot] */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	size_t size = (size_t)strtoull(argv[2], NULL, 0) << 20, chunk = 1 << 20;
	int hot = argc > 3 && !strcmp(argv[3], "hot");
	size_t bufsize = hot ? chunk : size;
	char *m = mmap(NULL, bufsize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	memset(m, 0x5a, bufsize);
	int fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC, 0600);
	struct timespec a, b;
	clock_gettime(CLOCK_MONOTONIC, &a);
	for (size_t off = 0; off < size; off += chunk)
		if (write(fd, m + (hot ? 0 : off), chunk) != (ssize_t)chunk)
			return 1;
	clock_gettime(CLOCK_MONOTONIC, &b);
	close(fd);
	unlink(argv[1]);
	printf("%.4f\n", (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9);
	return 0;
}
