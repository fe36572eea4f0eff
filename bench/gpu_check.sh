#!/usr/bin/env bash
# The checks that need a hardware GPU, as one prepared run for a machine that has one but cannot reach any
# registry (the device tool's: no npm, no apt there). Two steps:
#
#   bench/gpu_check.sh prepare            here, with network: fills .device/ (git-ignored) with the pinned
#                                         Deno binary (xz, 30 MB), the npm packages deno.json imports
#                                         (5 MB) and the Vulkan loader's Debian package
#   bench/gpu_check.sh run [phase ...]    there, in the repository root, with .device carried along; writes
#                                         one log per phase (and the reports' JSON) into $OUT (default
#                                         ./gpu_check_out)
#
# Phases, in the order given (default: adapter tests quick). Each runs under its own time limit (seconds,
# GPU_CHECK_LIMIT_<PHASE>, e.g. GPU_CHECK_LIMIT_TESTS=300), so a slow one cannot eat the others' time:
#   adapter   the adapter (features, limits, subgroup sizes) and what init() tunes: the matmul variant and
#             the fused scan's candidates at d_state 16 with their measured times; then WebGPU's own host
#             cost per dispatch (bench/webgpu_floor.ts), the floor under the reports' host times, and whether
#             its loops stop at 65535 trips as software adapters' do (bench/loop_limit.ts)
#   tests     the numerics against PyTorch's fixtures and the plain-TS references (scan modes, fused kernels
#             and every variant, whole models, long L), printing every measured error (MAMBA_TOL_REPORT=1)
#   suite     the rest of the test suite (no browser, hub or subgroup-size tests)
#   timeline  bench/gpu_timeline.ts: a step's wall, host, GPU-span and kernel times side by side, and the
#             GPU's own time per dispatch and a wait's cost (the H200's report at 49a9be6 put ~1 ms of its
#             waits into each small step); since 6bf1c21 also the fused step with y written over its
#             gradient (read-write) against y in its own binding, at d_model 64 and 1024 (perhaps 20 s)
#   variants  bench/fused_variants_layer.ts: a layer's step with each of the fused tuner's best variants and
#             with its per-call choice, at d_model 16 to 1024 (does the tuner's proxy pick what layers want?)
#   quick     bench/scan_report.ts --quick (scan_quick.json)
#   report    the full bench/scan_report.ts (scan.json)
#   matmul    bench/matmul_shapes.ts (matmul variants at a layer's shapes, each with and without the GPU split
#             over K of 2026-11-30: its A/B; the adapter phase prints what the tuner chose), at d_model 64, 768;
#             at 768 decoding's products also time the matvec kernel (0b19b04) against the split's slices and
#             against no split (the adapter phase prints the tuner's matvec choice too)
#   generate  bench/generate_report.ts (prefill and decode tokens/s, GPU and host memory; generate.json)
#   memory    bench/scan_memory.ts --quick (log only): a layer's training-step memory per mode with the
#             variants the tuner picks there (it tunes d_state 64 first, as the trainer does, up to 60 s):
#             short chunks (9 steps at 2d4b27c) make the saved chunk states 4 ED N / Lc bytes per token
# At most 8 files come back from $OUT: phases write one log each, quick/report/matmul/generate one JSON more.
# Seen on the H200 (2026-11-30, third session, 2d4b27c): the machine started within the first call; adapter
# 43 s (40 of them tuning on a fresh machine); timeline 50 s; matmul more than 50 s (d_model 64's table
# printed, 768's did not: give it 150); report 189 s; variants more than 75 s (three widths printed; give it
# 150 for four); tests 301 s for the nine files of the second call below (194 passed). Earlier sessions:
# adapter 25-33 s, report 230 s (before TUNE_BUDGET_MS), matmul 3 s at eae010e (half the calls, no 768). The
# first call must hold what matters most (a session was once lent no second machine). A 15-minute lease as
# two calls (10 minutes at most each; the second at once, while the machine is warm; about 12.5 minutes in
# all with the machine's start):
#   GPU_CHECK_LIMIT_ADAPTER=70 GPU_CHECK_LIMIT_TIMELINE=80 GPU_CHECK_LIMIT_MATMUL=150 \
#     GPU_CHECK_LIMIT_REPORT=220 bash bench/gpu_check.sh run adapter timeline matmul report          (~8 min)
#   GPU_CHECK_LIMIT_TESTS=260 GPU_CHECK_LIMIT_MEMORY=100 GPU_CHECK_TESTS="matmul_test fused_test \
#     lm_test mamba_test memory_test fused_variant_fuzz_test" bash bench/gpu_check.sh run tests memory (~6 min)
# (the second call's six test files are those the changes since 2d4b27c touch; all nine passed there)
# New since 2d4b27c, for that run to show: the timeline's L 16384 rows (the backward's parameter sums over the
# chunks' rows, 0.40 ms there at 2d4b27c, now a reduction pass first: fused_scan_bwd_sums should fall to a
# few µs and two reduce_sum dispatches appear; the chains, 0.12 and 0.09 ms there, now fused_scan_chain_*_seg64,
# in runs; the report's breakdown and the tuner count those two reduce_sum dispatches as the scan's); the
# tuner's third problem, (1, 1024, 2048): its pick, and the timeline's d_model 1024 rows with it (chunks of 9
# at 2d4b27c, 1.08 ms for the scan's backward kernel); the matmul phase's d_model 768 table (matvec against the
# split's slices), which has never run on a GPU; lm_test's decoding with the norms inside matvec (c810197:
# matmul_matvec_*_rms); the memory phase (the chunk states' bytes with the GPU's chunk lengths: at N 64, where
# N > 2 Lc, the ops now save the parameters alone and the backward works the states out again, a local pass
# per state block and a chain more in the timeline's and report's N 64 steps; the chunk-parallel backward's
# per-chunk parameter rows are N floats narrower); the forward walking longer chunks than the backward (`Lf`,
# FUSED_KERNEL_VERSION 31): the adapter phase's candidates with "Lf" and their times against the same without,
# which problems pick one, and the report's roofline "walk" column with its GB/s at d_model 1024 (22% of the
# copy bandwidth at 2d4b27c with chunks of 9); the roofline's new "inference" columns (82110c5: a forward no
# backward reads writes the last chunk state only), the figure the issue's "at least half the copy bandwidth"
# is about. The `tiled128` matmul (128x128 tiles, 8x8 per invocation): its GFLOP/s in the adapter phase's
# tuner line against register's 6.4 TFLOP/s at 2d4b27c, and its column in the matmul phase's tables at a
# layer's shapes (whether the tuner picks it, and whether d_model 1024's products, 0.93-1.08 ms each at
# 2d4b27c, fall). With time to spare: the generate phase (decode tokens/s). Since 2026-12-02 the tuners measure
# in interleaved rounds and cache a confidence (13d0251, f63e90b): the adapter phase prints each choice's
# `confident` and spreads; whether the 5% TIE_SPREAD suits a GPU's spreads has never been seen (a GPU whose
# near-equal variants are never confident would re-measure at three starts in a row, then keep its choice).
set -uo pipefail
cd "$(dirname "$0")/.."
DENO_VERSION=2.9.6
DEV=.device

