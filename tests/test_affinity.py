"""Task affinity: lookahead / cosine on real models and real Trainer runs, the grouping search, the
callback through checkpoint resume, the early errors, and the embedded data the truth is built into."""

from __future__ import annotations

import hashlib
import itertools
import json

import numpy as np
import pytest
import torch

from hf_tlmtl import TaskSpec, TimmMultiTaskModel
from hf_tlmtl.multitask.affinity import (
    AFFINITY_JSON,
    AFFINITY_PNG,
    AFFINITY_STATE,
    AffinityMatrix,
    TaskAffinityCallback,
    measure_affinity,
)
from hf_tlmtl.multitask.grouping import group_tasks, grouping_score
from hf_tlmtl.data import prepare_dataset
from hf_tlmtl.data.embedded import COLORS, SIZE_CLASSES, WARM_COLORS, load_embedded_dataset
from hf_tlmtl.data import infer_tasks
from hf_tlmtl.training import MultiTaskTrainer, MultiTaskTrainingArguments

SIZE = 32


# ------------------------------------------------------------------------------------ grouping
def _brute_force(matrix: np.ndarray, k: int) -> float:
    """Best score over every assignment of tasks to exactly k labelled groups (independent of the library's search)."""
    n = len(matrix)
    best = -np.inf
    for labels in itertools.product(range(k), repeat=n):
        if len(set(labels)) != k:
            continue
        groups = [[i for i in range(n) if labels[i] == g] for g in range(k)]
        best = max(best, grouping_score(matrix, groups))
    return best


HAND_MADE = np.array(
    [  # a, b help each other; c, d help each other; e hurts everyone and is hurt by everyone
        [0.9, 0.6, -0.1, 0.0, -0.3],
        [0.5, 0.8, 0.0, -0.1, -0.3],
        [-0.1, 0.0, 0.7, 0.4, -0.2],
        [0.0, 0.1, 0.3, 0.9, -0.2],
        [-0.4, -0.3, -0.2, -0.3, 0.6],
    ]
)


def test_group_tasks_returns_the_optimum_of_a_hand_made_matrix():
    names = ["a", "b", "c", "d", "e"]
    assert group_tasks(HAND_MADE, max_groups=3, tasks=names).groups == (("a", "b"), ("c", "d"), ("e",))
    # At most 2 groups: e must join a pair, and it hurts c, d less than a, b.
    two = group_tasks(HAND_MADE, max_groups=2, min_groups=2, tasks=names)
    assert two.groups == (("c", "d", "e"), ("a", "b")) and two.exact
    assert two.score == pytest.approx(_brute_force(HAND_MADE, 2))
    for k in (1, 3, 4, 5):
        assert group_tasks(HAND_MADE, max_groups=k, min_groups=k, tasks=names).score == pytest.approx(_brute_force(HAND_MADE, k))
    # Scoring: a+b = mean affinity onto a from b (0.5) + onto b from a (0.6); singletons 0.
    assert grouping_score(HAND_MADE, [[0, 1], [2], [3], [4]]) == pytest.approx(1.1)


def test_group_tasks_above_the_budget_approximates_and_recovers_planted_groups():
    rng = np.random.default_rng(0)
    planted = [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8, 10]]
    n = 11
    matrix = rng.normal(0, 0.02, (n, n)) - 0.2
    for group in planted:
        for i, j in itertools.permutations(group, 2):
            matrix[i, j] = 0.5 + rng.normal(0, 0.02)
    result = group_tasks(matrix, max_groups=3)
    assert not result.exact  # 11 tasks into <= 3 groups: 29,525 partitions > the default budget
    assert sorted(map(sorted, result.groups)) == sorted(sorted(str(i) for i in g) for g in planted)
    assert group_tasks(matrix, max_groups=3, budget=30_000).exact


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(affinity=[[1.0]], max_groups=1), "at least two tasks"),
        (dict(affinity=HAND_MADE, max_groups=6), "from 1 to the number of tasks"),
        (dict(affinity=HAND_MADE, max_groups=0), "from 1 to the number of tasks"),
        (dict(affinity=HAND_MADE, max_groups=2, min_groups=3), "larger than max_groups"),
        (dict(affinity=np.zeros((2, 3)), max_groups=1), "square"),
        (dict(affinity=[[1.0, np.nan], [0.1, 1.0]], max_groups=1, tasks=["a", "b"]), r"\['a', 'b'\].*no label"),
    ],
)
def test_group_tasks_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        group_tasks(**kwargs)


# --------------------------------------------------------------------- one measurement, by hand
def _tasks(*names):
    return [TaskSpec(name=n, type="regression") for n in names]


