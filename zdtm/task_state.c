/* The rest of a task's own state: resource limits, personality, groups and
 * capabilities, the clear-child-tid address, the rseq registration (the
 * kernel keeps updating the cpu id after restore), and the name. */
#include "zdtmlib.h"
#include <grp.h>
#include <linux/capability.h>
#include <sys/personality.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <stdint.h>
#include <stddef.h>
#include <sched.h>

extern __thread int dummy_tls;
__thread int dummy_tls = 42;

struct rseq_abi { uint32_t cpu_id_start, cpu_id; uint64_t rseq_cs; uint32_t flags; };
extern const ptrdiff_t __rseq_offset;
extern const unsigned int __rseq_size;

static struct rseq_abi *my_rseq(void)
{
	if (!__rseq_size)
		return NULL;
	return (struct rseq_abi *)((char *)__builtin_thread_pointer() + __rseq_offset);
}

int main(void)
{
	test_init();
	struct rlimit nofile = { 200, 300 }, core = { 0, 0 };
	if (setrlimit(RLIMIT_NOFILE, &nofile) || setrlimit(RLIMIT_CORE, &core))
		fail("setrlimit");
	if (personality(ADDR_NO_RANDOMIZE | READ_IMPLIES_EXEC) == -1)
		fail("personality");
	gid_t groups[] = { 5, 7, 1234 };
	if (setgroups(3, groups))
		fail("setgroups");
	struct __user_cap_header_struct h = { _LINUX_CAPABILITY_VERSION_3, 0 };
	struct __user_cap_data_struct d[2];
	if (syscall(SYS_capget, &h, d))
		fail("capget");
	d[0].effective &= ~(1u << CAP_NET_RAW);
	d[0].inheritable |= 1u << CAP_KILL;
	if (syscall(SYS_capset, &h, d))
		fail("capset");
	if (prctl(PR_CAPBSET_DROP, CAP_SYS_BOOT))
		fail("PR_CAPBSET_DROP");
	if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_KILL, 0, 0))
		fail("PR_CAP_AMBIENT_RAISE");
	prctl(PR_SET_NAME, "zdtm-state");
	int *tid_addr;
	if (prctl(PR_GET_TID_ADDRESS, &tid_addr))
		fail("PR_GET_TID_ADDRESS");
	struct rseq_abi *rs = my_rseq();
	if (rs && (int)rs->cpu_id < 0)
		fail("rseq not registered before the dump");

	test_ready();
	test_waitsig();

	struct rlimit r;
	getrlimit(RLIMIT_NOFILE, &r);
	if (r.rlim_cur != 200 || r.rlim_max != 300)
		fail("RLIMIT_NOFILE %lu/%lu", r.rlim_cur, r.rlim_max);
	getrlimit(RLIMIT_CORE, &r);
	if (r.rlim_cur != 0 || r.rlim_max != 0)
		fail("RLIMIT_CORE");
	if (personality(0xffffffff) != (ADDR_NO_RANDOMIZE | READ_IMPLIES_EXEC))
		fail("personality %x", personality(0xffffffff));
	gid_t now[16];
	int n = getgroups(16, now);
	if (n != 3 || now[0] != 5 || now[1] != 7 || now[2] != 1234)
		fail("groups");
	struct __user_cap_data_struct c[2];
	if (syscall(SYS_capget, &h, c))
		fail("capget");
	if ((c[0].effective & (1u << CAP_NET_RAW)) || !(c[0].inheritable & (1u << CAP_KILL)) ||
	    c[0].permitted != d[0].permitted || c[1].effective != d[1].effective)
		fail("capabilities");
	if (prctl(PR_CAPBSET_READ, CAP_SYS_BOOT) != 0 || prctl(PR_CAPBSET_READ, CAP_SYS_ADMIN) != 1)
		fail("bounding set");
	if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_IS_SET, CAP_KILL, 0, 0) != 1 ||
	    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_IS_SET, CAP_CHOWN, 0, 0) != 0)
		fail("ambient set");
	char name[32] = { 0 };
	prctl(PR_GET_NAME, name);
	if (strcmp(name, "zdtm-state"))
		fail("name %s", name);
	int *tid_now;
	prctl(PR_GET_TID_ADDRESS, &tid_now);
	if (tid_now != tid_addr)
		fail("clear-child-tid %p != %p", tid_now, tid_addr);
	/* A registered rseq area follows the task from CPU to CPU; a stale one
	 * keeps the CPU of the dump. */
	if (rs && sysconf(_SC_NPROCESSORS_ONLN) > 1) {
		for (int round = 0; round < 4; round++) {
			int cpu = round % 2;
			cpu_set_t set;
			CPU_ZERO(&set);
			CPU_SET(cpu, &set);
			if (sched_setaffinity(0, sizeof(set), &set))
				fail("sched_setaffinity");
			sched_yield();
			if ((int)rs->cpu_id != cpu)
				fail("rseq cpu_id %d on CPU %d: not registered after restore", (int)rs->cpu_id, cpu);
		}
	}
	if (dummy_tls != 42)
		fail("TLS");
	pass();
}
