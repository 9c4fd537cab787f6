"""Learning-curve point of one model dir (issue 24): rule reading (json / own prefix) on the probe's fixed evaluation
hand set, own-prefix rule reading on held-out hands, copying the hand (ID / OOD held-out hands)."""
import json, sys, time
import torch
torch.set_num_threads(2)
import yaml
from sftrl.base import probe as P
from sftrl.evaluation.rule_reading import rule_reading
from sftrl.generation.backends import make_backend
from sftrl.generation.sampling import Sampling
from sftrl.task.cards import ID_RULE, OOD_RULE
from sftrl.task.rule_hands import rule_reading_hands
model_dir, out = sys.argv[1], sys.argv[2]
cfg = yaml.safe_load(open("config/config.yaml"))
n, seed, held = cfg["base"]["probe"]["n"], cfg["base"]["probe"]["seed"], cfg["base"]["corpus"]["held_out_per_mille"]
t = time.time()
backend = make_backend("hf", model_dir, {**cfg["model"], "device": "cpu"}, 64)
res = {"model": model_dir}
eval_hands = rule_reading_hands(193, cfg["data"]["eval"]["seed"])
for p in ("json", "own"):
    res[f"rr_eval_{p}"] = rule_reading(backend.model, backend.tokenizer, eval_hands, p, 64)
# the same held-out hands and seeds as the abilities probe (probe.probe)
res["rr_heldout_own"] = P.rule_reading_ability(backend, P.held_out_rule_reading_hands(n, seed + 11, held), "own", 64)
greedy = Sampling.from_settings(cfg["eval"], temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0,
                                max_new_tokens=32, seed=seed)
for i, rule in enumerate((ID_RULE, OOD_RULE)):
    res[f"copy_{rule.name}"] = P.copy_hand(backend, P.held_out_hands(rule, n, seed + 9 + i, held), rule, greedy)
res["seconds"] = time.time() - t
json.dump(res, open(out, "w"), indent=1)
def cells(r):  # a rule_reading result lists its cells; an ability names them
    values = r["cells"].values() if isinstance(r["cells"], dict) else [c["accuracy"] for c in r["cells"]]
    return [round(v * 100, 1) for v in values]
print("CURVE", model_dir, "json", round(res["rr_eval_json"]["mean"] * 100, 1), cells(res["rr_eval_json"]),
      "own", round(res["rr_eval_own"]["mean"] * 100, 1), cells(res["rr_eval_own"]),
      "own-heldout", round(res["rr_heldout_own"]["accuracy"] * 100, 1), cells(res["rr_heldout_own"]),
      "copy", round(res["copy_id"]["accuracy"] * 100, 1), round(res["copy_ood"]["accuracy"] * 100, 1),
      f"{res['seconds']:.0f}s")
