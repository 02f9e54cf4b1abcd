"""Specification of lynx_hf.runtime.probe: the MLP probe, its problem-level training split, and a dependency-free AUROC."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from lynx_hf.runtime.probe import LynxProbe, ProbeTrainingReport, auroc, split_groups, train_probe


def synthetic_events(n_problems: int = 300, dim: int = 12, seed: int = 0):
    """Cue events grouped by problem: a nonlinear signal (inside a sphere) plus a per-problem offset on noise dims."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(2, 9, (n_problems,), generator=g)
    groups = torch.repeat_interleave(torch.arange(n_problems), sizes)
    n = int(sizes.sum())
    x = torch.randn(n, dim, generator=g)
    x[:, 3:] += 3.0 * torch.randn(n_problems, dim - 3, generator=g)[groups]  # problem-specific nuisance
    x = x * 5.0 + 10.0  # far from standardised: the probe must standardise
    radius = ((x[:, :3] - 10.0) / 5.0).pow(2).sum(dim=1)
    labels = (radius < 2.4).long()  # about half safe; not linearly separable
    return x, labels, [f"problem-{int(i)}" for i in groups]


def test_probe_learns_nonlinear_signal_on_held_out_problems():
    x, y, groups = synthetic_events()
    train, test = split_groups(groups, [0.75, 0.25], seed=1)
    probe, report = train_probe(x[train], y[train], [groups[i] for i in train], seed=0)
    assert isinstance(report, ProbeTrainingReport)
    assert auroc(probe.predict_proba(x[test]), y[test]) > 0.9
    assert report.val_auroc is not None and report.val_auroc > 0.9
    assert 1 <= report.best_epoch <= report.epochs_run <= 200
    assert report.train_size + report.val_size == len(train)
    json.dumps(dataclasses.asdict(report))


def test_standardisation_statistics_come_from_training_problems_only():
    x, y, groups = synthetic_events(n_problems=80)
    probe, report = train_probe(x, y, groups, seed=3, max_epochs=2)
    val = set(report.val_groups)
    in_train = torch.tensor([g not in val for g in groups])
    assert 0 < int((~in_train).sum()) == report.val_size
    x_train = x[in_train].double()
    torch.testing.assert_close(probe.mean, x_train.mean(0).float())
    torch.testing.assert_close(probe.std, x_train.std(0, unbiased=False).float())
    # The per-problem offsets make the all-events statistics differ from the training-only ones.
    assert not torch.allclose(probe.mean, x.double().mean(0).float(), atol=1e-3)


def test_split_keeps_every_problem_in_one_part():
    rng = np.random.default_rng(0)
    groups = [f"p{g}" for g in rng.integers(0, 57, size=600)]  # events of a problem are interleaved here
    parts = split_groups(groups, [0.6, 0.2, 0.2], seed=4)
    assert sorted(np.concatenate(parts).tolist()) == list(range(600))
    part_of_group = {}
    for k, idx in enumerate(parts):
        assert (np.diff(idx) > 0).all()  # sorted: trace order preserved
        for i in idx:
            assert part_of_group.setdefault(groups[i], k) == k
    sizes = np.bincount(list(part_of_group.values()), minlength=3)
    assert sizes.tolist() == [34, 12, 11]  # 57 problems: 34.2 / 11.4 / 11.4, largest remainder to the first tie
    again = split_groups(groups, [0.6, 0.2, 0.2], seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = split_groups(groups, [0.6, 0.2, 0.2], seed=5)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))
    # Two problems still give a non-empty validation part.
    train, val = split_groups(["a", "a", "b"], [0.8, 0.2], seed=0)
    assert len(train) and len(val)


def test_training_is_deterministic_given_seed():
    x, y, groups = synthetic_events(n_problems=60)
    kwargs = dict(max_epochs=15, hidden_sizes=(32, 16))
    p1, r1 = train_probe(x, y, groups, seed=7, **kwargs)
    p2, r2 = train_probe(x, y, groups, seed=7, **kwargs)
    p3, _ = train_probe(x, y, groups, seed=8, **kwargs)
    s1, s2, s3 = p1.state_dict(), p2.state_dict(), p3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert r1 == r2
    assert not all(torch.equal(s1[k], s3[k]) for k in s1)


def test_early_stopping_restores_best_validation_weights():
    x, y, groups = synthetic_events(n_problems=60)
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]  # pure noise: overfits quickly
    probe, report = train_probe(x, y, groups, seed=0, patience=3, max_epochs=200, lr=1e-2)
    assert report.epochs_run == report.best_epoch + 3 < 200
    val = set(report.val_groups)
    in_val = torch.tensor([g in val for g in groups])
    with torch.no_grad():
        logits = probe(x[in_val])
    yv = y[in_val].float()
    w = torch.where(yv > 0, len(yv) / (2 * yv.sum()), len(yv) / (2 * (1 - yv).sum()))
    loss = (torch.nn.functional.binary_cross_entropy_with_logits(logits, yv, reduction="none") * w).sum() / w.sum()
    assert abs(float(loss) - report.val_loss) < 1e-5


def test_forward_accepts_any_float_dtype_and_standardises_inside():
    probe = LynxProbe(4, hidden_sizes=(8,))
    probe.set_standardization(torch.tensor([10.0, 0.0, 0.0, 3.0]), torch.tensor([2.0, 1.0, 0.0, 1.0]))
    assert probe.std.tolist() == [2.0, 1.0, 1.0, 1.0]  # a constant dimension is centred, not divided by ~0
    x = torch.tensor([[12.0, 1.0, 5.0, 3.0]])
    manual = probe.layers(torch.tensor([[1.0, 1.0, 5.0, 0.0]])).squeeze(-1)
    torch.testing.assert_close(probe(x), manual)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        out = probe(x.to(dtype))
        assert out.dtype == torch.float32 and out.shape == (1,)
    p = probe.predict_proba(x)
    assert not p.requires_grad and torch.allclose(p, torch.sigmoid(manual))
    assert LynxProbe(**probe.config).config == {"input_size": 4, "hidden_sizes": [8]}
    with pytest.raises(ValueError, match="2-D"):
        probe(torch.zeros(4))
    with pytest.raises(ValueError, match="expects 4"):
        probe(torch.zeros(2, 5))


def test_training_errors_name_the_problem():
    x, y, groups = synthetic_events(n_problems=20)
    with pytest.raises(ValueError, match="2-D"):
        train_probe(x[:, 0], y, groups)
    with pytest.raises(ValueError, match="one entry per event"):
        train_probe(x, y[:-1], groups)
    with pytest.raises(ValueError, match="one entry per event"):
        train_probe(x, y, groups[:-1])
    with pytest.raises(ValueError, match="single class"):
        train_probe(x, torch.ones_like(y), groups)
    bad = x.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        train_probe(bad, y, groups)
    with pytest.raises(ValueError, match="too few groups"):
        train_probe(x, y, ["only-problem"] * len(y))
    with pytest.raises(ValueError, match="binary"):
        train_probe(x, y * 2, groups)


def brute_force_auroc(scores, labels) -> float:
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def test_auroc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 80))
        labels = rng.integers(0, 2, size=n)
        labels[:2] = [0, 1]
        scores = np.round(rng.normal(labels * 0.5, 1.0), 1)  # many ties
        got = auroc(torch.from_numpy(scores).float(), torch.from_numpy(labels))
        assert got == pytest.approx(brute_force_auroc(scores.astype(np.float32).tolist(), labels.tolist()), abs=1e-12)
    assert auroc(torch.tensor([0.3, 0.3]), torch.tensor([0, 1])) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        auroc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1]))
