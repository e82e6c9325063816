/* Inner-loop ceilings of the CPU GEMM micro-kernels on this machine (benchmarks/cpu_peak.py builds and runs it).
 *
 * Each loop is the register-blocked inner loop of a GEMM micro-kernel, run over L1-resident data, so the figure is
 * the instruction mix's throughput with no memory traffic, epilogue or packing:
 *   fp32      6x16 tile, vbroadcastss + 2 vfmadd231ps per row per k            (what MKL/oneDNN sgemm runs)
 *   w8_exact  6x16 tile, 16-byte loads widened by vpmovzxbw, vpmaddwd + vpaddd per k-pair (quantkit W8A8: exact
 *             for u8 x u8 codes)
 *   w4        4x16 tile, nibbles split with vpsrlw/vpand, vpmaddubsw u8 x u4, two summed in int16, vpmaddwd by
 *             ones, vpaddd per 8 k (quantkit W4A8: exact)
 *   u7s8      6x16 tile, vpmaddubsw u7 x s8, vpmaddwd by ones, vpaddd per 4 k (quantkit's W8Q layout for 8-bit
 *             weights x activations of at most 7 bits, and fbgemm's reduce_range scheme)
 * Prints one JSON object: GMAC/s per kernel (one thread). x86-64 with AVX2 + FMA only. */
#include <stdint.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static uint8_t A[4096] __attribute__((aligned(64)));
static uint8_t B[65536] __attribute__((aligned(64)));
static const int16_t ONES[16] __attribute__((aligned(32))) = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
static const uint8_t M4[32] __attribute__((aligned(32))) = {15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15,
                                                           15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15};
#define CLOB "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", \
             "xmm12", "xmm13", "xmm14", "xmm15", "memory", "cc"
#define STEPS 256

#define F_ROW(OFF, A0, A1) "vbroadcastss " #OFF "(%[a]), %%ymm14\n vfmadd231ps %%ymm12, %%ymm14, %%ymm" #A0 \
  "\n vfmadd231ps %%ymm13, %%ymm14, %%ymm" #A1 "\n"
static void fp32_loop(void) {
  const uint8_t *a = A, *b = B;
  long n = STEPS;
  __asm__ volatile("1:\n vmovaps (%[b]), %%ymm12\n vmovaps 32(%[b]), %%ymm13\n" F_ROW(0, 0, 1) F_ROW(4, 2, 3)
                   F_ROW(8, 4, 5) F_ROW(12, 6, 7) F_ROW(16, 8, 9) F_ROW(20, 10, 11)
                   "add $64, %[b]\n add $8, %[a]\n dec %[n]\n jnz 1b\n"
                   : [a] "+r"(a), [b] "+r"(b), [n] "+r"(n)::CLOB);
}

#define W8_ROW(OFF, A0, A1) "vpbroadcastd " #OFF "(%[a]), %%ymm14\n vpmaddwd %%ymm12, %%ymm14, %%ymm15\n" \
  "vpaddd %%ymm15, %%ymm" #A0 ", %%ymm" #A0 "\n vpmaddwd %%ymm13, %%ymm14, %%ymm15\n"                     \
  "vpaddd %%ymm15, %%ymm" #A1 ", %%ymm" #A1 "\n"
static void w8_loop(void) {
  const uint8_t *a = A, *b = B;
  long n = STEPS;
  __asm__ volatile("1:\n vpmovzxbw (%[b]), %%ymm12\n vpmovzxbw 16(%[b]), %%ymm13\n" W8_ROW(0, 0, 1) W8_ROW(4, 2, 3)
                   W8_ROW(8, 4, 5) W8_ROW(12, 6, 7) W8_ROW(16, 8, 9) W8_ROW(20, 10, 11)
                   "add $32, %[b]\n add $8, %[a]\n dec %[n]\n jnz 1b\n"
                   : [a] "+r"(a), [b] "+r"(b), [n] "+r"(n)::CLOB);
}

