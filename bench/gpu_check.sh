#!/usr/bin/env bash
# Every GPU figure of the README in one short run on a GPU machine, most important first: the GPU-only
# tests, the evidence for the CUDA-graph default (bench/graph_parity.py), validation, training with the
# default (CUDA graphs) and eager (--no_cuda_graph), LBFGS, mini-ImageNet-shaped data, concurrent runs,
# NC measured in the run, and the scripts themselves.
#   bash bench/gpu_check.sh [out_dir]            # every step (on a lent GPU machine: out_dir "$OUT")
#   ONLY="graph_parity train_sota" bash bench/gpu_check.sh out   # some steps
# Writes each step's whole output to out_dir (default: bench_out/) and echoes its last lines; each step
# is stopped after STEP_S seconds (default 180), and no step starts after BUDGET seconds (default 400),
# so that one call ends within 10 minutes; the last line names the failed, stopped and skipped steps,
# and the exit status is 1 if there are any. SMALL=1 runs the same steps at toy sizes, without time
# limits, to try the script on a CPU.
set -u
out=${1:-bench_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# Sizes: each bench times a warm-up and 3 interleaved rounds per side, so 12,800 training images
# (100 batches) per pass time 38,400 per side, more than the one pass of 25,600 that this script
# timed before. LBFGS: 5,120 images (10 steps of ~25 closure evaluations each); mini-ImageNet-shaped:
# 5,000 training images (~7x a CIFAR image's convolution work with --SOTA's stride-1 stem) and 10,000
# validated (100 per class). Estimated (not yet timed) for an H200: 8 to 10 minutes in all, the
# compiled step last (1-3 minutes of compilation) so that the budget cuts it first.
dev=cuda; n_val=20000; n_train=12800; n_nc=25600; epochs=2; subset=""; parity=""
budget=${BUDGET:-400}; step_s=${STEP_S:-180}
n_lbfgs=5120; lbfgs_batch=512; n_mini=5000; mini_batch=128; n_mini_val=10000; mini_classes=100
rounds=""  # the benches' default: a warm-up and 3 interleaved rounds per side
if [ "${SMALL:-0}" = 1 ]; then dev=cpu; n_val=100; n_train=64; n_nc=64; epochs=1; subset="--sample_size 10"
  parity="--model MLP --width 16 --depth 1 --sample_size 5 --epochs 2"
  # On a (shared, 2-core) CPU only the script is under test, not the sizes: ResNet-18 costs seconds
  # per image at 84x84 with the stride-1 stem, so a handful of images, 2 per class of 10 classes
  # for the mini validation's NC, and one timed round
  n_lbfgs=32; lbfgs_batch=32; n_mini=8; mini_batch=4; n_mini_val=20; mini_classes=10; rounds="--rounds 1"
  budget=${BUDGET:-100000}; step_s=${STEP_S:-3600}; fi
step() {  # step NAME COMMAND...: run it (unless ONLY leaves it out), keep its log, go on after a failure
  local name=$1; shift
  case " ${ONLY:-$name} " in *" $name "*) ;; *) return ;; esac
  if [ $SECONDS -ge "$budget" ]; then skipped="$skipped $name"; echo "=== $name: skipped (the budget of ${budget} s is spent)"; return; fi
  echo "=== $name: $*"
  local t=$SECONDS
  timeout -k 10 "$step_s" "$@" > "$out/$name.txt" 2>&1; local rc=$?
  grep -v -e Warning -e check_worker "$out/$name.txt" | tail -n 8
  echo "=== $name: exit $rc after $((SECONDS - t)) s"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then stopped="$stopped $name"; elif [ $rc -ne 0 ]; then failed="$failed $name"; fi
}
failed=""; stopped=""; skipped=""
python3 -c "import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))"
bench="python3 bench/train.py --model resnet18 --dataset synthetic --num_samples $n_train --device $dev $rounds"
# The tests that need a GPU (skipped on the CPU): CUDA-graph steps against eager, the graphed LBFGS
# closure, validation's graphed forward pass, NCStats without host syncs
step gpu_tests python3 -m pytest -q tests/test_steps.py tests/test_fold.py tests/test_nc.py
# The condition for CUDA graphs by default: a 3-epoch run with graphs within the spread of two eager ones
step graph_parity python3 bench/graph_parity.py --device $dev $parity
step validate python3 bench/validate.py --model resnet18 --SOTA --dataset synthetic --num_samples $n_val --device $dev $rounds
# (b) trains as the scripts do by default (CUDA graphs on a GPU), and eagerly with --no_cuda_graph
step train_sota $bench --SOTA
step train_sota_eager $bench --SOTA --no_cuda_graph
# LBFGS (history 10, strong Wolfe, lr 0.1), plain ResNet-18, batch 512, CIFAR-shaped (target ratio >= 3)
lbfgs="python3 bench/train.py --model resnet18 --dataset synthetic --optimizer LBFGS --num_samples $n_lbfgs --batch_size $lbfgs_batch --device $dev $rounds"
step train_lbfgs $lbfgs
step train_lbfgs_eager $lbfgs --no_cuda_graph
# mini-ImageNet-shaped data (84x84, 100 classes), --SOTA: training, and one checkpoint's validation
step train_mini python3 bench/train.py --model resnet18 --SOTA --dataset synthetic_mini --num_samples $n_mini --batch_size $mini_batch --device $dev $rounds
step validate_mini python3 bench/validate.py --model resnet18 --SOTA --dataset synthetic_mini --num_samples $n_mini_val --num_classes $mini_classes --device $dev $rounds
step train_plain $bench
step train_plain_eager $bench --no_cuda_graph
step train_sota_bf16 $bench --SOTA --amp bf16
# several runs at once on one GPU (experiments.py --jobs N): target ratio >= 2.5 at N = 4
step jobs python3 bench/jobs.py --model resnet18 --SOTA --dataset synthetic --num_samples $n_train --device $dev --jobs 2 4
# NC measured in the run over 25,600 + 5,120 CIFAR-shaped images (half of CIFAR-10's; target nc_overhead <= 0.25)
step train_sota_nc python3 bench/train.py --model resnet18 --dataset synthetic --num_samples $n_nc --device $dev --SOTA --nc_every 1 $rounds
# The scripts themselves: train (the default: graphs on a GPU), resume one more epoch, validate; and eagerly.
run=/tmp/gpu_runs
rm -rf $run
common="--dataset mnist_sample --SOTA --lr 0.05 --save_dir $run --device $dev $subset"
step train_script python3 train_1st_order.py $common --epochs $epochs --uid default
step resume_script python3 train_1st_order.py --uid default --save_dir $run --resume --epochs $((epochs + 1)) --device $dev
step validate_script python3 validate_NC.py --load_path $run/default --device $dev
step eager_script python3 train_1st_order.py $common --epochs $((epochs + 1)) --uid eager --no_cuda_graph
for r in default eager; do [ -f $run/$r/train_log.txt ] && cp $run/$r/train_log.txt "$out/train_log_$r.txt"; done
cat "$out"/train_log_*.txt 2>/dev/null | grep "^epoch"
# Last, and first to be cut by the budget: bf16 with torch.compile (the compilation takes minutes)
step train_sota_bf16_compile $bench --SOTA --amp bf16 --compile
# the exit status: 0 when every step ran and exited 0
if [ -n "$failed$stopped$skipped" ]; then
  echo "=== failed:${failed:- none}; stopped at ${step_s} s:${stopped:- none}; skipped:${skipped:- none}"; exit 1; fi
echo "=== every step exited 0"
