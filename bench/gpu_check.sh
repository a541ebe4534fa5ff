#!/usr/bin/env bash
# The device checks of issues 3 and 5 in one short run on a GPU machine:
#   bash bench/gpu_check.sh [out_dir]            # every step
#   ONLY="train_sota train_sota_graph" bash bench/gpu_check.sh out   # some steps
# Writes each step's output to out_dir (default: bench_out/) and echoes its end.
# SMALL=1 runs the same steps at toy sizes, to try the script on a CPU.
set -u
out=${1:-bench_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
dev=cuda; n_val=20000; n_train=25600; n_nc=50000; epochs=2; subset=""; graph="--cuda_graph"
if [ "${SMALL:-0}" = 1 ]; then dev=cpu; n_val=512; n_train=512; n_nc=512; epochs=1; subset="--sample_size 10"; graph=""; fi
step() {  # step NAME COMMAND...: run it (unless ONLY leaves it out), keep its log, go on after a failure
  local name=$1; shift
  case " ${ONLY:-$name} " in *" $name "*) ;; *) return ;; esac
  echo "=== $name: $*"
  local t=$SECONDS
  "$@" > "$out/$name.txt" 2>&1; local rc=$?
  grep -v -e Warning -e check_worker "$out/$name.txt" | tail -n 16
  echo "=== $name: exit $rc after $((SECONDS - t)) s"
}
python3 -c "import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))"
bench="python3 bench/train.py --model resnet18 --dataset synthetic --num_samples $n_train --device $dev"
step validate python3 bench/validate.py --model resnet18 --SOTA --dataset synthetic --num_samples $n_val --device $dev
step train_sota $bench --SOTA
step train_sota_graph $bench --SOTA $graph
step train_plain $bench
step train_plain_graph $bench $graph
step train_sota_bf16_compile $bench --SOTA --amp bf16 --compile
step train_sota_bf16_graph $bench --SOTA --amp bf16 $graph
# several runs at once on one GPU (experiments.py --jobs N): target ratio >= 2.5 at N = 4
step jobs python3 bench/jobs.py --model resnet18 --SOTA --dataset synthetic --num_samples $n_train --device $dev --jobs 2 4 8
# NC measured in the run: 50,000 + 10,000 CIFAR-shaped images, as CIFAR-10 (target nc_overhead <= 0.25)
step train_sota_nc python3 bench/train.py --model resnet18 --dataset synthetic --num_samples $n_nc --device $dev --SOTA --nc_every 1
# The scripts themselves: train, resume one more epoch, validate; and the same run with CUDA graphs.
run=/tmp/gpu_runs
rm -rf $run
common="--dataset mnist_sample --SOTA --lr 0.05 --save_dir $run --device $dev $subset"
step train_script python3 train_1st_order.py $common --epochs $epochs --uid eager
step resume_script python3 train_1st_order.py --uid eager --save_dir $run --resume --epochs $((epochs + 1)) --device $dev
step validate_script python3 validate_NC.py --load_path $run/eager --device $dev
step graph_script python3 train_1st_order.py $common --epochs $((epochs + 1)) --uid graph $graph
for r in eager graph; do [ -f $run/$r/train_log.txt ] && cp $run/$r/train_log.txt "$out/train_log_$r.txt"; done
grep -h "^epoch" "$out"/train_log_*.txt 2>/dev/null
