#!/bin/sh
# Runs inside the two-node guest (tests/numa/vm.py boots it): every in-guest test, in one
# pytest process (a Python start costs seconds under TCG).  Results go to OUT, the directory
# shared read-write with the host; vng's own exit status means nothing (it is always 255).
#
#   guest.sh OUT CHECKOUT
out=$1
cd "$2" || { echo "no checkout $2" > "$out/error"; exit 1; }
# The checkout is read-only here: no .pyc files, no pytest cache.
export PYTHONDONTWRITEBYTECODE=1 KVMACCEL_REQUIRE_ENV=1 KVMACCEL_IN_NUMA_GUEST=1
export KVMACCEL_NUMA_OUT="$out"
date +%s.%N > "$out/started"
.venv/bin/python -m pytest -p no:cacheprovider -q -rA --durations=8 \
  --junitxml="$out/guest.xml" tests/numa/guest > "$out/guest.log" 2>&1
echo $? > "$out/guest.rc"
date +%s.%N > "$out/finished"
