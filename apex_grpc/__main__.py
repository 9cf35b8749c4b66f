"""`python -m apex_grpc ...` is the `apex-grpc` console script."""

from __future__ import annotations

import sys

from apex_grpc.cli import main

sys.exit(main())
