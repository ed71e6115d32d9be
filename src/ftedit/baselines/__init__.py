"""Baseline editors in ftedit's harness: ROME, MEMIT, AlphaEdit (closed-form MLP edits), GRACE (a key-value
codebook at one layer, :mod:`~ftedit.baselines.grace`), IKE (in-context editing, :mod:`~ftedit.baselines.ike`)
and the hypernetwork editors MEND and MALMEN (:mod:`~ftedit.baselines.mend`, :mod:`~ftedit.baselines.malmen`).
The fine-tuning baselines FT, FT-L and FT-M are recipes (``ftedit recipes``).

Each method has a hyperparameter dataclass with documented defaults and one entry point
``apply_<method>_to_model(model, tok, requests, hparams)``; each is registered in :mod:`ftedit.registry`, so
``ftedit.methods.apply_method("rome", ...)`` reaches it by name. Every method finds the MLP down projection
(the "value" matrix the closed-form editors rewrite) from the model's structure (:mod:`ftedit.params`), so
they run on GPT-2, Llama and Gemma.
"""
