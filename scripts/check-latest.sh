#!/usr/bin/env bash
# Installs the newest versions that pyproject.toml's ranges allow (no lock; torch stays at its 2.13.0 pin) into a
# fresh venv, shows which packages moved against constraints.txt, and runs the test suite there.
#
# Run it before `scripts/lock.sh --upgrade`, before a release, and weekly: the registries move under us (a
# transformers minor release once broke prefix tuning). When it fails, users who install through the lock are
# safe; fix the code, then upgrade the lock. The report goes to stdout and to $1 (default
# benchmarks/results/check_latest.md), with the command, machine and date.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/check_latest.md}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
py="$work/venv/bin/python"
{
  echo "# Newest allowed versions against the lock"
  echo
  echo "Command: \`scripts/check-latest.sh\`; machine: $(nproc) cores, $(uname -m), Python $($py -c 'import platform; print(platform.python_version())'); date: $(date -u +%Y-%m-%d)."
  echo
} >"$work/report.md"
if ! "$py" -m pip install -q -e ".[dev]" >"$work/install.log" 2>&1; then
  { echo "**Install failed:**"; echo '```'; grep -v "WARNING: Location" "$work/install.log" | tail -20; echo '```'; } >>"$work/report.md"
  cat "$work/report.md"; cp "$work/report.md" "$out"; exit 1
fi
"$py" - constraints.txt >>"$work/report.md" <<'PY'
import importlib.metadata as md, re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
lock = dict(l.split("==", 1) for l in open(sys.argv[1]) if re.match(r"^[A-Za-z0-9]", l))
lock = {norm(k): v.strip() for k, v in lock.items()}
now = {norm(d.metadata["Name"]): d.version for d in md.distributions() if norm(d.metadata["Name"]) not in ("fedfm", "pip", "setuptools")}
moved = sorted((k, lock.get(k, "-"), v) for k, v in now.items() if lock.get(k) != v)
print(f"{len(now)} packages installed; {len(moved)} differ from constraints.txt:\n")
print("| package | lock | newest allowed |\n|---|---|---|")
print("\n".join(f"| {k} | {a} | {b} |" for k, a, b in moved) or "| (none) | | |")
gone = sorted(set(lock) - set(now) - {"setuptools"})
print(f"\nIn the lock, not installed now: {', '.join(gone) or 'none'}.\n")
PY
{
  echo "Newer releases that exist but that the resolution held back (another package's range excludes them):"
  echo '```'
  "$py" -m pip list --outdated 2>/dev/null | grep -v "^WARNING"
  echo '```'
  echo
} >>"$work/report.md"
"$work/venv/bin/fedfm" data fetch >"$work/fetch.log" 2>&1 || { echo "fedfm data fetch failed:"; tail -5 "$work/fetch.log"; } >>"$work/report.md"
# the venv first on PATH: tests start its `fedfm`, `flower-superlink`, ... as separate processes
PATH="$work/venv/bin:$PATH" "$py" -m pytest -p no:cacheprovider -rf 2>&1 | tee "$work/pytest.log" | tail -3
status=${PIPESTATUS[0]}
{
  echo "Test suite (exit $status):"
  echo '```'
  grep -E "^(FAILED|ERROR) " "$work/pytest.log" | head -30
  tail -1 "$work/pytest.log"
  echo '```'
} >>"$work/report.md"
cat "$work/report.md"
cp "$work/report.md" "$out"
exit "$status"
