"""Training a multi-exit network with or without the EGT consistency loss, in one readable file.

Resumable by construction: each epoch's data order and augmentation draw from generators seeded by
``(seed, epoch)``, the learning rate is a pure function of the step, and a resume file (weights,
optimizer state, epoch, best score) is replaced atomically at every epoch end. A run killed mid-epoch
and resumed therefore redoes only that epoch and ends with the same weights as an unbroken run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from .attention import ATTENTION_KINDS, attention_maps
from .checkpoints import atomic_save_tensors, save_checkpoint
from .consistency import exit_consistency
from .data import DatasetBundle, load_dataset
from .data import limit as limit_dataset
from .losses import DISTANCES, EGTLossConfig, egt_loss
from .models import FAMILIES, MultiExitNet, build_model

BEST, LAST, STATE, LOG = "best.safetensors", "last.safetensors", "resume.safetensors", "train.jsonl"


class TrainingError(RuntimeError):
    """A training run that cannot start or continue; the message says why and what was kept."""


@dataclass
class TrainConfig:
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    download: bool = False
    arch: str = "small"
    model_options: dict[str, Any] = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"  # "sgd" (momentum, nesterov) or "adamw"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # "cosine" (with linear warm-up) or "constant"
    warmup_epochs: float = 0.5
    seed: int = 0
    lam: float = 0.0  # consistency weight; 0 is the baseline
    attention: str = "cam"
    distance: str = "cosine"
    exit_weights: list[float] | None = None
    detach_final: bool = True
    augment: bool = True
    val_fraction: float = 0.1
    limit: int | None = None  # first N training samples (smoke runs)
    val_limit: int | None = None
    out: str = "runs/model"
    resume: bool = False
    threads: int | None = None

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Read a JSON or YAML config; keyword overrides (CLI flags) win."""
        text = Path(path).read_text()
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise TrainingError(f"unknown config keys in {path}: {', '.join(sorted(unknown))}")
        return cls(**{**values, **overrides})

    def validate(self) -> None:
        if self.lam < 0:
            raise TrainingError(f"lambda must be >= 0, got {self.lam}")
        if self.arch not in FAMILIES:
            raise TrainingError(f"unknown architecture {self.arch!r}; known: {sorted(FAMILIES)}")
        if self.attention not in ATTENTION_KINDS:
            raise TrainingError(f"unknown attention kind {self.attention!r}: {ATTENTION_KINDS}")
        if self.distance not in DISTANCES:
            raise TrainingError(f"unknown distance {self.distance!r}; choose from {DISTANCES}")
        if self.optimizer not in ("sgd", "adamw") or self.schedule not in ("cosine", "constant"):
            raise TrainingError("optimizer must be sgd|adamw and schedule cosine|constant")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise TrainingError("epochs, batch size and learning rate must be positive")
        if self.limit is not None and self.limit < 1:
            raise TrainingError("--limit must be a positive number of samples")

    @property
    def loss_config(self) -> EGTLossConfig:
        return EGTLossConfig(
            self.lam, self.attention, self.distance, self.exit_weights, self.detach_final
        )


