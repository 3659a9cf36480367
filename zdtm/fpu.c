/* FPU and vector registers: hold distinct values in every vector register
 * (and x87) while the task is checkpointed, then compare. The task spins in
 * assembly so the values live only in registers.
 *
 *   fpu avx512   zmm0-31 (all 512 bits), the k3 mask register and x87
 *   fpu avx      ymm0-15 (the upper halves live in the AVX xsave component)
 *   fpu avx threads   the same in a second thread too, with values of its
 *                own (a thread other than the leader runs the parasite's
 *                commands that crust ends without rt_sigreturn)
 *
 * Built without any -m flag: only the function of the chosen mode uses its
 * instructions (target attribute), and the runner picks a mode the CPU has
 * (/proc/cpuinfo). The program checks CPUID itself too, so a wrong mode
 * fails with a message instead of SIGILL. */
#include "zdtmlib.h"
#include <cpuid.h>
#include <pthread.h>
#include <stdint.h>

static int cpu_has(const char *what)
{
	unsigned a, b, c, d;
	if (!strcmp(what, "avx512")) {
		if (!__get_cpuid_count(7, 0, &a, &b, &c, &d))
			return 0;
		return (b >> 16) & 1;
	}
	if (!__get_cpuid(1, &a, &b, &c, &d))
		return 0;
	return (c >> 28) & 1; /* AVX */
}

static uint64_t in[32][8] __attribute__((aligned(64)));
static uint64_t out[32][8] __attribute__((aligned(64)));
static double x87_in = 3.14159265358979, x87_out;
/* The second thread's (fpu avx threads). */
static uint64_t in2[32][8] __attribute__((aligned(64)));
static uint64_t out2[32][8] __attribute__((aligned(64)));
static double x87_in2 = 2.71828182845904, x87_out2;
static volatile int thread_holds;

static void fill(uint64_t (*v)[8], uint64_t salt)
{
	for (int r = 0; r < 32; r++)
		for (int i = 0; i < 8; i++)
			v[r][i] = 0x0101010101010101ULL * (r + 1) + (uint64_t)i * 0x1000 + salt;
}

static void compare(const char *who, uint64_t (*want)[8], uint64_t (*got)[8], double x87_want,
		    double x87_got, int nregs, int words)
{
	for (int r = 0; r < nregs; r++)
		for (int i = 0; i < words; i++)
			if (want[r][i] != got[r][i])
				fail("%s: register %d word %d: %llx != %llx", who, r, i,
				     (unsigned long long)got[r][i], (unsigned long long)want[r][i]);
	if (x87_got != x87_want)
		fail("%s: x87 st0 %f", who, x87_got);
}

__attribute__((target("avx512f"))) static void hold_avx512(void)
{
	uint64_t k_in = 0xa5a5, k_out = 0;
	test_ready();
#define LDZ(n) "vmovdqa64 " #n "*64(%[in]), %%zmm" #n "\n\t"
#define STZ(n) "vmovdqa64 %%zmm" #n ", " #n "*64(%[out])\n\t"
	asm volatile(
		"fldl %[x]\n\t"
		"kmovw %k[k], %%k3\n\t"
		LDZ(0) LDZ(1) LDZ(2) LDZ(3) LDZ(4) LDZ(5) LDZ(6) LDZ(7) LDZ(8) LDZ(9) LDZ(10) LDZ(11)
		LDZ(12) LDZ(13) LDZ(14) LDZ(15) LDZ(16) LDZ(17) LDZ(18) LDZ(19) LDZ(20) LDZ(21) LDZ(22)
		LDZ(23) LDZ(24) LDZ(25) LDZ(26) LDZ(27) LDZ(28) LDZ(29) LDZ(30) LDZ(31)
		"1: pause\n\t"
		"cmpl $0, %[flag]\n\t"
		"je 1b\n\t"
		STZ(0) STZ(1) STZ(2) STZ(3) STZ(4) STZ(5) STZ(6) STZ(7) STZ(8) STZ(9) STZ(10) STZ(11)
		STZ(12) STZ(13) STZ(14) STZ(15) STZ(16) STZ(17) STZ(18) STZ(19) STZ(20) STZ(21) STZ(22)
		STZ(23) STZ(24) STZ(25) STZ(26) STZ(27) STZ(28) STZ(29) STZ(30) STZ(31)
		"kmovw %%k3, %k[ko]\n\t"
		"fstpl %[xo]\n\t"
		: [ko] "=r"(k_out), [xo] "=m"(x87_out)
		: [in] "r"(in), [out] "r"(out), [flag] "m"(zdtm_stop), [k] "r"(k_in), [x] "m"(x87_in)
		: "memory", "k3", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",
		  "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20",
		  "xmm21", "xmm22", "xmm23", "xmm24", "xmm25", "xmm26", "xmm27", "xmm28", "xmm29", "xmm30", "xmm31");
	compare("main", in, out, x87_in, x87_out, 32, 8);
	if ((k_out & 0xffff) != k_in)
		fail("k3: %llx", (unsigned long long)k_out);
}

/* Holds ymm0-15 and st0 from IN/X until the test stops, then stores them
 * into OUT/XO. */
__attribute__((target("avx"))) static void hold_avx(uint64_t (*in)[8], uint64_t (*out)[8], double *x,
						       double *xo)
{
#define LDY(n) "vmovdqa " #n "*64(%[in]), %%ymm" #n "\n\t"
#define STY(n) "vmovdqa %%ymm" #n ", " #n "*64(%[out])\n\t"
	asm volatile(
		"fldl %[x]\n\t"
		LDY(0) LDY(1) LDY(2) LDY(3) LDY(4) LDY(5) LDY(6) LDY(7) LDY(8) LDY(9) LDY(10) LDY(11)
		LDY(12) LDY(13) LDY(14) LDY(15)
		"1: pause\n\t"
		"cmpl $0, %[flag]\n\t"
		"je 1b\n\t"
		STY(0) STY(1) STY(2) STY(3) STY(4) STY(5) STY(6) STY(7) STY(8) STY(9) STY(10) STY(11)
		STY(12) STY(13) STY(14) STY(15)
		"fstpl %[xo]\n\t"
		: [xo] "=m"(*xo)
		: [in] "r"(in), [out] "r"(out), [flag] "m"(zdtm_stop), [x] "m"(*x)
		: "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",
		  "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
}

static void *second_thread(void *arg)
{
	(void)arg;
	test_thread_ignores_sigterm();
	thread_holds = 1;
	hold_avx(in2, out2, &x87_in2, &x87_out2);
	return NULL;
}

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "avx";
	int threads = argc > 2 && !strcmp(argv[2], "threads");
	pthread_t th;
	test_init();
	if (strcmp(mode, "avx") && strcmp(mode, "avx512"))
		fail("usage: fpu avx|avx512");
	if (!cpu_has(mode))
		fail("this CPU has no %s; the runner must not run this mode here", mode);
	fill(in, 0xabcd);
	fill(in2, 0x5a5a00);
	if (!strcmp(mode, "avx512")) {
		hold_avx512();
	} else {
		if (threads) {
			if (pthread_create(&th, NULL, second_thread, NULL))
				fail("pthread_create");
			/* Ready once the thread holds its values (a few
			 * instructions after the flag). */
			while (!thread_holds)
				;
			usleep(10000);
		}
		test_ready();
		hold_avx(in, out, &x87_in, &x87_out);
		compare("main", in, out, x87_in, x87_out, 16, 4);
		if (threads) {
			pthread_join(th, NULL);
			compare("second thread", in2, out2, x87_in2, x87_out2, 16, 4);
		}
	}
	pass();
}
