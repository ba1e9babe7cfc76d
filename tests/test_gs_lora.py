"""GS-LoRA / GS-LoRA++: LoRA placement, every loss term against a hand computation, the continual protocol,
saved adapters and merged model, the metric module, bad input, a small reproduction and a 2-process run."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from hfpapers.engine import TrainingState
from hfpapers.methods.gs_lora import ContinualForgetter, GSLoRAConfig
from hfpapers.methods.gs_lora.adapters import block_norms, find_ffn_targets, lora_config, lora_groups
from hfpapers.methods.gs_lora.forgetter import task_data
from hfpapers.methods.gs_lora.losses import (
    alpha_at,
    bounded_forgetting_loss,
    class_prototypes,
    group_sparse_penalty,
    prototype_kl,
    prototype_loss,
)
from hfpapers.methods.gs_lora.metrics import forgetting_metrics

NUM_CLASSES = 6
SIZE = 16


def tiny_vit(num_layers=3, seed=0):
    from transformers import ViTConfig, ViTForImageClassification

    from hfpapers.data.images import SHAPE_KINDS

    torch.manual_seed(seed)
    names = SHAPE_KINDS[:NUM_CLASSES]
    config = ViTConfig(image_size=SIZE, patch_size=8, hidden_size=16, num_hidden_layers=num_layers,
                       num_attention_heads=2, intermediate_size=32, num_labels=NUM_CLASSES,
                       id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    return ViTForImageClassification(config)


def processor():
    from transformers import ViTImageProcessorPil

    return ViTImageProcessorPil(size={"height": SIZE, "width": SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


@pytest.fixture(scope="module")
def shapes():
    from hfpapers.data import load

    return load("shapes", resolution=SIZE, num_train=120, num_test=60, num_classes=NUM_CLASSES)


PROBE = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def quick_config(**overrides):
    return GSLoRAConfig(**{"rank": 2, "num_epochs": 2, "batch_size": 8, "learning_rate": 1e-2, "bound": 5.0,
                           "alpha": 1e-3, **overrides})


# ------------------------------------------------------------------ placement


def test_ffn_layers_are_found_by_shape_in_vit_and_scaling_mlp():
    import hfpapers

    vit = find_ffn_targets(tiny_vit())
    assert vit.blocks == [[f"vit.layers.{i}.mlp.fc1", f"vit.layers.{i}.mlp.fc2"] for i in range(3)]
    mlp = hfpapers.create_model("scaling-mlp", preset="tiny", image_size=8, num_labels=3, num_blocks=2)
    assert find_ffn_targets(mlp).blocks == [[f"mlp.blocks.{i}.block.0", f"mlp.blocks.{i}.block.2"] for i in range(2)]
    # Explicit names (peft-style suffixes) are grouped by block as well.
    assert find_ffn_targets(tiny_vit(), ("mlp.fc2",)).blocks == [[f"vit.layers.{i}.mlp.fc2"] for i in range(3)]


def test_lora_sits_on_the_ffn_only_with_loralib_scaling():
    from peft import get_peft_model

    model = tiny_vit()
    targets = find_ffn_targets(model)
    peft_model = get_peft_model(model, lora_config(targets, rank=4, lora_alpha=1.0))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    expected = {f"base_model.model.vit.layers.{i}.mlp.{fc}.lora_{ab}.default.weight"
                for i in range(3) for fc in ("fc1", "fc2") for ab in "AB"}
    assert trainable == expected  # attention, embeddings, norms and head frozen
    layer = peft_model.get_submodule("base_model.model.vit.layers.0.mlp.fc1")
    assert layer.scaling["default"] == 1 / 4
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0  # the update starts at zero


# ------------------------------------------------------------------ losses by hand


def test_group_sparse_penalty_matches_a_hand_sum_for_each_group_type():
    from peft import get_peft_model

    model = tiny_vit(num_layers=2)
    targets = find_ffn_targets(model)
    peft_model = get_peft_model(model, lora_config(targets, rank=2, lora_alpha=1.0))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    params = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}

    def sq(block, fc, ab):
        return float((params[f"base_model.model.vit.layers.{block}.mlp.{fc}.lora_{ab}.default.weight"] ** 2).sum().detach())

    by_block = sum(math.sqrt(sum(sq(b, fc, ab) for fc in ("fc1", "fc2") for ab in "AB")) for b in range(2))
    by_lora = sum(math.sqrt(sq(b, fc, "A") + sq(b, fc, "B")) for b in range(2) for fc in ("fc1", "fc2"))
    by_matrix = sum(math.sqrt(sq(b, fc, ab)) for b in range(2) for fc in ("fc1", "fc2") for ab in "AB")
    for group_type, expected in (("block", by_block), ("lora", by_lora), ("matrix", by_matrix)):
        got = group_sparse_penalty(lora_groups(peft_model, targets, group_type)).item()
        assert got == pytest.approx(expected, rel=1e-5), group_type
    # Per-block norms as the official cal_norm logs them: the sum of the four matrices' Frobenius norms.
    expected_norms = [sum(math.sqrt(sq(b, fc, ab)) for fc in ("fc1", "fc2") for ab in "AB") for b in range(2)]
    assert block_norms(peft_model, targets) == pytest.approx(expected_norms, rel=1e-5)


def test_group_sparse_penalty_on_small_tensors_and_a_zero_group():
    a = torch.tensor([[3.0, 0.0], [0.0, 4.0]], requires_grad=True)
    b = torch.tensor([12.0], requires_grad=True)
    zero = torch.zeros(2, 2, requires_grad=True)
    penalty = group_sparse_penalty([[a, b], [zero]])
    assert penalty.item() == pytest.approx(13.0)  # sqrt(9 + 16 + 144) + 0
    penalty.backward()
    assert torch.allclose(a.grad, a.detach() / 13) and torch.allclose(b.grad, b.detach() / 13)
    assert torch.equal(zero.grad, torch.zeros(2, 2))  # a subgradient, not NaN


def test_bounded_forgetting_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    labels = torch.tensor([0, 1])
    ce = [math.log(math.exp(2) + 1 + math.exp(-1)) - 2, math.log(2 * math.exp(0.5) + math.exp(3)) - 0.5]
    mean_ce = sum(ce) / 2
    assert bounded_forgetting_loss(logits, labels, bound=5.0).item() == pytest.approx(5.0 - mean_ce, rel=1e-6)
    assert bounded_forgetting_loss(logits, labels, bound=1.0).item() == 0.0  # CE past the bound: no more ascent
    logits.requires_grad_(True)
    bounded_forgetting_loss(logits, labels, bound=5.0).backward()
    softmax = logits.detach().softmax(-1)
    onehot = torch.nn.functional.one_hot(labels, 3).float()
    assert torch.allclose(logits.grad, -(softmax - onehot) / 2, atol=1e-6)  # gradient ascent on the mean CE


def test_prototype_losses_by_hand():
    embeddings = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]])
    labels = torch.tensor([1, 0])
    prototypes = torch.tensor([[0.0, 0.0, 1.0], [2.0, 1.0, 0.0]])

    def softmax(v):
        e = [math.exp(x) for x in v]
        return [x / sum(e) for x in e]

    def kl(p, q):  # KL(p || q)
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))

    expected = sum(kl(softmax(prototypes[y].tolist()), softmax(e.tolist())) for e, y in zip(embeddings, labels)) / 2
    assert prototype_kl(embeddings, labels, prototypes).item() == pytest.approx(expected, rel=1e-6)
    f_kl = kl(softmax(prototypes[1].tolist()), softmax(embeddings[0].tolist()))
    r_kl = kl(softmax(prototypes[0].tolist()), softmax(embeddings[1].tolist()))
    got = prototype_loss(embeddings[:1], labels[:1], embeddings[1:], labels[1:], prototypes, bound=3.0,
                         forget_weight=0.5, retain_weight=0.25)
    assert got.item() == pytest.approx(0.5 * max(0.0, 3.0 - f_kl) + 0.25 * r_kl, rel=1e-6)


def test_class_prototypes_and_alpha_warmup():
    emb = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    protos = class_prototypes(emb, torch.tensor([2, 0, 2]), num_labels=3)
    assert torch.equal(protos, torch.tensor([[3.0, 4.0], [0.0, 0.0], [3.0, 4.0]]))
    assert [alpha_at(e, 0.01, warmup_epochs=2) for e in range(4)] == [0.0, 0.0, 0.01, 0.01]


def test_recipe_loss_is_the_weighted_sum_of_its_terms():
    from peft import get_peft_model

    from hfpapers.methods.gs_lora.recipe import EmbeddingTap, GSLoRARecipe

    model = tiny_vit(num_layers=2)
    targets = find_ffn_targets(model)
    peft_model = get_peft_model(model, lora_config(targets, rank=2, lora_alpha=1.0))
    cfg = quick_config(alpha=0.1, alpha_warmup_epochs=1, beta=0.3, bound=4.0, prototypes=True,
                       prototype_forget_weight=0.2, prototype_retain_weight=0.7, prototype_bound=2.0)
    protos = torch.randn(NUM_CLASSES, 16)
    tap = EmbeddingTap(peft_model.get_submodule("base_model.model.classifier"))
    recipe = GSLoRARecipe(cfg, lora_groups(peft_model, targets, "block"), [1], [], 1.0, protos, tap)
    g = torch.Generator().manual_seed(0)
    batch = {"retain_pixel_values": torch.randn(3, 3, SIZE, SIZE, generator=g), "retain_labels": torch.tensor([0, 2, 3]),
             "forget_pixel_values": torch.randn(2, 3, SIZE, SIZE, generator=g), "forget_labels": torch.tensor([1, 1])}
    peft_model.eval()
    # Independent pieces: separate forwards, the CLS embedding read from the hidden states.
    out_r = peft_model(pixel_values=batch["retain_pixel_values"], output_hidden_states=True)
    out_f = peft_model(pixel_values=batch["forget_pixel_values"], output_hidden_states=True)
    emb_r = peft_model.base_model.model.vit.layernorm(out_r.hidden_states[-1])[:, 0]
    emb_f = peft_model.base_model.model.vit.layernorm(out_f.hidden_states[-1])[:, 0]
    retain = torch.nn.functional.cross_entropy(out_r.logits, batch["retain_labels"])
    forget = max(0.0, 4.0 - torch.nn.functional.cross_entropy(out_f.logits, batch["forget_labels"]).item())
    structure = group_sparse_penalty(lora_groups(peft_model, targets, "block")).item()
    proto = (0.2 * max(0.0, 2.0 - prototype_kl(emb_f, batch["forget_labels"], protos).item())
             + 0.7 * prototype_kl(emb_r, batch["retain_labels"], protos).item())
    for epoch, alpha in ((0, 0.0), (1, 0.1)):
        expected = retain.item() + 0.3 * forget + alpha * structure + proto
        assert recipe.compute_loss(peft_model, batch, g, TrainingState(epoch=epoch)).item() == pytest.approx(expected, rel=1e-5)
    tap.remove()


# ------------------------------------------------------------------ metrics


def test_forgetting_metrics_by_hand_and_as_an_evaluate_module():
    import evaluate

    predictions = [0, 1, 1, 2, 3, 3, 4, 0, 5, 5]
    references = [0, 1, 2, 2, 3, 3, 4, 4, 5, 1]
    # forget {2, 4}: refs 2,2,4,4 -> hits at idx 3, 6 -> 2/4; old {5}: idx 8 hit -> 1/1; retained 0,1,3: idx 0,1,4,5,9
    # -> 4 hits of 5. Drop = 0.9 - 0.5 = 0.4; H = 2 * 0.4 * 0.8 / 1.2.
    expected = {"acc_f": 0.5, "acc_r": 0.8, "acc_o": 1.0, "drop": 0.4, "h_mean": 2 * 0.4 * 0.8 / 1.2}
    got = forgetting_metrics(predictions, references, [2, 4], [5], forget_accuracy_before=0.9)
    assert got == pytest.approx(expected)
    module = evaluate.load(str(REPO / "evaluation" / "metrics" / "forgetting"))
    assert module.compute(predictions=predictions, references=references, forget_classes=[2, 4], old_classes=[5],
                          forget_accuracy_before=0.9) == pytest.approx(expected)
    first_task = forgetting_metrics(predictions, references, [2, 4])
    assert first_task["acc_o"] is None and first_task["h_mean"] is None


# ------------------------------------------------------------------ the protocol


@pytest.fixture(scope="module")
def two_tasks(shapes, tmp_path_factory):
    """A tiny ViT (loaded from a folder, which its adapters name as their base) through two forgetting tasks,
    saved; the original weights kept for reloading the adapters, and the logits of `PROBE` after each task."""
    from transformers import ViTForImageClassification

    base = tmp_path_factory.mktemp("base")
    tiny_vit().save_pretrained(base)
    model = ViTForImageClassification.from_pretrained(base)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    forgetter = ContinualForgetter(model, quick_config(prototypes=True, prototype_forget_weight=0.1),
                                   processor=processor(), eval_data=shapes["test"],
                                   output_dir=tmp_path_factory.mktemp("runs"))
    reports, logits = [], []
    for classes in ([0, 1], ["triangle"]):
        forget, retain = task_data(shapes["train"], forgetter.class_ids(classes), forgetter.forgotten)
        reports.append(forgetter.forget(classes, forget, retain))
        with torch.no_grad():
            logits.append(forgetter.model.eval()(pixel_values=PROBE).logits)
    saved = forgetter.save_pretrained(tmp_path_factory.mktemp("saved"))
    forgetter.logits_after_task = logits
    return forgetter, original, reports, saved


def test_each_task_reports_and_merges_its_own_adapter(two_tasks):
    forgetter, _, reports, _ = two_tasks
    assert [r.forget_classes for r in reports] == [["circle", "square"], ["triangle"]]
    assert reports[0].acc_o is None and reports[1].acc_o is not None  # Acc_o: classes of earlier tasks
    assert all(len(r.block_norms) == 3 for r in reports)
    for r in reports:
        assert r.h_mean == pytest.approx(2 * r.drop * r.acc_r / (r.drop + r.acc_r) if r.drop + r.acc_r else 0.0)
    assert forgetter.forgotten == [0, 1, 2]
    assert not any("lora" in n for n, _ in forgetter.model.named_modules())  # merged, no adapter left
    assert type(forgetter.model).__name__ == "ViTForImageClassification"


def test_saved_adapters_reload_with_peft_and_rebuild_the_merged_model(two_tasks):
    from peft import PeftModel

    forgetter, original, _, saved = two_tasks
    for task in (1, 2):
        folder = saved / "adapters" / f"task-{task}"
        assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    model = tiny_vit()
    model.load_state_dict(original)
    model = PeftModel.from_pretrained(model, saved / "adapters" / "task-2").merge_and_unload()
    merged = type(model).from_pretrained(saved).state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, merged[name], atol=1e-6, rtol=1e-5)
    # Task 2's adapter holds task 1's (rank 2) and its own (rank 2) stacked along the rank; the scale is shared.
    a1 = load_file(saved / "adapters" / "task-1" / "adapter_model.safetensors")
    a2 = load_file(saved / "adapters" / "task-2" / "adapter_model.safetensors")
    assert a1.keys() == a2.keys()
    for key in a1:
        rank_dim = 0 if ".lora_A." in key else 1
        assert a2[key].shape[rank_dim] == 4 and torch.equal(a2[key].narrow(rank_dim, 0, 2), a1[key])
        assert not torch.equal(a2[key].narrow(rank_dim, 2, 2), a1[key])


def test_auto_peft_model_loads_each_task_adapter_as_the_model_after_that_task(two_tasks):
    """Task t's adapter names the base it applies to (the original model) and a loadable class: AutoPeftModel
    gives the run's logits after task t (before, task 2's named the original model and held only its own update)."""
    from peft import AutoPeftModel

    forgetter, _, _, saved = two_tasks
    for task, expected in enumerate(forgetter.logits_after_task, start=1):
        model = AutoPeftModel.from_pretrained(saved / "adapters" / f"task-{task}").eval()
        with torch.no_grad():
            torch.testing.assert_close(model(pixel_values=PROBE).logits, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(*forgetter.logits_after_task, atol=1e-3)  # the two tasks are told apart


def test_saved_folder_works_with_the_pipeline_and_has_a_card(two_tasks, shapes):
    from huggingface_hub import ModelCard
    from transformers import pipeline

    forgetter, _, reports, saved = two_tasks
    assert not list(saved.rglob("*.bin")) and not list(saved.rglob("*.pt"))
    classify = pipeline("image-classification", model=str(saved))
    image = shapes["test"][0]["image"]
    top = classify(image, top_k=1)[0]
    assert top["label"] in forgetter.id2label.values()
    card = ModelCard.load(saved / "README.md")
    assert "arxiv:2501.09705" in card.data.tags and card.data.pipeline_tag == "image-classification"
    for expected in ("circle, square, triangle", "Not a privacy guarantee", "Reported in the papers",
                     f"{100 * reports[1].acc_f_before:.1f}", "adapters/task-1"):
        assert expected in card.text, expected
    results = json.loads((saved / "results.json").read_text())
    assert [t["forget_classes"] for t in results["details"]["tasks"]] == [["circle", "square"], ["triangle"]]


def test_scaling_mlp_forgets_too(shapes, tmp_path):
    import hfpapers
    from hfpapers.registry import create_processor

    from peft import AutoPeftModel
    from transformers import AutoModelForImageClassification

    hfpapers.create_model("scaling-mlp", preset="tiny", image_size=SIZE, num_labels=NUM_CLASSES, num_blocks=2,
                          hidden_size=32).save_pretrained(tmp_path / "base")
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "base")
    forgetter = ContinualForgetter(model, quick_config(), processor=create_processor("scaling-mlp", model.config),
                                   eval_data=shapes["test"], output_dir=tmp_path / "runs")
    forget, retain = task_data(shapes["train"], [3], [])
    report = forgetter.forget([3], forget, retain)
    assert len(report.block_norms) == 2 and report.acc_f is not None
    assert type(forgetter.model).__name__ == "ScalingMLPForImageClassification"
    # Its adapter loads with AutoPeftModel (it named the hfpapers module, which peft refuses to import).
    loaded = AutoPeftModel.from_pretrained(tmp_path / "runs" / "task-1").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=PROBE).logits, forgetter.model.eval()(pixel_values=PROBE).logits,
                                   atol=1e-5, rtol=1e-5)


def test_ema_average_is_what_gets_merged(shapes, tmp_path):
    from peft import PeftModel

    model = tiny_vit(num_layers=2)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    forgetter = ContinualForgetter(model, quick_config(ema_decay=0.5, num_epochs=3), processor=processor(),
                                   output_dir=tmp_path)
    forget, retain = task_data(shapes["train"], [4], [])
    forgetter.forget([4], forget, retain)
    # The engine saved the averaged adapter; the last raw LoRA weights are in its final checkpoint.
    averaged = load_file(tmp_path / "task-1" / "adapter_model.safetensors")
    raw = load_file(next((tmp_path / "task-1" / "checkpoints").glob("step-*")) / "model.safetensors")
    key = next(k for k in averaged if "lora_B" in k)
    raw_key = next(k for k in raw if k.endswith(key.split("base_model.model.")[-1].replace(".weight", ".default.weight")))
    assert not torch.allclose(averaged[key], raw[raw_key])
    rebuilt = tiny_vit(num_layers=2)
    rebuilt.load_state_dict(original)
    rebuilt = PeftModel.from_pretrained(rebuilt, tmp_path / "task-1").merge_and_unload()
    for name, value in rebuilt.state_dict().items():
        torch.testing.assert_close(value, forgetter.model.state_dict()[name], atol=1e-6, rtol=1e-5)


def test_model_given_as_a_local_folder(shapes, tmp_path):
    tiny_vit().save_pretrained(tmp_path / "base")
    processor().save_pretrained(tmp_path / "base")
    forgetter = ContinualForgetter(str(tmp_path / "base"), quick_config(num_epochs=1), output_dir=tmp_path / "runs")
    forget, retain = task_data(shapes["train"], [5], [])
    assert forgetter.forget(["ring"], forget, retain).forget_classes == ["ring"]


def test_model_given_as_a_hub_id(tmp_path):
    from hfpapers.testing import LocalHub

    tiny_vit().save_pretrained(tmp_path / "base")
    processor().save_pretrained(tmp_path / "base")
    code = f"""
