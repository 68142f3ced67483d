// SPDX-License-Identifier: GPL-2.0
/*
 * swaptest: make the guest swap, then check every page came back intact.
 *
 * A worker allocates its share of FACTOR times MemTotal (default 3) of
 * anonymous memory, fills each 4 KiB page with one of five kinds of content
 * (zero, same-filled, a copy of one of a few template pages, random,
 * text-like), remembers a checksum per page, then walks the memory again (in
 * a different order) verifying every page, rewrites some pages, and verifies
 * everything once more.
 *
 * With -j N, N worker processes share FACTOR between them and swap at once.
 * With -c, a churn process maps a quarter of MemTotal, fills it, verifies it
 * and unmaps it, over and over until the workers are done, so that swap
 * slots are freed in bulk while the workers swap. With -m FILE, FILE is
 * created once every worker has filled its memory (the middle of the run,
 * for a test that wants to act then).
 *
 * Prints "SWAPTEST PASS ..." or "SWAPTEST FAIL ..." and exits 0 or 1.
 *
 * usage: swaptest [-j workers] [-c] [-m file] [factor] [seed]
 */
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

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
static const char *tag = "swaptest";

static void verify(const unsigned char *mem, const uint64_t *sums, size_t n, size_t i,
		   const char *pass)
{
	uint64_t c = checksum((const uint64_t *)(mem + i * PAGE));

	if (c != sums[i]) {
		if (bad < 10)
			printf("%s: %s: page %zu of %zu corrupt (sum %016llx, want %016llx)\n",
			       tag, pass, i, n, (unsigned long long)c, (unsigned long long)sums[i]);
		bad++;
	}
}

/* Shared by all processes: how many workers have filled their memory. */
struct shared {
	int filled;
};

static struct shared *shared;
static const char *mark_file;
static int jobs = 1;

static void filled_one(void)
{
	int fd;

	if (__sync_add_and_fetch(&shared->filled, 1) != jobs || !mark_file)
		return;
	fd = open(mark_file, O_CREAT | O_WRONLY, 0644);
	if (fd >= 0)
		close(fd);
}

