"""Novelty scores: does an image belong to any known class? Scores, thresholds, metrics and a synthetic unknown set.

Usage:
    rows = fit_sample(train_labels, 20_000)                   # what to fit on: a stratified sample past 20,000
    train_feats = extract_features(model, train_images[rows], normalization=ckpt["normalization"], tta=True)
    state = fit_score("combined", train_feats, train_labels[rows], num_classes)  # plain dict, weights_only-safe
    states = fit_states(train_feats, train_labels[rows], num_classes)  # the chosen score + the others within 10 MB
    scores = novelty_score(state, extract_features(model, images))  # one per image; higher = less like any known class
    val_scores = score_images(model, val_images, states)      # {score name: scores}, a chunk of features at a time
    threshold = threshold_for_accept_rate(val_scores["combined"], 0.95)  # accept when score <= threshold
    unknown_report("combined", threshold, val_scores, unknown_scores)  # metrics.json "unknown"
    report_by_group(val_scores["combined"], split_by_group(unknown_scores["combined"], folder_groups(paths, root)),
                    threshold)                                # per folder of the unknown set
    auroc(known_scores, unknown_scores), fpr_at_tpr(known_scores, unknown_scores, 0.95)

Every score is oriented the same way: the higher, the less the image looks like the training classes.
  combined           the sum of parts, each standardised over the training images: the Mahalanobis distance
                     of the stem's and of the first residual stage's per-channel mean and spread (how the image
                     looks: texture, light, background), the energy of the logits (how much evidence for any
                     class it holds) and the Mahalanobis distance of the penultimate feature (what the image
                     shows); with a rotation head (--rotation-weight, on by default) also the head's surprise
                     that the image is upright, from the pass that classifies it. The default (DEFAULT_SCORE), chosen
                     on real photos of other things (../shared/data/other, scenes and objects) against cat/dog val
                     photos, never on generated ones, by what carries from one kind to the other (leave one source
                     out, benchmarks/bench_unknown.py): the sum separates them better than any part alone, each
                     part catching images the others miss (docs/experiments/unknown-images.md). For a model
                     trained with --other the energy part counts OTHER_ENERGY_WEIGHT times: outlier exposure trains
                     it.
  msp                1 - max softmax probability (the confidence --threshold already uses)
  energy             -T * logsumexp(logits / T)
  knn                L2 distance from the L2-normalised penultimate feature to its k-th nearest training feature
                     (a float16 subsample of the training features is kept)
  mahalanobis        smallest Mahalanobis distance of the L2-normalised penultimate feature to a class mean
                     (shared covariance, shrunk towards a multiple of the identity)
  layer_mahalanobis  the same distance on the per-channel mean and spread of every stage's feature maps, from the
                     stem to the penultimate; each stage's distance is standardised by its spread over the
                     training images, and the largest counts. Strong on generated far-away images (drawn shapes,
                     text, noise), weak on real photos (docs/experiments/unknown-images.md).
  rotation           the rotation head's mean negative log-probability of the right quarter turn over the image's
                     four turns (a model trained with --rotation-weight); images whose upright side the model
                     cannot see score high. Three more passes per image, so fitted only when it is the chosen one.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from config import NOVELTY_SCORES
from core.common import UserError
from loading.decode import decode_files, expand_inputs

DEFAULT_SCORE = "combined"
COMBINED_STAGES = 2  # the combined score's early stages: the stem's and the first residual stage's statistics
STATE_VERSION = 1
# The weight of the combined score's energy part for a model trained with --other (energy-margin outlier exposure
# trains that part): the best of 1, 2 and 3 on ../shared/data/other, trained on one part and scored on the other,
# and steadier across the parts than energy alone (docs/experiments/unknown-images.md).
OTHER_ENERGY_WEIGHT = 3.0
# The weight of the combined score's penultimate part (the Mahalanobis distance of what the image shows), chosen
# leave-one-source-out on ../shared/data/other (docs/experiments/unknown-images.md).
PENULTIMATE_WEIGHT = 1.0
STATE_BUDGET = 10_000_000  # bytes of score states a checkpoint may hold (the chosen score's is always kept)
KNN_BANK_BYTES = 4_000_000  # the kNN bank stored beside the chosen score: ~5,000 features of 384 values


# ---------------------------------------------------------------- features


def fit_sample(labels: torch.Tensor, limit: int, seed: int = 0) -> torch.Tensor:
    """Sorted indices of the training images to fit the scores on: all of them when there are at most `limit`
    (or `limit` <= 0), else a random sample of about `limit` in which every class keeps its share, rounded up,
    so no class is left out. The features of the sample are what fitting holds in memory (about 7 KB an image
    for the default model), so this bounds it whatever the size of the training set."""
    n = len(labels)
    if limit <= 0 or n <= limit:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    picked = []
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero().flatten()
        picked.append(rows[torch.randperm(len(rows), generator=generator)[:math.ceil(limit * len(rows) / n)]])
    return torch.cat(picked).sort().values


# ---------------------------------------------------------------- fitting a score's state

def fit_knn(features: torch.Tensor, k: int = 10, max_bytes: int = 8_000_000, seed: int = 0) -> dict:
    """kNN state: the L2-normalised features in float16, subsampled at random to fit in `max_bytes`."""
    if len(features) == 0:
        raise ValueError("fit_knn needs at least one training feature")
    bank = F.normalize(features.float(), dim=1)
    keep = max(1, min(len(bank), max_bytes // (2 * bank.shape[1])))
    if keep < len(bank):
        idx = torch.randperm(len(bank), generator=torch.Generator().manual_seed(seed))[:keep]
        bank = bank[idx.sort().values]
    return {"score": "knn", "k": int(min(k, len(bank))), "bank": bank.half().contiguous()}


def class_gaussians(features: torch.Tensor, labels: torch.Tensor, num_classes: int, shrinkage: float = 0.01
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(class means (K, D), precision (D, D)), float32, of the L2-normalised features with one covariance shared
    by all classes, shrunk towards (its mean variance) x identity so that a small set still inverts. Classes
    without images get no mean."""
    x = F.normalize(features.double(), dim=1)
    labels = labels.long()
    present = [c for c in range(num_classes) if (labels == c).any()]
    if not present:
        raise ValueError("class_gaussians needs at least one training feature")
    means = torch.zeros(num_classes, x.shape[1], dtype=torch.float64)
    for c in present:
        means[c] = x[labels == c].mean(0)
    centred = x - means[labels]
    cov = centred.T @ centred / len(x)
    d = cov.shape[0]
    cov = (1 - shrinkage) * cov + shrinkage * (cov.trace() / d).clamp(min=1e-12) * torch.eye(d, dtype=cov.dtype)
    return means[present].float(), torch.linalg.pinv(cov, hermitian=True).float()


