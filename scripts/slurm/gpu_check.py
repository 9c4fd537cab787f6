"""What GPUs does a job that requests the SFT rule's GPUs really see? (rule gpu_check, workflow/rules/cluster.smk)

Records `nvidia-smi -L` (or that it is absent), the GPUs torch sees (count and names), CUDA_VISIBLE_DEVICES and the
SLURM job/GPU variables, and compares the count with the `gpu` resource the job requested. snakemake-executor-plugin-
slurm has an open issue where a `gpu=N` job sees only one GPU; this target lets a user check their cluster:
    snakemake --profile profiles/slurm gpu_check && cat results/cluster/gpu_check.txt
Run by Snakemake's `script:` directive (the `snakemake` object is injected); also runnable by hand:
    python scripts/slurm/gpu_check.py OUT [REQUESTED_GPUS]
"""
import os
import platform
import shutil
import subprocess
import sys

SLURM_VARS = ("SLURM_JOB_ID", "SLURM_JOB_PARTITION", "SLURM_JOB_NODELIST", "SLURM_GPUS", "SLURM_GPUS_ON_NODE",
              "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_CPUS_PER_GPU", "SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE",
              "GPU_DEVICE_ORDINAL")


def nvidia_smi() -> list[str]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return ["nvidia-smi: absent (not on PATH; no NVIDIA driver on this node)"]
    try:
        run = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return [f"nvidia-smi -L: failed to run ({err})"]
    lines = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    if run.returncode != 0:
        return [f"nvidia-smi -L: exit status {run.returncode}", *lines]
    return [f"nvidia-smi -L: {len(lines)} GPU(s)", *lines]


def torch_gpus() -> tuple[int | None, list[str]]:
    try:
        import torch
    except ImportError as err:
        return None, [f"torch: not importable ({err})"]
    lines = [f"torch {torch.__version__} (CUDA build {torch.version.cuda})"]
    count = torch.cuda.device_count()
    lines.append(f"torch.cuda.is_available(): {torch.cuda.is_available()}")
    lines.append(f"torch.cuda.device_count(): {count}")
    lines += [f"  cuda:{i}: {torch.cuda.get_device_name(i)}" for i in range(count)]
    return count, lines


def report(requested: int | None) -> str:
    count, torch_lines = torch_gpus()
    lines = [
        f"host: {platform.node()}",
        f"python: {sys.executable}",
        f"requested gpu resource: {requested if requested is not None else 'none'}",
        f"CUDA_VISIBLE_DEVICES: {os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}",
        *(f"{var}: {os.environ[var]}" for var in SLURM_VARS if var in os.environ),
        *nvidia_smi(),
        *torch_lines,
    ]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    n_visible = len([d for d in visible.split(",") if d.strip()]) if visible else None
    if not requested:
        verdict = "no GPU requested"
    elif count == requested:
        verdict = f"OK: torch sees the {requested} requested GPU(s)"
    elif count == 0 and n_visible == requested:
        verdict = (f"SCHEDULED ONLY: CUDA_VISIBLE_DEVICES lists the {requested} requested GPU(s) but torch sees none "
                   "(no driver/CUDA here, e.g. the fake GPUs of scripts/slurm/up.sh)")
    else:
        verdict = f"MISMATCH: requested {requested} GPU(s), torch sees {count}, CUDA_VISIBLE_DEVICES has {n_visible}"
    lines.append(f"verdict: {verdict}")
    return "\n".join(lines) + "\n"


def main(out: str, requested: int | None, log: str | None = None) -> None:
    text = report(requested)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as fh:
        fh.write(text)
    if log:
        with open(log, "w") as fh:
            fh.write(text)


def requested_gpus(resources) -> int | None:
    """The GPU count a job asked for: the `gpu` resource, else the count in a `gres` like gpu:h100:4 or gpu:2."""
    if resources.get("gpu"):
        return int(resources.get("gpu"))
    for item in str(resources.get("gres") or "").split(","):
        parts = item.strip().split(":")
        if parts[0] == "gpu":
            return int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else 1
    return None


if "snakemake" in globals():
    smk = globals()["snakemake"]
    main(smk.output[0], requested_gpus(smk.resources), smk.log[0])
elif __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None)