import json
from huggingface_hub import HfApi
from hfpapers.data import load
from hfpapers.methods.gs_lora import ContinualForgetter, GSLoRAConfig
from hfpapers.methods.gs_lora.forgetter import task_data
HfApi().create_repo("someone/tiny-vit")
HfApi().upload_folder(folder_path={str(tmp_path / "base")!r}, repo_id="someone/tiny-vit")
data = load("shapes", resolution={SIZE}, num_train=60, num_test=12, num_classes={NUM_CLASSES})
forgetter = ContinualForgetter("someone/tiny-vit", GSLoRAConfig(rank=2, num_epochs=1, batch_size=8, bound=5.0),
                               output_dir={str(tmp_path / "runs")!r})
forget, retain = task_data(data["train"], [0], [])
print(json.dumps(forgetter.forget([0], forget, retain).to_dict()))
"""
    with LocalHub(data_dir=tmp_path / "hub") as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"), "HF_TOKEN": hub.token,
               "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                              timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["forget_classes"] == ["circle"]


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("case, message", [
    ("unknown class", "the model has no such class"),
    ("empty forget data", "forget_data is empty"),
    ("overlap", "forget and retain classes overlap"),
    ("stray forget example", "not being forgotten"),
])
def test_bad_input_is_one_clear_error_and_nothing_is_merged(case, message, shapes, tmp_path):
    model = tiny_vit(num_layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    forgetter = ContinualForgetter(model, quick_config(), processor=processor(), output_dir=tmp_path)
    forget, retain = task_data(shapes["train"], [0], [])
    classes = [0]
    if case == "unknown class":
        classes = ["dodecahedron"]
    elif case == "empty forget data":
        forget = forget.select([])
    elif case == "overlap":
        _, retain = task_data(shapes["train"], [1], [])  # still has class 0
    else:
        forget, _ = task_data(shapes["train"], [0, 1], [])
    with pytest.raises(ValueError, match=message):
        forgetter.forget(classes, forget, retain)
    assert forgetter.model is model and forgetter.tasks == [] and not list(tmp_path.iterdir())
    assert not any("lora" in n for n, _ in model.named_modules())
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_a_model_without_ffn_linear_layers_is_refused():
    import hfpapers

    model = hfpapers.create_model("efficientvim", preset="tiny", num_labels=3)  # its FFNs are 1x1 convolutions
    with pytest.raises(ValueError, match="has no FFN Linear layers to put LoRA into"):
        ContinualForgetter(model, GSLoRAConfig())
    assert not any("lora" in n for n, _ in model.named_modules())


# (The settings GS-LoRA refuses are in tests/test_contract.py, from hfpapers.testing.tiny.)


# ------------------------------------------------------------------ accelerate launch


@pytest.mark.slow
def test_forget_script_runs_on_two_processes(tmp_path):
    from accelerate.test_utils.testing import get_launch_command, get_torch_dist_unique_port

    tiny_vit().save_pretrained(tmp_path / "base")
    processor().save_pretrained(tmp_path / "base")
    command = get_launch_command(multi_gpu=True, num_processes=2, num_machines=1, mixed_precision="no",
                                 dynamo_backend="no", main_process_port=get_torch_dist_unique_port())
    command[0] = str(Path(sys.executable).with_name("accelerate"))
    command += [str(REPO / "training" / "run.py"), "gs-lora", "--model", str(tmp_path / "base"), "--tasks", "circle,square",
                "--tasks", "2", "--output-dir", str(tmp_path / "out"), "--set", "few_shot=8",
                *[a for k, v in {"resolution": SIZE, "num_train": 120, "num_test": 30, "num_classes": NUM_CLASSES}.items()
                  for a in ("--dataset-option", f"{k}={v}")],
                "--set", "rank=2", "--set", "num_epochs=2", "--set", "batch_size=4", "--set", "bound=5"]
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"task"')]
    assert [r["forget_classes"] for r in reports] == [["circle", "square"], ["triangle"]]  # printed once, by rank 0
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert [t["task"] for t in results["details"]["tasks"]] == [1, 2]
    assert json.loads((out / "hfpapers_run.json").read_text())["method"] == "gs-lora"
    for task in (1, 2):
        assert (out / "adapters" / f"task-{task}" / "adapter_model.safetensors").exists()
    assert (out / "model.safetensors").exists() and (out / "README.md").exists()
    # 8 replay examples per kept class, split over 2 ranks in batches of 4: both ranks stepped.
    metrics = [json.loads(line) for line in (out / "runs" / "task-1" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in metrics) == 2 * (4 * 8 // (2 * 4))


# ------------------------------------------------------------------ the paper's claim, small


def _reproduction():
    """evaluation/reproduce/gs_lora.py as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gs_lora_reproduce", REPO / "evaluation" / "reproduce" / "gs_lora.py")
    reproduce = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = reproduce  # dataclasses look their module up while the class is made
    spec.loader.exec_module(reproduce)
    return reproduce


