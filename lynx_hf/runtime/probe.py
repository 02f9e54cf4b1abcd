"""The LYNX probe: a small MLP that reads the hidden state at a reflection cue and scores "safe to exit".

The probe is trained on the event table produced by ``collect``: one row per cue event, the concatenated hidden
states of a few layers as features, and label 1 when a forced exit at that cue answers correctly. Events are
grouped by problem, and every split here is a split of problems, never of events: the events of one trace are
strongly correlated, so letting a trace straddle train and validation would inflate the validation score.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = ["LynxProbe", "ProbeTrainingReport", "train_probe", "auroc", "split_groups"]

# Feature dimensions whose training standard deviation is below this are centred but not scaled.
_MIN_STD = 1e-6


class LynxProbe(nn.Module):
    """MLP that maps the hidden state at a cue event to the logit of "a forced exit here answers correctly".

    Architecture: standardisation -> Linear(d, 256) -> ReLU -> Linear(256, 64) -> ReLU -> Linear(64, 1). The
    standardisation statistics are buffers (``mean``, ``std``), so they travel with the weights in a state dict
    (safetensors) and the caller always passes raw hidden states, in whatever float dtype the model produced.

    Args:
        input_size: Feature dimension ``d`` (hidden size times the number of probed layers).
        hidden_sizes: Widths of the hidden layers (default ``(256, 64)``, the paper's).

    Raises:
        ValueError: If `input_size` or a hidden size is not a positive integer.

    Example:
        >>> import torch
        >>> probe = LynxProbe(input_size=8)
        >>> probe(torch.randn(5, 8, dtype=torch.bfloat16)).shape
        torch.Size([5])
        >>> p = probe.predict_proba(torch.randn(5, 8))
        >>> bool(((p >= 0) & (p <= 1)).all())
        True
    """

    def __init__(self, input_size: int, hidden_sizes: Sequence[int] = (256, 64)):
        super().__init__()
        if int(input_size) <= 0:
            raise ValueError(f"input_size must be a positive integer, got {input_size!r}.")
        if any(int(h) <= 0 for h in hidden_sizes):
            raise ValueError(f"hidden_sizes must be positive integers, got {tuple(hidden_sizes)!r}.")
        self.input_size = int(input_size)
        self.hidden_sizes = tuple(int(h) for h in hidden_sizes)
        self.register_buffer("mean", torch.zeros(self.input_size))
        self.register_buffer("std", torch.ones(self.input_size))
        layers: list[nn.Module] = []
        width = self.input_size
        for h in self.hidden_sizes:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.layers = nn.Sequential(*layers)

    @property
    def config(self) -> dict:
        """Constructor arguments, JSON-serialisable: ``LynxProbe(**probe.config)`` rebuilds the architecture.

        Returns:
            ``{"input_size": ..., "hidden_sizes": [...]}``.

        Example:
            >>> LynxProbe(16, hidden_sizes=(8,)).config
            {'input_size': 16, 'hidden_sizes': [8]}
        """
        return {"input_size": self.input_size, "hidden_sizes": list(self.hidden_sizes)}

    @torch.no_grad()
    def set_standardization(self, mean: Tensor, std: Tensor) -> None:
        """Set the standardisation buffers; dimensions with ``std`` below 1e-6 are centred but not scaled.

        Args:
            mean: ``[d]`` per-dimension mean of the training features.
            std: ``[d]`` per-dimension standard deviation of the training features.

        Raises:
            ValueError: If either has other than ``d`` entries or holds NaN/inf.

        Example:
            >>> import torch
            >>> probe = LynxProbe(2)
            >>> probe.set_standardization(torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.0]))
            >>> probe.std.tolist()
            [0.5, 1.0]
        """
        mean = torch.as_tensor(mean).detach().reshape(-1)
        std = torch.as_tensor(std).detach().reshape(-1)
        if mean.numel() != self.input_size or std.numel() != self.input_size:
            raise ValueError(
                f"standardisation statistics must have {self.input_size} entries, got mean {mean.numel()}, "
                f"std {std.numel()}."
            )
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            raise ValueError("standardisation statistics contain NaN/inf; check the training features.")
        # A constant dimension would otherwise be divided by ~0 and explode on any deviation at inference.
        std = torch.where(std.abs() < _MIN_STD, torch.ones_like(std), std.abs())
        self.mean.copy_(mean.to(self.mean))
        self.std.copy_(std.to(self.std))

    def forward(self, features: Tensor) -> Tensor:
        """Logits ``[N]`` for raw features ``[N, d]`` (any float dtype; cast to the probe's dtype and device).

        Args:
            features: ``[N, d]`` raw hidden states, any float dtype and device.

        Returns:
            ``[N]`` logits of "a forced exit here answers correctly", on the probe's device.

        Raises:
            TypeError: If `features` is not a tensor.
            ValueError: If `features` is not 2-D or has other than ``d`` columns.

        Example:
            >>> import torch
            >>> LynxProbe(4)(torch.zeros(3, 4)).shape
            torch.Size([3])
        """
        if not isinstance(features, Tensor):
            raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}.")
        if features.dim() != 2:
            raise ValueError(
                f"features must be 2-D [num_events, {self.input_size}], got shape {tuple(features.shape)}; "
                "for a single event use features.unsqueeze(0)."
            )
        if features.shape[1] != self.input_size:
            raise ValueError(
                f"features have {features.shape[1]} dimensions but the probe expects {self.input_size}; "
                "check that the same layers are probed as at training time."
            )
        x = features.to(device=self.mean.device, dtype=self.mean.dtype)
        x = (x - self.mean) / self.std
        return self.layers(x).squeeze(-1)

    @torch.no_grad()
    def predict_proba(self, features: Tensor) -> Tensor:
        """P(safe to exit) ``[N]`` = sigmoid of the logits, computed without gradients.

        Args:
            features: ``[N, d]`` raw hidden states, any float dtype and device.

        Returns:
            ``[N]`` probabilities in [0, 1].

        Raises:
            TypeError: If `features` is not a tensor.
            ValueError: If `features` is not 2-D or has other than ``d`` columns.

        Example:
            >>> import torch
            >>> LynxProbe(4).predict_proba(torch.zeros(2, 4)).shape
            torch.Size([2])
        """
        return torch.sigmoid(self.forward(features))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Re-initialise the linear layers (PyTorch's default scheme) from ``generator``, for reproducible training.

        Args:
            generator: Source of randomness; None uses the global generator.

        Example:
            >>> import torch
            >>> a, b = LynxProbe(4), LynxProbe(4)
            >>> a.reset_parameters(torch.Generator().manual_seed(0))
            >>> b.reset_parameters(torch.Generator().manual_seed(0))
            >>> all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
            True
        """
        for module in self.layers:
            if isinstance(module, nn.Linear):
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
                bound = 1.0 / math.sqrt(module.in_features)
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)


