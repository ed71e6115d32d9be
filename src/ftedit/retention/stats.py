"""Per-run statistics: retention with bootstrap intervals over facts, and per-probe top-3 drift.

Retention of a probe kind at the end of a run = the share of its probes known right after editing that are still
known at the end (so the edit's own damage to intrinsic facts is not counted as downstream forgetting). The
interval is a percentile bootstrap over those facts; the edited-minus-intrinsic gap resamples both sets.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from ftedit.retention.measure import RetentionProbe, RetentionSnapshot
from ftedit.tokenization import encode_target

KINDS = ("edited", "paraphrase", "intrinsic")


def _mean(flags: Sequence[float]) -> float:
    return 100.0 * sum(flags) / len(flags)


def _percentiles(values: list[float], level: float) -> tuple[float, float]:
    values = sorted(values)
    lo = values[int((1 - level) / 2 * (len(values) - 1))]
    hi = values[int((1 + level) / 2 * (len(values) - 1))]
    return lo, hi


def bootstrap(flags: Sequence[float], n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Rate (%) of ``flags`` (booleans, or per-fact shares in [0, 1]) with a percentile-bootstrap interval."""
    if not flags:
        return {"rate": None, "low": None, "high": None, "n": 0}
    rng = random.Random(seed)
    draws = [_mean(rng.choices(flags, k=len(flags))) for _ in range(n_boot)]
    lo, hi = _percentiles(draws, level)
    return {"rate": _mean(flags), "low": lo, "high": hi, "n": len(flags)}


def bootstrap_gap(a: Sequence[float], b: Sequence[float], n_boot: int = 1000, level: float = 0.95,
                  seed: int = 0) -> dict[str, Any]:
    """Rate(a) - rate(b) in points, each set resampled on its own."""
    if not a or not b:
        return {"gap": None, "low": None, "high": None}
    rng = random.Random(seed)
    draws = [_mean(rng.choices(a, k=len(a))) - _mean(rng.choices(b, k=len(b))) for _ in range(n_boot)]
    lo, hi = _percentiles(draws, level)
    return {"gap": _mean(a) - _mean(b), "low": lo, "high": hi}


def retained_flags(probes: Sequence[RetentionProbe], post: RetentionSnapshot, end: RetentionSnapshot,
                   kind: str) -> list[bool]:
    """For each probe of ``kind`` known after editing: is it still known at ``end``?"""
    return [end.known[i] for i, p in enumerate(probes) if p.kind == kind and post.known[i]]


def _first_token_text(tok, target: str) -> str:
    return tok.decode([encode_target(tok, target)[0]]).strip()


def probe_drift(tok, probes: Sequence[RetentionProbe], post: RetentionSnapshot,
                end: RetentionSnapshot) -> list[dict[str, Any]]:
    """Per probe: the top-3 after editing and at the end, and whether the top-1 / the target left the top-3."""
    out = []
    for i, p in enumerate(probes):
        target = _first_token_text(tok, p.target)
        before, after = post.top3[i], end.top3[i]
        out.append({"index": i, "kind": p.kind, "prompt": p.prompt, "target": p.target,
                    "post_edit_top3": before, "end_top3": after,
                    "top1_changed": bool(before and after and before[0][0] != after[0][0]),
                    "target_left_top3": any(t == target for t, _ in before) and not any(t == target for t, _ in after)})
    return out


def drift_summary(drift: Sequence[dict[str, Any]]) -> dict[str, dict[str, float | int]]:
    """Per kind: how many probes, and the % whose top-1 changed / whose target left the top-3."""
    out = {}
    for kind in KINDS:
        rows = [d for d in drift if d["kind"] == kind]
        if rows:
            out[kind] = {"n": len(rows), "top1_changed": _mean([d["top1_changed"] for d in rows]),
                         "target_left_top3": _mean([d["target_left_top3"] for d in rows])}
    return out


def _summary(flags: dict[str, list], drift: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    return {"retention": {kind: bootstrap(f, seed=seed) for kind, f in flags.items() if f},
            "gap_edited_minus_intrinsic": bootstrap_gap(flags.get("edited", []), flags.get("intrinsic", []),
                                                        seed=seed),
            "drift": drift_summary(drift), "probe_drift": drift}


def _key(probe: RetentionProbe) -> str:
    """A probe's identity across the runs of a study (two edits may share a paraphrase's wording)."""
    return f"{probe.edit}:{probe.prompt}"


def run_statistics(tok, probes: Sequence[RetentionProbe], post: RetentionSnapshot, end: RetentionSnapshot,
                   seed: int = 0) -> dict[str, Any]:
    """Retention per kind with intervals, the edited - intrinsic gap, and the top-3 drift."""
    retained = {kind: {_key(p): end.known[i] for i, p in enumerate(probes) if p.kind == kind and post.known[i]}
                for kind in KINDS}
    flags = {kind: list(r.values()) for kind, r in retained.items()}
    return {**_summary(flags, probe_drift(tok, probes, post, end), seed), "retained_by_probe": retained}


def pooled_statistics(runs: Sequence[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """:func:`run_statistics` over single-edit runs: a fact probed in several runs counts once, with the share
    of those runs that retained it (the intrinsic facts are probed in every run)."""
    flags: dict[str, list] = {}
    for kind in KINDS:
        by_prompt: dict[str, list[bool]] = {}
        for run in runs:
            for key, kept in run["retained_by_probe"].get(kind, {}).items():
                by_prompt.setdefault(key, []).append(kept)
        flags[kind] = [sum(v) / len(v) for v in by_prompt.values()]
    return _summary(flags, [d for run in runs for d in run["probe_drift"]], seed)