def test_near_zero_fraction_counts_blocks_the_penalty_emptied():
    near_zero_fraction = _reproduction().near_zero_fraction
    assert near_zero_fraction([12.0, 0.5, 1.3, 0.0]) == 0.5  # under a tenth of the largest block's norm
    assert near_zero_fraction([3.0, 3.0, 2.0]) == 0.0
    assert near_zero_fraction([0.0, 0.0, 0.0, 0.0]) == 1.0  # an adapter shrunk to nothing: every block is empty
    assert near_zero_fraction([2e-4, 1e-4]) == 1.0


@pytest.mark.slow
def test_small_reproduction_forgets_keeps_and_selects_few_blocks(tmp_path):
    """evaluation/reproduce/gs_lora.py at a smaller size with the full run's forgetting hyper-parameters, GS-LoRA
    only: a 6-block ViT on 16-pixel patches (4 tokens + CLS; 30 base epochs at batch 256), then the first two of its
    three tasks x 2 classes with 16-shot replay; the paper's three claims in every task. Seed 0, one thread: base
    36.6 %, Acc_f 0.0 / 2.5 %, kept classes +0.9 / +4.7 points, 5 of 6 blocks near zero in both tasks. (8-pixel
    patches gave a 53 % base and the same verdicts at four times the cost; a weaker base with 8-pixel patches failed:
    with 20 base epochs a later task's forgetting failed on two threads, with 25 task 2 lost 4.8 kept points.)"""
    reproduce = _reproduction()
    setting = reproduce.Setting(patch_size=16, base_epochs=30, base_batch_size=256, base_learning_rate=2e-3,
                                base_warmup_steps=150, num_test=1000, tasks=((8, 9), (6, 7)), methods=("GS-LoRA",))
    results = reproduce.run(setting, tmp_path, log=lambda *_: None)
    rows = results["methods"]["GS-LoRA"]
    assert [r["forget_classes"] for r in rows] == [["semicircle", "arrow"], ["star", "hexagon"]]
    for r in rows:
        assert r["acc_f"] <= 0.10, r  # forgotten classes at or below chance
        assert r["retained_loss"] <= 0.03, r  # kept classes within 3 points of the original model
        assert reproduce.near_zero_fraction(r["block_norms"]) > 0.5, r  # most blocks' LoRA near zero
    assert (tmp_path / "gs_lora_block_norms.png").read_bytes().startswith(b"\x89PNG")


