#!/bin/bash
# Every run recorded in benchmarks/results/cpu_sharding_check.md, one at a time (2 CPU processes each, gloo).
# MAIN: a venv with this project (no deepspeed); DS: a second venv with deepspeed (see the .md for how it was built).
# Output folders under R (default /tmp/shard/final); verify runs in one plain process after the launches.
cd "$(dirname "$0")/../.." || exit 1
export OMP_NUM_THREADS=1 PYTHONPATH=$PWD PEFT_HEFT_NO_AUTOLOAD=0
S=benchmarks/accelerate/cpu_sharding_check.py
R=${R:-/tmp/shard/final}
MAIN=${MAIN:-.venv/bin}
DS=${DS:-/tmp/venv-ds/bin}
mkdir -p "$R"
DDP_LAUNCH="--multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no --main_process_port 29571"
FSDP2="--config_file benchmarks/accelerate/fsdp2_cpu.yaml"
run() { name=$1; shift; echo "== $name: $*"; start=$(date +%s); timeout 600 "$@" > "$R/$name.log" 2>&1; echo "rc=$? seconds=$(( $(date +%s) - start ))"; }
verify() { echo "verify $1 (vs $2)"; $MAIN/python $S verify --out "$R/$1" --ddp-out "$R/$2" > "$R/$1.verify.log" 2>&1; echo "rc=$?"; }

# DDP reference (as tests/test_trainer_ddp.py), with and without gradient checkpointing / contiguous rotations
run ddp $MAIN/accelerate launch $DDP_LAUNCH $S train --engine ddp --out "$R/ddp"
run ddp_contig $MAIN/accelerate launch $DDP_LAUNCH $S train --engine ddp --contiguous-rotations --out "$R/ddp_contig"
run ddp_gc $MAIN/accelerate launch $DDP_LAUNCH $S train --engine ddp --gradient-checkpointing --out "$R/ddp_gc"
# FSDP2: as configured (accelerate drops FSDP on CPU), forced onto CPU, forced + contiguous rotations, + GC
run fsdp2_noforce $MAIN/accelerate launch $FSDP2 $S train --engine fsdp2 --out "$R/fsdp2_noforce"
run fsdp2_raw $MAIN/accelerate launch $FSDP2 $S train --engine fsdp2 --force-fsdp-on-cpu --out "$R/fsdp2_raw"
run fsdp2 $MAIN/accelerate launch $FSDP2 $S train --engine fsdp2 --force-fsdp-on-cpu --contiguous-rotations --out "$R/fsdp2"
run fsdp2_gc $MAIN/accelerate launch $FSDP2 $S train --engine fsdp2 --force-fsdp-on-cpu --contiguous-rotations \
    --gradient-checkpointing --out "$R/fsdp2_gc"
# DeepSpeed (CPU accelerator, gloo)
export DS_ACCELERATOR=cpu
for z in zero2 zero3; do
  CFG="--config_file benchmarks/accelerate/${z}_cpu.yaml"
  run ${z}_raw $DS/accelerate launch $CFG $S train --engine $z --out "$R/${z}_raw"
  run $z $DS/accelerate launch $CFG $S train --engine $z --contiguous-rotations --out "$R/$z"
  run ${z}_gc $DS/accelerate launch $CFG $S train --engine $z --contiguous-rotations --gradient-checkpointing \
      --out "$R/${z}_gc"
done
# ZeRO-3 + GC with one stage (one engine): tells the second engine apart from ZeRO-3 + GC as such
run zero3_gc_reft_only $DS/accelerate launch --config_file benchmarks/accelerate/zero3_cpu.yaml $S train --engine zero3 \
    --contiguous-rotations --gradient-checkpointing --stage-order reft --out "$R/zero3_gc_reft_only"

for e in ddp ddp_contig fsdp2_noforce fsdp2 zero2 zero3; do [ -f "$R/$e/train_results.json" ] && verify $e ddp; done
for e in ddp_gc fsdp2_gc zero2_gc zero3_gc; do [ -f "$R/$e/train_results.json" ] && verify $e ddp_gc; done
