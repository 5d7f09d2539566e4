"""Training a multi-exit network with or without the EGT consistency loss, in one readable file.

Resumable by construction: each epoch's data order and augmentation draw from generators seeded by
``(seed, epoch)``, the learning rate is a pure function of the step, and a resume file (weights,
optimizer state, epoch, best score, the settings that decide the weights, and the log so far) is
replaced atomically at every epoch end. A run killed mid-epoch and resumed therefore redoes only
that epoch and ends with the same weights and log as an unbroken run; a resume with different
settings is refused. Every file is written through a temp file and a rename, so whatever a kill
leaves behind is either the old or the new complete file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
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

    def __post_init__(self) -> None:
        # Paths are stored as text: the config goes into JSON (checkpoint metadata, resume state).
        if isinstance(self.out, os.PathLike):
            self.out = os.fspath(self.out)
        if isinstance(self.data_dir, os.PathLike):
            self.data_dir = os.fspath(self.data_dir)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Read a JSON or YAML config; keyword overrides (CLI flags) win.

        Keys are `TrainConfig` field names (``lambda`` is accepted for ``lam``); unknown keys,
        unreadable files and malformed documents raise `TrainingError`.
        """
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise TrainingError(f"cannot read the config file {path}: {e.strerror}") from None
        try:
            if path.suffix.lower() in (".yaml", ".yml"):
                import yaml

                values = yaml.safe_load(text)
            else:
                values = json.loads(text)
        except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
            detail = " ".join(str(e).split())
            raise TrainingError(f"cannot parse the config file {path}: {detail}") from None
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise TrainingError(f"config file {path} must hold a mapping of TrainConfig fields")
        if "lambda" in values:
            if "lam" in values:
                raise TrainingError(f"config file {path} sets both 'lambda' and 'lam'")
            values["lam"] = values.pop("lambda")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(map(str, values)) - known
        if unknown:
            raise TrainingError(
                f"unknown config keys in {path}: {', '.join(sorted(unknown))} "
                f"(known: {', '.join(sorted(known))})"
            )
        return cls(**{**values, **overrides})

    def validate(self) -> None:
        """Refuse a config that cannot train, with a message that names the field."""
        _check_types(self)
        if not math.isfinite(self.lam) or self.lam < 0:
            raise TrainingError(f"lambda must be >= 0, got {self.lam}")
        if self.arch not in FAMILIES:
            raise TrainingError(f"unknown architecture {self.arch!r}; known: {sorted(FAMILIES)}")
        if self.attention not in ATTENTION_KINDS:
            raise TrainingError(f"unknown attention kind {self.attention!r}: {ATTENTION_KINDS}")
        if self.distance not in DISTANCES:
            raise TrainingError(f"unknown distance {self.distance!r}; choose from {DISTANCES}")
        if self.optimizer not in ("sgd", "adamw") or self.schedule not in ("cosine", "constant"):
            raise TrainingError("optimizer must be sgd|adamw and schedule cosine|constant")
        if self.epochs < 1 or self.batch_size < 1 or not (math.isfinite(self.lr) and self.lr > 0):
            raise TrainingError("epochs, batch size and learning rate must be positive")
        if self.warmup_epochs < 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise TrainingError("warmup_epochs and weight_decay must be >= 0, momentum in [0, 1)")
        if not 0 < self.val_fraction < 1:
            raise TrainingError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.limit is not None and self.limit < 1:
            raise TrainingError("--limit must be a positive number of samples")
        if self.val_limit is not None and self.val_limit < 1:
            raise TrainingError("--val-limit must be a positive number of samples")
        if self.threads is not None and self.threads < 1:
            raise TrainingError("--threads must be a positive number")
        if self.exit_weights is not None and any(
            not math.isfinite(w) or w < 0 for w in self.exit_weights
        ):
            raise TrainingError(f"exit weights must be finite and >= 0, got {self.exit_weights}")

    @property
    def loss_config(self) -> EGTLossConfig:
        return EGTLossConfig(
            self.lam, self.attention, self.distance, self.exit_weights, self.detach_final
        )


_INT_FIELDS = ("epochs", "batch_size", "seed", "limit", "val_limit", "threads")
_FLOAT_FIELDS = ("lr", "momentum", "weight_decay", "warmup_epochs", "lam", "val_fraction")
_BOOL_FIELDS = ("download", "augment", "detach_final", "resume")
_STR_FIELDS = ("dataset", "data_dir", "arch", "optimizer", "schedule", "attention", "distance")
_OPTIONAL = ("data_dir", "limit", "val_limit", "threads", "exit_weights")


