#!/usr/bin/env bash
# Wheels for an offline GPU machine (the optional extras fa4 and liger, and brotli), carried within the
# 64 MiB a device call may take. Usage, from the repository root (bench/wheels.py says how):
#   bash bench/wheels.sh pack [DIR]                 here: download into DIR (default .whl/fa4), split the
#                                                   92 MB CUDA-13 libs wheel into xz parts, print the carry lists
#   eval "$(bash bench/wheels.sh install [DIR])"    there, once per call: unpack the parts present, pip
#                                                   install the wheels into /tmp/site, export PYTHONPATH
# PYTHON picks the interpreter (default python3: on the GPU machine a bare pip is another interpreter's).
exec "${PYTHON:-python3}" "$(dirname "$0")/wheels.py" "$@"