def learning_rate(cfg: TrainConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Linear warm-up then cosine decay to zero; a pure function of the step (resume-safe)."""
    if cfg.schedule == "constant":
        return cfg.lr
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)


# ------------------------------------------------------------------ evaluation during training


@torch.no_grad()
def evaluate_exits(
    model: MultiExitNet, loader: DataLoader, attention: str = "cam"
) -> dict[str, Any]:
    """Accuracy of every exit and consistency of every early exit with the final exit."""
    model.eval()
    correct = torch.zeros(model.num_exits)
    sums: list[dict[str, float]] = [
        {"cosine": 0.0, "pearson": 0.0, "iou": 0.0} for _ in range(model.num_exits - 1)
    ]
    n = 0
    for x, y in loader:
        with torch.enable_grad() if attention == "gradcam" else torch.no_grad():
            outputs = model(x.requires_grad_(attention == "gradcam"))
            maps = attention_maps(outputs, attention, create_graph=False).detach()
        for k, out in enumerate(outputs):
            correct[k] += (out.logits.argmax(1) == y).sum()
        for k, scores in enumerate(exit_consistency(maps)):
            for name in sums[k]:
                sums[k][name] += float(scores[name].sum())
        n += len(y)
    return {
        "accuracy": (correct / max(n, 1)).tolist(),
        "consistency": [{k: v / max(n, 1) for k, v in s.items()} for s in sums],
        "n": n,
    }


# ------------------------------------------------------------------ resume state


def _save_state(path: Path, model: nn.Module, opt: torch.optim.Optimizer, info: dict) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_state = opt.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in opt_state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"opt.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = [{k: v for k, v in g.items()} for g in opt_state["param_groups"]]
    meta = {"info": info, "param_groups": groups, "opt_scalars": scalars}
    atomic_save_tensors(path, tensors, meta)


def _load_state(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # a damaged resume file must say so, not crash obscurely
        raise TrainingError(f"cannot read the resume state {path}: {e}") from None
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, entry in meta.get("opt_scalars", {}).items():
        state.setdefault(int(idx), {}).update(entry)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta["info"]


# ------------------------------------------------------------------ the loop


def _prepare_output(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise TrainingError(f"cannot write to the output folder {out}: {e.strerror}") from None


def checkpoint_metadata(cfg: TrainConfig, data: DatasetBundle, extra: dict) -> dict[str, Any]:
    return {
        "classes": list(data.classes),
        "input_size": data.input_size,
        "in_channels": data.in_channels,
        "mean": list(data.mean),
        "std": list(data.std),
        "dataset": data.name,
        "train_config": asdict(cfg),
        "log": LOG,
        **extra,
    }


def train(
    cfg: TrainConfig,
    progress: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    """Train per ``cfg``; returns the summary of the last epoch. Writes into ``cfg.out``."""
    cfg.validate()
    out = Path(cfg.out)
    _prepare_output(out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)

    data = load_dataset(
        cfg.dataset,
        data_dir=cfg.data_dir,
        seed=cfg.seed,
        val_fraction=cfg.val_fraction,
        augment=cfg.augment,
        download=cfg.download,
    )
    train_set = limit_dataset(data.train, cfg.limit) if cfg.limit else data.train
    val_n = cfg.val_limit or (min(len(data.val), cfg.limit) if cfg.limit else None)
    val_set = limit_dataset(data.val, val_n) if val_n else data.val

    torch.manual_seed(cfg.seed)
    options = {"input_size": data.input_size, **cfg.model_options}
    model = build_model(cfg.arch, data.in_channels, len(data.classes), **options)
    opt = make_optimizer(cfg, model)
    loss_cfg = cfg.loss_config
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs

    start_epoch, best = 0, -1.0
    state_path, log_path = out / STATE, out / LOG
    if cfg.resume:
        if not state_path.exists():
            raise TrainingError(f"--resume: no resume state in {out} (nothing to continue)")
        info = _load_state(state_path, model, opt)
        start_epoch, best = info["epoch"] + 1, info["best"]
        _truncate_log(log_path, start_epoch)
    elif log_path.exists():
        log_path.unlink()

    val_loader = DataLoader(val_set, batch_size=256, shuffle=False)
    summary: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(cfg.seed * 100_003 + epoch)  # augmentation draws for this epoch
        order = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, generator=order)
        model.train()
        t0 = time.perf_counter()
        totals = {"loss": 0.0, "consistency": 0.0, "correct": 0, "n": 0}
        bar = _progress(loader, progress, f"epoch {epoch + 1}/{cfg.epochs}")
        for i, (x, y) in enumerate(bar):
            step = epoch * steps_per_epoch + i
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, step, total_steps, steps_per_epoch)
            terms = egt_loss(model(x), y, loss_cfg)
            if not torch.isfinite(terms.total):
                kept = (
                    f"the last good checkpoint is {out / LAST}"
                    if (out / LAST).exists()
                    else ("no checkpoint was written yet")
                )
                raise TrainingError(
                    f"loss became {float(terms.total)} at epoch {epoch + 1}, step {i + 1}; "
                    f"stopped ({kept}). Try a lower --lr or --lambda."
                )
            opt.zero_grad(set_to_none=True)
            terms.total.backward()
            opt.step()
            totals["loss"] += float(terms.total.detach()) * len(y)
            totals["consistency"] += float(sum(c.detach() for c in terms.consistency)) * len(y)
            totals["n"] += len(y)
            if bar is not loader:
                bar.set_postfix(loss=f"{totals['loss'] / totals['n']:.3f}")
        val = evaluate_exits(model, val_loader, cfg.attention)
        summary = {
            "epoch": epoch + 1,
            "train_loss": totals["loss"] / totals["n"],
            "train_consistency_loss": totals["consistency"] / totals["n"],
            "lr": opt.param_groups[0]["lr"],
            "val_accuracy": val["accuracy"],
            "val_consistency": val["consistency"],
            "seconds": round(time.perf_counter() - t0, 2),
        }
        score = val["accuracy"][-1]
        extra = {"epoch": epoch + 1, "metrics": {"val": val}}
        meta = checkpoint_metadata(cfg, data, extra)
        if score > best:
            best = score
            save_checkpoint(out / BEST, model, meta)
        save_checkpoint(out / LAST, model, meta)
        _save_state(state_path, model, opt, {"epoch": epoch, "best": best})
        with open(log_path, "a") as f:
            f.write(json.dumps(summary) + "\n")
        if on_epoch:
            on_epoch(summary)
    return summary


def _truncate_log(path: Path, epochs_done: int) -> None:
    """Keep only the log lines of epochs that the resume state covers."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln)["epoch"] <= epochs_done]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in kept))
    os.replace(tmp, path)


def _progress(loader: DataLoader, enabled: bool, desc: str):
    if not enabled:
        return loader
    from tqdm import tqdm

    return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)
