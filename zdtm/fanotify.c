/* fanotify: a notification group with an inode mark (FAN_MODIFY, and an
 * ignored FAN_OPEN that survives modification) and a mount mark. After
 * restore fdinfo shows the same marks and a write to the marked file is
 * reported with an fd of that file. The group's init flags are the same
 * (fdinfo shows them as given). */
#define _GNU_SOURCE
#include "zdtmlib.h"
#include <sys/fanotify.h>

/* The group flags line and the mark lines (without the inode and handle)
 * of fdinfo. */
static void marks(int fd, char *out, size_t n)
{
	char p[64], line[512];
	snprintf(p, sizeof(p), "/proc/self/fdinfo/%d", fd);
	FILE *f = fopen(p, "r");
	out[0] = 0;
	while (f && fgets(line, sizeof(line), f)) {
		char *m = strstr(line, "mflags:");
		if (!strncmp(line, "fanotify flags:", 15)) {
			/* The group's init flags, as given (no FAN_CLOEXEC). */
			size_t l = strlen(out);
			snprintf(out + l, n - l, "%s", line);
		} else if (!strncmp(line, "fanotify", 8) && m) {
			char *end = strstr(m, " fhandle");
			if (end)
				*end = 0;
			size_t l = strlen(out);
			snprintf(out + l, n - l, "%s;", m);
		}
	}
	if (f)
		fclose(f);
}

int main(void)
{
	test_init();
	char path[4096];
	snprintf(path, sizeof(path), "%s/marked", getenv("ZDTM_DIR") ? getenv("ZDTM_DIR") : "/tmp");
	close(open(path, O_CREAT | O_WRONLY, 0600));
	int fd = fanotify_init(FAN_CLASS_NOTIF | FAN_NONBLOCK, O_RDONLY | O_LARGEFILE);
	if (fd < 0)
		fail("fanotify_init: %m");
	if (fanotify_mark(fd, FAN_MARK_ADD, FAN_MODIFY, AT_FDCWD, path) ||
	    fanotify_mark(fd, FAN_MARK_ADD | FAN_MARK_IGNORED_MASK | FAN_MARK_IGNORED_SURV_MODIFY, FAN_OPEN,
			  AT_FDCWD, path) ||
	    fanotify_mark(fd, FAN_MARK_ADD | FAN_MARK_MOUNT, FAN_CLOSE_NOWRITE, AT_FDCWD, "/dev/shm"))
		fail("fanotify_mark: %m");
	char before[1024], after[1024], buf[4096];
	marks(fd, before, sizeof(before));
	while (read(fd, buf, sizeof(buf)) > 0)
		;
	test_ready();
	test_waitsig();

	marks(fd, after, sizeof(after));
	if (strcmp(before, after))
		fail("marks were \"%s\", now \"%s\"", before, after);
	int w = open(path, O_WRONLY);
	write(w, "x", 1);
	close(w);
	ssize_t n = read(fd, buf, sizeof(buf));
	int seen = 0;
	for (struct fanotify_event_metadata *m = (void *)buf; n > 0 && FAN_EVENT_OK(m, n); m = FAN_EVENT_NEXT(m, n)) {
		char l[64], target[4096] = { 0 };
		snprintf(l, sizeof(l), "/proc/self/fd/%d", m->fd);
		readlink(l, target, sizeof(target) - 1);
		if ((m->mask & FAN_MODIFY) && !strcmp(target, path))
			seen = 1;
		close(m->fd);
	}
	if (!seen)
		fail("no FAN_MODIFY event for %s after restore", path);
	pass();
}
