#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, as the device tool's command (see gpu_carry.py):
#   bash services/bench/gpu_device.sh unpack|check|services|bench|precision [extra arguments for that stage]
# (`services` checks the models first, then runs gpu_bench; `bench` runs only gpu_bench, for further stack
# settings in the same call: pass each its own --out.)
# Unpacks the carried package groups (.gpu-*/, kept between calls while the machine is warm), puts
# them ahead of the machine's own packages (numpy 1.26 before its numpy 2, which Triton's Python
# backend does not take), builds the models from the carried MTCNN weights, and runs one stage,
# writing its JSON under $OUT.
set -euo pipefail
stage=${1:?usage: gpu_device.sh unpack|check|services|bench|precision [arguments]}
shift
site=/tmp/swapline-site
out=${OUT:-build/gpu-out}
mkdir -p "$site" "$out"
for archive in .gpu-*/*.tar.xz; do
  [ -e "$archive" ] || continue
  marker="$site/.unpacked-$(basename "$archive")-$(stat -c %s "$archive")"
  if [ ! -e "$marker" ]; then
    tar -xJf "$archive" -C "$site"
    touch "$marker"
  fi
done
if ! compgen -G "$site/.unpacked-triton.tar.xz-*" >/dev/null; then
  echo "the triton group is not unpacked on this machine: the calls must follow each other while it is warm" >&2
  exit 3
fi
# Triton's Python-backend stubs start their own interpreter: a .pth file in the machine's site-packages
# puts the carried packages and this repository first on every interpreter's path, theirs included.
python3 - "$site" "$PWD" <<'EOF'
import pathlib, site, sys
paths = sys.argv[1:]
pth = pathlib.Path(site.getsitepackages()[0]) / "00-swapline.pth"
pth.write_text(f"import sys; sys.path[:0] = [p for p in {paths!r} if p not in sys.path]\n")
EOF
for tools in .gpu-*/bin; do
  [ -d "$tools" ] && export PATH="$PWD/$tools:$PATH"
done
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -c 'import numpy, torch; print("numpy", numpy.__version__, "torch", torch.__version__, torch.cuda.get_device_name())'
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
if [ ! -e triton_models/face_swapper/1/model.pt ]; then
  python3 -m services.model_build --weights-wheel build/weights/facenet_pytorch-2.6.0-py3-none-any.whl \
    --repository triton_models
fi
case "$stage" in
  unpack) ;;
  check) python3 -m services.bench.gpu_check --out "$out/check.json" "$@" ;;
  precision) python3 -m services.bench.precision_sweep --device cuda --repository triton_models \
               --out "$out/precision.json" "$@" ;;
  services) python3 -m services.bench.gpu_check --out "$out/check.json" || echo "gpu_check failed: see above" >&2
            python3 -m services.bench.gpu_bench --out "$out/gpu-bench.json" "$@" ;;
  bench) python3 -m services.bench.gpu_bench --out "$out/gpu-bench.json" "$@" ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
