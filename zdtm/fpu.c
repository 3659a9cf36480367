/* FPU/SSE/AVX/AVX-512 registers: hold distinct values in all vector
 * registers (and x87) while the task is checkpointed, then compare. The task
 * spins in assembly so the values live only in registers. */
#include "zdtmlib.h"
#include <cpuid.h>
#include <stdint.h>

static volatile int stop_flag;
static void on_term(int s) { (void)s; stop_flag = 1; }

static int has_avx512(void)
{
	unsigned a, b, c, d;
	if (!__get_cpuid_count(7, 0, &a, &b, &c, &d))
		return 0;
	return (b >> 16) & 1;
}

int main(void)
{
	test_init();
	struct sigaction sa = { .sa_handler = on_term };
	sigaction(SIGTERM, &sa, NULL);
	if (!has_avx512()) {
		/* The runner only runs this test on AVX-512 machines. */
		fail("no AVX-512 on this CPU");
	}
	static uint64_t in[32][8] __attribute__((aligned(64)));
	static uint64_t out[32][8] __attribute__((aligned(64)));
	for (int r = 0; r < 32; r++)
		for (int i = 0; i < 8; i++)
			in[r][i] = 0x0101010101010101ULL * (r + 1) + (uint64_t)i * 0x1000 + 0xabcd;
	uint64_t k_in = 0xa5a5, k_out = 0;
	double x87_in = 3.14159265358979, x87_out = 0;
	test_ready();
#define LD(n) "vmovdqa64 " #n "*64(%[in]), %%zmm" #n "\n\t"
#define ST(n) "vmovdqa64 %%zmm" #n ", " #n "*64(%[out])\n\t"
	asm volatile(
		"fldl %[x]\n\t"
		"kmovq %[k], %%k3\n\t"
		LD(0) LD(1) LD(2) LD(3) LD(4) LD(5) LD(6) LD(7) LD(8) LD(9) LD(10) LD(11) LD(12) LD(13) LD(14) LD(15)
		LD(16) LD(17) LD(18) LD(19) LD(20) LD(21) LD(22) LD(23) LD(24) LD(25) LD(26) LD(27) LD(28) LD(29) LD(30) LD(31)
		"1: pause\n\t"
		"cmpl $0, %[flag]\n\t"
		"je 1b\n\t"
		ST(0) ST(1) ST(2) ST(3) ST(4) ST(5) ST(6) ST(7) ST(8) ST(9) ST(10) ST(11) ST(12) ST(13) ST(14) ST(15)
		ST(16) ST(17) ST(18) ST(19) ST(20) ST(21) ST(22) ST(23) ST(24) ST(25) ST(26) ST(27) ST(28) ST(29) ST(30) ST(31)
		"kmovq %%k3, %[ko]\n\t"
		"fstpl %[xo]\n\t"
		: [ko] "=m"(k_out), [xo] "=m"(x87_out)
		: [in] "r"(in), [out] "r"(out), [flag] "m"(stop_flag), [k] "m"(k_in), [x] "m"(x87_in)
		: "memory", "k3", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",
		  "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20",
		  "xmm21", "xmm22", "xmm23", "xmm24", "xmm25", "xmm26", "xmm27", "xmm28", "xmm29", "xmm30", "xmm31");
	for (int r = 0; r < 32; r++)
		for (int i = 0; i < 8; i++)
			if (in[r][i] != out[r][i])
				fail("zmm%d word %d: %llx != %llx", r, i, (unsigned long long)out[r][i],
				     (unsigned long long)in[r][i]);
	if (k_out != k_in)
		fail("k3: %llx", (unsigned long long)k_out);
	if (x87_out != x87_in)
		fail("x87 st0 %f", x87_out);
	pass();
}