#define W4_ROW(OFF, A0, A1) "vpbroadcastd " #OFF "(%[a]), %%ymm12\n vpbroadcastd 4+" #OFF "(%[a]), %%ymm13\n"  \
  "vpmaddubsw %%ymm8, %%ymm12, %%ymm14\n vpmaddubsw %%ymm9, %%ymm13, %%ymm15\n vpaddw %%ymm15, %%ymm14, %%ymm14\n" \
  "vpmaddwd (%[ones]), %%ymm14, %%ymm14\n vpaddd %%ymm14, %%ymm" #A0 ", %%ymm" #A0 "\n"                         \
  "vpmaddubsw %%ymm10, %%ymm12, %%ymm14\n vpmaddubsw %%ymm11, %%ymm13, %%ymm15\n vpaddw %%ymm15, %%ymm14, %%ymm14\n" \
  "vpmaddwd (%[ones]), %%ymm14, %%ymm14\n vpaddd %%ymm14, %%ymm" #A1 ", %%ymm" #A1 "\n"
static void w4_loop(void) {
  const uint8_t *a = A, *b = B;
  long n = STEPS;
  __asm__ volatile("1:\n vmovdqu (%[b]), %%ymm8\n vpsrlw $4, %%ymm8, %%ymm9\n vpand (%[m4]), %%ymm8, %%ymm8\n"
                   "vpand (%[m4]), %%ymm9, %%ymm9\n vmovdqu 32(%[b]), %%ymm10\n vpsrlw $4, %%ymm10, %%ymm11\n"
                   "vpand (%[m4]), %%ymm10, %%ymm10\n vpand (%[m4]), %%ymm11, %%ymm11\n"
                   W4_ROW(0, 0, 1) W4_ROW(8, 2, 3) W4_ROW(16, 4, 5) W4_ROW(24, 6, 7)
                   "add $64, %[b]\n add $8, %[a]\n dec %[n]\n jnz 1b\n"
                   : [a] "+r"(a), [b] "+r"(b), [n] "+r"(n)
                   : [ones] "r"(ONES), [m4] "r"(M4)
                   : CLOB);
}

#define U7_ROW(OFF, A0, A1) "vpbroadcastd " #OFF "(%[a]), %%ymm14\n vpmaddubsw %%ymm12, %%ymm14, %%ymm15\n" \
  "vpmaddwd %%ymm0, %%ymm15, %%ymm15\n vpaddd %%ymm15, %%ymm" #A0 ", %%ymm" #A0 "\n"                        \
  "vpmaddubsw %%ymm13, %%ymm14, %%ymm15\n vpmaddwd %%ymm0, %%ymm15, %%ymm15\n"                              \
  "vpaddd %%ymm15, %%ymm" #A1 ", %%ymm" #A1 "\n"
static void u7_loop(void) {
  const uint8_t *a = A, *b = B;
  long n = STEPS;
  __asm__ volatile("vmovdqa (%[ones]), %%ymm0\n"
                   "1:\n vmovdqu (%[b]), %%ymm12\n vmovdqu 32(%[b]), %%ymm13\n" U7_ROW(0, 1, 2) U7_ROW(4, 3, 4)
                   U7_ROW(8, 5, 6) U7_ROW(12, 7, 8) U7_ROW(16, 9, 10) U7_ROW(20, 11, 1)
                   "add $64, %[b]\n add $8, %[a]\n dec %[n]\n jnz 1b\n"
                   : [a] "+r"(a), [b] "+r"(b), [n] "+r"(n)
                   : [ones] "r"(ONES)
                   : CLOB);
}

static double gmacs(void (*fn)(void), double macs_per_call) {
  const long calls = 20000;
  const double t0 = now();
  for (long i = 0; i < calls; ++i) fn();
  return calls * macs_per_call / (now() - t0) / 1e9;
}

int main(void) {
  /* Rounds over all four loops (interleaved, so a busy spell of the machine hits them alike); best per loop. */
  void (*fns[4])(void) = {fp32_loop, w8_loop, w4_loop, u7_loop};
  const double macs[4] = {STEPS * 6.0 * 16, STEPS * 2.0 * 6 * 16, STEPS * 8.0 * 4 * 16, STEPS * 4.0 * 6 * 16};
  double best[4] = {0, 0, 0, 0};
  for (int round = 0; round < 15; ++round) {
    for (int i = 0; i < 4; ++i) {
      const double v = gmacs(fns[i], macs[i]);
      best[i] = v > best[i] ? v : best[i];
    }
  }
  printf("{\"fp32_gmacs\": %.2f, \"w8_exact_gmacs\": %.2f, \"w4_gmacs\": %.2f, \"u7s8_gmacs\": %.2f}\n", best[0],
         best[1], best[2], best[3]);
  return 0;
}
