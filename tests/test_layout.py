"""The package's layout holds: imports only go down, no circle, and the old module paths still answer.

The floors below are the layout README's "How the code is laid out" describes; an import from a lower
floor to a higher one (module level or inside a function) fails here with the two files named.
"""

from __future__ import annotations

import ast
import importlib
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import pytest

import hf_tlmtl
from hf_tlmtl._moved_modules import MOVED

PACKAGE = Path(hf_tlmtl.__file__).parent

FLOORS: dict[str, int] = {
    "tasks": 0,
    "_moved_modules": 0,
    "_lazy": 0,
    "configuration": 1,
    "backbone": 2,
    "image_processing": 2,
    "checkpoints": 3,
    "data": 3,
    "adapters": 3,
    "modeling": 4,
    "multitask": 5,
    "transferability": 5,
    "transfer": 6,
    "hub": 6,
    "training": 7,
    "__init__": 8,
}
"""Each top-level module or folder of hf_tlmtl and its floor: it may import only from lower floors."""

# The names each moved module had before the package got its folders (public, defined in it).
OLD_NAMES: dict[str, list[str]] = {
    "hf_tlmtl.affinity": ["AFFINITY_JSON", "AFFINITY_STATE", "AffinityMatrix", "TaskAffinityCallback", "TaskGrouping",
                          "group_tasks", "grouping_score", "measure_affinity", "plot_affinity", "shared_parameters"],
    "hf_tlmtl.balancing": ["BALANCERS", "BALANCER_STATE_NAME", "LossBalancer", "build_balancer", "save_balancer_state",
                           "load_balancer_state", "load_balancer_optimizer_state"],
    "hf_tlmtl.batch_norm": ["BN_POLICIES", "freeze_batch_norm", "recalibrate_batch_norm", "batch_norm_layers"],
    "hf_tlmtl.callbacks": ["GradualUnfreezeCallback"],
    "hf_tlmtl.cli": ["UsageError", "build_parser", "run_or_exit", "yaml_to_argv"],
    "hf_tlmtl.curves": ["curve_series", "plot_training_curves", "save_figure"],
    "hf_tlmtl.distributed": ["block_class_names", "check_fsdp_setup", "full_state_dict", "describe_sharding"],
    "hf_tlmtl.embedded": ["load_embedded_dataset", "SHAPES_FEATURES", "EMBEDDED_DATASETS"],
    "hf_tlmtl.metrics": ["build_compute_metrics", "delta_m", "MAIN_METRIC", "LOWER_IS_BETTER"],
    "hf_tlmtl.optim": ["layer_decay_param_groups"],
    "hf_tlmtl.partial_labels": ["concatenate_partially_labelled", "missing_label_value"],
    "hf_tlmtl.pipeline": ["PIPELINE_TASK", "MultiTaskImageClassificationPipeline", "read_image"],
    "hf_tlmtl.run_folder": ["SET_ASIDE_DIR", "set_aside", "restore", "DropSetAsideOnSave"],
    "hf_tlmtl.source_models": ["efficientnet_lite0_imagenet", "convert_in_order"],
    "hf_tlmtl.sources": ["load_image_dataset", "load_table", "infer_tasks", "resolve_tasks", "parse_task_arg"],
    "hf_tlmtl.streaming": ["load_streaming_dataset", "read_per_process"],
    "hf_tlmtl.trainer": ["MultiTaskTrainer", "MultiTaskTrainingArguments", "batch_norm_min_values"],
    "hf_tlmtl.transfer": ["apply_transfer_strategy", "recommend_strategy", "backbone_groups", "truncation_points",
                          "summarize_trainable", "base_model", "is_peft_model", "STRATEGIES"],
    "hf_tlmtl.data": ["prepare_dataset", "build_transforms", "MultiTaskCollator", "cache_features", "FEATURES_COLUMN",
                      "check_worker_picklable", "STREAM_MAP_BATCH"],
    "hf_tlmtl.transferability": ["score_transferability", "rank_backbones", "measure_similarity", "logme", "leep"],
    "hf_tlmtl.adapters": ["apply_lora", "load_adapter", "merge_adapter", "unsharded_copy", "METHODS"],
    "hf_tlmtl.hub": ["create_model_card", "create_adapter_card", "push_model_to_hub", "metrics_from_card", "CARD_TAGS"],
}