@dataclass
class ProbeTrainingReport:
    """What `train_probe` did; JSON-serialisable with ``dataclasses.asdict`` when group ids are str/int.

    Args:
        train_size: Training events.
        val_size: Validation events.
        best_epoch: The epoch whose weights were kept, 1-based.
        val_loss: Class-balanced BCE on the validation problems at that epoch.
        val_auroc: AUROC on the validation problems at that epoch; ``None`` when they contain a single class.
        positive_rate: Share of safe events among all events given.
        epochs_run: Epochs trained before early stopping (or `max_epochs`).
        train_loss: Class-balanced BCE on the training events at the best epoch, if recorded.
        train_groups: Number of training problems.
        val_groups: The validation problems' ids.
        pos_weight: The weight given to safe events in the loss, if recorded.

    Example:
        >>> r = ProbeTrainingReport(train_size=80, val_size=20, best_epoch=3, val_loss=0.4, val_auroc=0.9,
        ...                         positive_rate=0.5, epochs_run=13)
        >>> r.val_auroc
        0.9
    """

    train_size: int
    val_size: int
    best_epoch: int
    val_loss: float
    val_auroc: float | None
    positive_rate: float
    epochs_run: int
    train_loss: float | None = None
    train_groups: int = 0
    val_groups: list = field(default_factory=list)
    pos_weight: float | None = None


