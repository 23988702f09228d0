#!/usr/bin/env bash
# One GPU session in one call (the device tool allows 10 minutes a command): install the package from a
# wheel built beforehand, then, each step under its own time limit so that one slow step cannot starve
# the rest: the GPU tests, the benchmark, compute-sanitizer memcheck and racecheck of the kernel tests
# on odd shapes, and the conformance suite with its summary. Everything lands under $OUT; a failing
# step is logged and the others still run.
#
#   here (no GPU):  .venv/bin/python -m pip wheel --no-deps -w dist .
#   device tool:    run(command="bash bench/gpu_session.sh", carry=["dist"], timeout_s=600)
#
# The device image has its own Python, torch, triton and cupy and no internet: nothing is installed
# but the wheel. Tests and benchmark run from a scratch folder, so the source folder crossattn_gpu/
# does not shadow the installed package (whose crossattn_gpu.kernels is the repository's kernels/).
set -u
repo=$(pwd)
out=${OUT:?OUT must name the folder for results}
mkdir -p "$out/results"
python -m pip install --no-deps --force-reinstall "$repo"/dist/crossattn_gpu-*.whl > "$out/install.log" 2>&1 \
    || { echo "wheel install failed"; tail -20 "$out/install.log"; exit 1; }

scratch=$(mktemp -d)
ln -s "$repo/bench" "$scratch/bench"
cd "$scratch" || exit 1

step() {  # step NAME SECONDS COMMAND...: run under a time limit, log to $out/NAME.log, report
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    echo "$name: exit $? in $((SECONDS - start)) s (limit $limit s)"
}
pytest_args=(-q -p no:cacheprovider -c "$repo/pyproject.toml" --rootdir "$repo")

step info 30 python -m crossattn_gpu info
step tests 140 python -m pytest "${pytest_args[@]}" "$repo/tests" --ignore="$repo/tests/conformance"
step bench 180 python -m bench --device gpu --budget 2 --repeats 20 --out-dir "$out/results"
if command -v compute-sanitizer > /dev/null; then
    odd='113x130 or 130x113 or 1280 or 17x113'
    for tool in memcheck racecheck; do
        step "sanitizer-$tool" 45 compute-sanitizer --tool "$tool" --error-exitcode 9 \
            python -m pytest "${pytest_args[@]}" "$repo/tests/kernels/test_attention.py" -k "$odd"
    done
else
    echo "compute-sanitizer not found: memcheck and racecheck not run"
fi
CROSSATTN_CONFORMANCE_SUMMARY="$out/results/conformance" \
    step conformance 110 python -m pytest "${pytest_args[@]}" "$repo/tests/conformance"
tail -n 2 "$out/tests.log" "$out/conformance.log"