def test_per_task_settings_of_the_official_script():
    """The paper presets carry the script's per-task lists; a task past the list is a clear error."""
    import hfpapers

    record = hfpapers.get_method("gs-lora")
    few_shot = GSLoRAConfig(**record.preset("face-casia100-few-shot"))
    assert [few_shot.for_task(t).beta for t in (1, 2, 3, 4)] == [0.3, 0.4, 0.28, 0.2]
    assert [few_shot.for_task(t).prototype_forget_weight for t in (1, 2, 3, 4)] == [0.015, 0.06, 0.025, 0.012]
    assert (few_shot.batch_size, few_shot.few_shot, few_shot.prototype_bound, few_shot.ema_decay,
            few_shot.ema_start_epoch) == (4, 4, 18.0, 0.9, 30)
    assert GSLoRAConfig(beta=0.5).for_task(7).beta == 0.5  # one value serves every task
    with pytest.raises(ValueError, match=r"beta gives 4 per-task values .*; task 5 has none"):
        few_shot.for_task(5)
    with pytest.raises(ValueError, match="beta=.* out of range"):
        GSLoRAConfig(beta=(0.1, -0.2))
    with pytest.raises(ValueError, match="ema_start_epoch must lie in"):
        GSLoRAConfig(num_epochs=10, ema_start_epoch=10)
