"""The tree's one-way rules and the library's drop-in promises.

* Library packages never import the reference trainer (``pr2_megatron.rl``), and no shipped
  module imports test helpers (``pr2_megatron.testing``, the tests' ``support``).
* A stock-spec Megatron model's state dict loads into the PR2 model on CPU with only the
  predictor keys missing, and gives the same logits.
* Installing the package into an environment that already has torch >= 2.6 and megatron-core
  0.19.x installs neither (pip's resolver, offline).
"""

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pr2_megatron"
LIBRARY = ("routing", "routes", "models", "runtime", "metrics", "examples", "errors", "__init__")
TEST_HELPERS = ("pr2_megatron.testing", "support", "tests")


def imported_modules(source: str, module: str) -> set[str]:
    """Absolute names of every module ``source`` imports (at any depth, lazily or not)."""
    package = module.rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def rule_violations(module: str, source: str) -> list[str]:
    """What ``module`` imports against the tree's rules."""
    names = imported_modules(source, module)
    top = module.split(".")[1] if module.count(".") else "__init__"
    out = []
    if top in LIBRARY:
        out += [
            f"{module} imports the trainer: {n}" for n in names if n.startswith("pr2_megatron.rl")
        ]
    if top != "testing":
        out += [
            f"{module} imports a test helper: {n}"
            for n in names
            if any(n == h or n.startswith(h + ".") for h in TEST_HELPERS)
        ]
    return sorted(out)


def shipped_modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(ROOT).with_suffix("")
        parts = list(relative.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1] + (["__init__"] if len(parts) == 1 else [])
        yield ".".join(parts), path.read_text()


def test_rule_checker_catches_violations():
    trainer = "def f():\n    from pr2_megatron.rl.train import Trainer\n"
    assert rule_violations("pr2_megatron.routes.path", trainer)
    relative = "from ..rl import train\n"
    assert rule_violations("pr2_megatron.routing.specs", relative)
    helper = "from pr2_megatron.testing.moe import global_parameters\n"
    assert rule_violations("pr2_megatron.models.hf", helper)
    assert rule_violations("pr2_megatron.rl.train", helper)
    assert not rule_violations("pr2_megatron.rl.train", trainer)  # the trainer may use itself
    assert not rule_violations("pr2_megatron.testing.moe", "import pr2_megatron.models\n")


def test_library_never_imports_trainer_or_test_helpers():
    modules = dict(shipped_modules())
    assert "pr2_megatron.routes.path" in modules and "pr2_megatron.rl.train" in modules
    violations = [v for name, src in modules.items() for v in rule_violations(name, src)]
    assert violations == []


def test_slurm_harness_is_not_shipped():
    assert not (PACKAGE / "testing" / "slurm.py").exists()
    assert (ROOT / "tests" / "support" / "slurm.py").exists()


# ------------------------------------------------------------ stock Megatron state dict


def test_stock_megatron_state_dict_loads_into_pr2_model(megatron_single):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    from pr2_megatron.models import MoEModelConfig, build_gpt_moe, transformer_config
    from pr2_megatron.routing import RoutingController
    from pr2_megatron.runtime.parallel import ParallelConfig, initialize_parallel

    model_cfg, parallel = MoEModelConfig(num_layers=2, num_experts=4), ParallelConfig()
    initialize_parallel(parallel, seed=3)
    config = transformer_config(model_cfg, parallel)
    stock = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_decoder_block_spec(config, use_transformer_engine=False),
        vocab_size=model_cfg.vocab_size,
        max_sequence_length=model_cfg.max_sequence_length,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
    )
    initialize_parallel(parallel, seed=4)  # other weights: the load must bring them over
    pr2 = build_gpt_moe(model_cfg, parallel)
    result = pr2.load_state_dict(stock.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == [
        f"decoder.layers.{i}.mlp.router.predictor.weight" for i in range(2)
    ]
    RoutingController(pr2).off()
    ids = torch.randint(0, model_cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(8).expand_as(ids)
    with torch.no_grad():
        torch.testing.assert_close(pr2(ids, positions, None), stock(ids, positions, None))


# ---------------------------------------------------------------------------- packaging

FAKE_INSTALLED = {"torch": "2.6.0", "megatron-core": "0.19.2"}


@pytest.mark.slow
def test_install_keeps_existing_torch_and_megatron_core(tmp_path):
    """pip resolves the package against torch 2.6.0 and megatron-core 0.19.2 already installed.

    The venv sees this machine's packages (``--system-site-packages``) and, in front of them,
    distribution metadata that says torch 2.6.0 and megatron-core 0.19.2 are installed. With
    no index at all, any requirement those versions do not meet would fail the resolution.
    """
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    for name, version in FAKE_INSTALLED.items():
        info = Path(site) / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            textwrap.dedent(f"""\
                Metadata-Version: 2.1
                Name: {name}
                Version: {version}
                """)
        )
        (info / "INSTALLER").write_text("pip\n")
        (info / "RECORD").write_text("")
    report = tmp_path / "report.json"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_CONSTRAINT": ""}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [str(python), "-m", "pip", "install", "--dry-run", "--no-index", "--report", str(report),
         "--quiet", *declared_dependencies()],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(report.read_text())["install"] == []  # everything already met


def declared_dependencies() -> list[str]:
    """The package's install requirements, as pyproject.toml declares them."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"]
    assert any(d.startswith("torch") for d in deps) and any("megatron-core" in d for d in deps)
    return deps
