"""Teacher-forced NLL (nats/token) of a model on cardgame documents: the answer's card list, its numbers, the rest."""
import sys, numpy as np, torch
torch.set_num_threads(2)
from transformers import AutoModelForCausalLM
from sftrl.modeling import load_tokenizer
from sftrl.base import corpus as C
tok = load_tokenizer(sys.argv[1]); model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
rng = np.random.default_rng(2024)
sums = {"cards": [], "numbers": [], "other": []}
for i in range(200):
    doc = C.cardgame_document(rng, authors_wording=(i % 2 == 1))
    start = doc.index("Cards: [", doc.index("assistant")) + len("Cards: [")
    end = doc.index("]", start)
    nstart = doc.index("Numbers: [", end) + len("Numbers: [")
    nend = doc.index("]", nstart)
    enc = tok(doc, return_offsets_mapping=True, return_tensors="pt")
    ids = enc.input_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
    nll = -logp.gather(1, ids[0, 1:, None])[:, 0]
    for j, (a, b) in enumerate(enc.offset_mapping[0, 1:].tolist()):
        key = "cards" if start <= a < end else "numbers" if nstart <= a < nend else "other"
        sums[key].append(nll[j].item())
print(sys.argv[1], {k: (round(float(np.mean(v)), 3), len(v)) for k, v in sums.items()}, "uniform over 13 ranks:", round(np.log(13), 3))
