/* A task running as another user, with distinct real, effective and saved
 * ids: crust (root) dumps it and brings it back with the same credentials. */
#include "zdtmlib.h"
#include <grp.h>
#include <sys/prctl.h>

int main(void)
{
	test_init();
	gid_t groups[] = { 65534 };
	if (setgroups(1, groups) || setresgid(65534, 65533, 65532))
		fail("setresgid");
	if (setresuid(65534, 65533, 0))
		fail("setresuid");
	test_ready();
	test_waitsig();
	uid_t r, e, s;
	gid_t gr, ge, gs;
	getresuid(&r, &e, &s);
	getresgid(&gr, &ge, &gs);
	if (r != 65534 || e != 65533 || s != 0)
		fail("uids %d %d %d", r, e, s);
	if (gr != 65534 || ge != 65533 || gs != 65532)
		fail("gids %d %d %d", gr, ge, gs);
	gid_t now[4];
	if (getgroups(4, now) != 1 || now[0] != 65534)
		fail("groups");
	if (prctl(PR_GET_DUMPABLE) != 0)
		fail("dumpable changed");
	pass();
}
