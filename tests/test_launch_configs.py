"""Every shipped launch file parses and is consistent: ds_configs/*.json, launch/accelerate/*.yaml, the hostfile
example and the shell/sbatch scripts. One slow test runs a real 2-process DeepSpeed ZeRO-3 job on CPU (gloo)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DS_DIR = ROOT / "ds_configs"
ACCEL_DIR = ROOT / "launch" / "accelerate"
SCRIPTS = [
    ROOT / "launch" / "slurm" / "accelerate.sbatch",
    ROOT / "launch" / "slurm" / "deepspeed.sbatch",
    ROOT / "launch" / "deepspeed_multinode.sh",
]

EXPECTED_STAGE = {"zero0.json": 0, "zero1.json": 1, "zero2.json": 2, "zero3.json": 3, "zero3_offload.json": 3}
# Accelerate fills these "auto" values from the recipe (dataloader batch size, plugin, Accelerator precision).
AUTO_ALLOWED = {
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "bf16.enabled",
    "fp16.enabled",
}
# Sizes Accelerate can only derive from model.config.hidden_size (absent on ragtrain's wrapper module) or never
# fills: they must be explicit integers.
BUCKET_KEYS = {
    0: [],
    1: ["reduce_bucket_size", "allgather_bucket_size"],
    2: ["reduce_bucket_size", "allgather_bucket_size"],
    3: [
        "reduce_bucket_size",
        "stage3_prefetch_bucket_size",
        "stage3_param_persistence_threshold",
        "stage3_max_live_parameters",
        "stage3_max_reuse_distance",
    ],
}
# With deepspeed_config_file, accelerate refuses these accelerate-config keys (they belong in the JSON / recipe).
FORBIDDEN_WITH_DS_FILE = {
    "gradient_accumulation_steps",
    "gradient_clipping",
    "zero_stage",
    "offload_optimizer_device",
    "offload_param_device",
    "offload_optimizer_nvme_path",
    "offload_param_nvme_path",
    "zero3_save_16bit_model",
    "mixed_precision",
}

DS_FILES = sorted(DS_DIR.glob("*.json"))
YAML_FILES = sorted(ACCEL_DIR.glob("*.yaml"))


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def test_expected_files_exist():
    assert {p.name for p in DS_FILES} >= set(EXPECTED_STAGE)
    assert {p.name for p in YAML_FILES} >= {
        "zero2.yaml",
        "zero3.yaml",
        "zero3_offload.yaml",
        "multinode_zero3.yaml",
        "cpu_2proc_zero2.yaml",
        "cpu_2proc_zero3.yaml",
    }
    for p in SCRIPTS + [ROOT / "launch" / "hostfile.example", ROOT / "launch" / "README.md"]:
        assert p.is_file(), p


@pytest.mark.parametrize("path", DS_FILES, ids=lambda p: p.name)
def test_ds_config(path):
    cfg = json.loads(path.read_text())
    zero = cfg["zero_optimization"]
    stage = zero["stage"]
    assert stage == EXPECTED_STAGE.get(path.name, stage)
    # The trainer builds AdamW (param group per sub-model) and the LR schedule itself.
    assert "optimizer" not in cfg and "scheduler" not in cfg
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert cfg[key] == "auto", key
    assert cfg["bf16"]["enabled"] == "auto" and cfg["fp16"]["enabled"] == "auto"
    autos = {k for k, v in flatten(cfg).items() if v == "auto"}
    assert autos <= AUTO_ALLOWED, autos - AUTO_ALLOWED
    for key in BUCKET_KEYS[stage]:
        assert isinstance(zero[key], int) and not isinstance(zero[key], bool) and zero[key] > 0, key
    if stage:
        assert zero["overlap_comm"] is True and zero["contiguous_gradients"] is True
    if stage == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    if "offload" in path.name:
        for sect in ("offload_optimizer", "offload_param"):
            assert zero[sect] == {"device": "cpu", "pin_memory": True}
    else:
        assert "offload_optimizer" not in zero and "offload_param" not in zero


@pytest.mark.parametrize("path", DS_FILES, ids=lambda p: p.name)
def test_ds_config_zero_section_validates_with_deepspeed(path):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig  # extra keys are forbidden

    zero = json.loads(path.read_text())["zero_optimization"]
    parsed = DeepSpeedZeroConfig(**zero)
    assert int(parsed.stage) == zero["stage"]
    if zero["stage"]:
        assert parsed.reduce_bucket_size == zero["reduce_bucket_size"]


@pytest.mark.parametrize("path", DS_FILES, ids=lambda p: p.name)
def test_accelerate_fills_every_auto_for_a_wrapper_model(path, monkeypatch):
    """Replays what Accelerate does in prepare() for a model with no config.hidden_size: no "auto" may remain."""
    pytest.importorskip("deepspeed")
    from accelerate.utils import DeepSpeedPlugin

    for name in list(os.environ):
        if name.startswith("ACCELERATE_"):
            monkeypatch.delenv(name)
    plugin = DeepSpeedPlugin(hf_ds_config=str(path), gradient_accumulation_steps=2, gradient_clipping=0.7)
    plugin.set_mixed_precision("bf16")
    micro, world = 4, 8
    plugin.deepspeed_config_process(
        must_match=False,
        **{
            "gradient_clipping": 1.0,  # Accelerate's fallback; the plugin value must win
            "zero_optimization.stage3_gather_16bit_weights_on_model_save": False,
            "train_micro_batch_size_per_gpu": micro,
            "train_batch_size": micro * 2 * world,
        },
    )
    cfg = plugin.deepspeed_config
    left = [k for k, v in flatten(cfg).items() if v == "auto"]
    assert left == []
    assert cfg["gradient_clipping"] == 0.7
    assert cfg["gradient_accumulation_steps"] == 2
    assert cfg["train_batch_size"] == 64
    assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
    if cfg["zero_optimization"]["stage"] == 3:
        assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_accelerate_yaml(path):
    cfg = yaml.safe_load(path.read_text())
    assert cfg["distributed_type"] == "DEEPSPEED"
    assert cfg["compute_environment"] == "LOCAL_MACHINE"
    assert cfg.get("use_cpu", False) is False
    ds = cfg["deepspeed_config"]
    ds_file = ROOT / ds["deepspeed_config_file"]
    assert ds_file.is_file(), ds_file
    assert ds_file.parent == DS_DIR
    clash = (set(ds) | set(cfg)) & FORBIDDEN_WITH_DS_FILE
    assert not clash, f"accelerate rejects {clash} together with deepspeed_config_file"
    assert isinstance(cfg["num_processes"], int) and cfg["num_processes"] >= 1
    assert cfg["num_processes"] % cfg["num_machines"] == 0
    if path.name.startswith("cpu_2proc"):
        assert cfg["num_processes"] == 2 and cfg["num_machines"] == 1
        stage = json.loads(ds_file.read_text())["zero_optimization"]["stage"]
        assert path.stem.endswith(f"zero{stage}")
    if path.name.startswith("multinode"):
        assert cfg["num_machines"] >= 2
        assert "main_process_ip" in cfg and "machine_rank" in cfg


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_accelerate_yaml_loads_with_accelerate(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert str(cfg.distributed_type).endswith("DEEPSPEED")


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_scripts_bash_syntax(path):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    res = subprocess.run([bash, "-n", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    text = path.read_text()
    assert "train.py" in text and "--config" in text
    if path.suffix == ".sbatch":
        assert "#SBATCH --nodes=" in text
        assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1' in text
        assert "srun" in text and "$SLURM_NODEID" in text


def test_hostfile_example_parses_with_deepspeed():
    pytest.importorskip("deepspeed")
    from deepspeed.launcher.runner import _parse_hostfile

    lines = (ROOT / "launch" / "hostfile.example").read_text().splitlines()
    pool = _parse_hostfile(lines)
    assert list(pool.values()) == [8, 8]


@pytest.mark.slow
def test_two_process_zero3_on_cpu_via_accelerate_launch():
    """Real run: accelerate launch + cpu_2proc_zero3.yaml + gloo, partitioned params gathered on every rank."""
    pytest.importorskip("deepspeed")
    accelerate_bin = Path(sys.executable).with_name("accelerate")
    if not accelerate_bin.exists():
        pytest.skip("accelerate CLI not found next to the interpreter")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    res = subprocess.run(
        [
            str(accelerate_bin),
            "launch",
            "--config_file",
            "launch/accelerate/cpu_2proc_zero3.yaml",
            "launch/check_deepspeed_cpu.py",
            "--config",
            "ignored.yaml",
            "train.max_steps=2",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=570,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "CHECK OK world_size=2 zero_stage=3" in out, out[-4000:]
    # Ranks print concurrently; split on the marker rather than on newlines.
    lines = ["[check]" + chunk.split("\n")[0] for chunk in out.split("[check]")[1:]]
    assert len(lines) == 2, lines
    for ln in lines:
        assert "backend=gloo" in ln and "distributed_type=DistributedType.DEEPSPEED" in ln
        assert "local_numel=0 gathered_numel=256" in ln