def _to_hashable_list(groups: Sequence[Hashable] | Tensor | np.ndarray) -> list:
    if isinstance(groups, (Tensor, np.ndarray)):
        return list(groups.tolist())
    return list(groups)


def split_groups(groups: Sequence[Hashable], fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Split events into parts by group (problem id): all events of a group land in the same part.

    Distinct groups are shuffled with ``seed`` and dealt out in proportion to ``fractions`` (largest remainder;
    every part with a positive fraction gets at least one group when there are enough groups).

    Args:
        groups: Each event's group (problem id); any hashable values.
        fractions: Share of the groups per part, non-negative, summing to 1.
        seed: Seed of the shuffle.

    Returns:
        One sorted ``int64`` array of event indices per part, so trace order is preserved inside each part.

    Raises:
        ValueError: If `fractions` is empty, negative, not finite, or does not sum to 1.

    Example:
        >>> train, val = split_groups(["a", "a", "b", "c", "c", "d"], [0.5, 0.5], seed=0)
        >>> sorted(train.tolist() + val.tolist())
        [0, 1, 2, 3, 4, 5]
        >>> {0, 1} <= set(train.tolist()) or {0, 1} <= set(val.tolist())
        True
    """
    group_list = _to_hashable_list(groups)
    fractions = [float(f) for f in fractions]
    if not fractions or any(not math.isfinite(f) or f < 0 for f in fractions):
        raise ValueError(f"fractions must be non-negative numbers, got {fractions!r}.")
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {fractions!r} (sum {sum(fractions)}).")
    # Distinct groups in order of first appearance (no sorting: group ids need not be comparable).
    index_of: dict = {}
    event_group = np.empty(len(group_list), dtype=np.int64)
    for i, g in enumerate(group_list):
        event_group[i] = index_of.setdefault(g, len(index_of))
    n_groups = len(index_of)

    exact = [f * n_groups for f in fractions]
    counts = [int(math.floor(x)) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda k: (-(exact[k] - counts[k]), k))
    for k in by_remainder[: n_groups - sum(counts)]:
        counts[k] += 1
    for k in range(len(counts)):  # no part with a positive fraction stays empty if a donor can spare a group
        if fractions[k] > 0 and counts[k] == 0:
            donor = max(range(len(counts)), key=lambda j: counts[j])
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[k] += 1

    order = np.random.default_rng(seed).permutation(n_groups)
    part_of_group = np.empty(n_groups, dtype=np.int64)
    start = 0
    for k, c in enumerate(counts):
        part_of_group[order[start : start + c]] = k
        start += c
    part_of_event = part_of_group[event_group]
    return [np.flatnonzero(part_of_event == k).astype(np.int64) for k in range(len(counts))]


def auroc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties count one half); no sklearn needed.

    Args:
        scores: Scores, one per example.
        labels: 0/1 or bool labels, one per example.

    Returns:
        The AUROC in [0, 1].

    Raises:
        ValueError: If the lengths differ, scores hold NaN/inf, labels are not binary, or only one class occurs.

    Example:
        >>> import torch
        >>> auroc(torch.tensor([0.1, 0.4, 0.4, 0.8]), torch.tensor([0, 0, 1, 1]))
        0.875
    """
    s = torch.as_tensor(scores).detach().reshape(-1).to(device="cpu", dtype=torch.float64).numpy()
    y = torch.as_tensor(labels).detach().reshape(-1).cpu().numpy()
    if s.shape != y.shape:
        raise ValueError(f"scores and labels must have the same length, got {s.shape[0]} and {y.shape[0]}.")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN/inf; AUROC is undefined.")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be binary (0/1 or bool).")
    y = y.astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs both classes, got {n_pos} positive and {n_neg} negative labels.")
    # Average ranks (1-based) with ties sharing the mean of the ranks they span.
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    avg_rank = ends - (counts - 1) / 2.0
    ranks = avg_rank[inverse]
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _balanced_weights(y: Tensor) -> Tensor:
    """Per-sample weights so that both classes carry half the total weight (mean weight 1)."""
    n = y.numel()
    n_pos = y.sum()
    n_neg = n - n_pos
    w_pos = n / (2.0 * n_pos) if n_pos > 0 else 0.0
    w_neg = n / (2.0 * n_neg) if n_neg > 0 else 0.0
    return torch.where(y > 0.5, torch.as_tensor(w_pos, dtype=y.dtype), torch.as_tensor(w_neg, dtype=y.dtype))


