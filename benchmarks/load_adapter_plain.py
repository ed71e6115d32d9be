"""Load an ``ftedit edit --save adapter`` output with transformers + peft only (ftedit is never imported).

    python benchmarks/load_adapter_plain.py runs/e/adapter "The Eiffel Tower is located in" "Rome"

Prints JSON: the mean negative log-likelihood of the target after the prompt (target encoded as " " + target
without special tokens, the prompt with the tokenizer's own BOS: ftedit's conventions), the greedy next
tokens, and whether ftedit got imported along the way.
"""

from __future__ import annotations

import json
import sys

import torch
from peft import PeftConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(adapter: str, prompt: str, target: str) -> dict:
    base_path = PeftConfig.from_pretrained(adapter).base_model_name_or_path
    tok = AutoTokenizer.from_pretrained(base_path)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter).eval()
    prompt_ids = tok(prompt)["input_ids"]
    if tok.eos_token_id is not None and len(prompt_ids) > 1 and prompt_ids[-1] == tok.eos_token_id:
        prompt_ids = prompt_ids[:-1]
    target_ids = tok(" " + target, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + target_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logprobs = torch.log_softmax(logits[len(prompt_ids) - 1:-1], dim=-1)
    picked = logprobs[torch.arange(len(target_ids)), torch.tensor(target_ids)]
    greedy = logits[len(prompt_ids) - 1:-1].argmax(-1).tolist()
    return {"base": base_path, "nll": float(-picked.mean()), "greedy": tok.decode(greedy),
            "ftedit_imported": any(name == "ftedit" or name.startswith("ftedit.") for name in sys.modules)}


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    print(json.dumps(main(*sys.argv[1:])))
