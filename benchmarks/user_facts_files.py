"""COUNTERFACT records as a user would hold them ({prompt, target} rows) plus the file that scores them.

    python benchmarks/user_facts_files.py --data ../shared/data/counterfact --split edit --n 30 --out runs/test

rows.jsonl: one {"prompt", "target"} row per record, what `ftedit edit --data` gets (no subject, no probes).
eval.jsonl: the same edits with target_true, paraphrases and neighbors, for `ftedit eval --data`. Per record the
probe prompts come from whichever copy has more: the full-schema union (2 paraphrases, 10 neighbors) when it
holds the case_id, else the EasyEdit record (1 rephrase, 1 locality prompt); sources.json says which.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ftedit.atomic import write_bytes_atomic, write_json_atomic


def _probes(easy: dict, full: dict | None) -> tuple[list[str], list[dict], str]:
    truth = easy["ground_truth"]
    if full and len(full["paraphrase_prompts"]) + len(full["neighborhood_prompts"]) > 2:
        return (full["paraphrase_prompts"], [{"prompt": p, "target": truth} for p in full["neighborhood_prompts"]],
                "full")
    return [easy["rephrase_prompt"]], [{"prompt": easy["locality_prompt"], "target": easy["locality_ground_truth"]}], \
        "easyedit"


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="folder with easyedit/ and full/")
    ap.add_argument("--split", default="edit", choices=["edit", "train", "val"])
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    easy = json.loads((args.data / "easyedit" / f"counterfact-{args.split}.json").read_text())
    union = {r["case_id"]: r for r in json.loads((args.data / "full" / "counterfact_full_union.json").read_text())}
    rows, scored, sources = [], [], {}
    for rec in easy[args.offset:args.offset + args.n]:
        paraphrases, neighbors, source = _probes(rec, union.get(rec["case_id"]))
        rows.append({"prompt": rec["prompt"], "target": rec["target_new"]})
        scored.append({"case_id": rec["case_id"], "prompt": rec["prompt"], "subject": rec["subject"],
                       "target": rec["target_new"], "target_true": rec["ground_truth"],
                       "paraphrases": paraphrases, "neighborhood": neighbors})
        sources[rec["case_id"]] = source
    write_bytes_atomic(args.out / "rows.jsonl", _jsonl(rows))
    write_bytes_atomic(args.out / "eval.jsonl", _jsonl(scored))
    write_json_atomic(args.out / "sources.json", sources)
    full = sum(s == "full" for s in sources.values())
    print(f"{len(rows)} records -> {args.out}: probes from the full schema for {full}, EasyEdit for {len(rows) - full}")


if __name__ == "__main__":
    main()
