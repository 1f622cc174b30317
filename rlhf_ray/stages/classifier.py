"""`rlhf-ray train-rm` with ``rm.kind: classifier``: a sequence classifier from labelled texts
(``text`` + ``label``), the reward being one class's score (``reward.label``), as a hate-speech
classifier rewards "not hate". The classifier is an encoder (RoBERTa-style): a tiny one built
here on the policy's tokenizer, or ``rm.classifier_base`` fine-tuned. Trained with cross-entropy
on ``rm.num_workers`` Ray Train workers like the other stages; reports held-out accuracy."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import Config
from ..data.loaders import BadRecord, LoadReport, load
from .finetune import (Clock, eval_chunks, pad_right, peak_memory, prepare_for_training, save_model, stage_trackers,
                       train_epochs, train_stage, start_worker)
from . import base_model, rm_dir


def label_names(cfg: Config, records: Optional[list[dict]] = None) -> list[str]:
    """Class names by label id: rm.label_names, the generated task's, or the file's labels
    (integer ids 0..k-1 named by themselves, else names in sorted order)."""
    if cfg.rm.label_names is not None:
        return list(cfg.rm.label_names)
    if records is None:
        from ..data import dialogue

        return list(dialogue.LABELS)
    seen = {r["label"] for r in records}
    if all(isinstance(v, int) for v in seen):
        return [str(i) for i in range(max(seen) + 1)]
    return sorted(str(v) for v in seen)


def _parse(rec: dict) -> dict:
    if not isinstance(rec.get("text"), str) or not rec["text"].strip():
        raise BadRecord(f"expected a non-empty 'text' (has {sorted(rec)})")
    label = rec.get("label")
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise BadRecord(f"'label' must be a class id or name, got {label!r}")
    return {"text": rec["text"], "label": label}


def classifier_data(cfg: Config) -> tuple[list[dict], list[dict], list[str], list[LoadReport]]:
    """(train, held out, class names, load reports): records with the label as a class id."""
    rc = cfg.rm
    if rc.data_path is None:
        if cfg.data.task != "dialogue":
            raise ValueError(f"rm.kind=classifier: data.task={cfg.data.task} has no generated labelled texts; set "
                             "rm.data_path to a JSONL file of {\"text\": ..., \"label\": ...} records")
        from ..data import dialogue

        train = dialogue.classifier_records(rc.num_pairs, rc.seed, "train")
        held = dialogue.classifier_records(max(64, int(rc.num_pairs * rc.eval_fraction)), rc.seed, "heldout")
        n = len(train) + len(held)
        return train, held, label_names(cfg), [LoadReport("generated dialogue task", read=n, kept=n)]
    records, report = load(rc.data_path, "rm.data_path", _parse, cfg.data.on_bad_record, rc.max_pairs)
    reports = [report]
    if rc.eval_path is not None:
        held, r2 = load(rc.eval_path, "rm.eval_path", _parse, cfg.data.on_bad_record)
        reports.append(r2)
    else:
        random.Random(rc.seed).shuffle(records)
        n_eval = max(1, int(len(records) * rc.eval_fraction))
        held, records = records[:n_eval], records[n_eval:]
    names = label_names(cfg, records + held)
    index = {n: i for i, n in enumerate(names)}
    out = []
    for part, key in ((records, "rm.data_path"), (held, "rm.eval_path")):
        rows = []
        for r in part:
            label = r["label"]
            i = label if isinstance(label, int) else index.get(str(label))
            if i is None or not 0 <= i < len(names):
                raise ValueError(f"{key}: label {label!r} is not one of the classes {names} (rm.label_names)")
            rows.append({"text": r["text"], "label": i})
        out.append(rows)
    return out[0], out[1], names, reports


def build_tiny_classifier(out: Path, tokenizer_dir: str, names: list[str], *, hidden: int, heads: int, layers: int,
                          max_positions: int, seed: int) -> Path:
    """A tiny RoBERTa sequence classifier (random weights) on the tokenizer at ``tokenizer_dir``."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from ..models import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    config = RobertaConfig(
        vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=2 * hidden, max_position_embeddings=max_positions + tok.pad_token_id + 2, type_vocab_size=1,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    RobertaForSequenceClassification(config).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def run_train_classifier(cfg: Config, *, progress: bool = True) -> dict[str, Any]:
    from ..models import load_tokenizer
    from ..models.checks import check_writable

    rc = cfg.rm
    clock = Clock()
    train, held, names, reports = classifier_data(cfg)
    out = rm_dir(cfg)
    if rc.output_dir:
        check_writable("rm.output_dir", rc.output_dir)
    if rc.classifier_base is not None:
        from ..models.loading import resolve_path

        base = resolve_path(rc.classifier_base, "rm.classifier_base")
    else:
        policy = base_model(cfg, "model", "model.path")
        m = cfg.model
        base = str(build_tiny_classifier(out.parent / f"{out.name}_init", policy, names, hidden=m.tiny_hidden,
                                         heads=m.tiny_heads, layers=m.tiny_layers, max_positions=m.tiny_max_positions,
                                         seed=rc.seed))
    tok = load_tokenizer(base)
    enc = lambda rows: [(tok(r["text"], truncation=True, max_length=rc.max_seq_len)["input_ids"], r["label"])
                        for r in rows]
    for key, report in zip(("rm.data_path", "rm.eval_path"), reports):
        report.announce(key)
    summary = {"stage": "rm", "kind": "classifier", "base": base, "output": str(out), "labels": names,
               "data": [r.to_dict() for r in reports], "train_examples": len(train), "heldout_examples": len(held),
               "workers": rc.num_workers, "use_gpu": rc.use_gpu}
    return train_stage(cfg, "rm", _classifier_worker, summary, clock,
                       {"cfg": cfg, "base": base, "names": names, "train": enc(train), "held": enc(held),
                        "progress": progress})


