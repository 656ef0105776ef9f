#!/usr/bin/env bash
# Benchmarks git-clone against the git CLI on one machine: a generated
# repository (BENCH_FILES files, BENCH_COMMITS commits; cached under
# /var/tmp keyed by those numbers) and any local repository named by
# BENCH_GIT_REPO, served by git-http-backend behind a loopback nginx
# (fcgiwrap). Each case runs BENCH_RUNS times, interleaved, into a fresh
# ext4 volume (a direct-I/O loop device) with the page cache dropped. Prints a
# markdown table of median wall time, ratio against the reference and median
# peak RSS, and writes it to bench-out/git-clone.md.
#
# Cases, per repository:
#   git-clone --depth 1            vs  git clone --depth 1 (reference)
#                                      git clone --depth 1 && sync (as durable)
#   git-clone --depth 0 (full)     vs  git clone (reference)
#
# usage: scripts/bench-git-clone.sh BIN_DIR   (make bench-git-clone; root)
#   BENCH_FILES=50000     files in the generated repository's tip
#   BENCH_COMMITS=1000    commits of its history
#   BENCH_RUNS=3          runs per case
#   BENCH_GIT_REPO=PATH   also a local repository (cloned bare once)
#   BENCH_TMPDIR=/var/tmp where the work directory and the volume image live
set -euo pipefail
# shellcheck source=scripts/lib/bench.sh
source "$(dirname "$0")/lib/bench.sh"

bench_args git-clone "$@"
files=${BENCH_FILES:-50000}
commits=${BENCH_COMMITS:-1000}
runs=${BENCH_RUNS:-3}
bench_check_runs "$runs" 50
[ "$files" -ge 10 ] && [ "$commits" -ge 1 ] || { echo "BENCH_FILES >= 10, BENCH_COMMITS >= 1" >&2; exit 2; }
bench_need nginx fcgiwrap git python3 /usr/bin/time /usr/lib/git-core/git-http-backend
$is_root || echo "warning: not root: the page cache is not dropped between runs" >&2

bench_workdir populator-bench-git
bench_load
bench_private_copy

# --- the generated repository (cached) --------------------------------------
cache=/var/tmp/populator-bench-git-cache/files$files-commits$commits-v1
if [ ! -d "$cache/repo.git" ]; then
  log "generating $files files, $commits commits into $cache (once)"
  rm -rf "$cache" && mkdir -p "$cache"
  git init -q --bare -b main "$cache/tmp.git"
  # fast-import: the first commit adds every file (a few hundred bytes of
  # text each, in 100-file directories), each later one edits 20 of them.
  python3 - "$files" "$commits" <<'PY' | git -C "$cache/tmp.git" fast-import --quiet
import random, sys
files, commits = int(sys.argv[1]), int(sys.argv[2])
rng = random.Random(42)
words = [("w%d" % i) for i in range(5000)]
out = sys.stdout.buffer
def blob(mark, text):
    data = text.encode()
    out.write(b"blob\nmark :%d\ndata %d\n" % (mark, len(data)) + data + b"\n")
def path(i):
    return "src/d%03d/f%05d.txt" % (i // 100, i)
def content(i, rev):
    n = 20 + (i * 7919) % 200
    return "file %d rev %d\n" % (i, rev) + " ".join(rng.choice(words) for _ in range(n)) + "\n"
mark = 0
for c in range(commits):
    changed = range(files) if c == 0 else rng.sample(range(files), 20)
    marks = []
    for i in changed:
        mark += 1
        blob(mark, content(i, c))
        marks.append((i, mark))
    msg = ("commit %d\n" % c).encode()
    out.write(b"commit refs/heads/main\ncommitter Bench <b@example.com> %d +0000\ndata %d\n" % (1700000000 + c, len(msg)) + msg)
    for i, m in marks:
        mode = b"100755" if i % 50 == 0 else b"100644"
        out.write(b"M %s :%d %s\n" % (mode, m, path(i).encode()))
    out.write(b"\n")
PY
  git -C "$cache/tmp.git" repack -q -a -d -f --window=10 --depth=50
  mv "$cache/tmp.git" "$cache/repo.git"
fi
mkdir -p "$work/git"
ln -s "$cache/repo.git" "$work/git/generated.git"
repos=(generated)
if [ -n "${BENCH_GIT_REPO:-}" ]; then
  log "cloning $BENCH_GIT_REPO bare"
  git clone -q --bare "$BENCH_GIT_REPO" "$work/git/local.git"
  repos+=(local)
fi

# --- nginx + fcgiwrap + git-http-backend ------------------------------------
port=$(bench_free_port)
mkdir -p "$work/nginx/logs"
# One process: preforked children would outlive a kill of the parent.
fcgiwrap -c 1 -s "unix:$work/nginx/fcgi.sock" </dev/null >/dev/null 2>"$work/nginx/logs/fcgiwrap.log" &
bench_pids+=("$!")
for ((i = 0; i < 50; i++)); do [ -S "$work/nginx/fcgi.sock" ] && break; sleep 0.1; done
# As root, without workers: the fcgiwrap socket is root's.
bench_nginx "master_process off;" "    server {
        listen 127.0.0.1:$port;
        location ~ ^/git(/.*)\$ {
            client_max_body_size 0;
            fastcgi_pass unix:$work/nginx/fcgi.sock;
            include /etc/nginx/fastcgi_params;
            fastcgi_param SCRIPT_FILENAME /usr/lib/git-core/git-http-backend;
            fastcgi_param GIT_PROJECT_ROOT $work/git;
            fastcgi_param GIT_HTTP_EXPORT_ALL \"\";
            fastcgi_param PATH_INFO \$1;
        }
    }"
