"""Retention of edited knowledge under downstream fine-tuning (paper 002), and protecting edits from it.

Library API: :func:`run_study` + :func:`write_report` (what ``ftedit retention`` runs), the freezing
utilities (:func:`protect_edits`, :class:`ProtectEditsCallback`, :func:`freeze_below`,
:func:`freeze_all_but_window`), the protection strategies (:func:`build_protection`: freezing, rehearsal,
L2 anchor), the downstream tasks and the stopping rule.
"""

from ftedit.retention.filtering import MentionFilter, edit_terms
from ftedit.retention.finetune import DownstreamConfig, finetune
from ftedit.retention.freezing import (
    FreezeHandle,
    ProtectEditsCallback,
    apply_strategy,
    freeze_all_but_window,
    freeze_below,
    protect_edits,
    touched_modules,
)
from ftedit.retention.measure import RetentionProbe, classify_fallback, measure, select_intrinsic
from ftedit.retention.protection import (
    L2Anchor,
    Protection,
    Rehearsal,
    build_protection,
    evaluation_prompts,
    rehearsal_pairs,
)
from ftedit.retention.report import write_report
from ftedit.retention.stopping import StoppingRule
from ftedit.retention.study import StudyConfig, run_study
from ftedit.retention.tasks import TaskConfig, build_task

__all__ = [
    "DownstreamConfig", "FreezeHandle", "L2Anchor", "MentionFilter", "Protection", "ProtectEditsCallback",
    "Rehearsal", "RetentionProbe", "StoppingRule", "StudyConfig", "TaskConfig", "apply_strategy", "build_protection",
    "build_task", "classify_fallback", "edit_terms", "evaluation_prompts", "finetune", "freeze_all_but_window",
    "freeze_below", "measure", "protect_edits", "rehearsal_pairs", "run_study", "select_intrinsic",
    "touched_modules", "write_report",
]
