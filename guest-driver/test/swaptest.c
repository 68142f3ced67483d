// SPDX-License-Identifier: GPL-2.0
/*
 * swaptest: make the guest swap, then check every page came back intact.
 *
 * Allocates FACTOR times MemTotal (default 3) of anonymous memory, fills each
 * 4 KiB page with one of five kinds of content (zero, same-filled, a copy of
 * one of a few template pages, random, text-like), remembers a checksum per
 * page, then walks the memory again (in a different order) verifying every
 * page, rewrites some pages, and verifies everything once more.
 * Prints "SWAPTEST PASS" or "SWAPTEST FAIL ..." and exits 0 or 1.
 *
 * usage: swaptest [factor] [seed]
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define PAGE 4096u
#define WORDS (PAGE / 8)
#define TEMPLATES 16

static uint64_t seed = 0x7e3a9c11d2b4f085ull;

static uint64_t mix(uint64_t x)
{
	x ^= x >> 30;
	x *= 0xbf58476d1ce4e5b9ull;
	x ^= x >> 27;
	x *= 0x94d049bb133111ebull;
	x ^= x >> 31;
	return x;
}

/* FNV-style over 64-bit words: any single changed word changes the sum. */
static uint64_t checksum(const uint64_t *p)
{
	uint64_t h = 0xcbf29ce484222325ull;
	unsigned int i;

	for (i = 0; i < WORDS; i++)
		h = (h ^ p[i]) * 0x100000001b3ull;
	return mix(h);
}

static const char *const words[] = {
	"page", "swap", "host", "guest", "memory", "virtio", "queue", "the",
	"of", "and", "a", "compressed", "store", "kernel", "tmem", "to",
};

static void fill_text(unsigned char *p, uint64_t r)
{
	unsigned int n = 0;

	while (n < PAGE) {
		const char *w = words[r & 15];
		size_t len = strlen(w);

		r = mix(r);
		while (*w && n < PAGE)
			p[n++] = (unsigned char)*w++;
		if (n < PAGE)
			p[n++] = (r & 7) ? ' ' : '\n';
		(void)len;
	}
}

/* Fills page @i for generation @gen; returns its kind (0..4). */
static int fill_page(uint64_t *p, size_t i, unsigned int gen)
{
	uint64_t r = mix(seed ^ (i * 0x9e3779b97f4a7c15ull) ^ ((uint64_t)gen << 56));
	int kind = (int)(r % 5);
	unsigned int k;

	switch (kind) {
	case 0: /* zero */
		memset(p, 0, PAGE);
		break;
	case 1: /* same-filled with a non-zero word */
		for (k = 0; k < WORDS; k++)
			p[k] = (r >> 8) | 1;
		break;
	case 2: /* duplicate of a template page */
		for (k = 0; k < WORDS; k++)
			p[k] = (seed + (r >> 8) % TEMPLATES) * 0x9e3779b97f4a7c15ull + k;
		break;
	case 3: /* random (xorshift64) */
		r |= 1;
		for (k = 0; k < WORDS; k++) {
			r ^= r << 13;
			r ^= r >> 7;
			r ^= r << 17;
			p[k] = r;
		}
		break;
	default: /* text-like */
		fill_text((unsigned char *)p, r);
		break;
	}
	return kind;
}

static size_t mem_total(void)
{
	FILE *f = fopen("/proc/meminfo", "r");
	char line[128];
	size_t kb = 0;

	if (!f)
		return 0;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "MemTotal: %zu kB", &kb) == 1)
			break;
	fclose(f);
	return kb * 1024;
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static size_t bad;

static void verify(const unsigned char *mem, const uint64_t *sums, size_t n, size_t i,
		   const char *pass)
{
	uint64_t c = checksum((const uint64_t *)(mem + i * PAGE));

	if (c != sums[i]) {
		if (bad < 10)
			printf("swaptest: %s: page %zu of %zu corrupt (sum %016llx, want %016llx)\n",
			       pass, i, n, (unsigned long long)c, (unsigned long long)sums[i]);
		bad++;
	}
}

int main(int argc, char **argv)
{
	double factor = argc > 1 ? atof(argv[1]) : 3.0;
	size_t total = mem_total(), n, i, step, kinds[5] = { 0 };
	unsigned char *mem;
	uint64_t *sums;
	unsigned int *gen;
	double t0 = now();

	if (argc > 2)
		seed = strtoull(argv[2], NULL, 0);
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (!total || factor <= 0) {
		printf("SWAPTEST FAIL cannot read MemTotal\n");
		return 1;
	}
	n = (size_t)(total * factor) / PAGE;
	printf("swaptest: MemTotal %zu MiB, %zu pages (%zu MiB, x%.1f)\n",
	       total >> 20, n, n * PAGE >> 20, factor);
	mem = mmap(NULL, n * PAGE, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	sums = calloc(n, sizeof(*sums));
	gen = calloc(n, sizeof(*gen));
	if (mem == MAP_FAILED || !sums || !gen) {
		printf("SWAPTEST FAIL cannot allocate\n");
		return 1;
	}

	step = n / 10 ? n / 10 : 1;
	for (i = 0; i < n; i++) {
		kinds[fill_page((uint64_t *)(mem + i * PAGE), i, 0)]++;
		sums[i] = checksum((uint64_t *)(mem + i * PAGE));
		if (i % step == step - 1)
			printf("swaptest: filled %zu%%\n", (i + 1) * 100 / n);
	}
	printf("swaptest: kinds zero %zu same %zu dup %zu random %zu text %zu (%.1fs)\n",
	       kinds[0], kinds[1], kinds[2], kinds[3], kinds[4], now() - t0);

	/* Pass 2: backwards; rewrite every 7th page after checking it. */
	for (i = n; i-- > 0;) {
		verify(mem, sums, n, i, "pass 2");
		if (i % 7 == 3) {
			gen[i]++;
			fill_page((uint64_t *)(mem + i * PAGE), i, gen[i]);
			sums[i] = checksum((uint64_t *)(mem + i * PAGE));
		}
	}
	printf("swaptest: pass 2 done, %zu bad (%.1fs)\n", bad, now() - t0);

	/* Pass 3: strided order so neighbours are not read together. */
	for (step = 0; step < 13; step++)
		for (i = step; i < n; i += 13)
			verify(mem, sums, n, i, "pass 3");
	printf("swaptest: pass 3 done, %zu bad (%.1fs)\n", bad, now() - t0);

	munmap(mem, n * PAGE);
	if (bad) {
		printf("SWAPTEST FAIL %zu corrupt pages\n", bad);
		return 1;
	}
	printf("SWAPTEST PASS %zu pages verified twice in %.1fs\n", n, now() - t0);
	return 0;
}
