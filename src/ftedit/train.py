"""The training loop, readable top to bottom: encode examples, then breadth-first or depth-first fine-tuning.

Breadth-first (paper 001, the default): epochs of shuffled mini-batches over *all* training examples.
Depth-first (EasyEdit/MEMIT's FT baselines): each edit, with its own augmentation, trained to convergence
before the next one; kept so that paper 001's ablation can be reproduced.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ftedit.checkpoint import RunCheckpoint
from ftedit.data.examples import TrainingExample
from ftedit.distributed import DataParallel
from ftedit.forward import PrefixActivations, labelled_logits, per_example_margin, per_example_nll
from ftedit.precision import train_autocast
from ftedit.tokenization import EncodedPair, encode_pair, pad_right

logger = logging.getLogger(__name__)

LOCALITY_KINDS = ("random", "similar")


@dataclass
class ObjectiveConfig:
    conditional: bool = True  # True: loss on target tokens only, prompt masked (paper 000). False: naive full likelihood.
    append_eos: bool = False  # train on target + EOS (LocFT does), so the model also learns to stop
    dpo_weight: float = 0.0  # >0 adds DPO with target_true as the rejected answer (paper 000's ablation)
    dpo_beta: float = 0.1  # DPO inverse temperature
    # "on": prompt and target go through the tokenizer's chat template (user turn -> assistant answer), in
    # training, evaluation and generation; "auto": on when the tokenizer has one and every prompt is a question
    chat_template: str = "auto"
    # pool facts (random/similar examples): "ce" trains them toward their true answers; "kl" keeps the unedited
    # model's next-token distribution at their answer positions (its top locality_top_k tokens + the rest's mass)
    locality_loss: str = "ce"
    locality_top_k: int = 64


@dataclass
class TrainConfig:
    pipeline: str = "breadth"  # "breadth": epochs over shuffled mini-batches; "depth": one edit at a time
    epochs: int = 25  # breadth-first: passes over all examples
    batch_size: int = 32  # examples per optimizer micro-batch
    grad_accum: int = 1  # breadth-first: micro-batches per optimizer step (depth-first accumulates a whole edit)
    lr: float = 5e-4
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # "adamw", "adam" or "sgd"
    schedule: str = "constant"  # any transformers scheduler name: constant, linear, cosine, ...
    warmup_ratio: float = 0.0
    max_grad_norm: float = 0.0  # 0 disables clipping
    loss_threshold: float = 0.0  # early stop: breadth when an epoch's mean loss is below; depth per edit
    # "after": every mini-batch steps, then the run (or edit) stops once its loss is below loss_threshold.
    # "before" (LocFT's and EasyEdit's code): a mini-batch whose loss is already below it is not stepped.
    threshold_check: str = "after"
    # breadth: stop after an epoch at whose end every edit's own prompt prefers its target by this margin
    # (each target token's log-prob above every other token's by at least this many nats); 0 disables
    stop_margin: float = 0.0
    fresh_optimizer_per_edit: bool = False  # depth: a new optimizer for each edit (EasyEdit's FT/FT-M do)
    steps_per_edit: int = 25  # depth-first: maximum optimizer steps for each edit
    mixed_precision: str = "auto"  # "auto" (bf16 autocast on CUDA and bf16-capable CPUs; see ftedit.precision), "bf16" or "no"
    cache_activations: bool = True  # run the frozen blocks below the first trainable one once, not every step
    group_by_length: bool = False  # breadth: batches of similar length (less padding), batch order still shuffled
    gradient_checkpointing: bool = False  # recompute the trainable blocks' activations in backward (less memory)
    checkpoint_every: int = 100  # optimizer steps between resumable checkpoints (when a checkpoint dir is given)
    seed: int = 0


@dataclass
class EncodedExample:
    chosen: EncodedPair
    rejected: EncodedPair | None
    group: int  # request index used to group examples depth-first
    kind: str = "edit"  # the training example's kind: "edit" or an augmentation


@dataclass
class TrainResult:
    steps: int = 0
    epochs_run: int = 0
    skipped_steps: int = 0  # threshold_check="before": mini-batches already below the threshold, not stepped
    final_loss: float = float("nan")
    loss_history: list[float] = field(default_factory=list)  # breadth: per epoch; depth: per edit (last step)
    seconds: float = 0.0
    stopped_early: bool = False
    stop_reason: str = ""  # "", "loss_threshold" or "margin"
    edit_margin: float | None = None  # smallest edit margin at the last check (stop_margin > 0)


def encode_examples(tok, examples: Sequence[TrainingExample], objective: ObjectiveConfig) -> list[EncodedExample]:
    encoded = []
    for ex in examples:
        if objective.conditional:
            chosen = encode_pair(tok, ex.prompt, ex.target, objective.append_eos)
        else:
            pair = encode_pair(tok, ex.prompt, ex.target, objective.append_eos)
            chosen = EncodedPair(pair.input_ids, 1)  # every token after the first is a label: full likelihood
        rejected = None
        if objective.dpo_weight > 0 and ex.rejected:
            rejected = encode_pair(tok, ex.prompt, ex.rejected, objective.append_eos)
        encoded.append(EncodedExample(chosen, rejected, ex.request_index, ex.kind))
    return encoded


class Scorer:
    """Per-example NLL and summed log-prob of the chosen or rejected answers of some examples.

    With ``prefix_layers = k > 0`` the hidden states entering block ``k`` are computed once
    (:class:`~ftedit.forward.PrefixActivations`) and every later call runs only blocks ``k..``.
    """

    def __init__(self, model, encoded: list[EncodedExample], pad_id: int, prefix_layers: int = 0,
                 batch_size: int = 32):
        self.model, self.encoded, self.pad_id = model, encoded, pad_id
        self.device = next(model.parameters()).device
        self.rejected_idx = [i for i, e in enumerate(encoded) if e.rejected is not None]
        self.rejected_pos = {i: j for j, i in enumerate(self.rejected_idx)}
        self.caches: dict[str, PrefixActivations | None] = {"chosen": None, "rejected": None}
        # pool-fact example -> the unedited model's top-k answer distributions (objective.locality_loss="kl")
        self.locality_ref: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if prefix_layers > 0:
            self.caches["chosen"] = PrefixActivations(model, prefix_layers, [e.chosen for e in encoded], pad_id,
                                                      batch_size)
            if self.rejected_idx:
                self.caches["rejected"] = PrefixActivations(
                    model, prefix_layers, [encoded[i].rejected for i in self.rejected_idx], pad_id, batch_size)

    def _run(self, fn, idx: list[int], which: str = "chosen"):
        """``fn(model, batch)`` on the chosen or rejected answers of ``idx``, through the prefix cache if any."""
        pairs = [getattr(self.encoded[i], which) for i in idx]
        cache = self.caches[which]
        if cache is None:
            return fn(self.model, pad_right(pairs, self.pad_id).to(self.device))
        rows = idx if which == "chosen" else [self.rejected_pos[i] for i in idx]
        return cache.run(fn, rows, pairs)

    def __call__(self, idx: list[int], which: str = "chosen") -> tuple[torch.Tensor, torch.Tensor]:
        return self._run(per_example_nll, idx, which)

    def logits(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """fp32 logits at the labelled positions of the chosen answers, their tokens, and each one's row."""
        return self._run(labelled_logits, idx)

    @torch.no_grad()
    def margins(self, idx: list[int], batch_size: int) -> torch.Tensor:
        """Per example, the smallest margin of a target token's log-prob over the best other token's."""
        return torch.cat([self._run(per_example_margin, chunk) for chunk in _chunks(idx, batch_size)])


