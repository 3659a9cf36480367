/* Benchmark target: a process with N open regular files (argv[1]). */
#include "../zdtm/zdtmlib.h"
#include <sys/resource.h>

int main(int argc, char **argv)
{
	syscall(436 /* close_range */, 3, ~0U, 0);
	test_init();
	int n = atoi(argv[1]);
	struct rlimit r;
	getrlimit(RLIMIT_NOFILE, &r);
	r.rlim_cur = r.rlim_max;
	setrlimit(RLIMIT_NOFILE, &r);
	char path[4096];
	for (int i = 0; i < n; i++) {
		snprintf(path, sizeof(path), "%s/f%d", argv[2], i % 100);
		if (open(path, O_RDWR | O_CREAT, 0600) < 0)
			fail("open %d", i);
	}
	test_ready();
	test_waitsig();
	pass();
}