prepare() {
  local deno
  deno="$(command -v deno || true)"
  [ -n "$deno" ] && "$deno" --version | grep -q "deno $DENO_VERSION" || {
    echo "prepare: needs deno $DENO_VERSION on PATH (npm install deno@$DENO_VERSION)" >&2
    exit 1
  }
  mkdir -p "$DEV/debs"
  echo "compressing $(readlink -f "$deno")"
  xz -6 -T2 -c "$(readlink -f "$deno")" >"$DEV/deno.xz.tmp" && mv "$DEV/deno.xz.tmp" "$DEV/deno.xz"
  # The npm packages deno.json imports (Deno installs them all before running anything): a DENO_DIR of its own.
  rm -rf /tmp/gpu_check_dd
  DENO_DIR=/tmp/gpu_check_dd deno install >/dev/null || {
    echo "prepare: deno install failed" >&2
    exit 1
  }
  # (pipefail: a failed tar or xz fails the pipe; the archive replaces the old one only when whole)
  tar -C /tmp/gpu_check_dd -cf - npm | xz -6 -T2 >"$DEV/npm.tar.xz.tmp" && mv "$DEV/npm.tar.xz.tmp" "$DEV/npm.tar.xz" || {
    echo "prepare: packing the npm packages failed" >&2
    exit 1
  }
  # The Vulkan loader (the GPU machine has the NVIDIA driver's ICD but may lack libvulkan.so.1).
  local o="-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/gpu_check_apt"
  mkdir -p /tmp/gpu_check_apt/partial
  # shellcheck disable=SC2086
  apt-get $o update -qq && (cd "$DEV/debs" && apt-get $o download -qq libvulkan1) || {
    echo "prepare: cannot download libvulkan1" >&2
    exit 1
  }
  echo "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo '+uncommitted')" \
    >"$DEV/commit"
  du -sh "$DEV"
}