@torch.no_grad()
def reference_logps(score: Scorer, batch_size: int) -> dict[int, tuple]:
    """Summed log-probs of chosen and rejected answers under the unedited model, for DPO."""
    out: dict[int, tuple] = {}
    for start in range(0, len(score.rejected_idx), batch_size):
        idx = score.rejected_idx[start:start + batch_size]
        chosen, rejected = score(idx, "chosen")[1], score(idx, "rejected")[1]
        out.update({i: (c.item(), r.item()) for i, c, r in zip(idx, chosen, rejected, strict=True)})
    return out


@torch.no_grad()
def locality_reference(score: Scorer, top_k: int, batch_size: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """For each pool-fact example: the unedited model's top-k token ids and log-probs at its answer positions."""
    idx = [i for i, e in enumerate(score.encoded) if e.kind in LOCALITY_KINDS]
    out = {}
    for chunk in _chunks(idx, batch_size):
        logits, _, rows = score.logits(chunk)
        top = logits.log_softmax(-1).topk(top_k, dim=-1)
        out.update({i: (top.indices[rows == r], top.values[rows == r]) for r, i in enumerate(chunk)})
    return out


def _per_row_mean(values: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    summed = torch.zeros(n, device=values.device).index_add(0, rows, values)
    return summed / torch.zeros(n, device=values.device).index_add(0, rows, torch.ones_like(values)).clamp_min(1)


def locality_kl(logp: torch.Tensor, ref_ids: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """KL(unedited || edited) per position over the unedited model's top-k tokens plus one bucket for the rest."""
    p_ref = ref_logp.exp()
    lp = logp.gather(1, ref_ids)
    rest_ref = (1 - p_ref.sum(-1)).clamp_min(1e-6)
    rest = (1 - lp.exp().sum(-1)).clamp_min(1e-6)
    return (p_ref * (ref_logp - lp)).sum(-1) + rest_ref * (rest_ref.log() - rest.log())


def _loss_with_locality_kl(score: Scorer, idx: list[int], loc_ref: dict[int, tuple]) -> torch.Tensor:
    """Mean over examples: NLL for edits and paraphrases, :func:`locality_kl` for pool facts."""
    logits, tokens, rows = score.logits(idx)
    logp = logits.log_softmax(-1)
    is_loc = torch.tensor([i in loc_ref for i in idx], device=logits.device)[rows]
    per_pos = -logp.gather(1, tokens[:, None]).squeeze(1)
    loc_rows = [r for r, i in enumerate(idx) if i in loc_ref]
    if loc_rows:
        ref_ids = torch.cat([loc_ref[idx[r]][0] for r in loc_rows])
        ref_logp = torch.cat([loc_ref[idx[r]][1] for r in loc_rows])
        per_pos = per_pos.masked_scatter(is_loc, locality_kl(logp[is_loc], ref_ids, ref_logp))
    return _per_row_mean(per_pos, rows, len(idx)).mean()


def batch_loss(score: Scorer, idx: list[int], objective: ObjectiveConfig, ref: dict[int, tuple]) -> torch.Tensor:
    """Mean per-example NLL of the chosen answers (or, for pool facts with ``locality_loss="kl"``, the KL to the
    unedited model), plus the weighted DPO term where a rejected answer exists."""
    if score.locality_ref:
        return _loss_with_locality_kl(score, idx, score.locality_ref)
    nll, chosen_logp = score(idx, "chosen")
    loss = nll.mean()
    dpo = [k for k, i in enumerate(idx) if i in ref]
    if objective.dpo_weight > 0 and dpo:
        rejected_logp = score([idx[k] for k in dpo], "rejected")[1]
        ref_c = torch.tensor([ref[idx[k]][0] for k in dpo], device=score.device)
        ref_r = torch.tensor([ref[idx[k]][1] for k in dpo], device=score.device)
        loss = loss + dpo_loss(chosen_logp[dpo], rejected_logp, ref_c, ref_r, objective)
    return loss


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             objective: ObjectiveConfig) -> torch.Tensor:
    """``dpo_weight`` times the mean DPO loss ``-log sigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l)))`` of
    summed answer log-probs under the edited (pi) and the unedited (ref) model."""
    margin = (chosen - ref_chosen) - (rejected - ref_rejected)
    return objective.dpo_weight * -F.logsigmoid(objective.dpo_beta * margin).mean()


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; use adamw, adam or sgd")


def _use_bf16(cfg: TrainConfig, model) -> bool:
    mode = cfg.mixed_precision
    if mode == "auto":  # bf16 on CUDA and on CPUs with bf16 units, unless the model was loaded as fp32
        mode = "bf16" if train_autocast(model) else "no"
    if mode not in ("bf16", "no"):
        raise ValueError(f"mixed_precision={mode!r}: use 'auto', 'bf16' or 'no' (fp16 would need loss scaling)")
    return mode == "bf16"


def _autocast(enabled: bool, device: torch.device):
    # autocast caches the bf16 copy of each trainable (leaf) weight until its context exits, so with one context
    # around the whole loop every step after the first would run on stale weights: no cache.
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False) if enabled else nullcontext()


@contextmanager
def _fp32_master_weights(params: list[nn.Parameter], enabled: bool):
    """Train low-precision weights as fp32 copies (optimizer state included), and give them back in their dtype.

    Under autocast the forward casts them as needed; without the copies, updates smaller than a bf16 weight's
    rounding step would be lost.
    """
    dtypes = [p.dtype for p in params]
    if enabled:
        for p in params:
            p.data = p.data.float()
    try:
        yield
    finally:
        for p, dtype in zip(params, dtypes, strict=True):
            p.data = p.data.to(dtype)


class Stepper:
    """Optimizer, schedule, clipping and the FT-L constraint: one ``step()`` per optimizer update."""

    def __init__(self, params: list[nn.Parameter], cfg: TrainConfig, total_steps: int,
                 after_step: Callable[[], None] | None = None, parallel: DataParallel | None = None):
        from transformers import get_scheduler

        self.params, self.cfg, self.after_step = params, cfg, after_step
        self.parallel = parallel or DataParallel()
        self.opt = make_optimizer(params, cfg)
        total = max(1, total_steps)
        self.sched = get_scheduler(cfg.schedule, self.opt, num_warmup_steps=int(cfg.warmup_ratio * total),
                                   num_training_steps=total)
        self.steps = 0
        self.skipped = 0

    def state_dict(self) -> dict[str, Any]:
        """Optimizer, scheduler and step count, for a resumable checkpoint."""
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(), "steps": self.steps,
                "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.steps = state["steps"]
        self.skipped = state.get("skipped", 0)

    def accumulate(self, score: Scorer, micro_batches: list[list[int]], objective, ref) -> float:
        """Backpropagate the mean loss over ``micro_batches`` (gradient accumulation), then step once; with
        ``threshold_check="before"`` a loss already below ``loss_threshold`` is not stepped (``skipped``)."""
        total = 0.0
        sharded = self.parallel.sharded
        for idx in micro_batches:
            # each process takes its share of the micro-batch; its loss is weighted by that share so that
            # the summed gradients are those of the whole micro-batch (what DDP computes)
            local = self.parallel.shard(idx)
            if local:
                loss = batch_loss(score, local, objective, ref) * (len(local) / len(idx))
                # FSDP averages the gradients it reduce-scatters: scale by the world size to sum them
                ((loss * self.parallel.world if sharded else loss) / len(micro_batches)).backward()
                total += loss.item()
            elif sharded:  # every process must join each unit's gather and reduce-scatter: a zero-weight pass
                (batch_loss(score, idx[:1], objective, ref) * 0.0).backward()
        total = self.parallel.sum_gradients(self.params, total)
        mean = total / len(micro_batches)
        if self.cfg.threshold_check == "before" and mean < self.cfg.loss_threshold:
            self.opt.zero_grad(set_to_none=True)
            self.skipped += 1
            return mean
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.steps += 1
        if self.after_step:
            self.after_step()
        return mean

    def fresh_optimizer(self) -> None:
        """A new optimizer (no moments), as EasyEdit's FT and FT-M build one for each edit."""
        self.opt = make_optimizer(self.params, self.cfg)
        self.sched.optimizer = self.opt


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def train(model, tok, examples: Sequence[TrainingExample], params: list[nn.Parameter], cfg: TrainConfig,
          objective: ObjectiveConfig, after_step: Callable[[], None] | None = None,
          progress: bool = True, prefix_layers: int = 0, checkpoint: RunCheckpoint | None = None) -> TrainResult:
    """Fine-tune ``params`` of ``model`` on ``examples``; everything else stays frozen.

    ``prefix_layers``: number of leading blocks that hold no trainable parameter; with
    ``cfg.cache_activations`` they run once instead of at every step.
    ``checkpoint``: save resumable state every ``checkpoint.every`` optimizer steps, and continue from the
    saved state when it is inside this run (or skip the run when the saved state is past it).
    """
    if not examples:
        raise ValueError("no training examples")
    if cfg.pipeline not in ("breadth", "depth"):
        raise ValueError(f"unknown pipeline {cfg.pipeline!r}; use 'breadth' or 'depth'")
    if checkpoint is not None and (done := checkpoint.finished_result(params)) is not None:
        logger.info("training run %d finished before the interruption: skipped", checkpoint.run)
        return TrainResult(**done)
    device = next(model.parameters()).device
    encoded = encode_examples(tok, examples, objective)
    model.eval()  # editing is deterministic: no dropout
    run = _train_breadth if cfg.pipeline == "breadth" else _train_depth
    start = time.perf_counter()
    bf16 = _use_bf16(cfg, model)
    with _autocast(bf16, device), _fp32_master_weights(params, bf16), \
            _checkpointed_blocks(model, cfg.gradient_checkpointing, prefix_layers):
        # cache and DPO reference in the same precision as training
        score = Scorer(model, encoded, tok.pad_token_id, prefix_layers if cfg.cache_activations else 0,
                       cfg.batch_size)
        ref = reference_logps(score, cfg.batch_size) if objective.dpo_weight > 0 else {}
        if objective.locality_loss == "kl":
            score.locality_ref = locality_reference(score, objective.locality_top_k, cfg.batch_size)
        result = run(score, params, cfg, objective, ref, after_step, progress, checkpoint)
    result.seconds = time.perf_counter() - start
    return result


@contextmanager
def _checkpointed_blocks(model, enabled: bool, prefix_layers: int):
    """Activation (gradient) checkpointing of the trainable blocks through transformers.

    transformers checkpoints a block only when the block is in training mode; editing keeps dropout off,
    so only the blocks' own ``training`` flag is set, not their submodules'.
    """
    if not enabled:
        yield
        return
    from ftedit.forward import _unwrap
    from ftedit.params import find_blocks

    lm = _unwrap(model)
    if not getattr(lm, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(lm).__name__} does not support gradient checkpointing (train.gradient_checkpointing)")
    enable = getattr(lm, "activation_checkpointing_enable", None) or lm.gradient_checkpointing_enable
    disable = getattr(lm, "activation_checkpointing_disable", None) or lm.gradient_checkpointing_disable
    enable()
    blocks = list(find_blocks(lm)[1])[prefix_layers:]
    for block in blocks:
        block.training = True
    try:
        yield
    finally:
        for block in blocks:
            block.training = False
        disable()


def _epoch_plan(rng: random.Random, lengths: list[int], cfg: TrainConfig) -> list[list[list[int]]]:
    """One epoch: optimizer steps, each a list of micro-batches of example indices, every example once."""
    if not cfg.group_by_length:
        order = list(range(len(lengths)))
        rng.shuffle(order)
        batches = _chunks(order, cfg.batch_size)
    else:
        from transformers.trainer_pt_utils import get_length_grouped_indices

        # mega-batches of a random permutation sorted by length (transformers' group_by_length), then the
        # batches themselves shuffled, so that no length comes systematically early or late in an epoch
        generator = torch.Generator().manual_seed(rng.getrandbits(63))
        grouped = get_length_grouped_indices(lengths, cfg.batch_size, generator=generator)
        batches = _chunks(grouped, cfg.batch_size)
        rng.shuffle(batches)
    return _chunks(batches, cfg.grad_accum)


def _train_breadth(score: Scorer, params, cfg: TrainConfig, objective, ref, after_step, progress,
                   checkpoint: RunCheckpoint | None = None) -> TrainResult:
    rng = random.Random(cfg.seed)
    n = len(score.encoded)
    lengths = [len(e.chosen.input_ids) for e in score.encoded]
    steps_per_epoch = math.ceil(math.ceil(n / cfg.batch_size) / cfg.grad_accum)
    stepper = Stepper(params, cfg, cfg.epochs * steps_per_epoch, after_step)
    result = TrainResult()
    saved = checkpoint.restore(params, stepper, rng) if checkpoint else None
    first_epoch, plan, done, losses = 0, None, 0, []
    if saved:
        first_epoch, plan, done, losses = saved["epoch"], saved["plan"], saved["done"], saved["losses"]
        result.loss_history, result.epochs_run = saved["loss_history"], saved["epoch"]
    bar = tqdm(total=cfg.epochs * steps_per_epoch, initial=stepper.steps, desc="edit (breadth-first)", unit="step",
               disable=not progress)
    for epoch in range(first_epoch, cfg.epochs):
        plan = plan or _epoch_plan(rng, lengths, cfg)
        for group in plan[done:]:
            losses.append(stepper.accumulate(score, group, objective, ref))
            done += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.4f}")
            if checkpoint and stepper.steps % checkpoint.every == 0 and stepper.parallel.is_main:
                checkpoint.save(params, stepper, rng, {"epoch": epoch, "plan": plan, "done": done, "losses": losses,
                                                       "loss_history": result.loss_history})
        result.loss_history.append(sum(losses) / len(losses))
        result.epochs_run = epoch + 1
        plan, done, losses = None, 0, []
        if _should_stop(score, cfg, result):
            break
    bar.close()
    result.steps, result.final_loss, result.skipped_steps = stepper.steps, result.loss_history[-1], stepper.skipped
    _finish(checkpoint, params, stepper, rng, result)
    return result