def train_probe(
    features: Tensor,
    labels: Tensor,
    groups: Sequence[Hashable],
    *,
    val_fraction: float = 0.2,
    max_epochs: int = 200,
    patience: int = 10,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    seed: int = 0,
    hidden_sizes: Sequence[int] = (256, 64),
) -> tuple[LynxProbe, ProbeTrainingReport]:
    """Train a `LynxProbe` on cue events, with a problem-level validation split and early stopping.

    ``groups`` gives each event's problem id; a ``val_fraction`` share of the problems (whole traces) is held out
    for early stopping on the class-balanced BCE, and the best epoch's weights are restored. Standardisation
    statistics come from the training problems only. Deterministic given ``seed``.

    Args:
        features: ``[N, d]`` float hidden states, one row per cue event.
        labels: ``[N]`` 0/1 or bool: 1 when the forced exit at this cue answers correctly.
        groups: ``[N]`` problem ids; a problem's events all go to one side of the split.
        val_fraction: Share of problems held out for early stopping, in (0, 1) (default 0.2).
        max_epochs: Most epochs to train (default 200).
        patience: Epochs without a better validation loss before stopping (default 10).
        lr: AdamW learning rate (default 1e-3).
        weight_decay: AdamW weight decay (default 1e-4).
        batch_size: Events per optimisation step (default 256).
        seed: Seed of the split, the initialisation and the batch order (default 0).
        hidden_sizes: Widths of the probe's hidden layers (default ``(256, 64)``).

    Returns:
        ``(probe, report)``: the trained probe in eval mode with the best epoch's weights, and what training did.

    Raises:
        TypeError: If `features` is not a float tensor.
        ValueError: If the shapes disagree, there are no events, features hold NaN/inf, labels are not binary or
            hold a single class (overall or in the training split), an option is out of range, or there are too
            few problems for the validation split.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(400, 4, generator=g)
        >>> y = (x[:, 0] > 0).long()
        >>> probe, report = train_probe(x, y, groups=[i // 4 for i in range(400)], max_epochs=30, seed=0)
        >>> report.val_auroc > 0.9
        True
    """
    if not isinstance(features, Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}.")
    if features.dim() != 2:
        raise ValueError(
            f"features must be 2-D [num_events, feature_dim], got shape {tuple(features.shape)}; "
            "concatenate the probed layers' hidden states per event."
        )
    if not features.is_floating_point():
        raise TypeError(f"features must be a float tensor, got {features.dtype}.")
    n = features.shape[0]
    labels_t = torch.as_tensor(labels).detach().reshape(-1)
    group_list = _to_hashable_list(groups)
    if labels_t.numel() != n or len(group_list) != n:
        raise ValueError(
            f"features, labels and groups must have one entry per event: got {n} feature rows, "
            f"{labels_t.numel()} labels and {len(group_list)} group ids."
        )
    if n == 0:
        raise ValueError("no events to train on; collect cue events first.")
    finite_rows = torch.isfinite(features).all(dim=1)
    if not bool(finite_rows.all()):
        bad = int((~finite_rows).sum())
        raise ValueError(
            f"features contain NaN/inf in {bad} of {n} events; drop those events (e.g. features[mask]) "
            "or recompute the hidden states in float32."
        )
    if not bool(torch.isin(labels_t.to(torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)).all()):
        raise ValueError("labels must be binary (0/1 or bool): 1 = the forced exit at this cue answers correctly.")
    y_all = labels_t.to(device=features.device, dtype=torch.float32)
    n_pos_all = int(y_all.sum().item())
    if n_pos_all == 0 or n_pos_all == n:
        only = "safe (1)" if n_pos_all == n else "unsafe (0)"
        raise ValueError(
            f"labels contain a single class (all {n} events are {only}); the probe needs both safe and unsafe "
            "events: collect more problems or use a harder/easier problem set."
        )
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}.")
    if max_epochs < 1 or patience < 1 or batch_size < 1:
        raise ValueError("max_epochs, patience and batch_size must be positive integers.")
    n_groups = len(set(group_list))
    if n_groups < 2:
        raise ValueError(
            f"too few groups for a validation split: got {n_groups} distinct problem id(s); the validation split "
            "holds out whole problems, so pass at least 2 (in practice dozens) problems."
        )
    train_idx, val_idx = split_groups(group_list, [1.0 - val_fraction, val_fraction], seed)
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise ValueError(
            f"too few groups for a validation split with val_fraction={val_fraction}: {n_groups} problems; "
            "pass more problems or adjust val_fraction."
        )

    device = features.device
    x_train = features[torch.as_tensor(train_idx, device=device)].to(torch.float32)
    y_train = y_all[torch.as_tensor(train_idx, device=device)]
    x_val = features[torch.as_tensor(val_idx, device=device)].to(torch.float32)
    y_val = y_all[torch.as_tensor(val_idx, device=device)]
    n_pos_train = int(y_train.sum().item())
    if n_pos_train == 0 or n_pos_train == len(train_idx):
        raise ValueError(
            "the training problems contain a single class after the problem-level split; "
            "use more problems, a smaller val_fraction or another seed."
        )

    generator = torch.Generator().manual_seed(seed)
    probe = LynxProbe(features.shape[1], hidden_sizes)
    probe.reset_parameters(generator)
    x64 = x_train.to(torch.float64)
    probe.set_standardization(x64.mean(dim=0), x64.std(dim=0, unbiased=False))
    probe.to(device)

    w_train = _balanced_weights(y_train)
    w_val = _balanced_weights(y_val)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    bce = nn.BCEWithLogitsLoss(reduction="none")

    def val_loss_now() -> float:
        probe.eval()
        with torch.no_grad():
            loss = (bce(probe(x_val), y_val) * w_val).sum() / w_val.sum()
        return float(loss)

    best_loss, best_epoch, best_state, best_train_loss = math.inf, 0, None, None
    bad_epochs, epochs_run = 0, 0
    n_train = len(train_idx)
    for epoch in range(1, max_epochs + 1):
        probe.train()
        perm = torch.randperm(n_train, generator=generator).to(device)
        total = 0.0
        for start in range(0, n_train, batch_size):
            b = perm[start : start + batch_size]
            loss_vec = bce(probe(x_train[b]), y_train[b]) * w_train[b]
            loss = loss_vec.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss_vec.sum().detach())
        epochs_run = epoch
        current = val_loss_now()
        logger.debug("epoch %d: train loss %.4f, val loss %.4f", epoch, total / n_train, current)
        if current < best_loss - 1e-6:
            best_loss, best_epoch, best_train_loss = current, epoch, total / n_train
            best_state = copy.deepcopy(probe.state_dict())
            bad_epochs = 0
        else:
            bad_epochs += 1
            if bad_epochs >= patience:
                break
    assert best_state is not None  # the first epoch always improves on inf
    probe.load_state_dict(best_state)
    probe.eval()

    val_auroc: float | None
    if 0 < int(y_val.sum().item()) < len(val_idx):
        val_auroc = auroc(probe.predict_proba(x_val), y_val)
    else:
        val_auroc = None
        logger.warning("validation problems contain a single class; val_auroc is undefined (None).")
    val_group_ids = list(dict.fromkeys(group_list[i] for i in val_idx.tolist()))
    report = ProbeTrainingReport(
        train_size=len(train_idx),
        val_size=len(val_idx),
        best_epoch=best_epoch,
        val_loss=best_loss,
        val_auroc=val_auroc,
        positive_rate=n_pos_all / n,
        epochs_run=epochs_run,
        train_loss=best_train_loss,
        train_groups=n_groups - len(val_group_ids),
        val_groups=val_group_ids,
        pos_weight=(n_train - n_pos_train) / n_pos_train,
    )
    logger.info(
        "probe trained: best epoch %d of %d, val loss %.4f, val AUROC %s (%d train / %d val events)",
        best_epoch, epochs_run, best_loss, "n/a" if val_auroc is None else f"{val_auroc:.3f}",
        report.train_size, report.val_size,
    )
    return probe, report
