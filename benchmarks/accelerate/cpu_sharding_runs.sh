#!/bin/bash
# Every run recorded in benchmarks/results/cpu_sharding_check.md, one at a time (2 CPU processes each, gloo).
# MAIN: a venv with this project (no deepspeed); DS: a second venv with deepspeed (`make test-deepspeed` builds
# .venv-deepspeed). Output folders under R (default /tmp/shard/final); verify runs in one plain process after the
# launches; the last step gathers every run into benchmarks/results/cpu_sharding_check.json.
cd "$(dirname "$0")/../.." || exit 1
export OMP_NUM_THREADS=1 PYTHONPATH=$PWD PEFT_HEFT_NO_AUTOLOAD=0
S=benchmarks/accelerate/cpu_sharding_check.py
R=${R:-/tmp/shard/final}
MAIN=${MAIN:-.venv/bin}
DS=${DS:-.venv-deepspeed/bin}
mkdir -p "$R"
DDP_LAUNCH="--multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no --main_process_port 29571"
FSDP2="--config_file examples/accelerate/fsdp2_cpu.yaml"
run() { name=$1; shift; echo "== $name: $*"; start=$(date +%s); timeout 600 "$@" > "$R/$name.log" 2>&1; rc=$?;
        echo "rc=$rc seconds=$(( $(date +%s) - start ))"; echo "{\"rc\": $rc, \"seconds\": $(( $(date +%s) - start ))}" > "$R/$name.rc.json"; }
verify() { echo "verify $1 (vs $2)"; $MAIN/python $S verify --out "$R/$1" --ddp-out "$R/$2" > "$R/$1.verify.log" 2>&1; echo "rc=$?"; }

# DDP reference (as tests/test_trainer_ddp.py), with and without gradient checkpointing
run ddp $MAIN/accelerate launch $DDP_LAUNCH $S train --engine ddp --out "$R/ddp"
run ddp_gc $MAIN/accelerate launch $DDP_LAUNCH $S train --engine ddp --gradient-checkpointing --out "$R/ddp_gc"
# FSDP2: as configured (accelerate drops FSDP on CPU and runs DDP), forced onto CPU, + gradient checkpointing
run fsdp2_noforce $MAIN/accelerate launch $FSDP2 $S train --engine fsdp2 --out "$R/fsdp2_noforce"
run fsdp2 $MAIN/accelerate launch $FSDP2 $S train --engine fsdp2 --force-fsdp-on-cpu --out "$R/fsdp2"
run fsdp2_gc $MAIN/accelerate launch $FSDP2 $S train --engine fsdp2 --force-fsdp-on-cpu --gradient-checkpointing \
    --out "$R/fsdp2_gc"
# DeepSpeed (CPU accelerator, gloo)
export DS_ACCELERATOR=cpu
for z in zero2 zero3; do
  CFG="--config_file examples/accelerate/${z}_cpu.yaml"
  run $z $DS/accelerate launch $CFG $S train --engine $z --out "$R/$z"
  run ${z}_gc $DS/accelerate launch $CFG $S train --engine $z --gradient-checkpointing --out "$R/${z}_gc"
done
Z3="--config_file examples/accelerate/zero3_cpu.yaml"
# ZeRO-3 + GC: non-reentrant is refused (zero3_gc above); reentrant trains; the refusal lifted shows why it is refused
run zero3_gc_reentrant $DS/accelerate launch $Z3 $S train --engine zero3 --gradient-checkpointing --reentrant \
    --out "$R/zero3_gc_reentrant"
run zero3_gc_lifted $DS/accelerate launch $Z3 $S train --engine zero3 --gradient-checkpointing --lift-refusal \
    --out "$R/zero3_gc_lifted"
# ZeRO-3 + GC with one stage (one engine): tells the second engine apart from ZeRO-3 + GC as such
run zero3_gc_reft_only $DS/accelerate launch $Z3 $S train --engine zero3 --gradient-checkpointing --stage-order reft \
    --out "$R/zero3_gc_reft_only"

for e in ddp fsdp2_noforce fsdp2 zero2 zero3; do [ -f "$R/$e/train_results.json" ] && verify $e ddp; done
for e in ddp_gc fsdp2_gc zero2_gc zero3_gc zero3_gc_reentrant zero3_gc_lifted; do
  [ -f "$R/$e/train_results.json" ] && verify $e ddp_gc
done

# gather: each run's exit status and time, rank 0's error (if any), and verify's summary
$MAIN/python - "$R" <<'PY'
import json, os, re, sys
R = sys.argv[1]
out = {}
for name in sorted(n[: -len(".rc.json")] for n in os.listdir(R) if n.endswith(".rc.json")):
    rc = json.load(open(os.path.join(R, f"{name}.rc.json")))
    entry = {"train_rc": rc["rc"], "train_seconds": rc["seconds"]}
    log = open(os.path.join(R, f"{name}.log"), errors="replace").read()
    errors = re.findall(r"^\[rank0\]: ((?:[\w.]+\.)?\w+(?:Error|Exception)[^\n]*)", log, re.M)
    if errors:
        entry["error"] = errors[-1][:800]
    entry["lora_stage_finished"] = "'stage': 'lora', 'epoch'" in log and "train_runtime" in log
    summary = os.path.join(R, name, "summary.json")
    if os.path.isfile(summary):
        entry.update(json.load(open(summary)))
    elif os.path.isfile(os.path.join(R, name, "train_results.json")):
        results = json.load(open(os.path.join(R, name, "train_results.json")))
        entry.update({k: results[k] for k in ("setup", "stages", "train_loss")})
    out[name] = entry
path = "benchmarks/results/cpu_sharding_check.json"
with open(path, "w") as handle:
    json.dump(out, handle, indent=1)
print("wrote", path, list(out))
PY