def _check_types(cfg: TrainConfig) -> None:
    """Config files are user input: a string epoch count must fail here, not deep in the loop."""

    def bad(name: str, want: str) -> TrainingError:
        value = getattr(cfg, name)
        return TrainingError(f"config field {name!r} must be {want}, got {value!r}")

    for name in _INT_FIELDS + _FLOAT_FIELDS + _BOOL_FIELDS + _STR_FIELDS + ("out",):
        value = getattr(cfg, name)
        if value is None and name in _OPTIONAL:
            continue
        if name in _BOOL_FIELDS:
            ok = isinstance(value, bool)
            want = "true or false"
        elif name in _INT_FIELDS:
            ok = isinstance(value, int) and not isinstance(value, bool)
            want = "an integer"
        elif name in _FLOAT_FIELDS:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            want = "a number"
        else:
            ok = isinstance(value, str) and bool(value)
            want = "a non-empty string"
        if not ok:
            raise bad(name, want)
    if not isinstance(cfg.model_options, dict):
        raise bad("model_options", "a mapping of model options")
    if cfg.exit_weights is not None and (
        not isinstance(cfg.exit_weights, list | tuple)
        or not all(isinstance(w, int | float) and not isinstance(w, bool) for w in cfg.exit_weights)
    ):
        raise bad("exit_weights", "a list of numbers")


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

# Fields that say where and how fast a run goes, not what it trains: they may differ on --resume.
_RUN_ONLY = ("out", "resume", "threads", "download", "data_dir")


def _trained_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The config fields that decide the weights, JSON-normalised (tuples become lists)."""
    return json.loads(json.dumps({k: v for k, v in asdict(cfg).items() if k not in _RUN_ONLY}))


def _save_state(path: Path, model: nn.Module, opt: torch.optim.Optimizer, info: dict) -> None:
    """Weights, optimizer state (tensors as tensors, the rest as JSON) and ``info``, atomically."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_state = opt.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in opt_state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"opt.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = [dict(g) for g in opt_state["param_groups"]]
    meta = {"info": info, "param_groups": groups, "opt_scalars": scalars}
    atomic_save_tensors(path, tensors, meta)


def _read_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if not isinstance(meta.get("info"), dict) or "param_groups" not in meta:
            raise ValueError("it lacks the training info (not a resume file?)")
    except Exception as e:  # a damaged resume file must say so, not crash obscurely
        detail = " ".join(str(e).split())
        raise TrainingError(f"cannot read the resume state {path}: {detail}") from None
    return tensors, meta


