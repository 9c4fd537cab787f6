"""The abilities probe (results/base/abilities.json's) of one model dir, GeneralPoints episodes with verify_iter
from argv (1 under this session's load; the DAG's probe_base uses env.verify_iter = 5)."""
import sys, time, logging
import torch
logging.basicConfig(level=logging.INFO)
torch.set_num_threads(2)
import yaml
from sftrl.base.probe import probe
model_dir, out, verify_iter = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = yaml.safe_load(open("config/config.yaml"))
t = time.time()
eval_knobs = {k: cfg["eval"][k] for k in ("backend", "batch_size", "max_new_tokens", "stop_tokens")}
report = probe(model_dir, cfg["base"]["probe"], eval_knobs,
               {**cfg["model"], "device": "cpu"}, out, verify_iter=verify_iter)
print("PROBE", {k: round(v["accuracy"] * 100, 1) for k, v in report["abilities"].items()}, f"{time.time() - t:.0f}s")
