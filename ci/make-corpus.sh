#!/usr/bin/env bash
# Builds a page corpus for `tmem-bench store --corpus FILE`: raw concatenated
# 4096-byte pages, optionally zstd-compressed (.zst).
#
#   ci/make-corpus.sh --out FILE [--workload python|sort] [--mib N] [--zst]
#       Starts a real program, waits until it has built its data, freezes it,
#       and copies its private anonymous memory (what the kernel would swap)
#       from /proc/PID/mem, page by page, resident or swapped pages only,
#       skipping what cannot be read. python: dicts, strings, lists and floats;
#       sort: GNU sort holding N MiB of generated text lines.
#
#   ci/make-corpus.sh --synthetic PAGES --out FILE [--seed S] [--no-dups] [--zst]
#       Generates a deterministic mixed corpus without any program: zero,
#       same-filled, duplicate, text, random and half-random pages.
#       --no-dups leaves out zero, same-filled and duplicate pages.
#
# Reading another process's memory needs ptrace rights over it: the dumper
# starts the program itself, so it is the program's parent (enough under
# Yama ptrace_scope 1) or root.
set -euo pipefail
cd "$(dirname "$0")/.."

out="" workload=python mib=64 zst=0 synthetic="" seed=1 nodups=0
while [ $# -gt 0 ]; do
    case "$1" in
    --out) out=$2; shift 2 ;;
    --workload) workload=$2; shift 2 ;;
    --mib) mib=$2; shift 2 ;;
    --zst) zst=1; shift ;;
    --synthetic) synthetic=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    --no-dups) nodups=1; shift ;;
    -h | --help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "make-corpus: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ -n "$out" ] || { echo "make-corpus: --out FILE is required" >&2; exit 2; }
case "$workload" in python | sort) ;; *) echo "make-corpus: unknown workload $workload" >&2; exit 2 ;; esac

bash ci/deps.sh bench

raw="$out"
[ "$zst" = 1 ] && raw="${out%.zst}.raw.tmp"

if [ -n "$synthetic" ]; then
    python3 - "$raw" "$synthetic" "$seed" "$nodups" <<'EOF'
import random, struct, sys

path, pages, seed, nodups = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
P = 4096
rng = random.Random(seed)
WORDS = ("swap page guest host memory kernel virtio queue the of and to in is for "
         "compressed transcendent frontswap zswap zram pool index object chunk "
         "error status config socket thread lock shard hash table").split()

def text():
    s = " ".join(rng.choices(WORDS, k=900)).encode()
    s += b" %d %d\n" % (rng.getrandbits(32), rng.getrandbits(48))
    return (s * 2)[:P]

kinds = [("text", 45), ("random", 15), ("half", 15)]
if not nodups:
    kinds += [("zero", 10), ("fill", 5), ("dup", 10)]
