"""LoRA against full weights at the same location, through ``ftedit edit`` as a user runs it.

    python benchmarks/lora_vs_full.py --n 100 --recipe locft-bf --set params.layers=1 --set params.modules=down \
        --out runs/lora-vs-full

Runs ``ftedit edit`` twice on the same edits (``params.method=full`` with ``--save none``, ``params.method=lora``
with ``--save adapter``), each with its before/after evaluation (the harness of ``ftedit eval``: the records'
paraphrases and neighbors), and writes ``OUT/table.md`` and ``OUT/results.json``: ES/PS/NS, edit score, wall
time of the edit, unreached edits, trainable parameters, and the size on disk of what the edit adds (the adapter
directory for LoRA; the changed weights at 4 bytes each for full weights, whose only saved form is the whole
model).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from ftedit.atomic import write_bytes_atomic, write_json_atomic

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact" / "easyedit"
KEYS = ("efficacy", "generalization", "locality", "edit_score")


def _run(args: argparse.Namespace, method: str) -> dict:
    out = Path(args.out) / method
    save = "adapter" if method == "lora" else "none"
    cmd = [sys.executable, "-m", "ftedit", "edit", "--model", args.model, "--data", args.data, "--n", str(args.n),
           "--offset", str(args.offset), "--recipe", args.recipe, "--out", str(out), "--save", save, "--overwrite",
           "--no-progress", "--set", f"params.method={method}"]
    cmd += [a for s in args.overrides for a in ("--set", s)] + (["--pool", args.pool] if args.pool else [])
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    manifest = json.loads((out / "manifest.json").read_text())
    post, pre = manifest["evaluation"]["post"], manifest["evaluation"]["pre"]
    n_params = manifest["touched"]["trainable_parameters"]
    size = sum(f.stat().st_size for f in (out / "adapter").rglob("*") if f.is_file()) if save == "adapter" \
        else 4 * n_params
    return {"method": method, **{k: post[k] for k in KEYS}, "pre": {k: pre[k] for k in KEYS},
            "edit_seconds": manifest["wall_seconds"], "train_seconds": manifest["seconds"].get("train"),
            "unreached": manifest["unreached"]["n"], "trainable_parameters": n_params, "bytes": size,
            "lr": manifest["config"]["train"]["lr"], "lora": manifest["config"]["lora"], "command": " ".join(cmd)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--data", default=str(DATA / "counterfact-edit.json"))
    ap.add_argument("--pool", default=None, help="fact pool, for recipes that draw random/similar facts")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--recipe", default="locft-bf")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--methods", nargs="+", default=["full", "lora"])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = [_run(args, m) for m in args.methods]
    pre = rows[0]["pre"]
    lines = ["| weights | ES | PS | NS | score | edit s | unreached | trainable | on disk |", "|---|" + "---:|" * 8,
             f"| unedited | {pre['efficacy']:.0f} | {pre['generalization']:.0f} | {pre['locality']:.0f} | "
             f"{pre['edit_score']:.1f} | | | | |"]
    for r in rows:
        disk = f"{r['bytes'] / 1e6:.2f} MB" + (" (adapter)" if r["method"] == "lora" else " (changed weights)")
        lines.append(f"| {r['method']} (lr {r['lr']:g}) | {r['efficacy']:.0f} | {r['generalization']:.0f} | "
                     f"{r['locality']:.0f} | {r['edit_score']:.1f} | {r['edit_seconds']:.0f} | {r['unreached']} | "
                     f"{r['trainable_parameters']:,} | {disk} |")
    write_bytes_atomic(Path(args.out) / "table.md", ("\n".join(lines) + "\n").encode())
    write_json_atomic(Path(args.out) / "results.json", {"argv": vars(args), "rows": rows})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