def _loss_sum(model, batch: list[tuple[list[int], int]], pad_id: int, device=None) -> tuple[torch.Tensor, dict]:
    ids, mask = pad_right([b[0] for b in batch], pad_id)
    labels = torch.tensor([b[1] for b in batch], device=device)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    return torch.nn.functional.cross_entropy(logits, labels, reduction="sum"), {
        "correct": float((logits.argmax(dim=-1) == labels).sum())}


@torch.no_grad()
def evaluate(model, rows: list, pad_id: int, chunk: int, device=None, rank: int = 0, world: int = 1) -> dict:
    from ..devices import all_sum

    model.eval()
    loss = correct = 0.0
    for part in eval_chunks(rows, chunk, rank, world):
        s, stats = _loss_sum(model, part, pad_id, device)
        loss, correct = loss + float(s), correct + stats["correct"]
    model.train()
    loss, correct, n = all_sum([loss, correct, float(len(rows[rank::world]))], device)
    return {"accuracy": correct / max(n, 1), "loss": loss / max(n, 1), "examples": int(n)}


def _classifier_worker(config: dict) -> None:
    from transformers import AutoModelForSequenceClassification

    from ..models import load_tokenizer
    from ..models.loading import load_pretrained

    cfg, base, names, train, held = config["cfg"], config["base"], config["names"], config["train"], config["held"]
    rc = cfg.rm
    rank, world, device = start_worker(config, "rm")
    tok = load_tokenizer(base)
    model = load_pretrained(AutoModelForSequenceClassification, base, cfg.model.dtype, device, num_labels=len(names),
                            id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
                            ignore_mismatched_sizes=True)
    model.config.pad_token_id = tok.pad_token_id
    params = [p for p in model.parameters() if p.requires_grad]
    chunk = rc.micro_batch_size or rc.batch_size
    before = evaluate(model, held, tok.pad_token_id, chunk, device, rank, world)
    with stage_trackers(config, "rm", rank) as trackers:
        if trackers:
            trackers.log({"heldout": before}, 0)
        model.train()
        ddp = prepare_for_training(model, rc.gradient_checkpointing, world)
        history = train_epochs(ddp, params, train, batch_size=rc.batch_size, epochs=rc.epochs, lr=rc.lr, seed=rc.seed,
                               loss_fn=lambda b: _loss_sum(ddp, b, tok.pad_token_id, device), count_fn=len,
                               desc="train-rm", progress=config["progress"], device=device, rank=rank, world=world,
                               micro_batch_size=rc.micro_batch_size, on_step=trackers.log if trackers else None)
        after = evaluate(model, held, tok.pad_token_id, chunk, device, rank, world)
        if trackers:
            trackers.log({"heldout": after}, len(history))
    if rank != 0:
        return
    summary = {**config["summary"], "steps": len(history), "trainable_params": sum(p.numel() for p in params),
               "train_loss_first": history[0]["loss"], "train_loss_last": history[-1]["loss"],
               "heldout_before": before, "heldout_after": after, **peak_memory(device)}
    save_model(model, tok, Path(summary["output"]), summary)
    (Path(summary["output"]) / "labels.json").write_text(json.dumps(names))
