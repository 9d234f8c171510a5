#!/usr/bin/env bash
# The GPU measurements issues 11, 12 and 34 ask for, in one run on a lent device machine (NVIDIA,
# Vulkan), within about 8 minutes. Run from the repository root there, with the release binary
# built here and carried along (the machine reaches no network, so nothing is built or fetched
# there), and the Vulkan loader packages unpacked first, as /work/.library/device/README.md says:
#
#   device run, carry [".gl", "target/release/cuboids"], timeout_s 600:
#     for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig; bash benches/device_check.sh
#
# Everything goes to $OUT/device.log (and stdout). Copy the figures into benches/RESULTS.md with
# the machine named. CPU peers (igneous, waterz, cc3d) are not installed there; compare with them
# on the machine's cores in a session that can carry them.
set -uo pipefail
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
LOG="$OUT/device.log"
BIN=${CUBOIDS:-target/release/cuboids}
# Sizes (smaller ones try the script out on lavapipe).
BENCH_SIZE=${BENCH_SIZE:-2048,2048,256}
DEMO_SIZE=${DEMO_SIZE:-1024,1024,128}
CC_SIZE=${CC_SIZE:-512,512,512}
SEGMENT_SIZE=${SEGMENT_SIZE:-512,512,128}
WORK=$(mktemp -d)
export CUBOIDS_LOG_FORMAT=json
if ! ldconfig -p | grep -q libvulkan; then
  echo "no Vulkan loader: unpack .gl/*.deb first" | tee -a "$LOG"
fi
if [ ! -e /usr/share/vulkan/icd.d/nvidia_icd.json ] && [ -e /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
fi

step() {
  echo "=== $* ($(date +%T))" | tee -a "$LOG"
  "$@" 2>"$WORK/stderr" | tee -a "$LOG"
  local rc=$?
  grep -v '"level":"INFO"' "$WORK/stderr" | tail -5 | tee -a "$LOG"
  return $rc
}

# Kernel times of a `segment` run with CUBOIDS_PROFILE_KERNELS, summed per kernel.
kernel_sums() {
  grep '"kernel time"' "$WORK/stderr" | sed -E 's/.*"kernel":"([^"]+)".*"ms":([0-9.]+).*/\1 \2/' |
    awk '{s[$1]+=$2; t+=$2} END {for (k in s) printf "  %-32s %9.1f ms\n", k, s[k]; printf "  %-32s %9.1f ms\n", "sum", t}' |
    tee -a "$LOG"
}

{ nvidia-smi -L; nproc; free -g | head -2; } 2>&1 | tee -a "$LOG"

# Issue 12: uint8 downsampling end to end (gzip 6 and raw), kernel throughput, codec limit.
step "$BIN" bench --size "$BENCH_SIZE" --num-mips 3 --gzip-level 6 --dir "$WORK"
step "$BIN" bench --size "$BENCH_SIZE" --num-mips 3 --gzip-level 0 --dir "$WORK"

# Issue 12: uint64 segmentation pyramids, compressed_segmentation encoded on the GPU and on the
# CPU (same bytes; the report gives the codecs' core-seconds and the codec limit).
step "$BIN" demo --size "$DEMO_SIZE" --dir "$WORK/demo" >/dev/null
for setting in 1 0; do
  CUBOIDS_GPU_ENCODING=$setting step "$BIN" downsample "$WORK/demo/segmentation" --num-mips 3
done

# Issue 34: inference of the demo's EM image by the demo's net (models/em_affinities.onnx,
# ~22 kFLOP per voxel, patch 64,64,16) on the GPU with each convolution kernel and precision,
# and on the machine's cores (the native engine) as the CPU figure.
for kernel in workgroup registers; do
  for dtype in float32 float16; do
    rm -rf "$WORK/aff"
    CUBOIDS_CONV_KERNEL=$kernel step "$BIN" infer --image "$WORK/demo/image" \
      --model models/em_affinities.onnx --output "$WORK/aff" --overlap 8,8,2 --engine gpu --dtype $dtype
  done
done
rm -rf "$WORK/aff"
step "$BIN" infer --image "$WORK/demo/image" --model models/em_affinities.onnx --output "$WORK/aff" \
  --overlap 8,8,2 --engine native

# Issue 11: connected components on 512^3 (labelling pass and end to end), then segment with
# each kernel timed.
step "$BIN" bench-segment --size "$CC_SIZE" --only connected-components --dir "$WORK"
step "$BIN" bench-segment --size "$SEGMENT_SIZE" --only segment --dir "$WORK" --keep
SEGVOL=$(ls -d "$WORK"/cuboids-bench-segment* 2>/dev/null | head -1)
if [ -n "$SEGVOL" ]; then
  CUBOIDS_PROFILE_KERNELS=1 step "$BIN" segment --affinity "$SEGVOL/affinities" --output "$WORK/seg-profiled"
  kernel_sums
fi
echo "=== done ($(date +%T))" | tee -a "$LOG"
rm -rf "$WORK"
