"""Rebuild the shipped calibration set and the dev edits used to choose the default recipe.

    python benchmarks/build_calibration.py --data ../shared/data/counterfact [--dev-out runs/dev]

Calibration: 120 records of counterfact_full_union.json whose case_id is in EasyEdit's counterfact-train.json
(never the edit or val split, nor the demo's edits), seed 0 -> src/ftedit/resources/calibration_counterfact.json.
Dev (optional): 30 further train-split records, disjoint from the calibration set and the shipped pool, written
as the full records (for `ftedit eval`) and as {prompt, target} rows (what a user's file holds).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from ftedit.atomic import write_bytes_atomic, write_json_atomic
from ftedit.calibration import POOL_FILE, build_calibration_set, calibration_path, case_ids, resource


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="folder with easyedit/ and full/ (shared/data/counterfact)")
    ap.add_argument("--n", type=int, default=120)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dev-out", type=Path, default=None)
    ap.add_argument("--n-dev", type=int, default=30)
    args = ap.parse_args()
    union = json.loads((args.data / "full" / "counterfact_full_union.json").read_text())
    train = case_ids(args.data / "easyedit" / "counterfact-train.json")
    held = case_ids(args.data / "easyedit" / "counterfact-edit.json") | case_ids(
        args.data / "easyedit" / "counterfact-val.json") | case_ids(resource("demo_edits.json"))
    records = build_calibration_set(union, train, held, n=args.n, seed=args.seed)
    write_json_atomic(calibration_path(), records)
    print(f"wrote {len(records)} calibration records to {calibration_path()}")
    if args.dev_out:
        taken = {r["case_id"] for r in records} | case_ids(resource(POOL_FILE)) | held
        eligible = [r for r in union if r["case_id"] in train and r["case_id"] not in taken]
        dev = sorted(random.Random(args.seed + 1).sample(eligible, args.n_dev), key=lambda r: r["case_id"])
        args.dev_out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.dev_out / "dev_full.json", dev)
        rows = [{"prompt": r["requested_rewrite"]["prompt"].replace("{}", r["requested_rewrite"]["subject"]),
                 "target": r["requested_rewrite"]["target_new"]["str"]} for r in dev]
        write_bytes_atomic(args.dev_out / "dev_rows.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
        print(f"wrote {len(dev)} dev records to {args.dev_out}")


if __name__ == "__main__":
    main()
