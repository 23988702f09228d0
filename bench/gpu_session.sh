#!/usr/bin/env bash
# One GPU session in one call: install the package from a wheel built beforehand, run the whole test
# suite on the GPU, a compute-sanitizer memcheck and racecheck of the kernel tests on odd shapes, and
# the benchmark. Everything it writes lands under $OUT; a step that fails is logged and the rest run.
#
#   here (no GPU):  .venv/bin/python -m pip wheel --no-deps -w dist .
#   device tool:    run(command="bash bench/gpu_session.sh", carry=["dist"], timeout_s=...)
#
# The device image has its own Python, torch, triton and cupy and no internet: nothing is installed
# but the wheel. Tests and benchmark run from a scratch folder, so the source folder crossattn_gpu/
# does not shadow the installed package (whose crossattn_gpu.kernels is the repository's kernels/).
set -u
repo=$(pwd)
out=${OUT:?OUT must name the folder for results}
mkdir -p "$out"
python -m pip install --no-deps --force-reinstall "$repo"/dist/crossattn_gpu-*.whl > "$out/install.log" 2>&1 \
    || { echo "wheel install failed"; tail -20 "$out/install.log"; exit 1; }

scratch=$(mktemp -d)
ln -s "$repo/bench" "$scratch/bench"
cd "$scratch" || exit 1

step() {  # step NAME COMMAND...: run, log to $out/NAME.log, report the exit code
    local name=$1
    shift
    local start=$SECONDS
    "$@" > "$out/$name.log" 2>&1
    echo "$name: exit $? in $((SECONDS - start)) s"
}

step info python -m crossattn_gpu info
mkdir -p "$out/results"
CROSSATTN_CONFORMANCE_SUMMARY="$out/results/conformance" \
    step pytest python -m pytest -q -p no:cacheprovider -c "$repo/pyproject.toml" --rootdir "$repo" "$repo/tests"
if command -v compute-sanitizer > /dev/null; then
    odd='113x130 or 130x113 or 1280 or 17x113'
    for tool in memcheck racecheck; do
        step "sanitizer-$tool" compute-sanitizer --tool "$tool" --error-exitcode 9 \
            python -m pytest -q -p no:cacheprovider -c "$repo/pyproject.toml" --rootdir "$repo" \
            "$repo/tests/kernels/test_attention.py" -k "$odd"
    done
else
    echo "compute-sanitizer not found: memcheck and racecheck not run"
fi
step bench python -m bench --device gpu --out-dir "$out/results"
tail -n 3 "$out/pytest.log"
