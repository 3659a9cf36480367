/* One open file shared by a parent and its child (inherited across fork):
 * after restore they still share one offset, so what the child writes moves
 * the parent's position too, and nothing is overwritten. */
#include "zdtmlib.h"
#include <sys/wait.h>

int main(void)
{
	test_init();
	char path[4096];
	snprintf(path, sizeof(path), "%s/shared.txt", getenv("ZDTM_DIR"));
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	if (fd < 0 || write(fd, "start;", 6) != 6)
		fail("open");
	int go[2];
	if (pipe(go))
		fail("pipe");
	pid_t c = fork();
	if (c == 0) {
		char b;
		close(go[1]);
		if (read(go[0], &b, 1) != 1)
			_exit(2);
		_exit(write(fd, "child;", 6) == 6 ? 0 : 3);
	}
	close(go[0]);
	test_ready();
	test_waitsig();
	if (write(go[1], "g", 1) != 1)
		fail("go");
	int st;
	if (waitpid(c, &st, 0) != c || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
		fail("child failed");
	if (lseek(fd, 0, SEEK_CUR) != 12)
		fail("offset %ld: the child's write did not move it", (long)lseek(fd, 0, SEEK_CUR));
	if (write(fd, "parent;", 7) != 7)
		fail("write");
	char buf[64] = { 0 };
	if (pread(fd, buf, sizeof(buf) - 1, 0) != 19 || strcmp(buf, "start;child;parent;"))
		fail("file holds %s", buf);
	pass();
}