def _unit(module: Path) -> str:
    parts = module.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def _imports() -> dict[tuple[Path, str], int]:
    """(file, imported top-level unit of hf_tlmtl) -> line, for every import in the package, at any depth."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        package = path.relative_to(PACKAGE.parent).with_suffix("").parts
        package = package if path.name == "__init__.py" else package[:-1]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    target = [*base, *(node.module.split(".") if node.module else [])]
                    names = [[*target, alias.name] for alias in node.names] if not node.module else [target]
                elif node.module and node.module.startswith("hf_tlmtl"):
                    names = [node.module.split(".")]
                else:
                    continue
            elif isinstance(node, ast.Import):
                names = [alias.name.split(".") for alias in node.names if alias.name.startswith("hf_tlmtl")]
            else:
                continue
            for name in names:
                if len(name) > 1:
                    found[(path, name[1])] = node.lineno
    return found


def test_every_module_of_the_package_has_a_floor():
    units = {_unit(p) for p in PACKAGE.rglob("*.py")} | {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__" and (p / "__init__.py").exists()}
    units.discard("model_cards")
    assert units <= set(FLOORS), f"give these a floor in FLOORS (and README's layout section): {sorted(units - set(FLOORS))}"


def test_imports_only_go_down():
    upward = []
    for (path, target), line in sorted(_imports().items()):
        source = "__init__" if path.parent == PACKAGE and path.name == "__init__.py" else _unit(path)
        if target == source or target not in FLOORS:
            continue
        if FLOORS[target] >= FLOORS[source]:
            upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports hf_tlmtl.{target} (floor {FLOORS[target]} >= {FLOORS[source]})")
    assert not upward, "\n".join(upward)


def test_no_import_circle_inside_a_folder():
    graph: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        if path.parent == PACKAGE or path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                graph[str(path.relative_to(PACKAGE))].add(str((path.parent / f"{node.module.split('.')[0]}.py").relative_to(PACKAGE)))
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        if state.get(node) == 1:
            raise AssertionError(f"import circle: {' -> '.join(trail[trail.index(node):] + [node])}")
        if state.get(node) == 2:
            return
        state[node] = 1
        for nxt in graph.get(node, ()):
            visit(nxt, trail + [node])
        state[node] = 2

    for node in list(graph):
        visit(node, [])


@pytest.mark.parametrize("old", sorted(OLD_NAMES))
def test_old_import_paths_answer_with_the_same_objects(old):
    sys.modules.pop(old, None)  # imported earlier in this process: the finder answers (and warns) again
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    moved = old in MOVED
    assert any(issubclass(w.category, FutureWarning) and old in str(w.message) for w in caught) == moved
    for name in OLD_NAMES[old]:
        value = getattr(module, name)
        if moved:  # the very object of its new home, not a copy
            homes = [importlib.import_module(home) for home in MOVED[old]]
            assert any(getattr(home, name, None) is value for home in homes), name


def test_an_unknown_name_at_an_old_path_says_where_the_module_went():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import hf_tlmtl.trainer as old

    with pytest.raises(AttributeError, match=r"moved to hf_tlmtl\.training\.arguments.*no attribute 'nothing_here'"):
        old.nothing_here


def test_import_hf_tlmtl_stays_light():
    """Registration and inference need neither datasets nor scikit-learn: the training-time names load on first use."""
    import subprocess

    code = ("import sys, hf_tlmtl; heavy = sorted({'datasets', 'sklearn', 'pandas', 'peft'} & set(sys.modules)); "
            "from hf_tlmtl import TaskAffinityCallback, group_tasks; from hf_tlmtl.hub import create_model_card; "
            "print(heavy, TaskAffinityCallback.__module__, create_model_card.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True).stdout
    assert out.strip() == "[] hf_tlmtl.multitask.affinity hf_tlmtl.hub.cards"