def test_measurement_signs_on_constructed_helping_and_conflicting_tasks():
    """b is a copy of a (same head, same target), c has a's head with the opposite target: b helps a,
    c conflicts with a. The model, its buffers and the random state are untouched by the measurement."""
    torch.manual_seed(0)
    model = TimmMultiTaskModel.from_backbone("test_resnet", _tasks("a", "b", "c"), image_size=SIZE).train()
    for name in ("b", "c"):
        model.heads[name].load_state_dict(model.heads["a"].state_dict())
    x, y = torch.randn(8, 3, SIZE, SIZE), torch.rand(8) + 0.5
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng_before = torch.get_rng_state()
    lookahead, cosine = measure_affinity(model, {"pixel_values": x, "a": y, "b": y, "c": -y}, learning_rates=0.05)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert cosine[0, 1] == pytest.approx(1.0, abs=1e-5) and cosine[0, 2] < -0.5
    assert lookahead[0, 1] > 0 and lookahead[0, 2] < 0 and lookahead[2, 0] < 0
    assert lookahead[0, 1] == pytest.approx(lookahead[0, 0], rel=1e-4)  # a step on a = a step on b
    # A task without labels in the batch gets NaN rows and columns.
    lookahead, _ = measure_affinity(model, {"pixel_values": x, "a": y, "b": y, "c": torch.full((8,), float("nan"))}, 0.05)
    assert np.isnan(lookahead[2]).all() and np.isnan(lookahead[:, 2]).all() and np.isfinite(lookahead[:2, :2]).all()


# --------------------------------------------------------------------------- real Trainer runs
@pytest.fixture(scope="module")
def pairs():
    return load_embedded_dataset("shapes_affinity", n_train=256, n_eval=8, image_size=SIZE, seed=0)["train"]


PAIR_TASKS = ["color", "distractor_color", "scale", "size_class"]


def _trainer(train, output_dir, callbacks, names=PAIR_TASKS, **overrides):
    torch.manual_seed(0)
    model = TimmMultiTaskModel.from_backbone("test_resnet", infer_tasks(train.features, names=names), image_size=SIZE)
    options = dict(
        output_dir=str(output_dir), report_to="none", use_cpu=True, per_device_train_batch_size=32, learning_rate=0.01,
        warmup_steps=5, weight_decay=0.01, seed=0, disable_tqdm=True, logging_steps=1000, save_strategy="no",
    )
    options.update(overrides)
    dataset = prepare_dataset(train.select_columns(["image", *names]), model.config, train=False)
    return MultiTaskTrainer(model=model, args=MultiTaskTrainingArguments(**options), train_dataset=dataset, callbacks=callbacks)


