"""The accelerate config files under training/accelerate/ (DDP, FSDP, DeepSpeed ZeRO-2/3), and a tiny model trained
with one of them by two CPU processes over gloo.

FSDP cannot run on CPU through accelerate (1.16): `AcceleratorState` turns a process group into FSDP only when it
is a MULTI_GPU / NPU / XPU / ... group, and on a machine without an accelerator the engine's `Accelerator(cpu=True)`
forms a MULTI_CPU (gloo) group, so fsdp.yaml silently trains with DDP there (torch's own `fully_shard` does work
on CPU with gloo; accelerate does not route to it). The two-process training test therefore runs ddp.yaml, and a
probe pins down what one of fsdp.yaml's processes gets on CPU, so that a future accelerate that shards on CPU is
noticed.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import pytest
import torch

from conftest import REPO, read_json, small_dataset_args

CONFIGS = REPO / "training" / "accelerate"


def launch(config: str, *args, cwd) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file training/accelerate/<config>.yaml --num_processes 2 ...` on a free port."""
    from accelerate.test_utils.testing import get_torch_dist_unique_port

    command = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", str(CONFIGS / config),
               "--num_processes", "2", "--main_process_port", str(get_torch_dist_unique_port()), *map(str, args)]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=300, stdin=subprocess.DEVNULL,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def launcher_env(name: str):
    """The config as accelerate's launcher reads it, and the environment it gives the training processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "-m", "hfpapers", "train"])
    args, config, _ = _validate_launch_command(args)
    if config.distributed_type == "DEEPSPEED":
        args.deepspeed_fields_from_accelerate_config = ",".join(config.deepspeed_config)  # as `launch_command` sets it
        return config, prepare_deepspeed_cmd_env(args)[1]
    return config, prepare_multi_gpu_env(args)


@pytest.mark.parametrize("name, kind, setting", [
    ("ddp.yaml", "MULTI_GPU", None),
    ("fsdp.yaml", "FSDP", ("fsdp_version", 2)),
    ("deepspeed_zero2.yaml", "DEEPSPEED", ("zero_stage", 2)),
    ("deepspeed_zero3.yaml", "DEEPSPEED", ("zero_stage", 3)),
])
def test_config_file_builds_its_accelerate_plugin(name, kind, setting):
    """Each file goes through accelerate's own loader and launcher, and the plugin the training processes build
    from the launcher's environment accepts every value."""
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

    import hfpapers

    config, env = launcher_env(name)
    assert config.distributed_type == kind
    if setting is not None:
        section = config.fsdp_config if kind == "FSDP" else config.deepspeed_config
        assert section[setting[0]] == setting[1]
    with mock.patch.dict(os.environ, env, clear=True):
        if kind == "FSDP":
            plugin = FullyShardedDataParallelPlugin()
            assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
            # No class list in the file: accelerate wraps the model's `_no_split_modules`, the B-MLP blocks here.
            plugin.set_auto_wrap_policy(hfpapers.create_model("scaling-mlp", preset="tiny"))
            assert plugin.transformer_cls_names_to_wrap == ["BottleneckBlock"]
        elif kind == "DEEPSPEED":
            plugin = DeepSpeedPlugin()
            assert plugin.deepspeed_config["zero_optimization"]["stage"] == setting[1]
            # Left to the engine's --gradient-accumulation-steps.
            assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"


@pytest.mark.skipif(torch.accelerator.is_available(), reason="the CPU-only behaviour of fsdp.yaml")
def test_fsdp_config_on_cpu_forms_a_gloo_ddp_group():
    """What one of fsdp.yaml's processes gets from accelerate on a machine without an accelerator."""
    from accelerate.test_utils.testing import get_torch_dist_unique_port

    _, env = launcher_env("fsdp.yaml")
    assert env["ACCELERATE_USE_FSDP"] == "true"
    # A process group of one, as torchrun would start it; `cpu=True` is what the engine passes here.
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(get_torch_dist_unique_port()), OMP_NUM_THREADS="1")
    probe = textwrap.dedent("""
        import torch
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
        model = accelerator.prepare(torch.nn.Linear(4, 2))
        print(accelerator.distributed_type.value, torch.distributed.get_backend(), type(model).__name__)
    """)
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["MULTI_CPU", "gloo", "DistributedDataParallel"]


@pytest.mark.slow
def test_ddp_config_trains_with_two_cpu_processes_from_the_installed_package(tmp_path):
    out = tmp_path / "run"
    # cwd away from the checkout: `-m hfpapers` must come from the installed package.
    launch("ddp.yaml", "-m", "hfpapers", "train", "scaling-mlp", "--preset", "tiny", "--output-dir", out,
           "--epochs", "1", "--batch-size", "64", "--no-progress", *small_dataset_args(), cwd=tmp_path)
    results = read_json(out / "train_results.json")
    # 256 training examples, 64 per process and step: each of the 2 ranks takes 2 of the 4 batches.
    assert results["examples_per_process"] == [128, 128]
    assert read_json(out / "hfpapers_run.json")["num_processes"] == 2
    assert (out / "model.safetensors").exists() and (out / "README.md").exists()
