# Cluster checks (profiles/slurm). Not part of `all`: run on demand, e.g.
#   snakemake --profile profiles/slurm gpu_check && cat results/cluster/gpu_check.txt


rule gpu_check:
    # Records what a job requesting the SFT rule's GPUs really sees: nvidia-smi -L (or its absence), torch's CUDA
    # devices, CUDA_VISIBLE_DEVICES and the SLURM GPU variables (plugin issue: a gpu=N job may see only one GPU).
    # Its GPU request comes from the profile (set-resources gpu_check reuses the sft block), not from here, so it
    # runs anywhere without a profile too.
    output:
        f"{RESULTS}/cluster/gpu_check.txt",
    log:
        "logs/cluster/gpu_check.log",
    conda:
        "../envs/train.yaml"
    threads: 1
    resources:
        runtime=10,
    script:
        "../../scripts/slurm/gpu_check.py"
