/* inotify: watches on a directory and on a file (one-shot), with a wd
 * gap left by a removed watch, and on a file deleted since but still open.
 * After restore fdinfo shows the same wds and masks, no event is queued
 * that the task did not cause, and changes to the watched files arrive
 * with the right wds (closing the deleted file reports IN_CLOSE_WRITE). */
#include "zdtmlib.h"
#include <sys/inotify.h>
#include <sys/stat.h>

static char dir[4096], a[4200], b[4200], d[4200];

/* "wd mask" of each watch, from fdinfo, in the order listed. */
static void watches(int fd, char *out, size_t n)
{
	char p[64], line[512];
	snprintf(p, sizeof(p), "/proc/self/fdinfo/%d", fd);
	FILE *f = fopen(p, "r");
	out[0] = 0;
	while (f && fgets(line, sizeof(line), f)) {
		unsigned wd, mask;
		char *w = strstr(line, "wd:"), *m = strstr(line, "mask:");
		if (!strncmp(line, "inotify", 7) && w && m && sscanf(w, "wd:%x", &wd) == 1 &&
		    sscanf(m, "mask:%x", &mask) == 1) {
			size_t l = strlen(out);
			snprintf(out + l, n - l, "%u:%x ", wd, mask);
		}
	}
	if (f)
		fclose(f);
}

int main(void)
{
	test_init();
	snprintf(dir, sizeof(dir), "%s/watched", getenv("ZDTM_DIR") ? getenv("ZDTM_DIR") : "/tmp");
	mkdir(dir, 0700);
	snprintf(a, sizeof(a), "%s/a", dir);
	snprintf(b, sizeof(b), "%s/b", dir);
	close(open(a, O_CREAT | O_WRONLY, 0600));
	close(open(b, O_CREAT | O_WRONLY, 0600));
	int fd = inotify_init1(IN_NONBLOCK);
	int wd_dir = inotify_add_watch(fd, dir, IN_CREATE | IN_DELETE);
	int wd_gone = inotify_add_watch(fd, a, IN_MODIFY);
	inotify_rm_watch(fd, wd_gone);
	int wd_b = inotify_add_watch(fd, b, IN_ATTRIB | IN_ONESHOT);
	snprintf(d, sizeof(d), "%s/deleted", getenv("ZDTM_DIR") ? getenv("ZDTM_DIR") : "/tmp");
	int held = open(d, O_CREAT | O_RDWR, 0600);
	int wd_del = inotify_add_watch(fd, d, IN_CLOSE_WRITE);
	if (held < 0 || wd_del < 0 || unlink(d))
		fail("the deleted watched file");
	char buf[4096];
	while (read(fd, buf, sizeof(buf)) > 0)
		;
	char before[512], after[512];
	watches(fd, before, sizeof(before));
	test_ready();
	test_waitsig();

	watches(fd, after, sizeof(after));
	if (strcmp(before, after))
		fail("watches were \"%s\", now \"%s\"", before, after);
	if (!(fcntl(fd, F_GETFL) & O_NONBLOCK))
		fail("O_NONBLOCK lost");
	if (read(fd, buf, sizeof(buf)) >= 0 || errno != EAGAIN)
		fail("an event is queued that the task did not cause");
	char c[4300];
	snprintf(c, sizeof(c), "%s/new", dir);
	close(open(c, O_CREAT | O_WRONLY, 0600));
	chmod(b, 0640);
	close(held);
	ssize_t n = read(fd, buf, sizeof(buf));
	int seen_create = 0, seen_attrib = 0, seen_close = 0;
	for (char *p = buf; n > 0 && p < buf + n;) {
		struct inotify_event *e = (struct inotify_event *)p;
		if (e->wd == wd_dir && (e->mask & IN_CREATE) && !strcmp(e->name, "new"))
			seen_create = 1;
		if (e->wd == wd_b && (e->mask & IN_ATTRIB))
			seen_attrib = 1;
		if (e->wd == wd_del && (e->mask & IN_CLOSE_WRITE))
			seen_close = 1;
		p += sizeof(*e) + e->len;
	}
	if (!seen_create || !seen_attrib || !seen_close)
		fail("events after restore: create %d attrib %d close of the deleted file %d", seen_create,
		     seen_attrib, seen_close);
	pass();
}
