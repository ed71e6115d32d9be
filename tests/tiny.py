"""Tiny randomly initialised models and in-process tokenizers, for unit tests that run in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FIXTURES = DATA / "fixtures"


def _corpus() -> list[str]:
    lines = []
    for rec in json.loads((FIXTURES / "counterfact_rome_format_first5.json").read_text()):
        rw = rec["requested_rewrite"]
        lines.append(rw["prompt"].format(rw["subject"]) + " " + rw["target_new"]["str"] + " " + rw["target_true"]["str"])
        lines += rec["paraphrase_prompts"] + rec["neighborhood_prompts"] + rec["generation_prompts"]
    for rec in json.loads((FIXTURES / "zsre_mend_eval_first5.json").read_text()):
        lines += [rec["src"], rec["rephrase"], rec["loc"], rec["loc_ans"], " ".join(rec["answers"])]
    lines += ["The quick brown fox jumps over the lazy dog. Paris is the capital of France."] * 3
    return lines


def byte_level_tokenizer(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """GPT-2 style: byte-level BPE, no BOS added, EOS = <|endoftext|>, no pad token."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def metaspace_tokenizer(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """Llama/Gemma style: sentencepiece-like metaspace BPE that prepends <bos>, with a <pad> token."""
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.normalizer = normalizers.Replace(" ", "▁")
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"])
    tk.train_from_iterator(_corpus(), trainer)
    bos = tk.token_to_id("<bos>")
    tk.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_gpt2(tok, seed: int = 0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=3, n_head=2,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return AutoModelForCausalLM.from_config(cfg).eval()


def tiny_llama(tok, seed: int = 0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return AutoModelForCausalLM.from_config(cfg).eval()


def tiny_gemma3(tok, seed: int = 0):
    from transformers import Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                           max_position_embeddings=256, sliding_window=64,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    return AutoModelForCausalLM.from_config(cfg).eval()
