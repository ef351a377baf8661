#!/usr/bin/env bash
# The wheels a GPU machine without internet may lack (the server's packages, llguidance, jsonschema),
# fetched here into .whl/ for Python 3.12 on x86-64 Linux; scripts/gpu_check.sh installs them there one
# by one. pip uses this machine's own configuration. Usage: bash scripts/device_wheels.sh [DIR]
set -eu
DIR=${1:-.whl}
mkdir -p "$DIR"
python3 -m pip download -q -d "$DIR" --only-binary=:all: --no-deps --python-version 3.12 --implementation cp \
  --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 \
  fastapi starlette pydantic pydantic_core annotated_types typing_inspection typing_extensions uvicorn h11 \
  anyio sniffio click opentelemetry_api "llguidance==1.9.1" jsonschema jsonschema_specifications referencing \
  rpds_py attrs
ls "$DIR"
