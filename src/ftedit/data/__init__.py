"""Edit requests, training examples, and loaders for benchmark and user files."""

from ftedit.data.examples import PoolFact, TrainingExample
from ftedit.data.loaders import FORMATS, LoadResult, detect_format, load_pool_facts, load_requests
from ftedit.data.requests import EditRequest, Origin, ProbePrompt
from ftedit.data.validation import (
    RequestFileNotFoundError,
    RequestValidationError,
    ValidationIssue,
    find_conflicts,
)

__all__ = [
    "FORMATS",
    "EditRequest",
    "LoadResult",
    "Origin",
    "PoolFact",
    "ProbePrompt",
    "RequestFileNotFoundError",
    "RequestValidationError",
    "TrainingExample",
    "ValidationIssue",
    "detect_format",
    "find_conflicts",
    "load_pool_facts",
    "load_requests",
]
