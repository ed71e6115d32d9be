"""ftedit: edit the factual knowledge of causal language models by plain fine-tuning."""

from ftedit.data.requests import EditRequest, ProbePrompt
from ftedit.models import load_model

__all__ = ["EditRequest", "ProbePrompt", "load_model"]
__version__ = "0.1.0"
from ftedit.evaluate import evaluate_requests as evaluate_requests  # noqa: E402