/* One worker: @n pages, filled, verified twice. Returns the pages that failed. */
static size_t worker(size_t n)
{
	size_t i, step, kinds[5] = { 0 };
	unsigned char *mem;
	uint64_t *sums;
	unsigned int *gen;
	double t0 = now();

	mem = mmap(NULL, n * PAGE, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	sums = calloc(n, sizeof(*sums));
	gen = calloc(n, sizeof(*gen));
	if (mem == MAP_FAILED || !sums || !gen) {
		printf("%s: cannot allocate\n", tag);
		return n ? n : 1;
	}

	step = n / 10 ? n / 10 : 1;
	for (i = 0; i < n; i++) {
		kinds[fill_page((uint64_t *)(mem + i * PAGE), i, 0)]++;
		sums[i] = checksum((uint64_t *)(mem + i * PAGE));
		if (i % step == step - 1)
			printf("%s: filled %zu%%\n", tag, (i + 1) * 100 / n);
	}
	printf("%s: kinds zero %zu same %zu dup %zu random %zu text %zu (%.1fs)\n",
	       tag, kinds[0], kinds[1], kinds[2], kinds[3], kinds[4], now() - t0);
	filled_one();

	/* Pass 2: backwards; rewrite every 7th page after checking it. */
	for (i = n; i-- > 0;) {
		verify(mem, sums, n, i, "pass 2");
		if (i % 7 == 3) {
			gen[i]++;
			fill_page((uint64_t *)(mem + i * PAGE), i, gen[i]);
			sums[i] = checksum((uint64_t *)(mem + i * PAGE));
		}
	}
	printf("%s: pass 2 done, %zu bad (%.1fs)\n", tag, bad, now() - t0);

	/* Pass 3: strided order so neighbours are not read together. */
	for (step = 0; step < 13; step++)
		for (i = step; i < n; i += 13)
			verify(mem, sums, n, i, "pass 3");
	printf("%s: pass 3 done, %zu bad (%.1fs)\n", tag, bad, now() - t0);

	munmap(mem, n * PAGE);
	free(sums);
	free(gen);
	return bad;
}

static volatile sig_atomic_t stop;

static void on_term(int sig)
{
	(void)sig;
	stop = 1;
}

/*
 * The churn process: map @n pages, fill them, verify them, unmap them, until
 * SIGTERM. Every unmap frees the slots of the pages that were swapped out.
 */
static size_t churn(size_t n)
{
	uint64_t *sums = calloc(n, sizeof(*sums));
	size_t cycles = 0, pages = 0, i, filled;
	double t0 = now(), t;

	if (!sums) {
		printf("%s: cannot allocate\n", tag);
		return 1;
	}
	signal(SIGTERM, on_term);
	while (!stop) {
		unsigned char *mem = mmap(NULL, n * PAGE, PROT_READ | PROT_WRITE,
					  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);

		if (mem == MAP_FAILED) {
			printf("%s: cannot map\n", tag);
			return bad + 1;
		}
		for (filled = 0; filled < n && !stop; filled++) {
			fill_page((uint64_t *)(mem + filled * PAGE), filled, (unsigned int)cycles);
			sums[filled] = checksum((uint64_t *)(mem + filled * PAGE));
		}
		for (i = 0; i < filled; i++)
			verify(mem, sums, n, i, "churn");
		munmap(mem, n * PAGE);
		pages += filled;
		cycles++;
	}
	t = now() - t0;
	printf("%s: %zu cycles, %zu pages mapped, filled, verified and unmapped in %.1fs (%.0f pages/s), %zu bad\n",
	       tag, cycles, pages, t, t > 0 ? pages / t : 0.0, bad);
	free(sums);
	return bad;
}

/* Runs @fn(@n) in a child process tagged @name; returns its pid. */
static pid_t spawn(const char *name, size_t (*fn)(size_t), size_t n, uint64_t child_seed)
{
	pid_t pid = fork();

	if (pid == 0) {
		tag = name;
		seed = child_seed;
		_exit(fn(n) ? 1 : 0);
	}
	return pid;
}

/* Waits for @pid; returns whether it exited 0, and says why not. */
static int reap(pid_t pid, const char *name)
{
	int st;

	if (pid < 0 || waitpid(pid, &st, 0) != pid) {
		printf("swaptest: %s: not started or lost\n", name);
		return 0;
	}
	if (WIFSIGNALED(st)) {
		printf("swaptest: %s killed by signal %d\n", name, WTERMSIG(st));
		return 0;
	}
	return WEXITSTATUS(st) == 0;
}

int main(int argc, char **argv)
{
	size_t total = mem_total(), n;
	int opt, k, ok = 1, with_churn = 0;
	double factor = 3.0, t0 = now();
	static char names[64][16];
	pid_t pids[64], churn_pid = -1;

	setvbuf(stdout, NULL, _IOLBF, 0);
	while ((opt = getopt(argc, argv, "j:cm:")) != -1) {
		switch (opt) {
		case 'j':
			jobs = atoi(optarg);
			break;
		case 'c':
			with_churn = 1;
			break;
		case 'm':
			mark_file = optarg;
			break;
		default:
			printf("SWAPTEST FAIL usage: swaptest [-j workers] [-c] [-m file] [factor] [seed]\n");
			return 1;
		}
	}
	if (optind < argc)
		factor = atof(argv[optind]);
	if (optind + 1 < argc)
		seed = strtoull(argv[optind + 1], NULL, 0);
	if (!total || factor <= 0 || jobs < 1 || jobs > 64) {
		printf("SWAPTEST FAIL cannot read MemTotal, or bad arguments\n");
		return 1;
	}
	shared = mmap(NULL, sizeof(*shared), PROT_READ | PROT_WRITE,
		      MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (shared == MAP_FAILED) {
		printf("SWAPTEST FAIL cannot allocate\n");
		return 1;
	}
	n = (size_t)(total * factor) / PAGE;
	printf("swaptest: MemTotal %zu MiB, %zu pages (%zu MiB, x%.1f), %d worker(s)%s\n",
	       total >> 20, n, n * PAGE >> 20, factor, jobs, with_churn ? " and churn" : "");

	if (jobs == 1 && !with_churn) {
		if (worker(n)) {
			printf("SWAPTEST FAIL %zu corrupt pages\n", bad);
			return 1;
		}
		printf("SWAPTEST PASS %zu pages verified twice in %.1fs\n", n, now() - t0);
		return 0;
	}

	if (with_churn)
		churn_pid = spawn("swaptest[churn]", churn, total / 4 / PAGE, mix(seed ^ 0xc4c4));
	for (k = 0; k < jobs; k++) {
		snprintf(names[k], sizeof(names[k]), "swaptest[%d]", k);
		pids[k] = spawn(names[k], worker, n / jobs, mix(seed + k + 1));
	}
	for (k = 0; k < jobs; k++)
		ok &= reap(pids[k], names[k]);
	if (with_churn) {
		kill(churn_pid, SIGTERM);
		ok &= reap(churn_pid, "swaptest[churn]");
	}
	if (!ok) {
		printf("SWAPTEST FAIL (see the lines above)\n");
		return 1;
	}
	printf("SWAPTEST PASS %zu pages verified twice by %d workers in %.1fs%s\n",
	       n / jobs * jobs, jobs, now() - t0, with_churn ? ", churn verified every page" : "");
	return 0;
}
