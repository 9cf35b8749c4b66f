"""Regenerate the committed Python stubs in apex_grpc/proto/ from protos/apex/v1/*.proto.

Usage: python scripts/gen_protos.py [--out DIR]   (tests/unit/test_protos.py diffs a fresh run)
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.relative_to(PROTO_ROOT))
                    for p in (PROTO_ROOT / "apex/v1").glob("*.proto"))
    tmp = out_dir / "_gen"
    tmp.mkdir(exist_ok=True)
    args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={tmp}", f"--grpc_python_out={tmp}",
            f"--pyi_out={tmp}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = []
    for src in sorted((tmp / "apex/v1").iterdir()):
        # protoc writes absolute imports (from apex.v1 import x_pb2); make them package-relative.
        text = re.sub(r"^from apex\.v1 import (\w+)", r"from . import \1", src.read_text(),
                      flags=re.M)
        dst = out_dir / src.name
        dst.write_text(text)
        written.append(dst)
        src.unlink()
    for d in (tmp / "apex/v1", tmp / "apex", tmp):
        d.rmdir()
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(ROOT / "apex_grpc/proto"))
    out = pathlib.Path(parser.parse_args().out)
    for path in generate(out):
        print(path.relative_to(out), file=sys.stderr)
