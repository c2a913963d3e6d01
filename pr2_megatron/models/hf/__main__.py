"""``python -m pr2_megatron.models.hf config DIR``: the ``model:`` section for a checkpoint.

Prints the YAML ``model:`` mapping of a run config whose architecture matches the Hugging
Face checkpoint ``DIR`` (``model.hf_checkpoint`` set to it), or the ConversionError saying
why the checkpoint cannot be converted. Run-side keys (``params_dtype``, recompute, the
dispatcher) are the defaults: adjust them in the run config.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import yaml

from pr2_megatron.models.hf.config_map import moe_config_from_hf
from pr2_megatron.models.hf.errors import ConversionError
from pr2_megatron.models.hf.read import read_hf_checkpoint


def model_section(path: str) -> str:
    """YAML of the ``model:`` section for the checkpoint at ``path``."""
    hf_config, _ = read_hf_checkpoint(path)
    model = dataclasses.asdict(moe_config_from_hf(hf_config))
    model["hf_checkpoint"] = str(path)
    return yaml.safe_dump({"model": model}, sort_keys=False)


def main(argv=None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog="python -m pr2_megatron.models.hf")
    commands = parser.add_subparsers(dest="command", required=True)
    config = commands.add_parser("config", help="print the run config's model: section")
    config.add_argument("checkpoint", help="Hugging Face checkpoint directory (config.json)")
    args = parser.parse_args(argv)
    try:
        print(model_section(args.checkpoint), end="")
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
