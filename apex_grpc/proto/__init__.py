"""Generated apex.v1 stubs (do not edit; run scripts/gen_protos.py after changing protos/)."""
