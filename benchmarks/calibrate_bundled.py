"""Run the calibration location search on a bundled model and ship its result in the package.

    python benchmarks/calibrate_bundled.py --model demo --out runs/calibration-demo
    python benchmarks/calibrate_bundled.py --model smollm2 --out runs/calibration-smollm2

Writes the sweep report (heatmap, tables) to --out and the result into src/ftedit/resources/locations.json,
keyed by the GGUF file's sha256 and the search settings (with the calibration set's hash), so that
`params.layers: auto` on that model needs no search. `ftedit locate --calibration --model NAME` reruns it.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ftedit.atomic import write_json_atomic
from ftedit.calibration import calibration_sha256, resource
from ftedit.config import resolve_config
from ftedit.locate import (
    LOCATIONS_FILE,
    calibration_search,
    gguf_sha256,
    search_settings,
    settings_key,
    shipped_entry,
    shipped_locations,
    write_report,
)
from ftedit.models import BUNDLED_MODELS, load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(BUNDLED_MODELS), required=True)
    ap.add_argument("--recipe", default="locft-bf", help="recipe whose training the trials use")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = resolve_config(args.recipe)
    model, tok, identity = load_model(args.model)
    result = calibration_search(model, tok, config, progress=True, model_fingerprint=identity.fingerprint)
    write_report(args.out, result, identity.to_dict(), f"{args.model}, calibration set, trials: {args.recipe}")
    key = settings_key(search_settings(config), calibration_sha256())
    name, entry = shipped_entry(args.model, gguf_sha256(identity), key, result)
    write_json_atomic(resource(LOCATIONS_FILE), shipped_locations() | {name: entry})
    logging.info("%s: layer %d %s (%.0fs, %d trials) -> %s", args.model, result.best.layer, result.best.module,
                 result.seconds, len(result.trials), resource(LOCATIONS_FILE))


if __name__ == "__main__":
    main()
