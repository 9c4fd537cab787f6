"""GeneralPoints, the 24-point card game, language-only, in five modules from the bottom up: `solver` (every
formula that makes the target, exactly), `cards` (ranks, the two face-card rules, dealing), `prompt` (the prompt,
the answer format, parsing the formula out of an answer), `verifier` (scoring an attempt, the feedback turn) and
`episode` (one multi-turn episode); plus the problem sets (`data`), the rule-reading hands (`rule_hands`), the
episode loop of a generation backend (`rollout`) and answer diagnostics (`diagnose`).

A clean rebuild of the authors' environment (authors_code_spec.md §1; `general_points_oneline.py`, `utils_rl.py`,
`utils_general.re_match`, `prompt_lib/prompts.py`). Everything the model sees or is rewarded for matches the
authors' code: the prompt byte for byte, the parse order, the reward table and its accumulation rules, the
feedback text. Differences are marked in the modules (FIX / DEVIATION): exact (fraction) evaluation of the value
test, seeded dealing and a deterministic solver order, no unscored 6th generation, no suits, a non-string JSON
"formula" counts as absent, the feedback echo cap. Importing the package imports nothing.
"""
