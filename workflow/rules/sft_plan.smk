# The sft stage's plan, for sft.smk's rules: the launcher. (Snakemake's lint wants functions apart from rules: each
# stage's plan is its own file, included just before its rules.)

def sft_launcher():
    """`sftrl` in-process (CPU or one GPU), or `accelerate launch` for multi-GPU / DeepSpeed (config sft.launcher).
    An argument list, rendered with `:q` in the shell command: each word quoted."""
    if config["sft"]["launcher"] == "accelerate":
        n = config["sft"]["num_processes"]
        return ["accelerate", "launch", "--num_processes", str(n), "-m", "sftrl.cli"]
    return ["sftrl"]