def _apply_state(
    path: Path,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    model: nn.Module,
    opt: torch.optim.Optimizer,
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, entry in meta.get("opt_scalars", {}).items():
        state.setdefault(int(idx), {}).update(entry)
    try:
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (RuntimeError, ValueError, KeyError) as e:
        detail = " ".join(str(e).split())[:300]
        raise TrainingError(f"the resume state {path} does not fit this model: {detail}") from None


def _check_same_run(info: dict, cfg: TrainConfig, path: Path) -> None:
    """--resume must continue the same run: other settings would not reproduce its weights."""
    stored = info.get("config")
    if stored is None:  # resume files written before settings were recorded
        return
    now = _trained_settings(cfg)
    diffs = [k for k in now if k in stored and stored[k] != now[k]]
    if diffs:
        listed = ", ".join(f"{k} {stored[k]!r} (now {now[k]!r})" for k in diffs)
        raise TrainingError(
            f"--resume: {path} was trained with other settings: {listed}; pass the same flags "
            "or start a new --out"
        )


# ------------------------------------------------------------------ the loop


def _prepare_output(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise TrainingError(f"cannot write to the output folder {out}: {e.strerror}") from None


def _remove_temp_files(out: Path) -> None:
    """Temp files of atomic writes interrupted by a kill (never counted as checkpoints)."""
    for name in (BEST, LAST, STATE, LOG):
        for tmp in out.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def _write_log(path: Path, log: list[dict]) -> None:
    """Rewrite the whole log atomically: a kill never leaves a half-written line."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write("".join(json.dumps(s) + "\n" for s in log))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read_log(path: Path, epochs_done: int) -> list[dict]:
    """The log lines of epochs that a resume state covers (unreadable lines are dropped)."""
    if not path.exists():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("epoch"), int):
            if entry["epoch"] <= epochs_done:
                kept.append(entry)
    return kept


def _all_finite(model: nn.Module) -> bool:
    return all(
        bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point()
    )


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
    """Train per ``cfg``; returns the summary of the last epoch. Writes into ``cfg.out``.

    A fresh run (no ``resume``) starts over in ``cfg.out``: its log and resume state are removed
    (checkpoints are replaced at the end of the first epoch). Torch's thread count and
    deterministic-algorithms flag are set for the run and restored afterwards.
    """
    cfg.validate()
    out = Path(cfg.out)
    _prepare_output(out)
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.use_deterministic_algorithms(True, warn_only=True)
        return _train(cfg, out, progress, on_epoch)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def _train(
    cfg: TrainConfig, out: Path, progress: bool, on_epoch: Callable[[dict], None] | None
) -> dict[str, Any]:
    if cfg.data_dir is not None and not Path(cfg.data_dir).expanduser().is_dir():
        raise TrainingError(f"--data-dir {cfg.data_dir} does not exist or is not a folder")
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
    val_set = limit_dataset(data.val, val_n, what="validation") if val_n else data.val

    torch.manual_seed(cfg.seed)
    options = {"input_size": data.input_size, **cfg.model_options}
    try:
        model = build_model(cfg.arch, data.in_channels, len(data.classes), **options)
    except (TypeError, ValueError) as e:
        raise TrainingError(
            f"cannot build {cfg.arch!r} with model_options {cfg.model_options}: {e}"
        ) from None
    if cfg.exit_weights is not None and len(cfg.exit_weights) != model.num_exits:
        raise TrainingError(
            f"{len(cfg.exit_weights)} exit weights given for a model with {model.num_exits} exits"
        )
    opt = make_optimizer(cfg, model)
    loss_cfg = cfg.loss_config
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs

    start_epoch, best = 0, -1.0
    state_path, log_path = out / STATE, out / LOG
    _remove_temp_files(out)
    log: list[dict[str, Any]] = []
    if cfg.resume:
        if not state_path.exists():
            raise TrainingError(f"--resume: no resume state in {out} (nothing to continue)")
        tensors, meta = _read_state(state_path)
        info = meta["info"]
        _check_same_run(info, cfg, state_path)
        _apply_state(state_path, tensors, meta, model, opt)
        start_epoch, best = int(info["epoch"]) + 1, float(info["best"])
        # The state holds the log of the epochs it covers; older states only had the file.
        log = info["log"] if "log" in info else _read_log(log_path, start_epoch)
        _write_log(log_path, log)
    else:
        state_path.unlink(missing_ok=True)
        log_path.unlink(missing_ok=True)
    last_saved = start_epoch if cfg.resume and (out / LAST).exists() else None

    def kept() -> str:
        if last_saved is None:
            return "no checkpoint was written yet"
        return f"the last good checkpoint is {out / LAST}, from epoch {last_saved}"

    val_loader = DataLoader(val_set, batch_size=256, shuffle=False)
    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(cfg.seed * 100_003 + epoch)  # augmentation draws for this epoch
        order = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, generator=order)
        model.train()
        t0 = time.perf_counter()
        totals = {"loss": 0.0, "consistency": 0.0, "n": 0}
        bar = _progress(loader, progress, f"epoch {epoch + 1}/{cfg.epochs}")
        try:
            for i, (x, y) in enumerate(bar):
                step = epoch * steps_per_epoch + i
                for group in opt.param_groups:
                    group["lr"] = learning_rate(cfg, step, total_steps, steps_per_epoch)
                terms = egt_loss(model(x), y, loss_cfg)
                if not torch.isfinite(terms.total):
                    raise TrainingError(
                        f"loss became {float(terms.total.detach())} at epoch {epoch + 1}, "
                        f"step {i + 1}; stopped ({kept()}). Try a lower --lr or --lambda."
                    )
                opt.zero_grad(set_to_none=True)
                terms.total.backward()
                opt.step()
                totals["loss"] += float(terms.total.detach()) * len(y)
                totals["consistency"] += float(sum(c.detach() for c in terms.consistency)) * len(y)
                totals["n"] += len(y)
                if bar is not loader:
                    bar.set_postfix(loss=f"{totals['loss'] / totals['n']:.3f}")
        finally:
            if bar is not loader:
                bar.close()  # clears the bar, also when the epoch fails
        if not _all_finite(model):
            raise TrainingError(
                f"the weights became non-finite during epoch {epoch + 1}; stopped ({kept()}). "
                "Try a lower --lr or --lambda."
            )
        val = evaluate_exits(model, val_loader, cfg.attention)
        summary = {
            "epoch": epoch + 1,
            "train_loss": totals["loss"] / totals["n"],
            "train_consistency_loss": totals["consistency"] / totals["n"],
            "lr": opt.param_groups[0]["lr"],
            "val_accuracy": val["accuracy"],
            "val_consistency": val["consistency"],
            "val_n": val["n"],
            "seconds": round(time.perf_counter() - t0, 2),
        }
        score = val["accuracy"][-1]
        extra = {"epoch": epoch + 1, "metrics": {"val": val}}
        meta = checkpoint_metadata(cfg, data, extra)
        # Order matters for a kill at any point: checkpoints, then the resume state (which
        # carries the log), then the log file. A resume rewrites the log from the state.
        if score > best:
            best = score
            save_checkpoint(out / BEST, model, meta)
        save_checkpoint(out / LAST, model, meta)
        last_saved = epoch + 1
        log.append(summary)
        info = {"epoch": epoch, "best": best, "config": _trained_settings(cfg), "log": log}
        _save_state(state_path, model, opt, info)
        _write_log(log_path, log)
        if on_epoch:
            on_epoch(summary)
    return log[-1] if log else {}


def _progress(loader: DataLoader, enabled: bool, desc: str):
    if not enabled:
        return loader
    from tqdm import tqdm

    return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)
