#!/usr/bin/env bash
# Parsl on falconet (docs/engines.md, "Parsl"), from the repository root of a fresh clone:
#  1. a virtual environment of its own (Parsl pins pytest<8) with a non-editable
#     install of falconet[parsl] and what Parsl's test suite imports;
#  2. Parsl's own test suite, as its CI runs it for a config (-k "not cleannet"), once on
#     Parsl's thread config and once on falconet's (tests/parsl/falconet_config.py), the
#     latter without the tests listed in tests/parsl/exclusions.txt;
#  3. the comparison: every test that passes on threads must pass on falconet (one that
#     does not runs again once, as a few of Parsl's tests are timing-sensitive);
#  4. falconet's own Parsl tests, tests/unit/test_parsl_options.py and
#     tests/integration/test_parsl.py.
# About 1.5 to 3 minutes on 2 cores, most of it the install.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.ci-venv-parsl
OUT=.ci-parsl
rm -rf "$OUT" && mkdir -p "$OUT"

echo "== the Parsl environment"
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# parsl[monitoring] and pandas: modules Parsl's test files import at collection.
"$VENV/bin/pip" install --quiet '.[parsl]' 'parsl[monitoring]' pandas 'pytest<8' pytest-timeout
PARSL_TESTS=$("$VENV/bin/python" -c 'import os, parsl.tests; print(os.path.dirname(parsl.tests.__file__))')
echo "Parsl $("$VENV/bin/python" -c 'import parsl; print(parsl.__version__)') at $PARSL_TESTS"

# The marker expression of Parsl's own CI; as root, a permission error cannot happen, so
# the tests that need one fail on every config (Parsl's TaskVine CI leaves them out too).
SELECT="not cleannet"
if [ "$(id -u)" = 0 ]; then
    SELECT="$SELECT and not unix_filesystem_permissions_required"
fi
DESELECT=()
while read -r test_id; do
    DESELECT+=(--deselect "$test_id")  # node ids are relative to --rootdir, below
done < <(sed -e 's/#.*//' -e 's/[[:space:]]*$//' tests/parsl/exclusions.txt | grep -v '^$')

suite() {  # suite NAME CONFIG PYTEST-ARGS...: Parsl's tests on one config, a JUnit file in $OUT
    local name=$1 config=$2
    shift 2
    echo "== Parsl's test suite on $name ($config)"
    # Run where its scratch folder (pytest-parsl/) goes to $OUT, with Parsl's folder as the
    # root and no ini file (not falconet's pyproject.toml).  The exit status is the
    # comparison's to judge, as a test may fail on both configs for reasons of the machine.
    # The tests come first: pytest finds Parsl's conftest (which adds --config) from them.
    (cd "$OUT" && "../$VENV/bin/pytest" "$@" --config "$config" -k "$SELECT" -q \
        --rootdir "$PARSL_TESTS" -c /dev/null -p no:cacheprovider --timeout 120 \
        --junitxml "$name.xml") || true
}
suite threads "$PARSL_TESTS/configs/local_threads.py" "$PARSL_TESTS"
suite falconet "$PWD/tests/parsl/falconet_config.py" "$PARSL_TESTS" "${DESELECT[@]}"

echo "== every test passing on Parsl's thread config passes on falconet's"
compare() {
    "$VENV/bin/python" tests/parsl/compare.py "$OUT/threads.xml" "$OUT/falconet.xml" \
        --exclusions tests/parsl/exclusions.txt "$@"
}
if ! compare --regressions "$OUT/regressions.txt"; then
    # A test that passed on threads and failed on falconet runs once more on falconet, to
    # tell a flaky timing test (see compare.py) from a regression; the second run decides.
    mapfile -t AGAIN < <(sed "s|^|$PARSL_TESTS/|" "$OUT/regressions.txt")
    [ "${#AGAIN[@]}" -gt 0 ] || exit 1
    suite falconet-rerun "$PWD/tests/parsl/falconet_config.py" "${AGAIN[@]}"
    compare --rerun "$OUT/falconet-rerun.xml"
fi

echo "== falconet's own Parsl tests"
# The venv's pytest, not python -m pytest: the installed falconet, not the source folder.
"$VENV/bin/pytest" tests/unit/test_parsl_options.py tests/integration/test_parsl.py -q -p no:cacheprovider
