"""Print the project's runtime requirements with the chosen ONNX Runtime build.

The CPU (``onnxruntime``) and GPU (``onnxruntime-gpu``) wheels both provide the ``onnxruntime``
module and overwrite each other's files, so an image must hold exactly one of them. pyproject.toml
names the CPU build; the image builds install these requirements and then the project itself with
``--no-deps``, so the GPU image never downloads the CPU wheel.

    python deploy/requirements.py --ort onnxruntime-gpu > requirements.txt
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

ORT_BUILDS = ("onnxruntime", "onnxruntime-gpu")
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def requirement_name(requirement: str) -> str:
    """The PEP 503 normalised project name of a requirement string."""
    match = _NAME.match(requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def runtime_requirements(pyproject: Path, ort: str) -> list[str]:
    """The ``[project] dependencies`` of ``pyproject``, the ONNX Runtime entry renamed to ``ort``.

    The version specifier stays, so both images get the same ONNX Runtime release line.
    """
    if ort not in ORT_BUILDS:
        raise ValueError(f"ort must be one of {ORT_BUILDS}, got {ort!r}")
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    others = [d for d in dependencies if requirement_name(d) not in ORT_BUILDS]
    ort_entries = [d for d in dependencies if requirement_name(d) in ORT_BUILDS]
    if len(ort_entries) != 1:
        raise ValueError(f"expected one ONNX Runtime dependency in {pyproject}, found {ort_entries}")
    return [*others, _NAME.sub(ort, ort_entries[0], count=1)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ort", choices=ORT_BUILDS, required=True, help="ONNX Runtime build to install")
    parser.add_argument("--pyproject", type=Path, default=Path(__file__).resolve().parent.parent / "pyproject.toml")
    args = parser.parse_args(argv)
    sys.stdout.write("".join(f"{line}\n" for line in runtime_requirements(args.pyproject, args.ort)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