def test_training_run_finds_the_helping_pair_and_self_affinity_is_highest(pairs, tmp_path):
    tag = TaskAffinityCallback(every_n_steps=10, start_step=20)
    equal = TaskAffinityCallback(every_n_steps=10, start_step=20, lookahead_step="equal", name="equal")
    default = TaskAffinityCallback(plot=False, name="default")
    trainer = _trainer(pairs, tmp_path, [tag, equal, default], max_steps=60)
    trainer.train()
    result, equal_steps = tag.result(), equal.result()
    assert result.steps == equal_steps.steps == [20, 30, 40, 50, 60]
    assert default.steps == [24, 48]  # every 6 x 4 tasks by default
    i = {n: k for k, n in enumerate(result.tasks)}
    z = result.lookahead
    # Helping pair: both directions positive, and the largest affinity between two different tasks.
    assert z[i["scale"], i["size_class"]] > 0 and z[i["size_class"], i["scale"]] > 0
    pair = z + z.T
    np.fill_diagonal(pair, -np.inf)
    assert np.unravel_index(np.argmax(pair), pair.shape) in {(i["scale"], i["size_class"]), (i["size_class"], i["scale"])}
    assert result.cosine[i["scale"], i["size_class"]] == pytest.approx(np.max(result.cosine[~np.eye(4, dtype=bool)]))
    # Every task's own step lowers its loss; with equal step lengths it is the best step for it.
    assert (np.diag(z) > 0).all()
    for j in range(4):
        assert equal_steps.lookahead[j, j] >= equal_steps.lookahead[:, j].max()
    assert np.allclose(np.diag(result.cosine), 1.0)
    # Written into the output folder: JSON (round trip) and the heatmap.
    saved = AffinityMatrix.load(tmp_path / AFFINITY_JSON)
    np.testing.assert_allclose(saved.lookahead, z)
    assert (tmp_path / AFFINITY_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_allclose(AffinityMatrix.load(tmp_path / "equal.json").lookahead, equal_steps.lookahead)


def test_callback_survives_resume(pairs, tmp_path):
    names = ["scale", "size_class"]
    full = TaskAffinityCallback(every_n_steps=2, batch_size=8, plot=False)
    _trainer(pairs.select(range(64)), tmp_path / "run", [full], names=names, max_steps=6, save_strategy="steps",
             save_steps=3, per_device_train_batch_size=8).train()
    checkpoint = tmp_path / "run" / "checkpoint-3"
    assert json.loads((checkpoint / AFFINITY_STATE).read_text())["steps"] == [2]

    resumed = TaskAffinityCallback(every_n_steps=2, batch_size=8, plot=False)
    _trainer(pairs.select(range(64)), tmp_path / "run", [resumed], names=names, max_steps=6,
             per_device_train_batch_size=8).train(resume_from_checkpoint=str(checkpoint))
    assert resumed.steps == full.steps == [2, 4, 6]
    np.testing.assert_allclose(resumed.result().lookahead, full.result().lookahead, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(resumed.result().cosine, full.result().cosine, rtol=1e-4, atol=1e-6)


def test_callback_errors_early(pairs, tmp_path):
    with pytest.raises(ValueError, match="at least two tasks"):
        _trainer(pairs, tmp_path / "one", [TaskAffinityCallback()], names=["scale"], max_steps=2).train()
    # size_class labelled only in rows the measurements never draw.
    unlabelled = pairs.map(lambda row, k: {"size_class": -1 if k > 0 else row["size_class"]}, with_indices=True)
    callback = TaskAffinityCallback(every_n_steps=5, batch_size=4, seed=1)
    trainer = _trainer(unlabelled, tmp_path / "none", [callback], names=["scale", "size_class"], max_steps=10)
    with pytest.raises(ValueError, match=r"\['size_class'\] have none there"):
        trainer.train()
    assert trainer.state.global_step == 0
    with pytest.raises(ValueError, match="every_n_steps"):
        TaskAffinityCallback(every_n_steps=0)
    with pytest.raises(ValueError, match="lookahead_step"):
        TaskAffinityCallback(lookahead_step="adam")


# ------------------------------------------------------------------------------ embedded data
def _digest(ds) -> str:
    h = hashlib.sha256()
    for split in ("train", "validation"):
        d = ds[split]
        for col in d.column_names:
            if col == "image":
                for image in list(d[col]):
                    h.update(np.asarray(image).tobytes())
            else:
                h.update(json.dumps(list(d[col])).encode())
        h.update(repr(d.features).encode())
    return h.hexdigest()


# Digests of the datasets as they were before shapes_affinity was added (other studies' results depend on them).
EXISTING = {
    "shapes": "064237979555ae580b80b7ca04cc9989abb98234b7a67561668cb3c4ee9edf21",
    "digits": "c08f31dee14ce28fd6fba42666ad2f6bc0d51bf58d969f42886b9a3f8018fd91",
    "photos": "764ce455404f8ec340fef10d8ff9746d234bc27f14044f1ed330b0e0104cda2e",
}


@pytest.mark.parametrize("name", sorted(EXISTING))
def test_existing_embedded_datasets_are_byte_identical(name):
    assert _digest(load_embedded_dataset(name, n_train=40, n_eval=20, image_size=32, seed=3)) == EXISTING[name]


def test_shapes_affinity_labels_describe_the_pixels(pairs):
    colors = np.array(pairs["color"])
    disc = np.array(pairs["distractor_color"])
    scale = np.array(pairs["scale"])
    assert (colors != disc).all()  # the conflicting pair never shares an answer
    assert (np.array(pairs["size_class"]) == np.minimum((scale * 3).astype(int), 2)).all()
    assert (np.array(pairs["warm"]) == np.isin(np.array(list(COLORS))[colors], WARM_COLORS)).all()
    assert pairs.features["size_class"].names == SIZE_CLASSES
    rgb = np.array(list(COLORS.values()))
    pixels = np.stack([np.asarray(row["image"]) for row in pairs.select(range(64))]).astype(int)
    for half, labels in ((slice(0, SIZE // 2), colors), (slice(SIZE // 2, SIZE), disc)):
        region = pixels[:, :, half].reshape(64, -1, 3)
        # The colour covering most pixels of each half (background excluded) is that object's label.
        distances = np.abs(region[:, :, None, :] - rgb[None, None]).sum(-1)  # (n, pixels, colours)
        counts = (distances < 30).sum(1)
        assert (counts.argmax(1) == labels[:64]).mean() > 0.95
    # The disc's size drives its ink in the right half, the shape's the left half's.
    ink = (np.abs(pixels - pixels[:, :1, :1]).sum(-1) > 60)
    right, left = ink[:, :, SIZE // 2:].sum((1, 2)), ink[:, :, : SIZE // 2].sum((1, 2))
    assert np.corrcoef(right, np.array(pairs["distractor_scale"][:64]))[0, 1] > 0.9
    assert np.corrcoef(left, scale[:64])[0, 1] > 0.8