names = [k for k, _ in kinds]
weights = [w for _, w in kinds]
done = []
with open(path, "wb") as f:
    for _ in range(pages):
        kind = rng.choices(names, weights)[0]
        if kind == "dup" and not done:
            kind = "zero"
        if kind == "zero":
            p = bytes(P)
        elif kind == "fill":
            p = struct.pack("<Q", rng.getrandbits(64)) * (P // 8)
        elif kind == "dup":
            p = rng.choice(done)
        elif kind == "random":
            p = rng.randbytes(P)
        elif kind == "half":
            p = rng.randbytes(P // 2) + text()[: P // 2]
        else:
            p = text()
        if not nodups and len(done) < 512:
            done.append(p)
        f.write(p)
EOF
else
    python3 - "$raw" "$workload" "$mib" <<'EOF'
import os, random, signal, struct, subprocess, sys, time

path, workload, mib = sys.argv[1], sys.argv[2], int(sys.argv[3])
P = 4096

PY_WORKLOAD = r'''
import random, sys
mib = int(sys.argv[1])
rng = random.Random(7)
words = "alpha beta gamma delta swap page memory guest host kernel queue lorem ipsum".split()
data = {"dict": {}, "strings": [], "floats": [], "lists": []}
target = mib << 20
size = 0
i = 0
while size < target:
    k = "user:%08d" % i
    v = {"id": i, "name": " ".join(rng.choices(words, k=4)), "score": rng.random(),
         "tags": [rng.randrange(1000) for _ in range(5)]}
    data["dict"][k] = v
    if i % 3 == 0:
        s = " ".join(rng.choices(words, k=40)) + " %d" % i
        data["strings"].append(s)
        size += len(s) + 49
    if i % 5 == 0:
        data["floats"].append([rng.random() for _ in range(16)])
        size += 16 * 24 + 184
    data["lists"].append(list(range(i % 50)))
    size += 560 + 8 * (i % 50)
    i += 1
print("ready", flush=True)
sys.stdin.read()
'''

def resident(pagemap, addr):
    """True when the page is present in RAM or swapped: what swap would see."""
    if pagemap is None:
        return True
    try:
        pagemap.seek((addr // P) * 8)
        (entry,) = struct.unpack("<Q", pagemap.read(8))
    except (OSError, struct.error):
        return True
    return bool(entry & (1 << 63) or entry & (1 << 62))

if workload == "python":
    child = subprocess.Popen([sys.executable, "-c", PY_WORKLOAD, str(mib)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    if child.stdout.readline().strip() != b"ready":
        sys.exit("make-corpus: the python workload did not get ready")
else:
    # A buffer large enough that sort keeps the input in memory, not in temp files.
    child = subprocess.Popen(["sort", "-S", "%dM" % (mib * 3)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             env=dict(os.environ, LC_ALL="C"))
    rng = random.Random(11)
    words = "alpha beta gamma delta swap page memory guest host kernel queue".split()
    written = 0
    while written < mib << 20:
        lines = "".join("%s %d %s\n" % (rng.choice(words), rng.getrandbits(40),
                                        " ".join(rng.choices(words, k=8)))
                        for _ in range(2000)).encode()
        child.stdin.write(lines)
        written += len(lines)
    child.stdin.flush()
    # sort keeps everything until end of input: wait until it has taken it in.
    last = -1
    for _ in range(100):
        time.sleep(0.2)
        with open("/proc/%d/status" % child.pid) as st:
            rss = next(int(l.split()[1]) for l in st if l.startswith("VmRSS:"))
        if rss == last:
            break
        last = rss

pid = child.pid
os.kill(pid, signal.SIGSTOP)
pages = skipped = 0
try:
    try:
        pagemap = open("/proc/%d/pagemap" % pid, "rb")
    except OSError:
        pagemap = None
    with open("/proc/%d/maps" % pid) as maps, open("/proc/%d/mem" % pid, "rb", 0) as mem, \
            open(path, "wb") as out:
        for line in maps:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            perms, inode = fields[1], fields[4]
            name = fields[5] if len(fields) > 5 else ""
            if not (perms.startswith("rw") and perms[3] == "p" and inode == "0"):
                continue
            if name not in ("", "[heap]", "[stack]"):
                continue
            for addr in range(start, end, P):
                if not resident(pagemap, addr):
                    continue
                try:
                    mem.seek(addr)
                    page = mem.read(P)
                except OSError:
                    skipped += 1
                    continue
                if len(page) != P:
                    skipped += 1
                    continue
                out.write(page)
                pages += 1
finally:
    os.kill(pid, signal.SIGKILL)
    child.wait()
print("make-corpus: %d pages from %s (pid %d), %d unreadable skipped" % (pages, workload, pid, skipped),
      file=sys.stderr)
if pages == 0:
    sys.exit("make-corpus: no page could be read (ptrace rights over the program?)")
EOF
fi

if [ "$zst" = 1 ]; then
    zstd -q -f -3 --rm "$raw" -o "$out"
fi
echo "make-corpus: wrote $out ($(stat -c %s "$out") bytes)" >&2