base=http://127.0.0.1:$port/git
for ((i = 0; i < 50; i++)); do
  git ls-remote "$base/generated.git" >/dev/null 2>&1 && break
  sleep 0.1
done
git ls-remote "$base/generated.git" >/dev/null || { cat "$work/nginx/logs/"* >&2; exit 1; }
log "git-http-backend on $base"

# --- cases --------------------------------------------------------------------
bench_volume 4096
out=$vol/out
declare -A label cmd group tip
order=()
add() { group[$1]=$2; label[$1]=$3; cmd[$1]=$4; order+=("$1"); }
declare -A ref group_title
gc=(--progress none --retries 0 --termination-log "$work/result.json")
for r in "${repos[@]}"; do
  url=$base/$r.git
  tip[$r]=$(git -C "$work/git/$r.git" rev-parse HEAD)
  nfiles=$(git -C "$work/git/$r.git" ls-tree -r HEAD | wc -l)
  ncommits=$(git -C "$work/git/$r.git" rev-list --count HEAD)
  add "${r}_gc1" "${r}_d1" "git-clone --depth 1" "$bin ${gc[*]} --repo $url --target $out"
  add "${r}_git1" "${r}_d1" "git clone --depth 1" "git clone -q --depth 1 $url $out"
  add "${r}_git1s" "${r}_d1" "git clone --depth 1 && sync -f (as durable as git-clone)" "git clone -q --depth 1 $url $out && sync -f $out"
  add "${r}_gc0" "${r}_full" "git-clone --depth 0" "$bin ${gc[*]} --depth 0 --repo $url --target $out"
  add "${r}_git0" "${r}_full" "git clone" "git clone -q $url $out"
  ref[${r}_d1]=${r}_git1
  ref[${r}_full]=${r}_git0
  group_title[${r}_d1]="$r ($nfiles files, $ncommits commits): depth 1"
  group_title[${r}_full]="$r: full history"
done

# The checkout must be the tip's tree: same paths and blob ids as git's index.
verify() {
  local id=$1 r=${1%%_*}
  [ "$(git -C "$out" rev-parse HEAD)" = "${tip[$r]}" ] || { echo "$id: HEAD is not the tip" >&2; return 1; }
  [ -z "$(git -C "$out" status --porcelain)" ] || { echo "$id: git status is not clean" >&2; return 1; }
}

results=$work/results.tsv
: > "$results"
total=$((runs * ${#order[@]}))
n=0
for ((run = 1; run <= runs; run++)); do
  for id in "${order[@]}"; do
    n=$((n + 1))
    rm -f "$work/result.json"
    bench_fresh_volume
    mkdir "$out"
    bench_drop_caches
    read -r -a argv <<< "${cmd[$id]}"
    [[ ${cmd[$id]} == *"&&"* ]] && argv=(bash -c "${cmd[$id]}")
    status=ok
    if bench_timed 1200 "${argv[@]}"; then
      verify "$id" || status="wrong output"
    else
      status="exit $?"
    fi
    rss=$rss_kib
    if [ "$status" = ok ]; then
      printf '%s\t%s\t%s\n' "$id" "$wall" "$rss" >> "$results"
      log "[$n/$total] ${label[$id]} (${group[$id]}): ${wall}s, $((rss / 1024)) MiB"
    else
      log "[$n/$total] ${label[$id]} (${group[$id]}): FAILED ($status)"; tail -5 "$work/run.log" >&2
    fi
  done
done
# --- table ----------------------------------------------------------------------
table=$work/table.md
{
  echo "git-clone $revision, $(date -u +%Y-%m-%d), $runs runs per case, load average at start: $load_start"
  echo
  last=
  for id in "${order[@]}"; do
    g=${group[$id]}
    if [ "$g" != "$last" ]; then
      echo
      echo "**${group_title[$g]}**"
      echo
      echo "| case | median wall | ratio | median peak RSS |"
      echo "|---|---|---|---|"
      last=$g
    fi
    wall=$(awk -v id="$id" '$1 == id { print $2 }' "$results" | bench_median)
    rss=$(awk -v id="$id" '$1 == id { print $3 }' "$results" | bench_median)
    refwall=$(awk -v id="${ref[$g]}" '$1 == id { print $2 }' "$results" | bench_median)
    if [ -z "$wall" ]; then echo "| ${label[$id]} | failed | | |"; continue; fi
    ratio=$(awk -v a="$wall" -v b="$refwall" 'BEGIN { if (b > 0) printf "%.2f×", a / b; else print "—" }')
    [ "$id" = "${ref[$g]}" ] && ratio="1.00× (reference)"
    echo "| ${label[$id]} | ${wall} s | $ratio | $(awk -v k="$rss" 'BEGIN { printf "%.0f MiB", k / 1024 }') |"
  done
} > "$table"
mkdir -p "$root/bench-out"
cp "$table" "$root/bench-out/git-clone.md"
cat "$table"