setup() {
  OUT="${OUT:-$PWD/gpu_check_out}"
  mkdir -p "$OUT"
  [ -f "$DEV/deno.xz" ] || {
    echo "no $DEV/deno.xz: run 'bench/gpu_check.sh prepare' first and carry $DEV" >&2
    exit 1
  }
  mkdir -p /tmp/gpu_check/bin
  local bin=/tmp/gpu_check/bin/deno
  if ! [ -x "$bin" ]; then
    if command -v xz >/dev/null; then
      xz -dc "$DEV/deno.xz" >"$bin"
    else
      python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        "$DEV/deno.xz" "$bin"
    fi
    chmod +x "$bin"
  fi
  export PATH="/tmp/gpu_check/bin:$PATH"
  if ! ldconfig -p | grep -q 'libvulkan.so.1 '; then
    for f in "$DEV"/debs/*.deb; do dpkg -x "$f" /; done
    ldconfig
  fi
  # NVIDIA's ICD file names libGLX_nvidia.so.0, which without a display fails the loader ("Could not get
  # 'vkCreateInstance' via 'vk_icdGetInstanceProcAddr'": no adapter, seen on the H200 machine, driver 580).
  # libEGL_nvidia.so.0 exports the same Vulkan entry points and works headless: an ICD file naming it.
  local icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  if [ -f "$icd" ] && [ -z "${VK_DRIVER_FILES:-}" ]; then
    sed 's/libGLX_nvidia\.so\.0/libEGL_nvidia.so.0/' "$icd" >/tmp/gpu_check/nvidia_egl_icd.json
    export VK_DRIVER_FILES=/tmp/gpu_check/nvidia_egl_icd.json
  fi
  export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp/gpu_check/xdg}"
  mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
  export DENO_WEBGPU_BACKEND="${DENO_WEBGPU_BACKEND:-vulkan}"
  export DENO_DIR="${DENO_DIR:-/tmp/gpu_check/deno_dir}" # tuned choices are cached here, once per machine
  if ! [ -d "$DENO_DIR/npm" ]; then
    mkdir -p "$DENO_DIR"
    if command -v xz >/dev/null; then
      xz -dc "$DEV/npm.tar.xz" | tar -C "$DENO_DIR" -xf -
    else
      python3 -c 'import lzma,tarfile,sys; tarfile.open(fileobj=lzma.open(sys.argv[1])).extractall(sys.argv[2])' \
        "$DEV/npm.tar.xz" "$DENO_DIR"
    fi
  fi
  export NO_COLOR=1
}

# Runs a phase's command under its limit, its output into $OUT/<phase>.log (also on stdout).
phase() {
  local name="$1" default_limit="$2"
  shift 2
  local var="GPU_CHECK_LIMIT_${name^^}"
  local limit="${!var:-$default_limit}"
  local t0=$SECONDS
  touch /tmp/gpu_check_phase_start
  echo "== $name (limit ${limit} s)" | tee "$OUT/$name.log"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
  PHASE_RC=${PIPESTATUS[0]}
  [ "$PHASE_RC" = 0 ] || FAILED_PHASES+=("$name")
  echo "== $name: exit $PHASE_RC after $((SECONDS - t0)) s$([ "$PHASE_RC" = 124 ] && echo ' (time limit)')" |
    tee -a "$OUT/$name.log"
}

# Copies a phase's results file into $OUT only when the phase succeeded and wrote it: the committed file
# (another machine's results) must not come back as if this run had written it.
keep_result() {
  if [ "$PHASE_RC" = 0 ] && [ "$1" -nt /tmp/gpu_check_phase_start ]; then
    cp "$1" "$OUT/"
  else
    echo "== not kept: $1 (phase exit $PHASE_RC, or the file was not written by it)" | tee -a "$OUT/results.log"
  fi
}

PHASES=(adapter tests suite timeline variants quick report matmul generate memory)

# The numerics: every file that compares against fixtures or references (GPU_CHECK_TESTS, names without .ts
# separated by spaces, runs some of them instead).
NUMERICS=(scan_test fused_test fused_variant_fuzz_test mamba_test lm_test large_test pretrained_test
  model_fuzz_test matmul_test ops_matmul_test memory_test)

run() {
  local phases=("$@")
  [ ${#phases[@]} -gt 0 ] || phases=(adapter tests quick)
  # every name checked before anything runs: a typo must not cost the phases before it
  for p in "${phases[@]}"; do
    [[ " ${PHASES[*]} " == *" $p "* ]] || {
      echo "unknown phase '$p' (${PHASES[*]})" >&2
      exit 2
    }
  done
  setup
  local flags=(-A --no-check --no-prompt)
  for p in "${phases[@]}"; do
    case "$p" in
      adapter)
        phase adapter 120 bash -c "echo commit: \$(cat $DEV/commit 2>/dev/null || echo unknown); \
          nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv 2>/dev/null; \
          deno --version | head -n 1; rc=0; deno run ${flags[*]} bench/gpu_adapter.ts || rc=1; \
          deno run ${flags[*]} bench/webgpu_floor.ts || rc=1; deno run ${flags[*]} bench/loop_limit.ts || rc=1; \
          exit \$rc"
        ;;
      tests)
        local files=()
        local names
        read -r -a names <<<"${GPU_CHECK_TESTS:-${NUMERICS[*]}}"
        for f in "${names[@]}"; do files+=("tests/$f.ts"); done
        MAMBA_TOL_REPORT=1 phase tests 240 deno test "${flags[@]}" "${files[@]}"
        ;;
      suite)
        local rest=()
        for f in tests/*_test.ts; do
          case "$(basename "$f" .ts)" in
            browser_test | hub_test | subgroup_sizes_test) ;;
            *) [[ " ${NUMERICS[*]} " == *" $(basename "$f" .ts) "* ]] || rest+=("$f") ;;
          esac
        done
        phase suite 400 deno test "${flags[@]}" "${rest[@]}"
        ;;
      timeline)
        phase timeline 120 deno run "${flags[@]}" bench/gpu_timeline.ts
        ;;
      variants)
        phase variants 200 deno run "${flags[@]}" bench/fused_variants_layer.ts
        ;;
      quick)
        phase quick 180 deno run "${flags[@]}" bench/scan_report.ts --quick
        keep_result bench/results/scan_quick.json
        ;;
      report)
        phase report 540 deno run "${flags[@]}" bench/scan_report.ts
        keep_result bench/results/scan.json
        ;;
      matmul)
        # d_model 64 (kept as JSON), then 768, the pretrained mamba-130m's width (its table in the log only:
        # at most 8 files come back)
        phase matmul 180 bash -c "deno run ${flags[*]} bench/matmul_shapes.ts && \
          deno run ${flags[*]} bench/matmul_shapes.ts --d-model 768"
        keep_result bench/results/matmul_shapes.json
        ;;
      generate)
        phase generate 240 deno run "${flags[@]}" bench/generate_report.ts
        keep_result bench/results/generate.json
        ;;
      memory)
        phase memory 120 deno run "${flags[@]}" bench/scan_memory.ts --quick
        ;;
    esac
  done
  # every phase runs whatever the others did; the exit status says whether all succeeded
  if [ ${#FAILED_PHASES[@]} -gt 0 ]; then
    echo "== failed phases: ${FAILED_PHASES[*]}"
    exit 1
  fi
}

FAILED_PHASES=()

case "${1:-}" in
  prepare) prepare ;;
  run)
    shift
    run "$@"
    ;;
  *)
    sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