def mahalanobis_distance(means: torch.Tensor, precision: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Smallest squared Mahalanobis distance of each L2-normalised feature to a class mean."""
    x = F.normalize(features.float(), dim=1)
    diff = x[:, None, :] - means[None].float()                       # (N, K, D)
    return torch.einsum("nkd,de,nke->nk", diff, precision.float(), diff).min(1).values


def fit_mahalanobis(features: torch.Tensor, labels: torch.Tensor, num_classes: int, shrinkage: float = 0.01) -> dict:
    """Mahalanobis state on the penultimate features: class means and the shared precision."""
    means, precision = class_gaussians(features, labels, num_classes, shrinkage)
    return {"score": "mahalanobis", "means": means, "precision": precision}


def fit_layer_mahalanobis(stages: list[torch.Tensor], labels: torch.Tensor, num_classes: int,
                          shrinkage: float = 0.01) -> dict:
    """layer_mahalanobis state: for each stage, class means, the shared precision, and the mean and standard
    deviation of the training images' own distances, which put every stage on the same scale."""
    means, precisions, centre, scale = [], [], [], []
    for x in stages:
        m, p = class_gaussians(x, labels, num_classes, shrinkage)
        d = mahalanobis_distance(m, p, x).double()
        means.append(m)
        precisions.append(p)
        centre.append(d.mean().item())
        scale.append(max(d.std(correction=0).item(), 1e-12))
    return {"score": "layer_mahalanobis", "means": means, "precisions": precisions,
            "centre": torch.tensor(centre), "scale": torch.tensor(scale)}


def combined_parts(state: dict, features: dict) -> list[torch.Tensor]:
    """The unscaled parts of the combined score: the Mahalanobis distance of each early stage's statistics, the
    energy of the logits, the Mahalanobis distance of the penultimate feature (states fitted before it was a part
    lack it), with a rotation head its surprise that the image is upright, and the surprise over all four turns
    in states that have it."""
    t = float(state.get("temperature", 1.0))
    parts = [mahalanobis_distance(m, p, x) for m, p, x in
             zip(state["means"], state["precisions"], features["stages"][:len(state["means"])])]
    parts.append(-t * torch.logsumexp(features["logits"].float() / t, dim=1))
    if "penultimate" in state:
        parts.append(mahalanobis_distance(*state["penultimate"], features["penultimate"]))
    if state.get("upright", False):
        parts.append(features["upright"].float())
    if state["rotation"]:
        parts.append(features["rotation"].float())
    return parts


def needs_turns(states: dict[str, dict]) -> bool:
    """Whether scoring with these states needs extract_features(turns=True): the rotation score, or a combined
    state with the four-turn part."""
    return any(s["score"] == "rotation" or (s["score"] == "combined" and s["rotation"]) for s in states.values())


def fit_combined(features: dict, labels: torch.Tensor, num_classes: int, temperature: float = 1.0,
                 stages: int = COMBINED_STAGES, shrinkage: float = 0.01, energy_weight: float = 1.0,
                 penultimate_weight: float = PENULTIMATE_WEIGHT) -> dict:
    """combined state: class Gaussians of the first `stages` stages' statistics and of the penultimate feature,
    whether a rotation head's upright part counts ("upright" in the features), the mean and standard deviation of
    every part over the training images, which put the parts on one scale before they are added, and the weight
    of each part in the sum (1; the energy's `energy_weight`, the penultimate's `penultimate_weight`). The
    four-turn rotation surprise is never a part: it costs three more passes per image for no more than the
    upright part and the penultimate one give (docs/experiments/unknown-images.md)."""
    means, precisions = zip(*(class_gaussians(x, labels, num_classes, shrinkage) for x in features["stages"][:stages]))
    state = {"score": "combined", "means": list(means), "precisions": list(precisions), "rotation": False,
             "upright": "upright" in features, "temperature": float(temperature),
             "penultimate": list(class_gaussians(features["penultimate"], labels, num_classes, shrinkage))}
    parts = torch.stack([p.double() for p in combined_parts(state, features)])
    weights = torch.ones(len(parts))
    weights[len(means)] = energy_weight  # the part after the stages' is the energy, then the penultimate's
    weights[len(means) + 1] = penultimate_weight
    state.update(centre=parts.mean(1).float(), scale=parts.std(1, correction=0).clamp(min=1e-12).float(),
                 weights=weights)
    return state


def fit_score(name: str, features: dict, labels: torch.Tensor, num_classes: int,
              temperature: float = 1.0, **options) -> dict:
    """The state `novelty_score` needs for score `name`, from the training images' extract_features output:
    a plain dict of tensors, lists of tensors, ints, floats and strings (loads with weights_only=True)."""
    if name in ("msp", "energy"):
        state = {"score": name}
    elif name == "knn":
        state = fit_knn(features["penultimate"], **options)
    elif name == "mahalanobis":
        state = fit_mahalanobis(features["penultimate"], labels, num_classes, **options)
    elif name == "layer_mahalanobis":
        state = fit_layer_mahalanobis(features["stages"], labels, num_classes, **options)
    elif name == "combined":
        state = fit_combined(features, labels, num_classes, temperature, **options)
    elif name == "rotation":
        if "rotation" not in features:
            raise ValueError("the rotation score needs a model trained with a rotation head (--rotation-weight)")
        state = {"score": name}
    else:
        raise UserError(f"unknown novelty score {name!r}; choose one of {', '.join(NOVELTY_SCORES)}")
    state.update(version=STATE_VERSION, temperature=float(temperature))
    return state


# ---------------------------------------------------------------- scoring

def knn_distance(bank: torch.Tensor, features: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """L2 distance of each L2-normalised feature to its k-th nearest row of `bank` (rows already normalised)."""
    bank = bank.float()
    q = F.normalize(features.float(), dim=1)
    out = []
    for i in range(0, len(q), chunk):
        kth = (q[i:i + chunk] @ bank.T).topk(k, dim=1).values[:, -1]
        out.append((2 - 2 * kth).clamp(min=0).sqrt())
    return torch.cat(out) if out else torch.zeros(0)


def novelty_score(state: dict, features: dict) -> torch.Tensor:
    """One score per image (float32) from extract_features output: the higher, the less like any known class."""
    name, t = state["score"], float(state.get("temperature", 1.0))
    if name == "msp":
        return 1 - torch.softmax(features["logits"].float() / t, dim=1).max(1).values
    if name == "energy":
        return -t * torch.logsumexp(features["logits"].float() / t, dim=1)
    if name == "knn":
        return knn_distance(state["bank"], features["penultimate"], int(state["k"]))
    if name == "mahalanobis":
        return mahalanobis_distance(state["means"], state["precision"], features["penultimate"])
    if name == "layer_mahalanobis":
        if len(features["stages"]) != len(state["means"]):
            raise UserError(f"the novelty state has {len(state['means'])} stages, the model "
                            f"{len(features['stages'])}: the checkpoint does not match")
        z = [(mahalanobis_distance(m, p, x) - c) / s for m, p, x, c, s in
             zip(state["means"], state["precisions"], features["stages"], state["centre"].tolist(),
                 state["scale"].tolist())]
        return torch.stack(z).max(0).values
    if name == "rotation":
        return features["rotation"].float()
    if name == "combined":
        missing = (state["rotation"] and "rotation" not in features) or (state.get("upright") and
                                                                          "upright" not in features)
        if missing:
            raise UserError("the combined novelty score needs the rotation head the checkpoint's model was "
                            "trained with")
        parts = torch.stack(combined_parts(state, features))
        weights = state.get("weights", torch.ones(len(parts)))  # a state without weights: every part counts once
        return (weights[:, None] * (parts - state["centre"][:, None]) / state["scale"][:, None]).sum(0)
    raise UserError(f"unknown novelty score {name!r} in the checkpoint; this code knows {', '.join(NOVELTY_SCORES)}")


def state_bytes(state: dict) -> int:
    """Bytes the state's tensors take (about what it adds to a checkpoint)."""
    tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
    tensors += [t for v in state.values() if isinstance(v, list) for t in v if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------- thresholds and metrics

def threshold_for_accept_rate(known_scores: torch.Tensor, accept_rate: float = 0.95) -> float:
    """The smallest threshold that accepts (score <= threshold) at least `accept_rate` of `known_scores`."""
    if not 0.0 < accept_rate <= 1.0:
        raise UserError(f"--accept-rate must be in (0, 1], not {accept_rate}")
    if len(known_scores) == 0:
        raise ValueError("cannot choose a threshold without scores of known images")
    s = known_scores.double().sort().values
    # The 1e-9 guards against 0.95 * 20 = 19.000000000000004 asking for a 20th image.
    return s[max(0, math.ceil(accept_rate * len(s) - 1e-9) - 1)].item()


def accepted(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """True where an image counts as of a known class."""
    return scores.double() <= threshold


def auroc(known_scores: torch.Tensor, unknown_scores: torch.Tensor) -> float:
    """Area under the ROC curve of telling unknown from known by a higher score: the probability that an unknown
    image scores above a known one, ties counting half (the Mann-Whitney statistic)."""
    if len(known_scores) == 0 or len(unknown_scores) == 0:
        return float("nan")
    k = known_scores.double().sort().values
    u = unknown_scores.double()
    below = torch.searchsorted(k, u, right=False).double()       # known scores strictly below each unknown one
    not_above = torch.searchsorted(k, u, right=True).double()    # ... below or equal
    return ((below + not_above) / 2).sum().item() / (len(k) * len(u))


def fpr_at_tpr(known_scores: torch.Tensor, unknown_scores: torch.Tensor, tpr: float = 0.95) -> float:
    """Share of unknown images accepted by the threshold that accepts `tpr` of the known ones (known = positive);
    fpr_at_tpr(known, unknown, 0.95) is the usual FPR at 95% TPR."""
    if len(known_scores) == 0 or len(unknown_scores) == 0:
        return float("nan")
    return accepted(unknown_scores, threshold_for_accept_rate(known_scores, tpr)).double().mean().item()


def separation(known_scores: torch.Tensor, unknown_scores: torch.Tensor) -> dict:
    """How well a score tells unknown images from known ones: AUROC and FPR at 95% TPR."""
    return {"auroc": auroc(known_scores, unknown_scores),
            "fpr_at_95_tpr": fpr_at_tpr(known_scores, unknown_scores, 0.95)}


def separation_report(known_scores: torch.Tensor, unknown_scores: torch.Tensor, threshold: float) -> dict:
    """separation(), and at `threshold` the shares of known images rejected and unknown ones accepted."""
    return {**separation(known_scores, unknown_scores),
            "known_rejected": (~accepted(known_scores, threshold)).double().mean().item(),
            "unknown_accepted": accepted(unknown_scores, threshold).double().mean().item()}


def fit_states(features: dict, labels: torch.Tensor, num_classes: int, chosen: str = DEFAULT_SCORE,
               temperature: float = 1.0, budget: int = STATE_BUDGET, energy_weight: float = 1.0,
               names: tuple[str, ...] = NOVELTY_SCORES) -> dict[str, dict]:
    """{score name: state} for the chosen score and, while the total stays under `budget` bytes, the others of
    `names` (so evaluate.py can compare every score with nothing but the checkpoint). msp and energy cost nothing.
    `energy_weight`: the combined score's energy part's (OTHER_ENERGY_WEIGHT for a model trained with --other)."""
    if chosen not in NOVELTY_SCORES:
        raise UserError(f"unknown novelty score {chosen!r}; choose one of {', '.join(NOVELTY_SCORES)}")
    weighting = {"combined": {"energy_weight": energy_weight}}
    states = {chosen: fit_score(chosen, features, labels, num_classes, temperature, **weighting.get(chosen, {}))}
    used = state_bytes(states[chosen])
    for name in (n for n in NOVELTY_SCORES if n != chosen and n in names):
        options = {"max_bytes": KNN_BANK_BYTES} if name == "knn" else weighting.get(name, {})
        try:
            state = fit_score(name, features, labels, num_classes, temperature, **options)
        except (ValueError, UserError, RuntimeError):  # e.g. a model whose stages are unknown
            continue
        if used + state_bytes(state) <= budget:
            states[name] = state
            used += state_bytes(state)
    return states


def scores_by_name(states: dict[str, dict], features: dict) -> dict[str, torch.Tensor]:
    """Every stored score of these images, in NOVELTY_SCORES order."""
    return {name: novelty_score(states[name], features) for name in NOVELTY_SCORES if name in states}


def unknown_report(chosen: str, threshold: float, known_scores: dict[str, torch.Tensor],
                   unknown_scores: dict[str, torch.Tensor], groups: list[str] | None = None) -> dict:
    """What metrics.json holds under "unknown": the chosen score's AUROC, FPR at 95% TPR and, at `threshold`,
    the shares of known images rejected and unknown ones accepted; "by_score" gives AUROC and FPR for every
    stored score, and with `groups` (folder_groups of the unknown images) the same per group under its
    "by_folder". `known_scores` and `unknown_scores` are score_images (or scores_by_name) outputs."""
    out = {"score": chosen, "known_images": len(known_scores[chosen]), "unknown_images": len(unknown_scores[chosen]),
           **separation_report(known_scores[chosen], unknown_scores[chosen], threshold)}
    out["by_score"] = {name: separation(known_scores[name], unknown_scores[name]) for name in known_scores}
    if groups is not None:
        for name, r in out["by_score"].items():
            r["by_folder"] = {g: separation(known_scores[name], u)
                              for g, u in split_by_group(unknown_scores[name], groups).items()}
    return out


def folder_groups(paths: list[str], root: str | Path) -> list[str]:
    """The first folder under `root` of each path ("." for files directly in it): the groups by which an unknown
    set is reported (other/street/1.jpg -> "street")."""
    root = Path(root)
    out = []
    for p in paths:
        parts = Path(p).relative_to(root).parts
        out.append(parts[0] if len(parts) > 1 else ".")
    return out


def split_by_group(scores: torch.Tensor, groups: list[str]) -> dict[str, torch.Tensor]:
    """{group: the scores of its images}, in sorted group order (groups[i] is image i's)."""
    return {g: scores[torch.tensor([i for i, h in enumerate(groups) if h == g])] for g in sorted(set(groups))}


def report_by_group(known: torch.Tensor, unknown_by_group: dict[str, torch.Tensor], threshold: float
                    ) -> dict[str, dict]:
    """{group: {"images", "auroc", "fpr_at_95_tpr", "unknown_accepted"}}: each group's unknown scores (from
    split_by_group) against all the known ones, one score's, in the groups' order."""
    return {g: {"images": len(u), **separation(known, u),
                "unknown_accepted": accepted(u, threshold).double().mean().item()}
            for g, u in unknown_by_group.items()}


def load_images(folder: str | Path, size: int, channels: int, workers: int = 0
                ) -> tuple[torch.Tensor, list[str], list[tuple[str, str]]]:
    """Every image under `folder`, in any layout (class folders or flat), decoded: (uint8 (N, C, S, S), paths,
    [(path, reason)] of the unreadable ones)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"no folder at {folder}")
    paths = [str(p) for p in expand_inputs([str(folder)])]
    decoded = list(decode_files(paths, size, channels, workers, desc=f"decoding {folder.name}"))
    good = [(p, torch.from_numpy(a)) for p, (a, _) in zip(paths, decoded) if a is not None]
    bad = [(p, reason) for p, (a, reason) in zip(paths, decoded) if a is None]
    if not good:
        raise UserError(f"no readable images in {folder}")
    return torch.stack([im for _, im in good]), [p for p, _ in good], bad