def _should_stop(score: Scorer, cfg: TrainConfig, result: TrainResult) -> bool:
    """Breadth-first early stop after an epoch: the loss threshold, or every edit in by ``stop_margin``."""
    if result.loss_history[-1] < cfg.loss_threshold:
        result.stopped_early, result.stop_reason = True, "loss_threshold"
        return True
    if cfg.stop_margin <= 0:
        return False
    edits = [i for i, e in enumerate(score.encoded) if e.kind == "edit"]
    if not edits:
        raise ValueError("train.stop_margin needs edit examples (kind 'edit') among the training examples")
    result.edit_margin = float(score.margins(edits, cfg.batch_size).min())
    if result.edit_margin >= cfg.stop_margin:
        result.stopped_early, result.stop_reason = True, "margin"
        logger.info("every edit prefers its target by >= %.2g nats after epoch %d: stopped", cfg.stop_margin,
                    result.epochs_run)
    return result.stopped_early


def _finish(checkpoint: RunCheckpoint | None, params, stepper: Stepper, rng, result: TrainResult) -> None:
    if checkpoint and stepper.parallel.is_main:
        checkpoint.finish(params, stepper, rng, dict(vars(result)))


def _train_depth(score: Scorer, params, cfg: TrainConfig, objective, ref, after_step, progress,
                 checkpoint: RunCheckpoint | None = None) -> TrainResult:
    """Each edit (with its own augmentation) for up to ``steps_per_edit`` optimizer steps, one edit after another.

    Checkpoints fall between edits (every ``checkpoint.every`` optimizer steps, at the next edit boundary).
    """
    groups: dict[int, list[int]] = defaultdict(list)
    for i, e in enumerate(score.encoded):
        groups[e.group].append(i)
    stepper = Stepper(params, cfg, len(groups) * cfg.steps_per_edit, after_step)
    rng = random.Random(cfg.seed)
    result = TrainResult(epochs_run=1)
    saved = checkpoint.restore(params, stepper, rng) if checkpoint else None
    done = saved["done"] if saved else 0
    result.loss_history = saved["loss_history"] if saved else []
    last_saved = stepper.steps
    items = sorted(groups.items())
    for _, idx in tqdm(items[done:], desc="edit (depth-first)", unit="edit", disable=not progress):
        if cfg.fresh_optimizer_per_edit:
            stepper.fresh_optimizer()
        for _ in range(cfg.steps_per_edit):
            last = stepper.accumulate(score, _chunks(idx, cfg.batch_size), objective, ref)
            if last < cfg.loss_threshold:
                break
        result.loss_history.append(last)
        done += 1
        if checkpoint and stepper.steps - last_saved >= checkpoint.every and stepper.parallel.is_main:
            checkpoint.save(params, stepper, rng, {"done": done, "loss_history": result.loss_history})
            last_saved = stepper.steps
    result.steps, result.final_loss, result.skipped_steps = stepper.steps, result.loss_history[-1], stepper.skipped
    _finish(checkpoint, params, stepper, rng, result)
    return result


__all__ = ["ObjectiveConfig", "TrainConfig", "TrainResult", "encode_examples", "train"]
